"""The privacy unit on every row (issue 23): Ditto with DP-SGD inside the sites, and the unit, epsilons, deltas and
private dimension d that every comparison table, CSV and REPORT.md carries, read from the accountants."""
from __future__ import annotations

import math

import pytest
import torch

from mmpfl_core.errors import ConfigError
from mmpfl_core.federated.config import FederatedConfig, LocalTrainingConfig, OptimizerConfig
from mmpfl_core.federated.simulation import run_federated
from mmpfl_core.federated.strategies import create_strategy
from mmpfl_core.privacy import compute_epsilon

CFG = FederatedConfig(num_rounds=2, local=LocalTrainingConfig(local_steps=2, batch_size=16),
                      optimizer=OptimizerConfig(name="sgd", lr=0.05, momentum=0.0, weight_decay=0.0),
                      bootstrap_resamples=0, checkpoint_every=0, device="cpu", client_fraction=1.0)
INSECURE = dict(noise="reproducible-insecure")


def _ditto(federation, factory, **sample_level_dp):
    with pytest.warns(UserWarning):  # reproducible-insecure noise warns, on purpose
        strategy = create_strategy("ditto-dp-sgd", lam=0.5, sample_level_dp={**sample_level_dp, **INSECURE})
    return run_federated(federation, model_factory=factory, strategy=strategy, config=CFG, progress=False), strategy


# ------------------------------------------------------------------ Ditto with DP-SGD
def test_ditto_dp_sgd_charges_both_trainings_of_every_round(tiny_federation, tiny_model_factory):
    """Each site's ledger holds the global AND the personal update's DP-SGD steps, and its epsilon is the
    accountant's for their composition: 2 trainings x 2 steps x 2 rounds at (z, q_k), not half of it."""
    run, strategy = _ditto(tiny_federation, tiny_model_factory, noise_multiplier=1.1, max_grad_norm=1.0,
                           accountant="rdp")
    summary = run.summary["sample_level_privacy"]
    for site in tiny_federation.sites:
        q = 16 / len(site.train)
        ledger = strategy.sample_dp.ledgers[site.site_id]
        assert sum(e["steps"] for e in ledger.entries) == 2 * 2 * CFG.num_rounds
        both = compute_epsilon(noise_multiplier=1.1, sample_rate=q, steps=8, delta=1e-5, accountant="rdp")
        global_only = compute_epsilon(noise_multiplier=1.1, sample_rate=q, steps=4, delta=1e-5, accountant="rdp")
        assert summary["per_site_epsilon"][site.site_id] == pytest.approx(both)
        assert both > global_only * 1.05  # the personal model's steps are not free
    assert summary["max_epsilon"] == pytest.approx(max(summary["per_site_epsilon"].values()))
    # the deployed (personal) model is its own DP-SGD output, not the global model
    some = tiny_federation.sites[0].site_id
    personal = strategy.personal_state(some, run.global_state)
    assert any(not torch.equal(personal[n], run.global_state[n]) for n in personal)


def test_ditto_dp_sgd_target_epsilon_covers_both_trainings(tiny_federation, tiny_model_factory):
    """A target epsilon is calibrated for both trainings of every round: a site that takes part in every round
    ends at the target (within the accountant's calibration tolerance), never above it."""
    run, strategy = _ditto(tiny_federation, tiny_model_factory, target_epsilon=4.0, max_grad_norm=1.0,
                           accountant="rdp")
    epsilons = run.summary["sample_level_privacy"]["per_site_epsilon"]
    assert all(e <= 4.0 * 1.01 for e in epsilons.values())
    assert max(epsilons.values()) == pytest.approx(4.0, rel=0.05)  # calibrated for 2x the steps, not 1x


def test_ditto_dp_sgd_refuses_a_config_without_a_budget():
    with pytest.raises(ConfigError, match="sample_level_dp"):
        create_strategy("ditto-dp-sgd")
    with pytest.raises(ConfigError, match="exactly one of noise_multiplier or target_epsilon"):
        create_strategy("ditto-dp-sgd", sample_level_dp={"max_grad_norm": 1.0})
    with pytest.raises(ConfigError, match="target_epsilon"):
        create_strategy("ditto", sample_level_dp={"target_epsilon": math.inf})


def test_ditto_dp_sgd_averages_uniformly():
    """n_k changes with one patient: the server's mean of the deltas must not weight by it (plain Ditto does)."""
    from mmpfl_core.federated.client import ClientUpdate
    start = {"w": torch.zeros(1)}
    updates = [ClientUpdate(site_id=0, delta={"w": torch.ones(1)}, num_examples=1, num_steps=1, train_loss=0.0),
               ClientUpdate(site_id=1, delta={"w": torch.full((1,), 3.0)}, num_examples=99, num_steps=1,
                            train_loss=0.0)]
    strategy = create_strategy("ditto-dp-sgd", sample_level_dp={"noise_multiplier": 1.0})
    assert strategy.aggregate(start, updates, [u.delta for u in updates], 1)["w"].item() == pytest.approx(2.0)
    plain = create_strategy("ditto").aggregate(start, updates, [u.delta for u in updates], 1)["w"].item()
    assert plain == pytest.approx((1 + 297) / 100)
