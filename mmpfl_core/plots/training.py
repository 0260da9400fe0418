"""Figures of federated runs: accuracy per round, per-site accuracy, communication vs accuracy."""

from __future__ import annotations

from collections.abc import Mapping

import matplotlib.pyplot as plt
import pandas as pd
import seaborn as sns

from ..federated.simulation import RunResult


def save_axes(ax, path) -> None:
    """Lay out, save (120 dpi) and close the figure of ``ax``: the figures of reports are written, not shown."""
    ax.figure.tight_layout()
    ax.figure.savefig(path, dpi=120)
    plt.close(ax.figure)


def history_frame(runs: Mapping[str, RunResult]) -> pd.DataFrame:
    """All runs' evaluated rounds in one long table with a ``method`` column."""
    frames = [pd.DataFrame(run.history).assign(method=label) for label, run in runs.items()]
    frame = pd.concat(frames, ignore_index=True)
    return frame[frame["personal_test_accuracy"].notna()] if "personal_test_accuracy" in frame else frame


def plot_accuracy_vs_round(runs: Mapping[str, RunResult], *, metric: str = "personal_test_accuracy", ax=None):
    """Test accuracy after each round, one line per method."""
    ax = ax or plt.subplots(figsize=(6, 4))[1]
    sns.lineplot(data=history_frame(runs), x="round", y=metric, hue="method", marker="o", ax=ax)
    ax.set(xlabel="round", ylabel=metric.replace("_", " "), title="Accuracy vs round")
    return ax


def plot_site_accuracy(runs: Mapping[str, RunResult], *, ax=None):
    """Final personalised test accuracy per site and method (bars)."""
    rows = []
    for label, run in runs.items():
        last = run.history[-1]
        rows += [
            {"method": label, "site": key.split("_")[0].removeprefix("site"), "accuracy": value}
            for key, value in last.items()
            if key.startswith("site") and key.endswith("personal_test_accuracy")
        ]
    ax = ax or plt.subplots(figsize=(6, 4))[1]
    sns.barplot(data=pd.DataFrame(rows), x="site", y="accuracy", hue="method", ax=ax)
    ax.set(ylim=(0, 1), title="Per-site accuracy (own test split)")
    return ax


def plot_communication_vs_accuracy(runs: Mapping[str, RunResult], *, metric: str = "personal_test_accuracy", ax=None):
    """Accuracy against cumulative megabytes sent (up + down)."""
    frame = history_frame(runs)
    frame = frame.assign(megabytes=(frame["cum_bytes_up"] + frame["cum_bytes_down"]) / 1e6)
    ax = ax or plt.subplots(figsize=(6, 4))[1]
    sns.lineplot(data=frame, x="megabytes", y=metric, hue="method", marker="o", ax=ax)
    ax.set(xlabel="cumulative communication (MB)", ylabel=metric.replace("_", " "), title="Communication vs accuracy")
    return ax
