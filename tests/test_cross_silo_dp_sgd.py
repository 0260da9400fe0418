"""Cross-silo DP-SGD (``cross-silo-dp-sgd``): one DP-SGD step over the union of the sites' patients per round,
secure aggregation of the clipped sums, one Gaussian noise of variance z^2 C^2 on the aggregate."""

from __future__ import annotations

import dataclasses
import math
import warnings

import pytest
import torch
from torch import nn

from conftest import whole_killed_resumed
from mmpfl_core.errors import ConfigError
from mmpfl_core.federated.client import forward_batch
from mmpfl_core.federated.config import FederatedConfig, LocalTrainingConfig, OptimizerConfig
from mmpfl_core.federated.cross_silo_dp_sgd import PRIVACY_UNIT, CrossSiloDPSGD
from mmpfl_core.federated.simulation import run_federated
from mmpfl_core.federated.strategies import create_strategy
from mmpfl_core.privacy import compute_epsilon

PLAIN_SGD = OptimizerConfig(name="sgd", lr=0.05, momentum=0.0, weight_decay=0.0)


def _config(rounds: int, **overrides) -> FederatedConfig:
    return FederatedConfig(
        num_rounds=rounds,
        local=LocalTrainingConfig(local_steps=1, batch_size=16),
        optimizer=PLAIN_SGD,
        bootstrap_resamples=0,
        checkpoint_every=0,
        device="cpu",
        **{"client_fraction": 1.0, **overrides},
    )


def _strategy(**kwargs) -> CrossSiloDPSGD:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # reproducible-insecure noise warns, on purpose
        strategy = create_strategy("cross-silo-dp-sgd", noise="reproducible-insecure", **kwargs)
    assert isinstance(strategy, CrossSiloDPSGD)
    return strategy


def _clipped(model: nn.Module, dataset, index: int, clip: float) -> dict[str, torch.Tensor]:
    """One patient's gradient of the trainable parameters, clipped jointly to ``clip``: plain autograd."""
    model.zero_grad(set_to_none=True)
    batch = dataset.batch(torch.tensor([index]))
    nn.functional.cross_entropy(forward_batch(model, batch, torch.device("cpu")), batch["label"]).backward()
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    norm = math.sqrt(sum(float((g.double() ** 2).sum()) for g in grads.values()))
    return {n: g * min(1.0, clip / (norm + 1e-6)) for n, g in grads.items()}


# ------------------------------------------------------------------ (a) exact maths at sigma = 0
def test_one_round_is_the_clipped_per_patient_mean_over_the_union(tiny_federation, tiny_model_factory):
    """q = 1, z = 0, server SGD lr 1: the shared parameters move by minus the mean over ALL sites' patients of
    the jointly clipped per-patient gradients (denominator q N); each site's personal head moves by its own
    local lr times its clipped sum over q n_k. Checked against a per-patient autograd loop."""
    clip = 0.5
    strategy = _strategy(
        noise_multiplier=0.0,
        max_grad_norm=clip,
        sample_rate=1.0,
        personal_groups=("head",),
        server_optimizer={"name": "sgd", "lr": 1.0},
    )
    model = tiny_model_factory()
    start = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    run = run_federated(
        tiny_federation, model_factory=tiny_model_factory, strategy=strategy, config=_config(1), progress=False
    )
    heads = strategy.personal_names
    assert heads and all(n.startswith("head") for n in heads)
    total = {n: torch.zeros_like(t) for n, t in start.items()}
    n_total = 0
    from mmpfl_core.data.contract import CohortDataset

    for site in tiny_federation.sites:
        data = CohortDataset(site.train)
        model.load_state_dict(start, strict=False)
        model.train()
        site_sum = {n: torch.zeros_like(t) for n, t in start.items()}
        for i in range(len(data)):
            for n, g in _clipped(model, data, i, clip).items():
                site_sum[n] += g
        for n in start:
            total[n] += site_sum[n]
        n_total += len(data)
        personal = strategy.personal_state(site.site_id, run.global_state)
        for n in heads:  # the personal step: plain SGD at lr 0.05 on (sum + 0 noise) / (q n_k)
            torch.testing.assert_close(personal[n], start[n] - 0.05 * site_sum[n] / len(data), rtol=1e-4, atol=1e-6)
    for n in start:
        if n in heads:
            torch.testing.assert_close(run.global_state[n], start[n])  # the server never saw a head tensor
        else:
            torch.testing.assert_close(run.global_state[n], start[n] - total[n] / n_total, rtol=1e-4, atol=1e-6)
    assert any(not torch.equal(run.global_state[n], start[n]) for n in start if n not in heads)


# ------------------------------------------------------------------ (b) the aggregate's noise
class _SharesForMinimum(CrossSiloDPSGD):
    """BROKEN on purpose: shares sized for a minimum count m_min = 1 instead of the m announced."""

    @property
    def share_std(self) -> float:
        return self.noise_multiplier * self.max_grad_norm


class _NoTopUp(CrossSiloDPSGD):
    """BROKEN on purpose: the server forgets the top-up for shares that did not arrive."""

    def aggregate(self, global_state, updates, sent, round_index):
        m, self._m = self._m, len(sent)
        try:
            return super().aggregate(global_state, updates, sent, round_index)
        finally:
            self._m = m


def _aggregate_variances(cls, federation, model_factory, *, z=1.3, clip=0.7, rounds=12, dim=4000):
    """Empirical per-coordinate variance of the aggregate sum of a zero-gradient round, for (m announced, s
    arrived) in a few cases, through the strategy's own noise_share and aggregate (server SGD lr 1)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        strategy = cls(
            noise_multiplier=z,
            max_grad_norm=clip,
            sample_rate=0.5,
            noise="reproducible-insecure",
            server_optimizer={"name": "sgd", "lr": 1.0},
        )
    strategy.configure(config=_config(rounds), federation=federation, client_ids=[0], model=model_factory())
    generator = torch.Generator().manual_seed(0)
    qn = strategy.sample_rate * strategy.total
    out = {}
    for m, s in ((1, 1), (4, 4), (12, 12), (12, 7), (5, 0)):
        draws = []
        for t in range(rounds):
            strategy.select(list(range(m)), _config(rounds), None)
            sent = [strategy.noise_share({"w": torch.zeros(dim)}, generator) for _ in range(s)]
            new = strategy.aggregate({"w": torch.zeros(dim)}, [], sent, t + 1)
            draws.append(-new["w"] * qn)  # the aggregate sum (gradient zero: noise only)
        out[(m, s)] = float(torch.cat(draws).double().var())
    return out, (z * clip) ** 2


def _noise_is_exact(variances, expected) -> bool:
    # 48,000 draws per case: the variance estimate's relative std is sqrt(2 / 48000) = 0.65 %; 5 % is 7.7 of them
    return all(abs(v / expected - 1) < 0.05 for v in variances.values())


def test_aggregate_noise_variance_is_z2c2_whatever_m_and_flags_broken_shares(tiny_federation, tiny_model_factory):
    variances, expected = _aggregate_variances(CrossSiloDPSGD, tiny_federation, tiny_model_factory)
    assert _noise_is_exact(variances, expected), variances
    broken, _ = _aggregate_variances(_SharesForMinimum, tiny_federation, tiny_model_factory)
    assert not _noise_is_exact(broken, expected), broken  # variance grows with m: participation shows
    missing, _ = _aggregate_variances(_NoTopUp, tiny_federation, tiny_model_factory)
    assert not _noise_is_exact(missing, expected), missing  # under-noised when shares are missing


# ------------------------------------------------------------------ (c) accounting
def test_epsilon_is_the_accountants_and_calibration_stays_within_target(tiny_federation, tiny_model_factory):
    strategy = _strategy(target_epsilon=3.0, max_grad_norm=1.0, accountant="rdp", expected_batch_size=24)
    run = run_federated(
        tiny_federation, model_factory=tiny_model_factory, strategy=strategy, config=_config(3), progress=False
    )
    privacy = run.summary["sample_level_privacy"]
    n_total = sum(len(s.train) for s in tiny_federation.sites)
    assert privacy["sample_rate"] == pytest.approx(24 / n_total)
    assert privacy["delta"] == pytest.approx(1 / (10 * n_total))
    assert privacy["steps"] == 3 and privacy["privacy_unit"] == PRIVACY_UNIT
    expected = compute_epsilon(
        noise_multiplier=privacy["noise_multiplier"],
        sample_rate=24 / n_total,
        steps=3,
        delta=1 / (10 * n_total),
        accountant="rdp",
    )
    assert privacy["max_epsilon"] == pytest.approx(expected)
    assert set(privacy["per_site_epsilon"].values()) == {privacy["max_epsilon"]}
    assert privacy["max_epsilon"] <= 3.0
    assert privacy["max_epsilon"] == pytest.approx(3.0, abs=0.05)  # calibrated for T = 3 steps, not fewer
    assert "not_private" in privacy  # reproducible-insecure noise says so


# ------------------------------------------------------------------ (d) personal coordinates stay home
def test_personal_coordinates_never_reach_the_aggregate(tiny_federation, tiny_model_factory):
    strategy = _strategy(
        noise_multiplier=1.0,
        max_grad_norm=1.0,
        personal_groups=("head",),
        server_optimizer={"name": "momentum", "lr": 0.5},
    )
    seen: list[set[str]] = []
    aggregate = strategy.aggregate

    def spy(global_state, updates, sent, round_index):
        seen.extend(set(s) for s in sent)
        return aggregate(global_state, updates, sent, round_index)

    strategy.aggregate = spy  # type: ignore[method-assign]
    start = {n: p.detach().clone() for n, p in tiny_model_factory().named_parameters()}
    run = run_federated(
        tiny_federation, model_factory=tiny_model_factory, strategy=strategy, config=_config(2), progress=False
    )
    heads = strategy.personal_names
    assert heads and len(seen) == 2 * len(tiny_federation.sites)
    assert all(not (names & heads) and names for names in seen)
    assert not set(strategy.broadcast(0, run.global_state)) & heads
    for n in heads:
        torch.testing.assert_close(run.global_state[n], start[n])
    sites = [s.site_id for s in tiny_federation.sites]
    personal = [strategy.personal_state(k, run.global_state) for k in sites]
    assert all(not torch.equal(p[n], start[n]) for p in personal for n in heads)  # each site stepped its own
    with pytest.raises(RuntimeError, match="personal tensors"):
        from mmpfl_core.federated.client import ClientUpdate

        leaked = {next(iter(heads)): torch.zeros(1)}
        strategy.transmit(ClientUpdate(site_id=0, delta=leaked, num_examples=1, num_steps=1, train_loss=0.0), 1)


# ------------------------------------------------------------------ (e) bad input
@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"target_epsilon": 8.0, "sample_rate": 0.0}, "sample_rate"),
        ({"target_epsilon": 8.0, "sample_rate": 1.5}, "sample_rate"),
        ({"target_epsilon": 0.0}, "target_epsilon"),
        ({"target_epsilon": -1.0}, "target_epsilon"),
        ({"target_epsilon": 8.0, "delta": 1.0}, "delta"),
        ({"target_epsilon": 8.0, "delta": 2.0}, "delta"),
        ({}, "exactly one"),
    ],
)
def test_bad_settings_are_refused_with_the_fix(kwargs, match):
    with pytest.raises(ConfigError, match=match):
        create_strategy("cross-silo-dp-sgd", **kwargs)


def test_partial_participation_and_loose_delta_are_refused(tiny_federation, tiny_model_factory):
    strategy = create_strategy("cross-silo-dp-sgd", target_epsilon=8.0)
    with pytest.raises(ConfigError, match="client_fraction=1.0"):
        strategy.configure(
            config=_config(2, client_fraction=0.5),
            federation=tiny_federation,
            client_ids=[0],
            model=tiny_model_factory(),
        )
    vectorized = create_strategy("cross-silo-dp-sgd", target_epsilon=8.0)
    with pytest.raises(ConfigError, match="engine='loop'"):
        vectorized.configure(config=_config(2, engine="vectorized"), federation=tiny_federation, client_ids=[0],
                             model=tiny_model_factory())  # fmt: skip
    loose = create_strategy("cross-silo-dp-sgd", target_epsilon=8.0, delta=1e-2)
    with pytest.raises(ConfigError, match=r"1/\(10 N\)"):
        loose.configure(config=_config(2), federation=tiny_federation, client_ids=[0], model=tiny_model_factory())
    unknown = create_strategy("cross-silo-dp-sgd", target_epsilon=8.0, personal_groups=("nope",))
    with pytest.raises(ConfigError, match="personal_groups"):
        unknown.configure(config=_config(2), federation=tiny_federation, client_ids=[0], model=tiny_model_factory())


# ------------------------------------------------------------------ resume and the bench arms
def test_resume_matches_the_uninterrupted_run_and_keeps_one_ledger(tiny_federation, tiny_model_factory, tmp_path):
    """Reproducible noise: a run killed after round 2 and resumed from its checkpoint (server Adam moments, the
    sites' personal AdamW moments, the ledger) ends bit-identical to the uninterrupted run, charged 3 steps."""
    adamw = OptimizerConfig(name="adamw", lr=0.01, weight_decay=0.0)
    cfg = dataclasses.replace(_config(3), optimizer=adamw, checkpoint_every=1)

    def strategy():
        return _strategy(noise_multiplier=1.0, personal_groups=("head",), expected_batch_size=30)

    whole, resumed, _ = whole_killed_resumed(tiny_federation, tiny_model_factory, strategy, cfg, tmp_path)
    for name in whole.global_state:
        assert torch.equal(whole.global_state[name], resumed.global_state[name])
    for site in tiny_federation.sites:
        a = whole.strategy.personal_state(site.site_id, whole.global_state)
        b = resumed.strategy.personal_state(site.site_id, resumed.global_state)
        assert all(torch.equal(a[n], b[n]) for n in a)
    assert resumed.summary["sample_level_privacy"] == whole.summary["sample_level_privacy"]
    assert resumed.summary["sample_level_privacy"]["steps"] == 3


def test_bench_arm_reports_the_accountants_epsilon_and_keeps_the_head_home(tmp_path, monkeypatch):
    """bench/where_collaboration_pays.py's cross-silo arm at smoke size: epsilon from the one patient ledger
    (<= the target), the head's scalars not in the shared dimension, and a convergence curve."""
    import importlib
    import sys
    from dataclasses import replace
    from pathlib import Path

    monkeypatch.syspath_prepend(str(Path(__file__).resolve().parent.parent / "bench"))
    sys.modules.pop("where_collaboration_pays", None)
    bench = importlib.import_module("where_collaboration_pays")
    quick = {"num_subjects": 300, "public_subjects": 60, "public_epochs": 1, "image_size": 32}
    s = replace(bench.HEADLINE, num_sites=3, private_part="head+bias", secagg_rounds=4, secagg_batch=20, **quick)
    out = bench.run_arm("public/cross-silo-head+secagg-dp-sgd", 0, s, str(tmp_path))
    assert 0 < out["epsilon"] <= s.epsilon
    assert out["epsilon"] == pytest.approx(s.epsilon, abs=0.05)  # calibrated for the 4 steps
    assert 0 < out["shared_d"] < out["d"]
    assert sorted(out["curve"]) == [1, 2, 3, 4]
