"""Mask figures: score tables from a masker, mask history read back from checkpoints, plots draw."""
from __future__ import annotations

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np
import pytest

from mmpfl_core.io.checkpoint import checkpoint_path, save_checkpoint
from mmpfl_core.personalization import DynamicKLMasks, MaskSchedule
from mmpfl_core.plots.masks import mask_history, plot_kl_scores, plot_mask_timeline, score_table

GROUPS = {"embed": ["embed.weight"], "block": ["block.weight"], "head": ["head.weight"]}


def _masker() -> DynamicKLMasks:
    masker = DynamicKLMasks(MaskSchedule(threshold=0.1, hysteresis=0.0))
    masker.set_param_groups(GROUPS, {"embed": 10, "block": 100, "head": 5})
    return masker


def test_score_table_marks_exactly_the_personal_groups():
    masker = _masker()
    masker.masks.update(0, 1, {"embed": 0.0, "block": 0.5, "head": 0.2})
    masker.masks.update(1, 1, {"embed": 0.3, "block": 0.01, "head": 0.0})
    scores, personal = score_table(masker, [0, 1, 2])
    assert list(scores.index) == list(GROUPS) and list(scores.columns) == ["site 0", "site 1", "site 2"]
    assert scores.loc["block", "site 0"] == 0.5 and np.isnan(scores.loc["head", "site 2"])  # site 2 never scored
    assert personal["site 0"].to_dict() == {"embed": False, "block": True, "head": True}
    assert personal["site 1"].to_dict() == {"embed": True, "block": False, "head": False}
    assert not personal["site 2"].any()
    ax = plot_kl_scores(scores, personal)
    assert len(ax.patches) == 3  # one outline per personal cell
    plt.close("all")


def test_score_table_needs_groups():
    with pytest.raises(ValueError, match="parameter groups"):
        score_table(DynamicKLMasks(), [0])


def test_mask_history_reads_every_round_from_checkpoints(tmp_path):
    masker = _masker()
    rounds = [{"embed": 0.0, "block": 0.5, "head": 0.0}, {"embed": 0.0, "block": 0.5, "head": 0.3}]
    for t, scores in enumerate(rounds, start=1):
        masker.masks.update(0, t, scores)
        save_checkpoint(checkpoint_path(tmp_path, t), tensors={}, state={"round": t, "strategy": {"masker": masker.state_dict()}})
    history = mask_history(tmp_path)
    assert set(history.columns) >= {"round", "site", "group", "personal", "score"}
    personal = history[history["personal"]].groupby("round")["group"].apply(sorted).to_dict()
    assert personal == {1: ["block"], 2: ["block", "head"]}
    axes = plot_mask_timeline(history)
    assert len(axes) == 1 and axes[0].get_title() == "site 0"
    plt.close("all")


def test_mask_history_errors_name_the_problem(tmp_path):
    with pytest.raises(FileNotFoundError, match="checkpoint_every=1"):
        mask_history(tmp_path)
    save_checkpoint(checkpoint_path(tmp_path, 1), tensors={}, state={"round": 1, "strategy": {}})
    with pytest.raises(ValueError, match="no mask state"):
        mask_history(tmp_path)
