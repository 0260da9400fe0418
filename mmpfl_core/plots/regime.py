"""Figures of the regime map (:mod:`mmpfl_core.reproduction.regime`): which method wins each
(federation size, epsilon) cell, and every method's accuracy with its interval over seeds.

Inputs are the cell table of :func:`~mmpfl_core.reproduction.regime.regime_cells`; nothing here trains.
"""

from __future__ import annotations

import math

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import seaborn as sns
from matplotlib.patches import Patch

__all__ = ["plot_regime_accuracy", "plot_regime_map"]


def _eps_text(e: float) -> str:
    return "inf" if math.isinf(e) else f"{e:g}"


def plot_regime_map(cells: pd.DataFrame, *, title: str = "Who wins? personal accuracy, eligible methods"):
    """Sites (rows) x epsilon (columns), coloured by the winning method; the text gives its accuracy and
    "tie" where its 95% interval overlaps another eligible method's; "not ranked" where non-private
    collaboration does not beat local-only in that row (``ranked`` column of the cells)."""
    methods = list(dict.fromkeys(cells["method"]))
    palette = dict(zip(methods, sns.color_palette("Set2", len(methods)), strict=False))
    sites = sorted(cells["sites"].unique())
    eps = sorted(cells["epsilon"].unique())
    fig, ax = plt.subplots(figsize=(1.6 * len(eps) + 2.5, 0.9 * len(sites) + 1.5))
    wins = cells[cells["winner"]].set_index(["sites", "epsilon"])
    for i, n in enumerate(sites):
        for j, e in enumerate(eps):
            if (n, e) not in wins.index:
                if "ranked" in cells and not cells[(cells["sites"] == n) & (cells["epsilon"] == e)]["ranked"].all():
                    # no winner on purpose: non-private collaboration does not beat local-only in this row
                    ax.text(
                        j + 0.5,
                        i + 0.5,
                        "not ranked:\ncollaboration\ndoes not pay",
                        ha="center",
                        va="center",
                        fontsize=7,
                    )
                continue
            w = wins.loc[(n, e)]
            ax.add_patch(plt.Rectangle((j, i), 1, 1, color=palette[w["method"]], alpha=1.0 if w["clear"] else 0.45))
            ax.text(
                j + 0.5,
                i + 0.5,
                f"{w['method']}\n{w['acc']:.2f}" + ("" if w["clear"] else "\n(tie)"),
                ha="center",
                va="center",
                fontsize=8,
            )
    ax.set(
        xlim=(0, len(eps)),
        ylim=(0, len(sites)),
        xticks=np.arange(len(eps)) + 0.5,
        yticks=np.arange(len(sites)) + 0.5,
        xlabel="epsilon (client level)",
        ylabel="sites",
        title=title,
    )
    ax.set_xticklabels([_eps_text(e) for e in eps])
    ax.set_yticklabels([str(n) for n in sites])
    ax.legend(
        handles=[Patch(color=palette[m], label=m) for m in methods],
        loc="upper left",
        bbox_to_anchor=(1.01, 1.0),
        fontsize=8,
        title="winner (pale: tie)",
    )
    return ax


def plot_regime_accuracy(cells: pd.DataFrame):
    """One panel per federation size: personal accuracy vs epsilon for every method, 95% t-intervals
    over seeds as error bars (local-only and non-private methods are flat: they ignore epsilon)."""
    sites = sorted(cells["sites"].unique())
    eps = sorted(cells["epsilon"].unique())
    methods = list(dict.fromkeys(cells["method"]))
    palette = dict(zip(methods, sns.color_palette("Set2", len(methods)), strict=False))
    fig, axes = plt.subplots(1, len(sites), figsize=(3.2 * len(sites), 3.4), sharey=True, squeeze=False)
    for ax, n in zip(axes[0], sites, strict=False):
        for k, m in enumerate(methods):
            sel = cells[(cells["sites"] == n) & (cells["method"] == m)].set_index("epsilon").reindex(eps)
            x = np.arange(len(eps)) + (k - len(methods) / 2) * 0.06
            err = np.vstack([sel["acc"] - sel["low"], sel["high"] - sel["acc"]])
            ax.errorbar(
                x,
                sel["acc"],
                yerr=np.nan_to_num(err),
                marker="o",
                ms=4,
                capsize=2,
                color=palette[m],
                label=m,
                linestyle="-" if sel["eligible"].all() else ":",
            )
        ax.set(title=f"{n} sites", xticks=np.arange(len(eps)), xlabel="epsilon")
        ax.set_xticklabels([_eps_text(e) for e in eps])
    axes[0][0].set(ylabel="personal test accuracy", ylim=(0, 1))
    axes[0][-1].legend(fontsize=7, loc="best")
    return axes[0][0]
