"""Client-level DP-FedAvg in the round loop: clipping, noise, fixed denominator, accounting, resume."""
from __future__ import annotations

import dataclasses
import math

import numpy as np
import pytest
import torch

from conftest import PLAIN_SGD, tiny_run_config
from mmpfl_core.data.federation import Federation
from mmpfl_core.errors import ConfigError
from mmpfl_core.federated.client import ClientUpdate
from mmpfl_core.federated.config import FederatedConfig
from mmpfl_core.federated.dp_strategies import DPFedAvg
from mmpfl_core.federated.simulation import FederatedSimulation, run_federated
from mmpfl_core.federated.strategies import Strategy, create_strategy, weighted_average_update
from mmpfl_core.io.run_directory import RunDirectory
from mmpfl_core.privacy import compute_epsilon, effective_multiplier_of
from mmpfl_core.seeding import numpy_generator


def _config(**changes) -> FederatedConfig:
    return tiny_run_config(**{"local_steps": 1, "optimizer": PLAIN_SGD, "bootstrap_resamples": 0, **changes})


def _without_timing(history):
    return [{k: v for k, v in row.items() if k != "seconds"} for row in history]


def _configured(federation, model_factory, cfg=None, **kwargs) -> DPFedAvg:
    strategy = create_strategy(kwargs.pop("name", "dp-fedavg"), **{"accountant": "rdp", **kwargs})
    FederatedSimulation(federation, model_factory=model_factory, strategy=strategy, config=cfg or _config(),
                        progress=False)
    return strategy


def _fake_update(strategy, site, scale, generator):
    delta = {n: scale * torch.randn(s, generator=generator) for n, s in strategy.shapes.items()}
    return ClientUpdate(site_id=site, delta=delta, num_examples=10, num_steps=1, train_loss=0.0)


class _UniformFedAvg(Strategy):
    name = "uniform-fedavg"

    def aggregate(self, global_state, updates, sent, round_index):
        return weighted_average_update(global_state, sent, [1.0] * len(sent))


def test_bad_arguments_name_the_field(tiny_federation, tiny_model_factory):
    for kwargs, field in [({"target_epsilon": -1.0}, "target_epsilon"), ({"target_epsilon": 1.0, "delta": 2.0}, "delta"),
                          ({}, "exactly one"), ({"noise_multiplier": 1.0, "placement": "cloud"}, "placement"),
                          ({"noise_multiplier": 1.0, "clip_norm": 0.0}, "clip_norm"),
                          ({"noise_multiplier": 1.0, "clipping": "flat", "fisher_every": 1}, "per-group")]:
        with pytest.raises(ConfigError, match=field):
            create_strategy("dp-fedavg-fisher" if "fisher_every" in kwargs else "dp-fedavg", **kwargs)
    with pytest.raises(ConfigError, match="poisson"):  # amplification claimed without Poisson sampling
        _configured(tiny_federation, tiny_model_factory, _config(client_fraction=0.5), noise_multiplier=1.0)


@pytest.mark.parametrize("clipping", ["flat", "per-group"])
def test_transmitted_updates_never_exceed_their_bounds(tiny_federation, tiny_model_factory, clipping):
    s = _configured(tiny_federation, tiny_model_factory, noise_multiplier=1.0, clip_norm=0.7, clipping=clipping)
    s.before_round(1)
    g = torch.Generator().manual_seed(0)
    for trial in range(25):  # fuzz: scales over six orders of magnitude
        sent = s.transmit(_fake_update(s, 0, 10.0 ** (trial % 7 - 4), g), 1)
        for group, names in s.groups.items():
            norm = math.sqrt(sum(float(sent[n].double().norm()) ** 2 for n in names))
            assert norm <= s.clip_bounds[group] * (1 + 1e-6)
        total = math.sqrt(sum(float(t.double().norm()) ** 2 for t in sent.values()))
        assert total <= 0.7 * (1 + 1e-6)


def test_aggregate_noise_std_matches_configuration(tiny_federation, tiny_model_factory):
    s = _configured(tiny_federation, tiny_model_factory, noise_multiplier=2.0, clip_norm=0.5)
    glob = {n: torch.zeros(sh) for n, sh in s.shapes.items()}
    s.before_round(1)
    new = s.aggregate(glob, [], [], 1)  # an empty round releases pure noise / (qN)
    values = torch.cat([t.flatten() for t in new.values()])
    expected = 2.0 * 0.5 / s.expected_participants
    assert values.std().item() == pytest.approx(expected, rel=0.15)


def test_zero_noise_and_infinite_clip_is_uniform_fedavg(tiny_federation, tiny_model_factory):
    cfg = _config(num_rounds=2)
    plain = run_federated(tiny_federation, model_factory=tiny_model_factory, strategy=_UniformFedAvg(), config=cfg,
                          progress=False)
    dp = run_federated(tiny_federation, model_factory=tiny_model_factory, config=cfg, progress=False,
                       strategy=create_strategy("dp-fedavg", noise_multiplier=0.0, clip_norm=math.inf,
                                                accountant="rdp"))
    for name in plain.global_state:
        assert torch.equal(plain.global_state[name], dp.global_state[name]), name
    assert math.isinf(dp.history[-1]["epsilon"])  # no noise: the accountant says "not private"


def test_epsilon_is_the_accountants_and_budget_stop_works(tiny_federation, tiny_model_factory):
    cfg = _config(num_rounds=5, client_fraction=0.67, sampling="poisson")
    s = create_strategy("dp-fedavg", target_epsilon=4.0, accountant="rdp", calibration_rounds=2)
    run = run_federated(tiny_federation, model_factory=tiny_model_factory, strategy=s, config=cfg, progress=False)
    assert len(run.history) == 2 and "budget" in run.summary["stopped_early"]
    for t, row in enumerate(run.history, start=1):
        assert row["epsilon"] == compute_epsilon(noise_multiplier=s.noise_multiplier, sample_rate=0.67, steps=t,
                                                 delta=1e-5, accountant="rdp")
    assert run.summary["privacy"]["epsilon"] <= 4.0
    # The loop samples the way the accountant assumes: Poisson with q = client_fraction, every round charged.
    assert all(e["sample_rate"] == cfg.client_fraction for e in s.ledger.entries)


def test_loop_sampling_is_the_poisson_sampling_the_accountant_assumes(tiny_federation, tiny_model_factory):
    cfg = _config(client_fraction=0.3, sampling="poisson")
    s = _configured(tiny_federation, tiny_model_factory, cfg, noise_multiplier=1.0)
    ids = list(range(40))
    picks = np.array([[i in s.select(ids, cfg, numpy_generator(cfg.seed, 1, t)) for i in ids] for t in range(400)])
    assert abs(picks.mean() - s.release.sample_rate) < 0.01  # each site included with probability q
    sizes = picks.sum(axis=1)
    assert sizes.var() == pytest.approx(40 * 0.3 * 0.7, rel=0.2)  # Binomial(N, q) sizes, not fixed-size
    assert s.release.sample_rate == cfg.client_fraction and s.expected_participants == 0.3 * 3


def test_empty_rounds_add_noise_are_charged_and_do_not_crash(tiny_federation, tiny_model_factory):
    cfg = _config(num_rounds=4, client_fraction=0.05, sampling="poisson")
    s = create_strategy("dp-fedavg", noise_multiplier=3.0, accountant="rdp")
    run = run_federated(tiny_federation, model_factory=tiny_model_factory, strategy=s, config=cfg, progress=False)
    assert any(row["num_clients"] == 0 for row in run.history)
    assert len(s.ledger) == 4  # every round, empty or not, is one subsampled-Gaussian release
    assert run.history[-1]["epsilon"] == compute_epsilon(noise_multiplier=3.0, sample_rate=0.05, steps=4,
                                                         delta=1e-5, accountant="rdp")
    assert not torch.equal(run.global_state["head.weight"], tiny_model_factory().state_dict()["head.weight"])


def test_nan_update_is_rejected_not_averaged(tiny_federation, tiny_model_factory, caplog):
    s = _configured(tiny_federation, tiny_model_factory, noise_multiplier=0.0, clip_norm=10.0)
    s.before_round(1)
    g = torch.Generator().manual_seed(1)
    good, bad = _fake_update(s, 0, 1e-3, g), _fake_update(s, 1, 1e-3, g)
    bad.delta["head.weight"][0, 0] = float("nan")
    sent = [s.transmit(good, 1), s.transmit(bad, 1)]
    glob = {n: torch.zeros(sh) for n, sh in s.shapes.items()}
    new = s.aggregate(glob, [good, bad], sent, 1)
    assert all(bool(torch.isfinite(t).all()) for t in new.values())
    assert s.round_report(1)["dp_dropped"] == 1 and "rejected" in caplog.text
    sent[1]["head.weight"] = torch.full_like(sent[1]["head.weight"], float("inf"))  # tampered in transit
    new = s.aggregate(glob, [good, bad], sent, 1)
    torch.testing.assert_close(new["head.weight"], good.delta["head.weight"] / s.expected_participants)


@pytest.mark.parametrize("kwargs", [dict(noise_multiplier=1.5, adaptive_clipping=True, clipping="per-group"),
                                    dict(name="dp-fedavg-fisher", noise_multiplier=1.5, placement="distributed",
                                         fisher_batch_size=4, fisher_every=2)])
def test_resume_is_bit_identical(tiny_federation, tiny_model_factory, tmp_path, kwargs):
    cfg = _config(num_rounds=2, client_fraction=0.67, sampling="poisson", checkpoint_every=1)

    def strategy():  # bit-identical resume needs the reproducible (not private) noise mode
        args = {"accountant": "rdp", "noise": "reproducible-insecure", **kwargs}
        return create_strategy(args.pop("name", "dp-fedavg"), **args)
    whole = run_federated(tiny_federation, model_factory=tiny_model_factory, strategy=strategy(), config=cfg,
                          progress=False, run_dir=RunDirectory.create(tmp_path, "whole", {}, exist_ok_resume=False))
    FederatedSimulation(tiny_federation, model_factory=tiny_model_factory, strategy=strategy(), config=cfg,
                        run_dir=RunDirectory.create(tmp_path, "killed", {}, exist_ok_resume=False),
                        progress=False).run(stop_after=1)
    resumed = run_federated(tiny_federation, model_factory=tiny_model_factory, strategy=strategy(), config=cfg,
                            progress=False, run_dir=RunDirectory.create(tmp_path, "killed", {}, exist_ok_resume=True))
    assert _without_timing(resumed.history) == _without_timing(whole.history)
    assert resumed.summary == whole.summary
    for name in whole.global_state:
        assert torch.equal(whole.global_state[name], resumed.global_state[name])


def test_adaptive_clipping_is_one_joint_release(tiny_federation, tiny_model_factory):
    s = _configured(tiny_federation, tiny_model_factory, target_epsilon=5.0, adaptive_clipping=True)
    assert s.update_noise_multiplier > s.noise_multiplier
    assert (s.update_noise_multiplier ** -2 + s.count_noise_multiplier ** -2) ** -0.5 == pytest.approx(
        s.noise_multiplier, rel=1e-12)


def test_adaptive_clipping_stays_bounded_with_few_sites(tiny_federation, tiny_model_factory):
    """Issue 14: with 3 sites the count noise (std z_b / qN, about 20 here) drove C from 1 to 6e-12 to 9e4."""
    rounds = 30
    s = _configured(tiny_federation, tiny_model_factory, _config(num_rounds=rounds), target_epsilon=4.0,
                    adaptive_clipping=True, clip_norm=1.0, accountant="rdp")
    assert s.count_noise_multiplier / s.expected_participants > 5  # the regime of the bug
    glob = {n: torch.zeros(sh) for n, sh in s.shapes.items()}
    g = torch.Generator().manual_seed(0)
    norms = [s.clip_norm]
    for t in range(1, rounds + 1):
        s.before_round(t)
        updates = [_fake_update(s, k, 1e-2, g) for k in range(3)]
        s.aggregate(glob, updates, [s.transmit(u, t) for u in updates], t)
        norms.append(s.clip_norm)
    max_step = math.exp(s.clip_lr * max(s.target_quantile, 1 - s.target_quantile))
    for before, after in zip(norms, norms[1:]):
        assert 1 / max_step - 1e-12 <= after / before <= max_step + 1e-12
    assert all(1e-2 <= c <= 1e2 for c in norms)


def test_fisher_allocation_ignores_private_data_and_keeps_z(tiny_federation, tiny_model_factory):
    site = tiny_federation.sites[0]
    scrambled = dataclasses.replace(site, train=site.train.subset(np.arange(len(site.train))[::-1][: len(site.train) // 2]))
    other = dataclasses.replace(tiny_federation, sites=(scrambled, *tiny_federation.sites[1:]))
    sigmas = []
    for fed in (tiny_federation, other):
        assert isinstance(fed, Federation)
        s = _configured(fed, tiny_model_factory, name="dp-fedavg-fisher", noise_multiplier=2.0, fisher_batch_size=8,
                        proxy_trust=None)  # test the split itself, not the fallback to uniform
        s.before_round(1)
        sigmas.append(s.noise_allocation(1, {n: p.detach() for n, p in tiny_model_factory().named_parameters()}))
        assert effective_multiplier_of(s.last_allocation) == pytest.approx(2.0, rel=1e-9)
    assert sigmas[0] == sigmas[1]
    assert len(set(sigmas[0].values())) > 1  # not uniform: the Fisher moved noise between groups


def test_distributed_noise_does_not_depend_on_who_took_part_and_local_pays_for_its_trust_model(tiny_federation,
                                                                                                tiny_model_factory):
    """Issue 14: shares sigma^2/m_min made the aggregate's variance grow with the participant count."""
    s = _configured(tiny_federation, tiny_model_factory, noise_multiplier=1.0, clip_norm=0.5, placement="distributed")
    glob = {n: torch.zeros(sh) for n, sh in s.shapes.items()}
    zero = lambda site: ClientUpdate(site_id=site, delta={n: torch.zeros(sh) for n, sh in s.shapes.items()},  # noqa: E731
                                     num_examples=10, num_steps=1, train_loss=0.0)
    sigma = 1.0 * 0.5  # z C: std per coordinate of the noise in the sum
    variances = {}
    for announced, arrived in [(0, 0), (1, 1), (3, 3), (3, 1)]:  # (3, 1): two announced updates never arrived
        s.before_round(1)
        s.announce_participants(announced)
        s.client_start_state(0, glob)
        sent = [s.transmit(zero(k), 1) for k in range(arrived)]
        new = s.aggregate(glob, [zero(k) for k in range(arrived)], sent, 1)
        noise = torch.cat([t.flatten() for t in new.values()]) * s.expected_participants
        variances[announced, arrived] = float(noise.double().var())
    for key, var in variances.items():
        assert var == pytest.approx(sigma ** 2, rel=0.05), key
    assert len(s.ledger) == 4  # every round released and charged: no abort that depends on the sample
    with pytest.raises(ConfigError, match="min_participants"):
        create_strategy("dp-fedavg", noise_multiplier=1.0, placement="distributed", min_participants=2)
    local = _configured(tiny_federation, tiny_model_factory, target_epsilon=5.0, placement="local")
    # Replace-one sensitivity 2C and no amplification: accounted as (z/2, rate 1) every round.
    assert tuple(local.release) == (local.noise_multiplier / 2, 1.0)
    assert compute_epsilon(noise_multiplier=local.noise_multiplier / 2, sample_rate=1.0, steps=2, delta=1e-5,
                           accountant="rdp") <= 5.0
