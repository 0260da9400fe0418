"""Build the rendered pages: every teaching notebook, executed, as HTML with its figures, plus an index.

``make docs`` runs this. Sources:

* the executed notebooks the notebook tests keep (``build/executed/``, or ``$MMPFL_EXECUTED_NOTEBOOKS``;
  :mod:`mmpfl_core.notebook_tools.execute`): ``make test`` in CI leaves one per notebook, run at the
  smoke settings, and this script renders those, so CI does not run the notebooks twice;
* a notebook with no executed copy, an executed copy older than the notebook, or a copy of a failed
  run is executed here at the smoke settings with the SAME helper the tests use
  (:func:`~mmpfl_core.notebook_tools.execute.execute_notebook`), unless ``--require-executed`` is given
  (CI), which turns each of them into an error instead.

Output (``site/`` by default, git-ignored): ``<notebook>.html`` for each notebook (nbconvert's lab
template, every figure embedded as a data URI, Markdown images too) and ``index.html`` listing them in
order with their titles and the parameters each ran with. Then a check: every notebook in
``notebooks/`` has its page and an index entry, and every image a page references exists (an embedded
``data:`` URI, or a file under ``site/``); the script exits with status 1 and names each problem
otherwise.

Usage::

    python docs/build_site.py [--notebooks notebooks] [--executed build/executed] [--site site] [--require-executed]
"""

from __future__ import annotations

import argparse
import html
import json
import sys
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from html.parser import HTMLParser
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # `python docs/build_site.py` from a checkout without the editable install
    sys.path.insert(0, str(ROOT))

from mmpfl_core.notebook_tools import SMOKE_PARAMETERS  # noqa: E402
from mmpfl_core.notebook_tools.execute import execute_notebook, executed_dir  # noqa: E402

#: Notebook files that are pages: numbered, in name order (``07_...`` before ``07b_...`` before ``08_...``).
NOTEBOOK_GLOB = "[0-9][0-9]*.ipynb"


class SiteError(RuntimeError):
    """The site cannot be built or failed its check; the message names every problem and the fix."""


@dataclass(frozen=True)
class Page:
    stem: str
    title: str
    html_name: str
    parameters: dict[str, Any]
    figures: int


def notebook_sources(notebooks: Path) -> list[Path]:
    return sorted(notebooks.glob(NOTEBOOK_GLOB))


def notebook_title(notebook: dict[str, Any], default: str) -> str:
    """The first Markdown heading of the notebook (``# Title`` -> ``Title``), else ``default``."""
    for cell in notebook.get("cells", []):
        if cell.get("cell_type") != "markdown":
            continue
        for line in "".join(cell.get("source", "")).splitlines():
            if line.lstrip().startswith("#"):
                return line.lstrip().lstrip("#").strip() or default
    return default


def _failed(notebook: dict[str, Any]) -> bool:
    return bool(notebook.get("metadata", {}).get("papermill", {}).get("exception"))


def executed_problem(source: Path, executed: Path) -> str | None:
    """Why ``executed`` cannot be rendered as ``source``'s page (missing, older than the notebook, a failed run)."""
    if not executed.is_file():
        return "not executed"
    if executed.stat().st_mtime < source.stat().st_mtime:
        return "its executed copy is older than the notebook"
    if _failed(json.loads(executed.read_text(encoding="utf-8"))):
        return "its executed copy is of a failed run (a cell raised)"
    return None


def ensure_executed(
    sources: Sequence[Path],
    executed: Path,
    *,
    require: bool,
    run: Callable[..., Any] = execute_notebook,
) -> list[str]:
    """Make sure each source has a usable executed copy in ``executed``; return the stems run here.

    With ``require`` a missing, stale or failed copy is an error (CI, after ``make test``); otherwise the
    notebook is run at the smoke settings with the tests' helper, in a scratch folder.
    """
    todo = {s: why for s in sources if (why := executed_problem(s, executed / s.name))}
    if todo and require:
        lines = "\n".join(f"  {s.name}: {why}" for s, why in todo.items())
        raise SiteError(
            f"{len(todo)} notebook(s) have no usable executed copy in {executed}:\n{lines}\n"
            "Run the notebook tests first (make test), or drop --require-executed to run them here."
        )
    for source in todo:
        print(f"executing {source.name} at the smoke settings ({todo[source]})", flush=True)
        with tempfile.TemporaryDirectory(prefix="mmpfl-docs-") as scratch:
            parameters = dict(SMOKE_PARAMETERS, OUTPUT_DIR=str(Path(scratch) / "records"))
            run(source, executed / source.name, parameters, workdir=Path(scratch))
    return [s.stem for s in todo]


def render_page(executed: Path, site: Path) -> Page:
    """``executed`` as ``site/<stem>.html`` with every image embedded."""
    import nbformat
    from nbconvert import HTMLExporter

    notebook = nbformat.read(executed, as_version=4)
    exporter = HTMLExporter(template_name="lab", embed_images=True)
    body, _ = exporter.from_notebook_node(notebook, resources={"metadata": {"path": str(executed.parent)}})
    name = f"{executed.stem}.html"
    (site / name).write_text(body, encoding="utf-8")
    parameters = dict(notebook.metadata.get("papermill", {}).get("parameters", {}))
    return Page(executed.stem, notebook_title(notebook, executed.stem), name, parameters, body.count("<img"))


def _parameter_text(parameters: dict[str, Any]) -> str:
    shown = {k: v for k, v in parameters.items() if k != "OUTPUT_DIR"}
    return ", ".join(f"{k}={v!r}" for k, v in shown.items()) or "the notebook's defaults"


def write_index(pages: Sequence[Page], site: Path) -> Path:
    items = "\n".join(
        f'  <li><a href="{html.escape(p.html_name)}">{html.escape(p.title)}</a> '
        f"<small>({html.escape(p.stem)}.ipynb; run with {html.escape(_parameter_text(p.parameters))})</small></li>"
        for p in pages
    )
    body = f"""<!DOCTYPE html>
<html lang="en">
<head><meta charset="utf-8"><title>mmpfl notebooks</title>
<style>body {{ font-family: sans-serif; max-width: 60rem; margin: 2rem auto; line-height: 1.5 }}
small {{ color: #555 }}</style></head>
<body>
<h1>mmpfl: the teaching notebooks, executed</h1>
<p>Each page is a notebook as the test suite ran it under papermill (small smoke settings, so the numbers are
those of a tiny run, not of the notebook's teaching defaults), with its outputs and figures. Run a notebook yourself
to get its numbers at the defaults.</p>
<ol>
{items}
</ol>
</body>
</html>
"""
    path = site / "index.html"
    path.write_text(body, encoding="utf-8")
    return path


class _References(HTMLParser):
    """Every image source of a page (``<img src>``, SVG ``<image href>``) and every link target."""

    def __init__(self) -> None:
        super().__init__()
        self.images: list[str] = []
        self.links: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        values = dict(attrs)
        if tag == "img" and values.get("src") is not None:
            self.images.append(values["src"] or "")
        elif tag == "image":
            ref = values.get("href") or values.get("xlink:href")
            if ref is not None:
                self.images.append(ref)
        elif tag == "a" and values.get("href"):
            self.links.append(values["href"] or "")


def _references(page: Path) -> _References:
    parser = _References()
    parser.feed(page.read_text(encoding="utf-8"))
    return parser


def image_problems(page: Path, site: Path) -> list[str]:
    """Images of ``page`` that are not there: a ``data:`` URI counts as there; a relative path must be a file
    under ``site``; anything else (a remote or absolute URL) cannot be checked offline and is refused."""
    problems = []
    for src in _references(page).images:
        if src.startswith("data:image/"):
            continue
        if "://" in src or src.startswith("/") or not src:
            problems.append(f"{page.name}: image {src[:80]!r} is not embedded and not a file of the site")
            continue
        target = (page.parent / src.split("#")[0].split("?")[0]).resolve()
        if not (target.is_file() and target.is_relative_to(site.resolve())):
            problems.append(f"{page.name}: image {src!r} does not exist under {site}")
    return problems


def check_site(site: Path, sources: Sequence[Path]) -> list[str]:
    """Every source notebook has its page and an index entry, and every image of every page exists."""
    problems = []
    index = site / "index.html"
    linked = set(_references(index).links) if index.is_file() else set()
    if not index.is_file():
        problems.append(f"{index} is missing")
    for source in sources:
        page = site / f"{source.stem}.html"
        if not page.is_file():
            problems.append(f"{source.name} did not render: {page} is missing")
            continue
        if page.name not in linked:
            problems.append(f"index.html does not list {page.name}")
        problems += image_problems(page, site)
    return problems


def build_site(
    notebooks: Path,
    executed: Path,
    site: Path,
    *,
    require_executed: bool = False,
    run: Callable[..., Any] = execute_notebook,
) -> list[Page]:
    """Render every notebook of ``notebooks`` from its executed copy into ``site``, write the index, check it.

    Raises:
        SiteError: no notebook found, an executed copy missing or failed (see :func:`ensure_executed`), or the
            check found a page or an image missing.
    """
    sources = notebook_sources(notebooks)
    if not sources:
        raise SiteError(f"no notebooks matching {NOTEBOOK_GLOB} in {notebooks}")
    ensure_executed(sources, executed, require=require_executed, run=run)
    site.mkdir(parents=True, exist_ok=True)
    for stale in site.glob("*.html"):  # a renamed or removed notebook must not keep an old page
        stale.unlink()
    pages = [render_page(executed / s.name, site) for s in sources]
    write_index(pages, site)
    if problems := check_site(site, sources):
        raise SiteError("the rendered site failed its check:\n  " + "\n  ".join(problems))
    return pages


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--notebooks", type=Path, default=ROOT / "notebooks")
    parser.add_argument(
        "--executed", type=Path, default=None, help="default: $MMPFL_EXECUTED_NOTEBOOKS or build/executed"
    )
    parser.add_argument("--site", type=Path, default=ROOT / "site")
    parser.add_argument(
        "--require-executed", action="store_true", help="fail instead of running a notebook that has no executed copy"
    )
    args = parser.parse_args(argv)
    executed = args.executed or executed_dir(ROOT)
    try:
        pages = build_site(args.notebooks, executed, args.site, require_executed=args.require_executed)
    except SiteError as error:
        print(f"make docs: error: {error}", file=sys.stderr)
        return 1
    for page in pages:
        print(f"{args.site / page.html_name}: {page.title} ({page.figures} embedded images)")
    print(f"{args.site / 'index.html'}: {len(pages)} notebooks; every page rendered, every image present")
    return 0


if __name__ == "__main__":
    sys.exit(main())
