"""Personalisation maths: KL group scores, mask partition and hysteresis, private score release."""
from __future__ import annotations

import math

import pytest
import torch

from mmpfl_core.data.contract import CohortDataset
from mmpfl_core.errors import ConfigError, PrivacyError
from mmpfl_core.federated.client import trainable_state
from mmpfl_core.personalization import (MaskSchedule, PersonalizationMasks, ScoreRelease, clip_scores, kl_group_scores,
                                        mask_release_multiplier, release_scores)
from mmpfl_core.privacy.accounting import combine_noise_multipliers

GROUPS = ("a", "b", "c", "d", "head")


def test_kl_score_is_zero_for_identical_models_and_positive_for_a_changed_group(tiny_federation, tiny_model_factory):
    model = tiny_model_factory()
    val = CohortDataset(tiny_federation.sites[0].val)
    groups = model.parameter_groups()
    glob = trainable_state(model)
    same = kl_group_scores(model, glob, glob, val, groups, batch_size=16)
    assert list(same) == list(groups) and all(v == 0.0 for v in same.values())

    personal = dict(glob)
    personal["head.weight"] = glob["head.weight"] + torch.randn(glob["head.weight"].shape, generator=torch.Generator().manual_seed(0))
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    scores = kl_group_scores(model, glob, personal, val, groups, batch_size=7)
    assert scores["head"] > 0
    assert all(v == 0.0 for g, v in scores.items() if g != "head")
    # The module's own parameters are untouched (functional_call, no copies written back).
    assert all(torch.equal(before[n], p) for n, p in model.named_parameters())
    # Batch size does not change the mean (up to float rounding).
    assert kl_group_scores(model, glob, personal, val, groups, batch_size=256)["head"] == pytest.approx(scores["head"], rel=1e-5)


def test_kl_score_matches_a_direct_computation(tiny_federation, tiny_model_factory):
    model = tiny_model_factory().eval()
    val = CohortDataset(tiny_federation.sites[1].val)
    glob = trainable_state(model)
    personal = {n: t + 0.05 for n, t in glob.items() if n.startswith("norm.")}
    got = kl_group_scores(model, glob, personal, val, {"norm": ["norm.weight", "norm.bias"]}, batch_size=5)["norm"]
    batch = val.batch(torch.arange(len(val)))
    with torch.no_grad():
        logits_q = model(batch["images"], batch["modality_mask"], batch["clinical"])
        model.load_state_dict({**glob, **personal}, strict=False)
        logits_p = model(batch["images"], batch["modality_mask"], batch["clinical"])
    # The reference in float64, so only the float32 logits carry rounding error.
    log_q, log_p = torch.log_softmax(logits_q.double(), -1), torch.log_softmax(logits_p.double(), -1)
    expected = float((log_p.exp() * (log_p - log_q)).sum(-1).mean())  # KL(p_personal || p_global)
    # The KL here is ~2e-5, a difference of nearly equal log-probabilities: the float32 forward passes
    # (the scorer reruns only the head, the reference the whole model) move each logit by up to a few
    # ulps, and the KL by that much in absolute terms, not relative to its tiny value.
    float32_logit_error = 8 * torch.finfo(torch.float32).eps * float(torch.cat([logits_p, logits_q]).abs().max())
    assert got == pytest.approx(expected, rel=1e-4, abs=float32_logit_error) and got > 0
    assert abs(got - expected) < 0.05 * expected  # still tight enough to catch a wrong direction or a missed group


@pytest.mark.parametrize("fusion", ["early", "token", "late"])
def test_kl_scores_reusing_block_inputs_equal_full_forward_passes(fusion, tiny_federation, monkeypatch):
    from mmpfl_core.models import MultiModalViT, create_model
    model = create_model("tiny", seed=0, fusion=fusion, image_size=32, patch_size=8, embed_dim=32, depth=3, num_heads=2,
                         late_depth=2)
    val = CohortDataset(tiny_federation.sites[2].val)
    glob = trainable_state(model)
    g = torch.Generator().manual_seed(1)
    personal = {n: t + 0.05 * torch.randn(t.shape, generator=g) for n, t in glob.items()}  # every group changed
    groups = model.parameter_groups()
    staged = kl_group_scores(model, glob, personal, val, groups, batch_size=9)
    monkeypatch.setattr(MultiModalViT, "first_block_of_group", lambda self, group: None)
    full = kl_group_scores(model, glob, personal, val, groups, batch_size=9)
    assert list(staged) == list(groups) and all(v > 0 for v in full.values())
    assert staged == pytest.approx(full, rel=1e-4, abs=1e-7)


def _partition_ok(masks: PersonalizationMasks, site: int) -> bool:
    shared, personal = masks.partition(site)
    return set(shared).isdisjoint(personal) and set(shared) | set(personal) == set(GROUPS) \
        and len(shared) + len(personal) == len(GROUPS)


@pytest.mark.parametrize("mode", ["threshold", "top_fraction"])
def test_masks_partition_the_groups_exactly(mode):
    masks = PersonalizationMasks(MaskSchedule(mode=mode, threshold=0.5, top_fraction=0.5, always_shared=("a",),
                                              always_personal=("head",), min_shared_groups=2))
    masks.set_groups(GROUPS)
    gen = torch.Generator().manual_seed(0)
    for t in range(1, 30):
        scores = dict(zip(GROUPS, torch.rand(len(GROUPS), generator=gen).mul(2).tolist()))
        masks.update(0, t, scores)
        assert _partition_ok(masks, 0)
        shared, personal = masks.partition(0)
        assert "a" in shared and "head" in personal and len(shared) >= 2


def test_threshold_hysteresis_prevents_flapping():
    scores_b = [1.05, 0.95, 1.08, 0.93, 1.06, 0.94]  # oscillates around threshold 1.0
    flips = {}
    for h in (0.0, 0.1):
        masks = PersonalizationMasks(MaskSchedule(threshold=1.0, hysteresis=h, min_shared_groups=0))
        masks.set_groups(("b", "z"))
        changes = [masks.update(0, t, {"b": s, "z": 0.0}) for t, s in enumerate(scores_b, start=1)]
        flips[h] = sum(changes)
    assert flips[0.0] == len(scores_b)  # without hysteresis: in, out, in, out, ...
    assert flips[0.1] == 0  # never crosses 1.1 to enter
    masks = PersonalizationMasks(MaskSchedule(threshold=1.0, hysteresis=0.1, min_shared_groups=0))
    masks.set_groups(("b", "z"))
    masks.update(0, 1, {"b": 1.2, "z": 0.0})
    assert masks.personal_groups(0) == {"b"}
    for t, s in enumerate([0.95, 1.05, 0.91], start=2):  # stays personal above 0.9
        masks.update(0, t, {"b": s, "z": 0.0})
        assert masks.personal_groups(0) == {"b"}
    masks.update(0, 5, {"b": 0.85, "z": 0.0})
    assert masks.personal_groups(0) == frozenset()


def test_top_fraction_hysteresis_keeps_the_incumbent_on_near_ties():
    masks = PersonalizationMasks(MaskSchedule(mode="top_fraction", top_fraction=0.5, hysteresis=0.1, min_shared_groups=0))
    masks.set_groups(("x", "y"))
    masks.update(0, 1, {"x": 1.0, "y": 0.5})
    assert masks.personal_groups(0) == {"x"}
    masks.update(0, 2, {"x": 1.0, "y": 1.1})  # y slightly ahead: within the margin, x stays
    assert masks.personal_groups(0) == {"x"}
    masks.update(0, 3, {"x": 1.0, "y": 1.5})  # clearly ahead: y takes over
    assert masks.personal_groups(0) == {"y"}


def test_update_every():
    schedule = MaskSchedule(mode="top_fraction", top_fraction=0.5, update_every=2)
    masks = PersonalizationMasks(schedule)
    assert masks.due(3, 1)
    masks.update(3, 1, dict.fromkeys(GROUPS, 1.0))
    assert not masks.due(3, 2) and masks.due(3, 3)


def test_mask_config_errors_name_the_field():
    with pytest.raises(ConfigError, match="masks.hysteresis"):
        MaskSchedule(hysteresis=1.0)
    with pytest.raises(ConfigError, match="both always_shared and always_personal"):
        MaskSchedule(always_shared=("head",), always_personal=("head",))
    with pytest.raises(ConfigError, match="not parameter groups"):
        PersonalizationMasks(MaskSchedule(always_personal=("heads",))).set_groups(GROUPS)


def test_mask_state_round_trips():
    masks = PersonalizationMasks(MaskSchedule(threshold=0.3))
    masks.set_groups(GROUPS)
    masks.update(1, 2, dict(zip(GROUPS, [0.1, 0.5, 0.9, 0.0, 0.4])))
    other = PersonalizationMasks(MaskSchedule(threshold=0.3))
    other.load_state_dict(masks.state_dict())
    assert other.state_dict() == masks.state_dict() and other.personal_groups(1) == masks.personal_groups(1)


def test_release_scores_clips_to_the_bound_and_adds_noise_of_the_right_std():
    scores = dict(zip(GROUPS, [3.0, 4.0, 0.0, 0.0, 12.0]))  # norm 13
    clipped = release_scores(scores, clip=1.0, noise_multiplier=0.0, generator=torch.Generator().manual_seed(0))
    assert math.sqrt(sum(v * v for v in clipped.values())) == pytest.approx(1.0)
    assert clipped["b"] / clipped["a"] == pytest.approx(4 / 3)  # direction kept
    assert clip_scores({"a": 0.1}, 1.0) == {"a": 0.1}  # inside the bound: unchanged
    gen = torch.Generator().manual_seed(1)
    draws = torch.tensor([list(release_scores(scores, clip=2.0, noise_multiplier=1.5, generator=gen).values())
                          for _ in range(4000)], dtype=torch.float64)
    centred = draws - torch.tensor(list(clip_scores(scores, 2.0).values()), dtype=torch.float64)
    assert centred.std(dim=0).tolist() == pytest.approx([3.0] * len(GROUPS), rel=0.05)
    assert centred.mean(dim=0).abs().max() < 0.2
    with pytest.raises(PrivacyError, match="NaN"):
        release_scores({"a": float("nan")}, clip=1.0, noise_multiplier=1.0, generator=gen)


def test_mask_release_is_recorded_jointly_per_placement():
    assert mask_release_multiplier(placement="server", noise_multiplier=2.0) is None
    assert mask_release_multiplier(placement="distributed", noise_multiplier=2.0) == 2.0
    assert mask_release_multiplier(placement="local", noise_multiplier=2.0) == 1.0
    z_mask = ScoreRelease(clip=1.0, noise_multiplier=4.0).accounting_multiplier("distributed")
    assert combine_noise_multipliers(1.0, z_mask) == pytest.approx((1 + 1 / 16) ** -0.5)
    with pytest.raises(PrivacyError, match="server sees each site's mask"):
        mask_release_multiplier(placement="local", noise_multiplier=0.0)


def test_forced_personal_groups_need_no_score_and_override_min_shared():
    masks = PersonalizationMasks(MaskSchedule(threshold=0.5, always_shared=("a",), min_shared_groups=2))
    masks.set_groups(GROUPS)
    masks.update(0, 1, {"b": 0.9, "c": 0.8}, forced_personal={"d", "head"})  # d, head unscored; a always shared
    assert masks.personal_groups(0) == {"b", "d", "head"}  # c (the lower score) dropped: two groups stay shared
    assert set(masks.scores(0)) == {"b", "c"}
    masks.update(0, 2, {}, forced_personal=set(GROUPS) - {"a"})  # the gate may keep everything else home
    assert masks.personal_groups(0) == set(GROUPS) - {"a"} and _partition_ok(masks, 0)
    masks.update(0, 3, {}, forced_personal=set(GROUPS))  # ...even an always_shared group: noise wins
    assert masks.personal_groups(0) == set(GROUPS)
    with pytest.raises(ConfigError, match="scores miss groups"):
        masks.update(0, 4, {"b": 0.1}, forced_personal={"head"})
    with pytest.raises(ConfigError, match="forced_personal groups"):
        masks.update(0, 4, {}, forced_personal={"tail"})


def test_release_snr_formula_and_gate():
    from mmpfl_core.personalization.noise_gate import NoiseGate, release_snr
    snr = release_snr(clip_bounds={"x": 0.5, "y": 0.1, "off": 0.2}, sigmas={"x": 2.0, "y": 0.5, "off": 0.0},
                      group_sizes={"x": 100, "y": 4, "off": 9}, expected_participants=5.0, rounds=16)
    assert snr["x"] == pytest.approx(4 * 5 * 0.5 / (2.0 * 10))  # sqrt(T) qN C_g / (sigma_g sqrt(d_g)) = 0.5
    assert snr["y"] == pytest.approx(4 * 5 * 0.1 / (0.5 * 2))  # 2.0
    assert snr["off"] == math.inf  # no noise, nothing drowned
    assert NoiseGate(min_snr=1.0).drowned(snr) == {"x"}
    assert NoiseGate(min_snr=0.0).drowned(snr) == frozenset()
    with pytest.raises(ConfigError, match="noise_gate.min_snr"):
        NoiseGate(min_snr=-1.0)
