"""MM-PFL-ADP on cross-silo DP-SGD with secure aggregation (``mm-pfl-adp-cross-silo``): the allocation keeps
z_eff = z over every group, placeholder shares keep the aggregate's variance sigma_g^2 whatever the masks, masks
see only public data and DP outputs, the ablations do what they say, bad input is refused with the fix."""

from __future__ import annotations

import math
import warnings

import numpy as np
import pytest
import torch

from conftest import whole_killed_resumed
from mmpfl_core.data.contract import CohortDataset
from mmpfl_core.errors import ConfigError, PrivacyError
from mmpfl_core.federated import mm_pfl_adp_cross_silo as module
from mmpfl_core.federated.config import FederatedConfig, LocalTrainingConfig, OptimizerConfig
from mmpfl_core.federated.mm_pfl_adp_cross_silo import MMPFLADPCrossSilo
from mmpfl_core.federated.simulation import run_federated
from mmpfl_core.federated.strategies import create_strategy
from mmpfl_core.privacy import compute_epsilon
from mmpfl_core.privacy.allocation import NoiseAllocation, effective_multiplier

ADAMW = OptimizerConfig(name="adamw", lr=0.01, weight_decay=0.0)


def _config(rounds: int) -> FederatedConfig:
    return FederatedConfig(
        num_rounds=rounds,
        client_fraction=1.0,
        local=LocalTrainingConfig(local_steps=1, batch_size=16),
        optimizer=ADAMW,
        bootstrap_resamples=0,
        checkpoint_every=0,
        device="cpu",
    )


def _strategy(cls=MMPFLADPCrossSilo, **kwargs) -> MMPFLADPCrossSilo:
    kwargs = {"noise_multiplier": 1.2, "max_grad_norm": 1.0, "mask": {"always_personal": ["head"]}, **kwargs}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # reproducible-insecure noise warns, on purpose
        return cls(noise="reproducible-insecure", **kwargs)


def _configured(federation, model_factory, rounds=4, **kwargs) -> MMPFLADPCrossSilo:
    strategy = _strategy(**kwargs)
    strategy.configure(config=_config(rounds), federation=federation, client_ids=[0], model=model_factory())
    return strategy


# ------------------------------------------------------------------ (a) z_eff = z of the allocation
class _SpendsMore(MMPFLADPCrossSilo):
    """BROKEN on purpose: halves the noise of one group after allocating (spends more than z)."""

    def plan_round(self, round_index, global_state):
        alloc = super().plan_round(round_index, global_state)
        g = next(iter(alloc.sigmas))
        sigmas = {**alloc.sigmas, g: alloc.sigmas[g] / 2}
        broken = NoiseAllocation(sigmas=sigmas, rhos=alloc.rhos, clip_bounds=alloc.clip_bounds, noise_multiplier=1.2)
        self.check_allocation(broken)
        return broken


def test_fisher_allocation_has_z_eff_z_over_all_groups_and_an_overspending_one_is_refused(
    tiny_federation, tiny_model_factory
):
    strategy = _configured(tiny_federation, tiny_model_factory, noise_gate=False)
    state = {n: p.detach() for n, p in tiny_model_factory().named_parameters()}
    alloc = strategy.plan_round(1, state)
    assert set(alloc.sigmas) == set(strategy.groups)  # personal groups too: the joint mechanism's z_eff
    assert effective_multiplier(strategy.clip_bounds, alloc.sigmas) == pytest.approx(1.2, rel=1e-9)
    # C_g = C sqrt(d_g / d), so sum_g C_g^2 = C^2
    assert math.fsum(c**2 for c in strategy.clip_bounds.values()) == pytest.approx(1.0)
    assert len({round(s, 9) for s in alloc.sigmas.values()}) > 1  # the Fisher split differs by group
    ratio = max(alloc.sigmas.values()) / min(alloc.sigmas.values())
    assert ratio <= 4.0 + 1e-9  # max_noise_ratio 2: every sigma_g within [sigma_u / 2, 2 sigma_u]
    broken = _strategy(_SpendsMore, noise_gate=False)
    with pytest.raises(PrivacyError, match="not the accounted"):
        run_federated(tiny_federation, model_factory=tiny_model_factory, strategy=broken, config=_config(1),
                      progress=False)  # fmt: skip


# ------------------------------------------------------------------ (b) the aggregate keeps sigma_g^2
class _NoPlaceholders(MMPFLADPCrossSilo):
    """BROKEN on purpose: a site sends zeros WITHOUT noise for the groups it keeps (no placeholder share)."""

    def group_shares(self, sums, alloc, keep, round_index, noise_gen):
        shares = super().group_shares(sums, alloc, keep, round_index, noise_gen)
        return {n: (torch.zeros_like(t) if self.group_of[n] in keep else t) for n, t in shares.items()}


def _group_variances(cls, federation, model_factory, reps=40):
    """Per-group variance of the aggregate sum of zero-gradient rounds, 3 sites with DIFFERENT masks, through
    the strategy's own group_shares and aggregate (server SGD lr 1)."""
    strategy = _strategy(
        cls,
        noise_gate=False,
        server_optimizer={"name": "sgd", "lr": 1.0},
        mask={"always_personal": ["head"], "update_every": 1},
    )
    model = model_factory()
    strategy.configure(config=_config(10), federation=federation, client_ids=[0], model=model)
    state = {n: p.detach() for n, p in model.named_parameters()}
    sites = sorted(strategy.site_sizes)
    strategy.select(sites, _config(10), None)
    groups = list(strategy.groups)
    masks = [frozenset(groups[:3]), frozenset(groups[2:5]), frozenset()]  # private, all different
    alloc = strategy.plan_round(5, state)
    qn = strategy.sample_rate * strategy.total
    zeros = {n: torch.zeros_like(t) for n, t in state.items()}
    gen = torch.Generator().manual_seed(0)
    draws: dict[str, list[torch.Tensor]] = {g: [] for g in groups}
    for _ in range(reps):
        sent = [strategy.group_shares(zeros, alloc, m, 5, gen) for m in masks]
        new = strategy.aggregate(state, [], sent, 5)
        for n in sent[0]:
            draws[strategy.group_of[n]].append(((state[n] - new[n]) * qn).flatten())
    out = {g: float(torch.cat(d).double().var()) for g, d in draws.items() if d}
    sizes = {g: sum(t.numel() for t in [state[n] for n in strategy.groups[g]]) * reps for g in out}
    return out, {g: alloc.sigmas[g] ** 2 for g in out}, sizes, masks


def _exact(variances, expected, sizes) -> bool:
    # relative std of a variance estimate from n draws is sqrt(2 / n); 6 of them (n >= 40 * d_g)
    return all(abs(variances[g] / expected[g] - 1) < 6 * math.sqrt(2 / sizes[g]) for g in variances)


def test_aggregate_variance_is_sigma_g2_per_group_whatever_the_masks_and_flags_missing_placeholders(
    tiny_federation, tiny_model_factory
):
    variances, expected, sizes, masks = _group_variances(MMPFLADPCrossSilo, tiny_federation, tiny_model_factory)
    assert "head" not in variances  # always_personal: no site sends it, the server knows
    assert _exact(variances, expected, sizes), (variances, expected)
    broken, _, _, _ = _group_variances(_NoPlaceholders, tiny_federation, tiny_model_factory)
    kept = set(masks[0]) | set(masks[1])
    assert not _exact(broken, expected, sizes)
    assert all(broken[g] < 0.8 * expected[g] for g in kept if g in broken)  # under-noised where a site keeps g


# ------------------------------------------------------------------ (c) masks see public data and DP outputs only
def test_masks_are_scored_on_the_public_set_only_and_ignore_the_training_patients(
    tiny_federation, tiny_model_factory, monkeypatch
):
    strategy = _configured(tiny_federation, tiny_model_factory, noise_gate=False, mask={"always_personal": ["head"],
                           "update_every": 1, "threshold": 1e-4})  # fmt: skip
    seen = []
    real = module.kl_group_scores

    def spy(model, global_state, personal, dataset, groups, **kw):
        seen.append(dataset)
        return real(model, global_state, personal, dataset, groups, **kw)

    monkeypatch.setattr(module, "kl_group_scores", spy)
    # the DP outputs pinned: the site's personal copies are fixed tensors, its personal step a no-op
    monkeypatch.setattr(MMPFLADPCrossSilo, "step_personal_copy", lambda self, *a, **k: None)
    model = tiny_model_factory()
    state = {n: p.detach().clone() for n, p in model.named_parameters()}
    gen = torch.Generator().manual_seed(3)
    names = [n for g in ("block.0", "norm", "tokens") for n in strategy.groups[g]]
    pinned = {n: state[n] + 0.5 * torch.randn(state[n].shape, generator=gen) for n in names}
    site = tiny_federation.sites[0]
    full = CohortDataset(site.train)
    minus_one = CohortDataset(site.train.subset(np.arange(1, len(site.train))))
    strategy.select(sorted(strategy.site_sizes), _config(4), None)
    masks = []
    for data in (full, minus_one):
        strategy.site_masks[site.site_id] = strategy._start_mask
        strategy.personal[site.site_id] = dict(pinned)
        strategy.before_round(2)
        strategy.local_training(model, data, site_id=site.site_id, global_state=state, round_index=2,
                                config=_config(4), generator=torch.Generator().manual_seed(0),
                                device=torch.device("cpu"))  # fmt: skip
        masks.append(strategy.site_masks[site.site_id])
    assert masks[0] == masks[1]
    assert {"block.0", "norm", "tokens"} & masks[0] and masks[0] != strategy._start_mask  # it did decide
    assert seen and all(d is strategy._score_set for d in seen)
    public_ids = set(tiny_federation.public.subject_ids)
    assert set(strategy._score_set.cohort.subject_ids) <= public_ids
    assert not set(strategy._score_set.cohort.subject_ids) & set(site.train.subject_ids)


# ------------------------------------------------------------------ (d) the run, the ledger and the ablations
def test_run_releases_with_the_ledgers_epsilon_and_the_ablations_do_what_they_say(tiny_federation, tiny_model_factory):
    runs = {}
    for label, kwargs in {"full": {}, "uniform": {"fisher": False}, "nomask": {"masks": False}}.items():
        strategy = _strategy(target_epsilon=4.0, noise_multiplier=None, accountant="rdp", expected_batch_size=24,
                             noise_gate=False, mask={"always_personal": ["head"], "threshold": 5e-4}, **kwargs)  # fmt: skip
        run = run_federated(tiny_federation, model_factory=tiny_model_factory, strategy=strategy, config=_config(4),
                            progress=False)  # fmt: skip
        runs[label] = (strategy, run.summary["sample_level_privacy"])
    n_total = sum(len(s.train) for s in tiny_federation.sites)
    for _, privacy in runs.values():
        expected = compute_epsilon(noise_multiplier=privacy["noise_multiplier"], sample_rate=24 / n_total, steps=4,
                                   delta=1 / (10 * n_total), accountant="rdp")  # fmt: skip
        assert privacy["max_epsilon"] == pytest.approx(expected) and 0 < privacy["max_epsilon"] <= 4.0
        assert privacy["released"] and privacy["released_groups"]
        assert "head" not in privacy["released_groups"]
    full, uniform, nomask = (runs[k][0] for k in ("full", "uniform", "nomask"))
    z = runs["uniform"][1]["noise_multiplier"]
    assert set(np.round(list(runs["uniform"][1]["group_sigmas"].values()), 9)) == {round(z * 1.0, 9)}  # z C
    assert len(set(np.round(list(runs["full"][1]["group_sigmas"].values()), 9))) > 1
    assert all(m == frozenset({"head"}) for m in nomask.site_masks.values())  # no KL masks: always_personal only
    assert "no KL masks" in runs["nomask"][1]["mask_privacy"]
    for m in full.site_masks.values():  # one-way masks: from the start set, never below always_personal
        assert {"head"} <= m <= full._start_mask


def test_the_noise_gate_keeps_hopeless_groups_personal_everywhere_from_public_inputs(
    tiny_federation, tiny_model_factory
):
    strategy = _configured(tiny_federation, tiny_model_factory, noise_gate={"min_snr": 1e6}, masks=False)
    state = {n: p.detach() for n, p in tiny_model_factory().named_parameters()}
    strategy.plan_round(1, state)
    assert strategy.drowned == frozenset(strategy.groups)  # nothing clears an absurd min_snr
    assert strategy.public_personal(1) == frozenset(strategy.groups)
    shares = strategy.group_shares({n: torch.zeros_like(t) for n, t in state.items()}, strategy.allocation,
                                   frozenset(), 1, None)  # fmt: skip
    assert shares == {}  # nothing is sent
    assert strategy.aggregate(state, [], [], 1) == dict(state)  # and the global model does not move
    snr = strategy.snr  # sqrt(T) qN C_g / (sigma_g sqrt(d_g)): public quantities only
    g = next(iter(snr))
    qn = strategy.sample_rate * strategy.total
    expected = (
        math.sqrt(4)
        * qn
        * strategy.clip_bounds[g]
        / (strategy.allocation.sigmas[g] * math.sqrt(strategy.group_sizes[g]))
    )
    assert snr[g] == pytest.approx(expected)


# ------------------------------------------------------------------ (e) bad input
@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"personal_groups": ["head"]}, "always_personal"),
        ({"mask_start": "none"}, "mask_start"),
        ({"max_noise_ratio": 0.5}, "max_noise_ratio"),
        ({"fisher_every": 0}, "fisher_every"),
        ({"score_subjects": 0}, "score_subjects"),
    ],
)
def test_bad_settings_are_refused_with_the_fix(kwargs, match):
    with pytest.raises(ConfigError, match=match):
        create_strategy("mm-pfl-adp-cross-silo", target_epsilon=8.0, **kwargs)


def test_unknown_mask_group_is_refused(tiny_federation, tiny_model_factory):
    strategy = create_strategy("mm-pfl-adp-cross-silo", target_epsilon=8.0, mask={"always_personal": ["nope"]})
    with pytest.raises(ConfigError, match="not trainable groups"):
        strategy.configure(config=_config(2), federation=tiny_federation, client_ids=[0], model=tiny_model_factory())


# ------------------------------------------------------------------ the bench arms
@pytest.mark.parametrize("arm", ["public/mm-pfl-adp+secagg-dp-sgd", "public/mm-pfl-adp+secagg-dp-sgd-nomask"])
def test_bench_arm_reports_the_ledgers_epsilon_and_what_it_shares(arm, tmp_path, monkeypatch):
    """bench/where_collaboration_pays.py's MM-PFL-ADP secagg arms at smoke size: epsilon from the patient ledger
    (<= the target), the head's scalars never in the shared dimension, masks no more shared than the head alone."""
    import importlib
    import sys
    from dataclasses import replace
    from pathlib import Path

    monkeypatch.syspath_prepend(str(Path(__file__).resolve().parent.parent / "bench"))
    sys.modules.pop("where_collaboration_pays", None)
    bench = importlib.import_module("where_collaboration_pays")
    quick = {"num_subjects": 300, "public_subjects": 60, "public_epochs": 1, "image_size": 32}
    s = replace(bench.HEADLINE, num_sites=3, private_part="head+bias", secagg_rounds=6, secagg_batch=20, **quick)
    out = bench.run_arm(arm, 0, s, str(tmp_path))
    assert 0 < out["epsilon"] <= s.epsilon
    assert out["epsilon"] == pytest.approx(s.epsilon, abs=0.05)  # calibrated for the 6 steps
    head_only = bench.run_arm("public/cross-silo-head+secagg-dp-sgd", 0, replace(s, secagg_rounds=1), str(tmp_path))
    # at this size (q N = 20, T = 6) the noise gate drowns some groups too, so at most the head-only release
    assert 0 < out["shared_d"] <= head_only["shared_d"] < out["d"]


def test_resume_matches_the_uninterrupted_run(tiny_federation, tiny_model_factory, tmp_path):
    """Reproducible noise: killed after round 2 and resumed, the run ends bit-identical to the uninterrupted one
    (masks, the public-set Fisher of round 1 reused in round 3, personal AdamW moments, one ledger of 3 steps)."""
    import dataclasses

    cfg = dataclasses.replace(_config(3), checkpoint_every=1)

    def strategy():
        return _strategy(
            fisher_every=3,
            max_noise_ratio=None,
            noise_gate=False,
            mask={"always_personal": ["head"], "update_every": 1, "threshold": 10.0},
        )

    whole, resumed, run_dir = whole_killed_resumed(tiny_federation, tiny_model_factory, strategy, cfg, tmp_path)
    for name in whole.global_state:
        assert torch.equal(whole.global_state[name], resumed.global_state[name])
    assert whole.strategy.site_masks == resumed.strategy.site_masks
    assert all(m == frozenset({"head"}) for m in whole.strategy.site_masks.values())  # shared from round 2: it moved
    for site in tiny_federation.sites:
        a = whole.strategy.personal_state(site.site_id, whole.global_state)
        b = resumed.strategy.personal_state(site.site_id, resumed.global_state)
        assert a is not None and b is not None and all(torch.equal(a[n], b[n]) for n in a)
    assert resumed.summary["sample_level_privacy"] == whole.summary["sample_level_privacy"]
    assert resumed.summary["sample_level_privacy"]["steps"] == 3
    # A FINISHED run read back (what `mmpfl compare` does on a second call) deploys the same personal models: the
    # public warm-up rule (every group personal in rounds 1..update_every) must not apply again after loading.
    read_back = run_federated(tiny_federation, model_factory=tiny_model_factory, strategy=strategy(), config=cfg,
                              progress=False, run_dir=run_dir("whole", True))  # fmt: skip
    for site in tiny_federation.sites:
        a = whole.strategy.personal_state(site.site_id, whole.global_state)
        b = read_back.strategy.personal_state(site.site_id, read_back.global_state)
        assert a is not None and b is not None and a.keys() == b.keys() and all(torch.equal(a[n], b[n]) for n in a)
    assert read_back.strategy.personal_groups_of(0) == whole.strategy.personal_groups_of(0) == frozenset({"head"})
