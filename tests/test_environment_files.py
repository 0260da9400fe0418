"""The dependency lists of pyproject.toml, environment.yml and binder/environment.yml agree."""
from __future__ import annotations

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


def test_binder_post_build_installs_the_kit():
    post_build = (ROOT / "binder" / "postBuild").read_text()
    assert "pip install" in post_build and " -e ." in post_build


def test_python_version_agrees():
    requires = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["requires-python"]
    assert requires == ">=3.11"
    for path in (ROOT / "environment.yml", ROOT / "binder" / "environment.yml"):
        assert "python=3.11" in path.read_text()
