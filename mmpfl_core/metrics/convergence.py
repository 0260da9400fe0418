"""Convergence speed: how many federated rounds until validation accuracy reaches a target.

Per-round validation accuracy is noisy, so the first round that touches a target by luck is a poor
measure of speed. We smooth with a trailing moving average first (trailing, so the value at round
r uses only rounds <= r: the answer could have been known at that round).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from mmpfl_core.errors import ConfigError, DataError


def smooth(values: Sequence[float], window: int) -> np.ndarray:
    """Trailing moving average of the same length as ``values``.

    ``out[i] = mean(values[max(0, i - window + 1) : i + 1])``: the first ``window - 1`` entries
    average over the rounds available so far (no padding), so ``out[0] == values[0]``.
    ``window=1`` returns a float copy of ``values``.

    Raises:
        ConfigError: ``window < 1``.
        DataError: ``values`` is not 1-D or contains NaN/inf.
    """
    if int(window) != window or window < 1:
        raise ConfigError(f"window={window!r} must be an integer >= 1 (1 means no smoothing).")
    v = np.asarray(values, dtype=np.float64)
    if v.ndim != 1:
        raise DataError(f"values must be a 1-D sequence of per-round numbers, got shape {v.shape}.")
    if not np.all(np.isfinite(v)):
        raise DataError("values contain NaN or inf; evaluate every round or drop missing rounds first.")
    # a plain loop over rounds (R is small) avoids the rounding drift of a cumulative-sum trick
    w = int(window)
    return np.array([v[max(0, i - w + 1) : i + 1].mean() for i in range(v.size)], dtype=np.float64)


def rounds_to_target(values: Sequence[float], target: float, *, window: int = 3) -> int | None:
    """First 1-based round at which the smoothed validation accuracy reaches ``target``.

    Args:
        values: validation accuracy after rounds 1, 2, ... (index 0 is round 1).
        target: accuracy to reach (``>=``).
        window: trailing moving-average window, see :func:`smooth`.

    Returns:
        The round number, or ``None`` if the smoothed curve never reaches the target.
    """
    hit = np.flatnonzero(smooth(values, window) >= target)
    return int(hit[0]) + 1 if hit.size else None
