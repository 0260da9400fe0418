"""Strip outputs and execution counts from notebooks: ``python -m mmpfl_core.notebook_tools.strip FILES``.

Notebooks are committed without outputs (small diffs, no private data in the repository).
"""

from __future__ import annotations

import sys

import nbformat


def strip_notebook(path: str) -> bool:
    """Remove outputs in place; return True if the file changed."""
    nb = nbformat.read(path, as_version=4)
    changed = False
    for cell in nb.cells:
        if cell.cell_type != "code":
            continue
        if cell.get("outputs") or cell.get("execution_count") is not None:
            cell["outputs"], cell["execution_count"] = [], None
            changed = True
        for key in ("execution", "papermill"):
            if cell.metadata.pop(key, None) is not None:
                changed = True
    if nb.metadata.pop("papermill", None) is not None:
        changed = True
    if changed:
        nbformat.write(nb, path)
    return changed


def main(argv: list[str] | None = None) -> int:
    paths = sys.argv[1:] if argv is None else argv
    for path in paths:
        if strip_notebook(path):
            print(f"stripped {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
