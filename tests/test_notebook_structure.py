"""Every notebook follows the same skeleton and is committed without outputs.

Skeleton (STYLE.md, practice 2): title (markdown) -> setup (Colab-aware install) -> imports ending
with the environment printout -> exactly one ``parameters``-tagged cell of UPPER_CASE assignments ->
body -> a cell that records results -> cleanup.
"""
from __future__ import annotations

import ast
from pathlib import Path

import nbformat
import pytest

NOTEBOOK_DIR = Path(__file__).resolve().parent.parent / "notebooks"
NOTEBOOKS = sorted(NOTEBOOK_DIR.glob("[0-9][0-9]*_*.ipynb"))


def test_there_are_notebooks():
    assert NOTEBOOKS, f"no notebooks found in {NOTEBOOK_DIR}"


def test_notebooks_are_numbered_without_gaps():
    numbers = sorted({int(p.name[:2]) for p in NOTEBOOKS})  # 07 and 07b share a number
    assert numbers == list(range(len(numbers))), f"notebook numbers {numbers} have gaps"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_skeleton(path: Path):
    nb = nbformat.read(path, as_version=4)
    cells = nb.cells
    code = [c for c in cells if c.cell_type == "code"]
    assert cells[0].cell_type == "markdown" and cells[0].source.startswith("# "), "first cell must be a '# Title'"
    assert "google.colab" in code[0].source, "first code cell must be the Colab-aware setup"
    assert "describe_environment(" in code[1].source, "second code cell must be imports ending in describe_environment()"
    tagged = [c for c in cells if "parameters" in c.metadata.get("tags", [])]
    assert len(tagged) == 1, f"expected exactly one 'parameters' cell, found {len(tagged)}"
    assert tagged[0] is code[2], "the parameters cell must be the third code cell"
    for node in ast.parse(tagged[0].source).body:
        assert isinstance(node, (ast.Assign, ast.AnnAssign)), "the parameters cell holds assignments only"
        targets = node.targets if isinstance(node, ast.Assign) else [node.target]
        for target in targets:
            assert isinstance(target, ast.Name) and target.id.isupper(), f"parameter {ast.unparse(target)} must be UPPER_CASE"
    assert any("record_results(" in c.source for c in code), "a cell must call record_results()"
    assert "cleanup" in code[-1].source.lower(), "the last code cell must be the cleanup cell"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_committed_without_outputs(path: Path):
    nb = nbformat.read(path, as_version=4)
    for cell in nb.cells:
        if cell.cell_type == "code":
            assert not cell.outputs and cell.execution_count is None, f"{path.name} has outputs: run `make notebooks-clean`"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_no_algorithm_defined_in_notebook(path: Path):
    """Models, training loops and DP maths live in mmpfl_core (STYLE.md, practice 4)."""
    nb = nbformat.read(path, as_version=4)
    for cell in nb.cells:
        if cell.cell_type != "code":
            continue
        source = "\n".join(l for l in cell.source.splitlines() if not l.lstrip().startswith(("!", "%")))
        for node in ast.walk(ast.parse(source)):
            if isinstance(node, ast.ClassDef):
                pytest.fail(f"{path.name} defines class {node.name}; move it into mmpfl_core")
