"""The notebooks' Colab setup cells and the README agree with the one repository URL, and every
notebook's ``COHORT_PATH`` parameter is read by its body (a parameter nothing reads is a defect).

The URL lives in ``pyproject.toml`` ``[project.urls] Repository``; the setup cell cannot import it
(on Colab nothing is installed yet), so it holds a copy that this test keeps honest.
"""
from __future__ import annotations

import ast
import re
import tomllib
from pathlib import Path

import nbformat
import pytest

ROOT = Path(__file__).resolve().parent.parent
NOTEBOOKS = sorted((ROOT / "notebooks").glob("[0-9][0-9]*_*.ipynb"))
REPO_URL = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["urls"]["Repository"]
#: Notebooks whose body cannot take a user's cohort yet, with the reason (shown if the list goes stale).
NO_COHORT: dict[str, str] = {}


def _code(path: Path) -> list:
    return [c for c in nbformat.read(path, as_version=4).cells if c.cell_type == "code"]


def _assigned(source: str) -> dict[str, object]:
    """Top-level ``NAME = literal`` assignments of a cell."""
    out = {}
    for node in ast.parse(source).body:
        if isinstance(node, ast.Assign) and len(node.targets) == 1 and isinstance(node.targets[0], ast.Name):
            try:
                out[node.targets[0].id] = ast.literal_eval(node.value)
            except ValueError:
                pass
    return out


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_colab_cell_installs_from_the_one_repository_url(path: Path):
    setup = _code(path)[0].source
    assert _assigned(setup).get("REPO_URL") == REPO_URL, f"{path.name}: REPO_URL must equal pyproject's {REPO_URL}"
    assert "google.colab" in setup and "git" in setup and "pip" in setup
    assert "github.com" not in setup.replace(f'"{REPO_URL}"', ""), f"{path.name}: a second URL in the setup cell"


def test_readme_links_use_the_repository_url():
    readme = (ROOT / "README.md").read_text()
    owner_repo = REPO_URL.removeprefix("https://github.com/")
    links = re.findall(r"https://(?:colab\.research\.google\.com/github|mybinder\.org/v2/gh|github\.com)/[^\s)>\]]+", readme)
    assert links, "README must link Colab and Binder"
    for link in links:
        assert owner_repo in link, f"README link {link} does not use {REPO_URL}"
    assert any("colab.research.google.com" in l for l in links) and any("mybinder.org" in l for l in links)


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_cohort_path_parameter_is_read_by_the_body(path: Path):
    code = _code(path)
    params = _assigned(code[2].source)
    if path.stem in NO_COHORT:
        assert "COHORT_PATH" not in params, f"{path.stem} reads COHORT_PATH now: remove it from NO_COHORT"
        return
    assert "COHORT_PATH" in params and params["COHORT_PATH"] is None, f"{path.name}: add COHORT_PATH = None"
    body = "\n".join(c.source for c in code[3:])
    # In-process notebooks call with_cohort; notebook 08 passes the Flower app's `cohort` key, which calls it.
    assert re.search(r"with_cohort\(.*COHORT_PATH|cohort=str\(COHORT_PATH\)", body), (
        f"{path.name}: the body must pass COHORT_PATH to mmpfl_core.experiment.with_cohort(config, COHORT_PATH)")
