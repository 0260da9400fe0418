"""The dependency lists of pyproject.toml, environment.yml and binder/environment.yml agree."""
from __future__ import annotations

import shlex
import tomllib
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parent.parent


def _pyproject_requirements() -> set[str]:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    return set(project["dependencies"]) | set(project["optional-dependencies"]["dev"])


def _conda_pip_requirements(path: Path) -> set[str]:
    env = yaml.safe_load(path.read_text())
    pip_lists = [d["pip"] for d in env["dependencies"] if isinstance(d, dict) and "pip" in d]
    assert len(pip_lists) == 1, f"{path} must have exactly one pip: section"
    # Options (--extra-index-url) and the editable install of the kit itself are not requirements.
    return {r for r in pip_lists[0] if not r.startswith("-")}


def test_environment_yml_matches_pyproject():
    assert _conda_pip_requirements(ROOT / "environment.yml") == _pyproject_requirements()


def test_binder_environment_matches_pyproject():
    assert _conda_pip_requirements(ROOT / "binder" / "environment.yml") == _pyproject_requirements()


def _post_build_commands(text: str) -> list[list[str]]:
    return [shlex.split(line) for line in text.splitlines() if line.strip() and not line.lstrip().startswith("#")]


def _post_build_problems(text: str) -> list[str]:
    """What would make Binder's build wrong: a failing step that does not stop it, no editable install of
    the kit (without re-resolving the pinned environment), or a script that does not exist."""
    commands = _post_build_commands(text)
    problems = []
    if ["set", "-euo", "pipefail"] not in commands:
        problems.append("no `set -euo pipefail`: a failing step would not fail the build")
    if ["python", "-m", "pip", "install", "--no-deps", "-e", "."] not in commands:
        problems.append("no `python -m pip install --no-deps -e .` (the kit, over binder/environment.yml)")
    for cmd in commands:
        if cmd[0] == "python" and cmd[1].endswith(".py") and not (ROOT / cmd[1]).is_file():
            problems.append(f"{cmd[1]} does not exist")
    return problems


def test_binder_post_build_installs_the_kit():
    assert _post_build_problems((ROOT / "binder" / "postBuild").read_text()) == []
    # ...and flags the broken scripts it guards against.
    assert len(_post_build_problems("pip install -e .\npython data_scripts/gone.py\n")) == 3


def test_python_version_agrees():
    requires = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["requires-python"]
    assert requires == ">=3.11"
    for path in (ROOT / "environment.yml", ROOT / "binder" / "environment.yml"):
        assert "python=3.11" in path.read_text()
