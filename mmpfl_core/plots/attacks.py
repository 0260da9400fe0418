"""Figures of privacy attacks: membership-inference ROC curves (log scale), attack success vs epsilon, audit scores."""

from __future__ import annotations

from collections.abc import Mapping

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
from sklearn.metrics import roc_curve


def plot_roc_curves(
    curves: Mapping[str, tuple[np.ndarray, np.ndarray]], *, ax=None, title: str = "Membership inference ROC"
):
    """ROC curves on log-log axes (low FPR is where an attack matters); ``curves`` maps label -> (is_member, scores).

    The dashed diagonal is random guessing. FPRs below 1 / (number of non-members) cannot be resolved;
    curves start at that level.
    """
    ax = ax or plt.subplots(figsize=(5, 5))[1]
    floor = 1.0
    for label, (is_member, scores) in curves.items():
        fpr, tpr, _ = roc_curve(np.asarray(is_member), np.asarray(scores))
        resolution = 1.0 / max(1, int(np.sum(np.asarray(is_member) == 0)))
        floor = min(floor, resolution)
        ax.plot(np.maximum(fpr, resolution), np.maximum(tpr, resolution), label=label)
    grid = np.logspace(np.log10(floor), 0, 50)
    ax.plot(grid, grid, "k--", lw=1, label="random guess")
    ax.set(
        xscale="log",
        yscale="log",
        xlim=(floor, 1),
        ylim=(floor, 1),
        xlabel="false positive rate",
        ylabel="true positive rate",
        title=title,
    )
    ax.legend(fontsize=8)
    return ax


def plot_attack_vs_epsilon(frame: pd.DataFrame, *, metric: str = "AUC", ax=None, chance: float = 0.5):
    """Attack metric vs the accountant's epsilon with 95% CIs, one line per method.

    ``frame`` has columns ``method``, ``epsilon`` (inf for no DP), ``metric`` and, if present,
    ``f"{metric} low"`` / ``f"{metric} high"``. Runs without DP (epsilon inf) are drawn at the right
    edge and labelled "no DP".
    """
    ax = ax or plt.subplots(figsize=(6, 4))[1]
    finite = frame["epsilon"].replace(np.inf, np.nan).dropna()
    right = float(finite.max()) * 4 if len(finite) else 1.0
    for method, rows in frame.groupby("method", sort=False):
        rows = rows.sort_values("epsilon")
        x = rows["epsilon"].replace(np.inf, right).to_numpy(dtype=float)
        y = rows[metric].to_numpy(dtype=float)
        if f"{metric} low" in rows:
            err = np.vstack(
                [y - rows[f"{metric} low"].to_numpy(dtype=float), rows[f"{metric} high"].to_numpy(dtype=float) - y]
            )
            ax.errorbar(x, y, yerr=np.clip(err, 0, None), marker="o", capsize=3, label=method)
        else:
            ax.plot(x, y, marker="o", label=method)
    ax.axhline(chance, color="k", ls="--", lw=1, label="chance")
    ticks = sorted(set(finite.tolist())) + ([right] if np.isinf(frame["epsilon"]).any() else [])
    ax.set_xscale("log")
    ax.set_xticks(
        ticks, [f"{t:g}" for t in ticks[:-1]] + (["no DP"] if np.isinf(frame["epsilon"]).any() else [f"{ticks[-1]:g}"])
    )
    ax.set(
        xlabel="epsilon (accountant, per site)",
        ylabel=f"attack {metric}",
        title=f"Membership inference {metric} vs epsilon",
    )
    ax.legend(fontsize=8)
    return ax


def plot_audit_scores(scores: np.ndarray, included: np.ndarray, *, num_in: int, num_out: int, ax=None, title: str = ""):
    """Histogram of canary scores, included vs excluded, with the guess cut-offs (top k+, bottom k-)."""
    ax = ax or plt.subplots(figsize=(6, 3.5))[1]
    scores, included = np.asarray(scores), np.asarray(included, dtype=bool)
    bins = np.histogram_bin_edges(scores, bins=40)
    ax.hist(scores[included], bins=bins, alpha=0.6, label="canary included")
    ax.hist(scores[~included], bins=bins, alpha=0.6, label="canary excluded")
    order = np.sort(scores)
    if num_in:
        ax.axvline(order[-num_in], color="C2", ls="--", label=f"guess 'in' above (top {num_in})")
    if num_out:
        ax.axvline(order[num_out - 1], color="C3", ls="--", label=f"guess 'out' below (bottom {num_out})")
    ax.set(xlabel="canary score (released update along the canary)", ylabel="canaries", title=title)
    ax.legend(fontsize=8)
    return ax
