"""Where data and results live. One function reads ``MMPFL_DATA_DIR``; nothing else touches it."""
from __future__ import annotations

import os
from pathlib import Path

DATA_DIR_ENV = "MMPFL_DATA_DIR"
RESULTS_DIR_ENV = "MMPFL_RESULTS_DIR"
_REPO_ROOT = Path(__file__).resolve().parent.parent


def data_root(create: bool = True) -> Path:
    """The data root: ``$MMPFL_DATA_DIR`` if set, else ``<repo>/data`` (git-ignored).

    When the package is installed outside a checkout (e.g. on Colab from a wheel), the default
    falls back to ``~/.cache/mmpfl/data``.
    """
    env = os.environ.get(DATA_DIR_ENV)
    if env:
        root = Path(env).expanduser()
    elif (_REPO_ROOT / "pyproject.toml").exists():
        root = _REPO_ROOT / "data"
    else:
        root = Path.home() / ".cache" / "mmpfl" / "data"
    if create:
        root.mkdir(parents=True, exist_ok=True)
    return root


def results_root(create: bool = True) -> Path:
    """The results root: ``$MMPFL_RESULTS_DIR`` if set, else ``<repo>/results`` (git-ignored)."""
    env = os.environ.get(RESULTS_DIR_ENV)
    if env:
        root = Path(env).expanduser()
    elif (_REPO_ROOT / "pyproject.toml").exists():
        root = _REPO_ROOT / "results"
    else:
        root = Path.home() / ".cache" / "mmpfl" / "results"
    if create:
        root.mkdir(parents=True, exist_ok=True)
    return root
