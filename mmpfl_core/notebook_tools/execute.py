"""Run a notebook under papermill the way CI does, and say where the executed copies are kept.

What it is for: ONE way of executing a teaching notebook, called by the notebook tests
(``tests/test_notebooks.py``) and by the rendered pages (``make docs``, ``docs/build_site.py``), so the
pages show exactly the runs the tests checked. The smoke test keeps each executed copy in
:func:`executed_dir` (``build/executed/`` under the repository, or ``$MMPFL_EXECUTED_NOTEBOOKS``),
which is git-ignored; ``make docs`` renders what is there and runs only what is missing.

A notebook runs with its own folder as the working directory, its cohort cache and run directories
under ``workdir`` (``MMPFL_DATA_DIR``, ``MMPFL_RESULTS_DIR``), so a run never writes into the
repository, and Jupyter's inline ``matplotlib`` backend (:data:`MATPLOTLIB_BACKEND`), so every figure
is stored in the executed notebook as a PNG output: the rendered pages show them (under ``Agg`` a
kernel draws figures and stores none). The kernel inherits the process environment, so these three
variables are set for the duration of the call and restored after it.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

#: Environment variable naming the folder of executed notebooks (relative paths are from the repository root).
EXECUTED_DIR_ENV = "MMPFL_EXECUTED_NOTEBOOKS"
#: Its default, under the repository root; ``build/`` is git-ignored.
DEFAULT_EXECUTED_DIR = Path("build") / "executed"
#: Jupyter's inline backend (the kernel's own default), set explicitly so that an ``MPLBACKEND=Agg`` of the calling
#: process does not reach the kernel and drop the figures from the executed notebook.
MATPLOTLIB_BACKEND = "module://matplotlib_inline.backend_inline"


def executed_dir(root: Path) -> Path:
    """Where executed notebooks are kept: ``$MMPFL_EXECUTED_NOTEBOOKS`` or ``<root>/build/executed``."""
    value = os.environ.get(EXECUTED_DIR_ENV)
    path = Path(value) if value else DEFAULT_EXECUTED_DIR
    return path if path.is_absolute() else Path(root) / path


@contextmanager
def _environment(values: Mapping[str, str]) -> Iterator[None]:
    saved = {key: os.environ.get(key) for key in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for key, old in saved.items():
            if old is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = old


def execute_notebook(path: Path, output: Path, parameters: Mapping[str, Any], *, workdir: Path) -> Path:
    """Execute ``path`` with papermill, injecting ``parameters``, and write the executed copy to ``output``.

    Args:
        path: the notebook (``notebooks/NN_name.ipynb``).
        output: where the executed notebook goes (its folder is created); papermill writes it cell by
            cell, so a failed run leaves a copy that shows the error (``metadata.papermill.exception``).
        parameters: values for the notebook's ``parameters`` cell (e.g. ``SMOKE_PARAMETERS`` plus ``OUTPUT_DIR``).
        workdir: scratch folder for the notebook's data cache and run directories.

    Raises:
        papermill.PapermillExecutionError: a cell raised; the message names the cell and the error.
    """
    try:
        import papermill as pm  # a dev dependency: only the tests and `make docs` execute notebooks
    except ImportError as error:  # pragma: no cover - the dev extra installs it
        raise ImportError("papermill is needed to execute notebooks: pip install -e '.[dev]'") from error
    path, output, workdir = Path(path), Path(output), Path(workdir)
    output.parent.mkdir(parents=True, exist_ok=True)
    environment = {
        "MMPFL_DATA_DIR": str(workdir / "data"),
        "MMPFL_RESULTS_DIR": str(workdir / "results"),
        "MPLBACKEND": MATPLOTLIB_BACKEND,
    }
    with _environment(environment):
        pm.execute_notebook(
            str(path),
            str(output),
            parameters=dict(parameters),
            kernel_name="python3",
            cwd=str(path.parent),
            progress_bar=False,
        )
    return output
