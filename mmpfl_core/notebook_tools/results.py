"""Notebooks record their key numbers as JSON so tests (and readers) can check them afterwards.

Records are scoped like a run directory (docs/DESIGN.md 6): ``<dir>/<notebook>.json`` holds what may be shown
beside the notebook (settings, pooled accuracies, epsilons from the accountant, public quantities), and
``<dir>/private/<notebook>.json`` what only the operator who plays every site may see: per-site metrics,
masks and mask scores, byte counts (they depend on the private masks and on who took part), timings.
The notebook decides which is which by passing the latter as ``private=``; nothing private is ever
written outside ``private/``.
"""

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


def record_results(
    notebook: str,
    values: Mapping[str, Any],
    output_dir: str | Path | None = None,
    *,
    private: Mapping[str, Any] | None = None,
) -> Path:
    """Write ``values`` to ``<output_dir>/<notebook>.json`` (default ``results/notebooks``) and ``private``
    (per-site metrics, masks, scores, byte counts, timings) to ``<output_dir>/private/<notebook>.json``.

    Returns:
        The path of the released record.

    Raises:
        ValueError: a key appears in both ``values`` and ``private`` (say once which scope it has).
    """
    private = dict(private or {})
    both = sorted(set(values) & set(private))
    if both:
        raise ValueError(
            f"record_results({notebook!r}): keys {both} are in both values and private; keep each "
            "in one scope (private: per-site metrics, masks, scores, byte counts, timings)."
        )
    folder = _results_dir(output_dir)
    path = folder / f"{notebook}.json"
    path.write_text(json.dumps(_plain(values), indent=2, sort_keys=True))
    private_path = folder / "private" / f"{notebook}.json"
    if private:
        private_path.parent.mkdir(exist_ok=True)
        private_path.write_text(json.dumps(_plain(private), indent=2, sort_keys=True))
    else:
        private_path.unlink(missing_ok=True)  # a stale private record of an earlier run would be read back
    return path


def load_results(
    notebook: str, output_dir: str | Path | None = None, *, include_private: bool = False
) -> dict[str, Any]:
    """Read back what :func:`record_results` wrote; with ``include_private`` merged with the private
    record (operator use, e.g. the notebook tests)."""
    folder = _results_dir(output_dir)
    out = json.loads((folder / f"{notebook}.json").read_text())
    private_path = folder / "private" / f"{notebook}.json"
    if include_private and private_path.is_file():
        out.update(json.loads(private_path.read_text()))
    return out
