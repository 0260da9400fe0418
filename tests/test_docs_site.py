"""The rendered pages (``make docs``, ``docs/build_site.py``) on tiny generated notebooks: no papermill, seconds.

A page must show its figures (embedded, not linked to files that are not there), the index must list every
notebook in order with its title, and the build must refuse what CI must not publish: a notebook that
was not executed, an executed copy older than its notebook or of a failed run, a page or an image missing.
"""
from __future__ import annotations

import base64
import importlib.util
import io
import json
import os
import sys
from pathlib import Path
from typing import Any

import nbformat
import pytest

ROOT = Path(__file__).resolve().parent.parent


def _load_builder():
    spec = importlib.util.spec_from_file_location("build_site", ROOT / "docs" / "build_site.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["build_site"] = module
    spec.loader.exec_module(module)
    return module


bs = _load_builder()


def _png() -> str:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(1, 1))
    ax.plot([0, 1], [0, 1])
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png")
    plt.close(fig)
    return base64.b64encode(buffer.getvalue()).decode()


PNG = _png()


def _notebook(path: Path, title: str, *, figure: bool = True, failed: bool = False) -> Path:
    """A notebook as papermill leaves it: a title cell, a code cell with a figure output, papermill metadata."""
    nb = nbformat.v4.new_notebook()
    nb.cells.append(nbformat.v4.new_markdown_cell(f"# {title}\n\nWhat this notebook teaches."))
    code = nbformat.v4.new_code_cell("plt.plot([0, 1])", execution_count=1)
    if figure:
        code.outputs = [nbformat.v4.new_output("display_data", data={"image/png": PNG, "text/plain": "<Figure>"})]
    nb.cells.append(code)
    nb.metadata["papermill"] = {"parameters": {"NUM_ROUNDS": 3, "OUTPUT_DIR": "/tmp/x"}, "exception": failed}
    path.parent.mkdir(parents=True, exist_ok=True)
    nbformat.write(nb, path)
    return path


@pytest.fixture
def layout(tmp_path: Path) -> dict[str, Path]:
    notebooks, executed, site = tmp_path / "notebooks", tmp_path / "executed", tmp_path / "site"
    for stem, title in [("00_data", "Data and institutions"), ("07b_auditing", "Auditing"), ("07_attacks", "Attacks")]:
        _notebook(notebooks / f"{stem}.ipynb", title, figure=False)
    for source in notebooks.iterdir():
        _notebook(executed / source.name, bs.notebook_title(json.loads(source.read_text()), source.stem))
    return {"notebooks": notebooks, "executed": executed, "site": site}


def _no_run(*args: Any, **kwargs: Any) -> None:
    raise AssertionError("nothing should be executed here")


def test_the_site_renders_every_notebook_with_embedded_figures_and_an_ordered_index(layout):
    pages = bs.build_site(layout["notebooks"], layout["executed"], layout["site"], require_executed=True, run=_no_run)
    assert [p.stem for p in pages] == ["00_data", "07_attacks", "07b_auditing"]
    assert [p.title for p in pages] == ["Data and institutions", "Attacks", "Auditing"]
    for page in pages:
        text = (layout["site"] / page.html_name).read_text()
        assert "data:image/png;base64," in text and page.figures == 1
    index = (layout["site"] / "index.html").read_text()
    positions = [index.index(f'href="{name}.html"') for name in ("00_data", "07_attacks", "07b_auditing")]
    assert positions == sorted(positions) and "Auditing" in index and "NUM_ROUNDS=3" in index
    assert "OUTPUT_DIR" not in index
    assert bs.check_site(layout["site"], bs.notebook_sources(layout["notebooks"])) == []


def test_a_missing_executed_notebook_is_an_error_in_ci_and_executed_otherwise(layout):
    (layout["executed"] / "07_attacks.ipynb").unlink()
    with pytest.raises(bs.SiteError, match=r"07_attacks.ipynb: not executed"):
        bs.build_site(layout["notebooks"], layout["executed"], layout["site"], require_executed=True, run=_no_run)
    calls = []

    def fake_run(source: Path, output: Path, parameters: dict[str, Any], *, workdir: Path) -> Path:
        calls.append((source.name, parameters["NUM_ROUNDS"], parameters["SMOKE"], Path(parameters["OUTPUT_DIR"]).parent))
        assert workdir.is_dir()
        return _notebook(output, "Attacks")

    bs.build_site(layout["notebooks"], layout["executed"], layout["site"], run=fake_run)
    assert [c[:3] for c in calls] == [("07_attacks.ipynb", 3, True)]  # only the missing one, at the smoke settings
    assert (layout["site"] / "07_attacks.html").is_file()


def test_a_stale_or_failed_executed_copy_is_refused(layout):
    stale = layout["executed"] / "00_data.ipynb"
    os.utime(stale, (0, 0))  # older than its notebook
    with pytest.raises(bs.SiteError, match="00_data.ipynb: its executed copy is older than the notebook"):
        bs.build_site(layout["notebooks"], layout["executed"], layout["site"], require_executed=True, run=_no_run)
    _notebook(stale, "Data", failed=True)
    with pytest.raises(bs.SiteError, match="00_data.ipynb: its executed copy is of a failed run"):
        bs.build_site(layout["notebooks"], layout["executed"], layout["site"], require_executed=True, run=_no_run)


def test_the_check_flags_a_missing_page_an_unlisted_page_and_missing_images(layout):
    site, sources = layout["site"], bs.notebook_sources(layout["notebooks"])
    bs.build_site(layout["notebooks"], layout["executed"], site, require_executed=True, run=_no_run)
    (site / "07b_auditing.html").unlink()
    page = site / "00_data.html"
    page.write_text(page.read_text() + '<img src="figures/roc.png"><img src="https://example.org/x.png">'
                                       '<svg><image href="missing.svg"/></svg>')
    index = site / "index.html"
    index.write_text(index.read_text().replace('href="07_attacks.html"', 'href="elsewhere.html"'))
    problems = bs.check_site(site, sources)
    assert any("07b_auditing.ipynb did not render" in p for p in problems)
    assert any("index.html does not list 07_attacks.html" in p for p in problems)
    assert any("'figures/roc.png' does not exist" in p for p in problems)
    assert any("https://example.org/x.png" in p and "not embedded" in p for p in problems)
    assert any("'missing.svg' does not exist" in p for p in problems)
    assert len(problems) == 5, problems
    (site / "figures").mkdir()
    (site / "figures" / "roc.png").write_bytes(base64.b64decode(PNG))  # a file of the site counts
    assert len(bs.check_site(site, sources)) == 4


def test_main_reports_a_clear_error(layout, capsys):
    (layout["executed"] / "00_data.ipynb").unlink()
    argv = ["--notebooks", str(layout["notebooks"]), "--executed", str(layout["executed"]), "--site",
            str(layout["site"]), "--require-executed"]
    assert bs.main(argv) == 1
    assert "make docs: error:" in capsys.readouterr().err
