"""Where data and results live. ``MMPFL_DATA_DIR`` and ``MMPFL_RESULTS_DIR`` are read here and nowhere else."""

from __future__ import annotations

import os
from pathlib import Path

DATA_DIR_ENV = "MMPFL_DATA_DIR"
RESULTS_DIR_ENV = "MMPFL_RESULTS_DIR"
_REPO_ROOT = Path(__file__).resolve().parent.parent


def _root(env_var: str, folder: str, create: bool) -> Path:
    """``$env_var`` if set; else ``<repo>/<folder>`` (git-ignored) in a checkout, or
    ``~/.cache/mmpfl/<folder>`` when the package is installed elsewhere (e.g. on Colab from a wheel)."""
    env = os.environ.get(env_var)
    if env:
        root = Path(env).expanduser()
    elif (_REPO_ROOT / "pyproject.toml").exists():
        root = _REPO_ROOT / folder
    else:
        root = Path.home() / ".cache" / "mmpfl" / folder
    if create:
        root.mkdir(parents=True, exist_ok=True)
    return root


def data_root(create: bool = True) -> Path:
    """The data root: ``$MMPFL_DATA_DIR``, else ``<repo>/data``."""
    return _root(DATA_DIR_ENV, "data", create)


def results_root(create: bool = True) -> Path:
    """The results root: ``$MMPFL_RESULTS_DIR``, else ``<repo>/results``."""
    return _root(RESULTS_DIR_ENV, "results", create)
