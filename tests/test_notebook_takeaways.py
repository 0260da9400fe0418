"""No markdown cell states a result: numbers a notebook measured reach the reader only through cells that compute
them from the notebook's own results (``display(Markdown(f"..."))``), never as typed text (issue 24).

Unit tier, no execution: every markdown cell of every notebook is scanned for numeric literals that look like
results (decimals such as 0.707, percentages, thousands such as 3,000). Each one must be a definitional constant
of :data:`ALLOWED`, which says why it is not a result and where it may appear. Section references
("docs/DESIGN.md 4.6", "## 6 · ...") are not numbers of the text and are skipped.
"""
from __future__ import annotations

import re
from pathlib import Path

import nbformat
import pytest

NOTEBOOK_DIR = Path(__file__).resolve().parent.parent / "notebooks"
NOTEBOOKS = sorted(NOTEBOOK_DIR.glob("[0-9][0-9]*_*.ipynb"))

#: Decimals, percentages and comma-grouped thousands: the shapes a typed result takes.
RESULT_LIKE = re.compile(r"(?<![\w.])(\d+\.\d+|\d+(?:\.\d+)?\s?%|\d{1,3}(?:,\d{3})+)(?![\w.])")
#: References to sections of the design notes and numbered headings: labels, not quantities.
REFERENCES = re.compile(r"docs/DESIGN.md\s+\d+(?:\.\d+)?(?:\s*,\s*\d+(?:\.\d+)?)*|^#+\s.*$", re.MULTILINE)

#: value -> (why it is not a measured result, the notebooks (stem prefixes) where it may appear).
ALLOWED: dict[str, tuple[str, tuple[str, ...]]] = {
    "0.5": ("chance level of an AUC, and the shared label skew alpha of configs/notebooks.yaml", ("05", "06", "07")),
    "0.1": ("a chosen setting: alpha = 0.1 (extreme skew), sample rate q = 0.1 in exercises, an FPR of 0.1 %",
            ("02", "03", "05", "06", "07")),
    "0.05": ("an exercise's input (alpha = 0.05)", ("00",)),
    "1.0": ("a recipe constant of the ablation table (gradient clipping at 1.0)", ("01",)),
    "95%": ("the confidence level of an interval or test (a definition)", ("01", "06", "07b")),
    "1%": ("the FPR operating point at which TPR is reported (a definition)", ("07",)),
    "50%": ("random guessing on a balanced membership question", ("07",)),
    "52.1": ("the paper's published figure, quoted as the claim under test (not ours)", ("07",)),
    "70%": ("NB07's own split: validation 0.2 + test 0.5 of each site are the non-members (a setting)", ("07",)),
    "80 %": ("an exercise's question (a threshold to count sites against)", ("00",)),
    "3.5": ("pixel size of a 64 px slice of a brain-sized field of view (geometry, not a result)", ("00",)),
    "1.5": ("the field strength of older clinical scanners, 1.5 T (domain fact)", ("00",)),
    "1.1": ("ln(3), the KL divergence of a complete change of mind over 3 classes (maths)", ("05",)),
    "3.7": ("the constant of the distinguishing test's ceiling ln(n / 3.7) with n runs per world (maths of the test)",
            ("07b",)),
}


def result_like_numbers(markdown: str) -> list[str]:
    """The result-shaped numeric literals of one markdown cell, section references removed."""
    return [m.group(1) for m in RESULT_LIKE.finditer(REFERENCES.sub(" ", markdown))]


def _offences(path: Path) -> list[str]:
    nb = nbformat.read(path, as_version=4)
    found = []
    for index, cell in enumerate(nb.cells):
        if cell.cell_type != "markdown":
            continue
        for number in result_like_numbers(cell.source):
            reason = ALLOWED.get(number)
            if reason is None or not path.stem.startswith(reason[1]):
                found.append(f"cell {index}: {number!r}")
    return found


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_markdown_states_no_typed_result(path: Path):
    offences = _offences(path)
    assert not offences, (
        f"{path.name} types result-like numbers in markdown: {offences}. Compute them from the notebook's results "
        "(display(Markdown(f'...')) in a code cell) or reword; a definitional constant goes into ALLOWED with a reason.")


def test_the_scan_finds_typed_results_and_skips_references():
    assert result_like_numbers("FedAvg reached 0.707 [0.61, 0.80] on 3,000 subjects, 12% better") == [
        "0.707", "0.61", "0.80", "3,000", "12%"]
    assert result_like_numbers("## 6 · Masks (docs/DESIGN.md 4.4, 4.6)\nsee docs/DESIGN.md 4.2") == []
    assert result_like_numbers("z = 2 and epsilon 8 over 100 rounds") == []  # settings as small integers pass


def test_every_allowed_constant_is_used():
    """An allow-list entry nothing needs is dead weight that could hide a result later: remove it."""
    used = {n for path in NOTEBOOKS for cell in nbformat.read(path, as_version=4).cells
            if cell.cell_type == "markdown" for n in result_like_numbers(cell.source)}
    assert set(ALLOWED) <= used, f"unused allow-list entries: {sorted(set(ALLOWED) - used)}"


def test_a_planted_result_is_flagged(tmp_path: Path):
    """The notebook scan fails a markdown cell that types a measured number, and passes it once computed."""
    nb = nbformat.v4.new_notebook()
    nb.cells = [nbformat.v4.new_markdown_cell("# 02 · Planted"),
                nbformat.v4.new_markdown_cell("FedAvg reaches 0.707 balanced accuracy (0.5 is chance)."),
                nbformat.v4.new_code_cell('display(Markdown(f"FedAvg reaches {acc:.3f}"))')]
    path = tmp_path / "02_planted.ipynb"
    nbformat.write(nb, path)
    assert _offences(path) == ["cell 1: '0.707'", "cell 1: '0.5'"]  # 0.5 is allowed in 05-07 only
    nb.cells[1].source = "FedAvg's balanced accuracy is printed below."
    nbformat.write(nb, path)
    assert _offences(path) == []
