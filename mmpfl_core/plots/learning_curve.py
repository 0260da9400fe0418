"""The pooled learning curve with each site's training size marked: where does pooling pay?

:func:`plot_learning_curve` draws a table of :func:`~mmpfl_core.learning_curve.pooled_learning_curve`
(one row per training-set size n and seed): one point per seed, the mean over seeds as a line, its 95%
Student-t interval over seeds as a band (:func:`~mmpfl_core.learning_curve.learning_curve_summary`; no
band with one seed), on a log n axis. Each site's training size is a tick on the x axis with its name, and
a dashed vertical line marks the pooled training size (what centralized training and, at best, a
federation see). A site left of the knee is data-starved: pooling pays there. If the curve is flat from
the smallest site on, pooling cannot help.

It draws from a finished curve and the sites' sizes; it trains nothing and releases nothing (the curve is a
non-private diagnostic, see :mod:`mmpfl_core.learning_curve`).
"""

from __future__ import annotations

from collections.abc import Mapping

import matplotlib.pyplot as plt
import pandas as pd
from matplotlib.axes import Axes

from ..errors import ConfigError
from ..learning_curve import learning_curve_summary

__all__ = ["plot_learning_curve"]


def plot_learning_curve(
    curve: pd.DataFrame,
    site_sizes: Mapping[str, int] | pd.Series,
    *,
    metric: str = "accuracy",
    chance: float | None = None,
    ax: Axes | None = None,
) -> Axes:
    """Accuracy against training subjects (log x): seeds as points, mean line, 95% band, site sizes as ticks.

    Args:
        curve: rows ``n, seed, <metric>`` (:func:`~mmpfl_core.learning_curve.pooled_learning_curve`).
        site_sizes: training subjects per site, by site name (:func:`~mmpfl_core.learning_curve.site_training_sizes`).
        metric: the column to draw (``accuracy`` or ``balanced_accuracy``).
        chance: a horizontal reference (e.g. the majority-class rate of the test set); None draws none.
        ax: axes to draw on; None makes a new figure.

    Returns:
        The axes. Its title says how many seeds and sites are drawn.

    Raises:
        ConfigError: no site sizes, a size < 1, or ``metric`` not a column of ``curve``.
    """
    sizes = pd.Series(site_sizes, dtype="int64")
    if sizes.empty:
        raise ConfigError("plot_learning_curve: site_sizes is empty; pass site_training_sizes(federation).")
    if (sizes < 1).any():
        raise ConfigError(
            f"plot_learning_curve: site sizes {sizes[sizes < 1].to_dict()} are < 1; a log axis needs >= 1 subject."
        )
    summary = learning_curve_summary(curve, metric)
    pooled = int(sizes.sum())
    seeds = int(summary["seeds"].max())
    ax = ax or plt.subplots(figsize=(7, 4.2))[1]
    ax.scatter(curve["n"], curve[metric], s=14, color="tab:blue", alpha=0.45, label="one seed", zorder=3)
    ax.plot(summary["n"], summary["mean"], "-o", color="tab:blue", label="mean over seeds", zorder=4)
    if summary["seeds"].min() > 1:
        ax.fill_between(
            summary["n"], summary["low"], summary["high"], color="tab:blue", alpha=0.15, label="95% interval over seeds"
        )
    ax.set_xscale("log")
    # Each site's size as a tick from the bottom of the axes (blended transform: x in data, y in axes units),
    # so the rug stays put whatever the accuracy range.
    for name, size in sizes.items():
        ax.plot([size, size], [0.0, 0.06], color="tab:red", lw=1.5, transform=ax.get_xaxis_transform(), zorder=5)
        ax.annotate(
            str(name),
            (size, 0.07),
            xycoords=("data", "axes fraction"),
            rotation=90,
            fontsize=7,
            ha="center",
            va="bottom",
            color="tab:red",
            bbox={"facecolor": "white", "edgecolor": "none", "alpha": 0.7, "pad": 0.5},
        )
    ax.plot([], [], color="tab:red", lw=1.5, label="a site's training size")  # legend entry for the ticks
    ax.axvline(pooled, color="black", ls="--", lw=1, label=f"pooled training set ({pooled})")
    if chance is not None:
        ax.axhline(chance, color="grey", ls=":", lw=1, label="majority-class rate")
    low_n = min(int(curve["n"].min()), int(sizes.min()))
    ax.set_xlim(low_n / 1.3, max(pooled, int(curve["n"].max())) * 1.3)
    ax.set(
        xlabel="training subjects n (drawn from the pooled train splits, log scale)",
        ylabel=f"pooled test {metric.replace('_', ' ')}",
        title=f"Does pooling pay? Pooled accuracy vs training subjects ({seeds} seed{'s' if seeds > 1 else ''}, "
        f"{len(sizes)} sites)",
    )
    ax.legend(fontsize=7, loc="upper left")  # the curve rises from the lower left
    return ax
