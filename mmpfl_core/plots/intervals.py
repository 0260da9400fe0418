"""Point-and-interval figure of a comparison table: one row per arm, its accuracy and 95% interval.

Draws from a results table (e.g. ``docs/results/headline/headline_3seeds.csv``, read by
:func:`mmpfl_core.reproduction.headline.load_headline_table`); trains nothing, releases nothing new and changes no
global matplotlib state.
"""

from __future__ import annotations

from collections.abc import Mapping

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd

__all__ = ["plot_arm_intervals"]

_COLUMNS = ("arm", "rounds", "personal_accuracy", "low", "high", "patient_epsilon_max")


def _row_labels(table: pd.DataFrame, labels: Mapping[str, str]) -> list[str]:
    """The arm's label, with its round count where the arm appears at several (otherwise the rows would read alike)."""
    repeated = set(table["arm"][table["arm"].duplicated()])
    out = []
    for arm, rounds in zip(table["arm"], table["rounds"], strict=True):
        label = labels.get(arm, arm)
        out.append(f"{label} ({int(rounds)} rounds)" if arm in repeated else label)
    return out


def plot_arm_intervals(
    table: pd.DataFrame,
    *,
    labels: Mapping[str, str] | None = None,
    metric: str = "personal_accuracy",
    ax=None,
    title: str = "Personal accuracy, 95% interval over the pooled test patients",
):
    """One horizontal line per row of ``table``: a point at ``metric`` and a bar from ``low`` to ``high``, first
    row at the top. Rows without DP (``patient_epsilon_max == 0``) are drawn in grey, private rows in colour with
    their epsilon in the legend, so a reader compares arms at the same budget.

    Args:
        table: columns ``arm, rounds, <metric>, low, high, patient_epsilon_max`` (an arm may repeat at several
            round counts; its rows are then labelled with the rounds).
        labels: arm -> label shown on the axis (default: the arm name).

    Returns:
        The matplotlib ``Axes``.
    """
    needed = [c if c != "personal_accuracy" else metric for c in _COLUMNS]
    missing = [c for c in needed if c not in table.columns]
    if missing:
        raise ValueError(
            f"plot_arm_intervals needs the columns {missing} (has {list(table.columns)}); pass the bench's "
            "comparison table, e.g. mmpfl_core.reproduction.headline.load_headline_table()"
        )
    if table.empty:
        raise ValueError("plot_arm_intervals got an empty table: there is nothing to draw")
    table = table.reset_index(drop=True)
    ax = ax or plt.subplots(figsize=(7, 0.6 + 0.38 * len(table)))[1]
    y = -np.arange(len(table))  # the first row at the top, as in the table
    epsilons = sorted({float(e) for e in table["patient_epsilon_max"] if e > 0})
    # tab10 without its grey (index 7), which marks the rows without DP
    palette = [plt.get_cmap("tab10")(i) for i in (0, 1, 2, 3, 4, 5, 6, 8, 9)]
    colours = {eps: palette[i % len(palette)] for i, eps in enumerate(epsilons)}
    for private in (False, True):
        for eps in epsilons if private else [0.0]:
            sel = (table["patient_epsilon_max"] == eps) if private else (table["patient_epsilon_max"] <= 0)
            if not sel.any():
                continue
            rows = table[sel]
            point = rows[metric].to_numpy()
            err = np.vstack([point - rows["low"].to_numpy(), rows["high"].to_numpy() - point])  # (2, n)
            ax.errorbar(
                point,
                y[sel.to_numpy()],
                xerr=err,
                fmt="o",
                capsize=3,
                color=colours[eps] if private else "grey",
                label=f"patient epsilon {eps:g}" if private else "no DP",
            )
    ax.set_yticks(y, _row_labels(table, labels or {}))
    ax.set(xlabel=f"{metric.replace('_', ' ')} (95% interval)", title=title)
    ax.grid(axis="x", alpha=0.3)
    ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize="small")  # outside: rows fill the axes
    return ax
