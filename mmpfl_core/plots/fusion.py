"""Figures and tables for fusion ablations: accuracy of model variants with 95% bootstrap CIs.

Reads only the ``summary`` of finished runs (``summary["global_test"]["accuracy"]`` holds
``point``, ``low``, ``high``); trains nothing and changes no global matplotlib state.
"""

from __future__ import annotations

from collections.abc import Mapping

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import seaborn as sns

from ..federated.simulation import RunResult

__all__ = ["accuracy_ci_frame", "plot_accuracy_with_ci"]


def accuracy_ci_frame(
    runs: Mapping[str, RunResult], *, split: str = "global_test", metric: str = "accuracy"
) -> pd.DataFrame:
    """One row per run: ``variant, point, low, high`` of ``summary[split][metric]``.

    Runs without that split (local-only has no global model) fall back to ``personal_test``.
    """
    rows = []
    for label, run in runs.items():
        entry = (run.summary.get(split) or run.summary["personal_test"])[metric]
        rows.append(
            {"variant": label, "point": float(entry["point"]), "low": float(entry["low"]), "high": float(entry["high"])}
        )
    return pd.DataFrame(rows)


def plot_accuracy_with_ci(frame: pd.DataFrame, *, chance: float | None = None, ax=None, title: str = ""):
    """Horizontal bars of ``point`` with ``[low, high]`` error bars, one per ``variant``.

    Args:
        frame: output of :func:`accuracy_ci_frame` (optionally with a ``group`` column for colour).
        chance: draw a dashed line at this accuracy (e.g. the majority-class rate).
    """
    ax = ax or plt.subplots(figsize=(6, 0.5 + 0.45 * len(frame)))[1]
    hue = "group" if "group" in frame else None
    sns.barplot(data=frame, y="variant", x="point", hue=hue, dodge=False, ax=ax, orient="h")
    err = np.vstack([frame["point"] - frame["low"], frame["high"] - frame["point"]])  # (2, n)
    ax.errorbar(frame["point"], np.arange(len(frame)), xerr=err, fmt="none", ecolor="black", capsize=3)
    if chance is not None:
        ax.axvline(chance, ls="--", color="grey", label="majority class")
    ax.set(xlim=(0, 1), xlabel="test accuracy (95% bootstrap CI)", ylabel="", title=title)
    return ax
