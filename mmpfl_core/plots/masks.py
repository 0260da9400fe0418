"""Figures of personalisation masks: KL scores per group and site, and each site's mask round by round.

Inputs are plain tables built from a run's site-side state (``strategy.masker``) or from its
checkpoints; nothing here trains or scores. The scores and masks shown are private site-side
diagnostics (docs/DESIGN.md 4.4): in a deployment only the site itself, or a trusted aggregator with
``server`` placement, may look at them.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any
from collections.abc import Mapping, Sequence

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import seaborn as sns

from ..io.checkpoint import load_checkpoint

__all__ = ["mask_history", "plot_kl_scores", "plot_mask_timeline", "score_table"]


def score_table(masker: Any, sites: Sequence[int]) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(scores, personal): two groups x sites tables from a :class:`~mmpfl_core.personalization.DynamicKLMasks`.

    ``scores`` holds the KL scores (nats per validation sample) each site's current mask was chosen
    from (``masker.masks.scores(site)``; NaN before a site's first update); ``personal`` is True
    where the group is in the site's personal set.
    """
    groups = list(masker.masks.groups or [])
    if not groups:
        raise ValueError("the masker knows no parameter groups yet; run the strategy for at least one round first.")
    scores = pd.DataFrame({f"site {s}": {g: masker.masks.scores(s).get(g, np.nan) for g in groups} for s in sites})
    personal = pd.DataFrame({f"site {s}": {g: g in masker.personal_groups(s) for g in groups} for s in sites})
    return scores.loc[groups], personal.loc[groups]


def plot_kl_scores(scores: pd.DataFrame, personal: pd.DataFrame | None = None, *, ax=None):
    """Heatmap of KL scores (groups x sites, log colour scale); personal groups are outlined."""
    ax = ax or plt.subplots(figsize=(1.2 * scores.shape[1] + 3, 0.45 * scores.shape[0] + 1.5))[1]
    # Log scale: scores span orders of magnitude; exact zeros (unchanged groups) get the floor colour.
    positive = scores.to_numpy(dtype=float)
    floor = np.nanmin(positive[positive > 0]) if np.any(positive > 0) else 1e-6
    shown = np.log10(scores.clip(lower=floor).astype(float))
    sns.heatmap(
        shown,
        annot=scores.astype(float),
        fmt=".3f",
        cmap="viridis",
        ax=ax,
        cbar_kws={"label": "log10 KL score (nats / sample)"},
    )
    if personal is not None:
        for i, group in enumerate(scores.index):
            for j, site in enumerate(scores.columns):
                if bool(personal.loc[group, site]):
                    ax.add_patch(plt.Rectangle((j, i), 1, 1, fill=False, edgecolor="red", lw=2))
    ax.set(xlabel="", ylabel="parameter group", title="KL score per group and site (red: personal)")
    return ax


def mask_history(checkpoint_dir: Path | str) -> pd.DataFrame:
    """Every site's mask after every checkpointed round, read from a run's checkpoints.

    Works for any strategy whose checkpoint state has a ``masker`` entry (``fedavg-kl-masks``,
    ``mm-pfl-adp``). Keep one checkpoint per round (``checkpoint_every=1``, ``keep_checkpoints`` >=
    the number of rounds) to see every round.

    Returns:
        Long table with columns ``round, site, group, personal`` (bool), ``score`` (the scores the
        mask was chosen from; NaN before the site's first update) and ``updated_round``.
    """
    rows = []
    # Checkpoints are named round_0005.safetensors (mmpfl_core.io.checkpoint.checkpoint_path).
    found = sorted((int(p.stem.split("_")[1]), p) for p in Path(checkpoint_dir).glob("round_*.safetensors"))
    if not found:
        raise FileNotFoundError(f"no checkpoints in {checkpoint_dir}; run with checkpoint_every=1 and a results_dir.")
    for round_index, path in found:
        _, state = load_checkpoint(path)
        if "masker" not in state.get("strategy", {}):
            raise ValueError(
                f"checkpoint {path} has no mask state; the strategy {state.get('strategy', {}).keys()} "
                "keeps no masks (use fedavg-kl-masks or mm-pfl-adp)."
            )
        masks: Mapping[str, Any] = state["strategy"]["masker"]["masks"]
        personal = {int(s): set(p) for s, p in masks["personal"].items()}
        for site in sorted(personal):
            scores = masks["scores"].get(str(site), {})
            for group in masks["groups"]:
                rows.append(
                    {
                        "round": int(round_index),
                        "site": site,
                        "group": group,
                        "personal": group in personal[site],
                        "score": float(scores.get(group, np.nan)),
                        "updated_round": masks["last_update"].get(str(site)),
                    }
                )
    return pd.DataFrame(rows)


def plot_mask_timeline(history: pd.DataFrame, *, axes=None):
    """One panel per site: groups x rounds, filled where the group was personal after that round."""
    sites = sorted(history["site"].unique())
    groups = list(dict.fromkeys(history["group"]))
    if axes is None:
        _, axes = plt.subplots(
            1, len(sites), figsize=(2.6 * len(sites) + 1.5, 0.35 * len(groups) + 1.5), sharey=True, squeeze=False
        )
        axes = axes[0]
    for ax, site in zip(axes, sites, strict=False):
        grid = (
            history[history["site"] == site]
            .pivot(index="group", columns="round", values="personal")
            .reindex(groups)
            .astype(float)
        )  # (groups, rounds)
        sns.heatmap(grid, vmin=0, vmax=1, cmap="Blues", cbar=False, linewidths=0.5, linecolor="white", ax=ax)
        ax.set(title=f"site {site}", xlabel="round", ylabel="")
    axes[0].set_ylabel("parameter group (dark: personal)")
    return axes
