"""Notebooks record their key numbers as JSON so tests (and readers) can check them afterwards."""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any
from collections.abc import Mapping

import numpy as np

from ..paths import results_root


def _plain(value: Any) -> Any:
    """Convert numpy scalars/arrays and non-finite floats into JSON-safe Python values."""
    if isinstance(value, Mapping):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, np.ndarray):
        return _plain(value.tolist())
    if isinstance(value, np.generic):
        return _plain(value.item())
    if isinstance(value, float) and not math.isfinite(value):
        return None  # JSON has no NaN/Inf; None reads back as "undefined"
    return value


def _results_dir(output_dir: str | Path | None) -> Path:
    path = Path(output_dir) if output_dir is not None else results_root() / "notebooks"
    path.mkdir(parents=True, exist_ok=True)
    return path


def record_results(notebook: str, values: Mapping[str, Any], output_dir: str | Path | None = None) -> Path:
    """Write ``values`` to ``<output_dir>/<notebook>.json`` (default ``results/notebooks``) and return the path."""
    path = _results_dir(output_dir) / f"{notebook}.json"
    path.write_text(json.dumps(_plain(values), indent=2, sort_keys=True))
    return path


def load_results(notebook: str, output_dir: str | Path | None = None) -> dict[str, Any]:
    """Read back what :func:`record_results` wrote."""
    return json.loads((_results_dir(output_dir) / f"{notebook}.json").read_text())
