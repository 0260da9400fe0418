"""Sample-level DP-SGD inside each site: Poisson batches, Opacus clipping/noise, per-site accounting."""
from __future__ import annotations

import dataclasses

import pytest
import torch

from mmpfl_core.data.contract import CohortDataset
from mmpfl_core.errors import ConfigError
from mmpfl_core.federated.client import local_update, steps_per_round
from mmpfl_core.federated.config import FederatedConfig, LocalTrainingConfig, OptimizerConfig
from mmpfl_core.federated.simulation import run_federated
from mmpfl_core.federated.strategies import create_strategy
from mmpfl_core.privacy import compute_epsilon
from mmpfl_core.privacy.dp_sgd import PrivateTraining, SampleLevelDP, poisson_batch

CFG = FederatedConfig(num_rounds=2, local=LocalTrainingConfig(local_steps=3, batch_size=16),
                      optimizer=OptimizerConfig(name="sgd", lr=0.05, momentum=0.0, weight_decay=0.0),
                      bootstrap_resamples=0, checkpoint_every=0, device="cpu", client_fraction=0.67, sampling="poisson")


def test_poisson_batches_have_the_right_rate():
    g = torch.Generator().manual_seed(0)
    sizes = [len(poisson_batch(200, 0.1, g)) for _ in range(300)]
    assert sum(sizes) / 300 == pytest.approx(20, rel=0.05) and min(sizes) != max(sizes)


def test_arguments_are_validated():
    with pytest.raises(ConfigError, match="exactly one"):
        SampleLevelDP()
    with pytest.raises(ConfigError, match="max_grad_norm"):
        SampleLevelDP(noise_multiplier=1.0, max_grad_norm=0.0)


def test_run_completes_and_per_site_epsilon_is_the_accountants(tiny_federation, tiny_model_factory):
    strategy = create_strategy("dp-sgd-fedavg", noise_multiplier=1.1, max_grad_norm=1.0, accountant="rdp")
    run = run_federated(tiny_federation, model_factory=tiny_model_factory, strategy=strategy, config=CFG,
                        progress=False)
    assert len(run.history) == 2
    per_site = run.summary["sample_level_privacy"]["per_site_epsilon"]
    for entries in strategy.sample_dp.ledgers.values():
        for e in entries.entries:
            assert e["steps"] == 3
    for site in tiny_federation.sites:
        n = len(site.train)
        ledger = strategy.sample_dp.ledgers.get(site.site_id)
        steps = 0 if ledger is None else sum(e["steps"] for e in ledger.entries)
        if steps:
            assert per_site[site.site_id] == compute_epsilon(noise_multiplier=1.1, sample_rate=16 / n, steps=steps,
                                                             delta=1e-5, accountant="rdp")
    assert run.history[-1]["sample_epsilon_max"] == max(per_site.values())
    assert all(torch.isfinite(t).all() for t in run.global_state.values())


def test_calibrated_sites_stay_within_budget_and_dp_sgd_composes_with_client_level(tiny_federation,
                                                                                   tiny_model_factory):
    strategy = create_strategy("dp-fedavg", noise_multiplier=1.0, accountant="rdp",
                               sample_level_dp=dict(target_epsilon=3.0, accountant="rdp"))
    run = run_federated(tiny_federation, model_factory=tiny_model_factory, strategy=strategy, config=CFG,
                        progress=False)
    assert 0 < run.summary["sample_level_privacy"]["max_epsilon"] <= 3.0
    assert {"epsilon", "sample_epsilon_max"} <= set(run.history[0])


def test_empty_poisson_batch_still_adds_noise(tiny_federation, tiny_model_factory):
    site = tiny_federation.sites[0]
    model = tiny_model_factory()
    training = PrivateTraining(noise_multiplier=1.0, max_grad_norm=1.0, sample_rate=1e-9, expected_batch_size=4)
    update = local_update(model, CohortDataset(site.train), site_id=0, training=LocalTrainingConfig(local_steps=2),
                          optimizer=OptimizerConfig(name="sgd", lr=0.1, momentum=0.0, weight_decay=0.0),
                          generator=torch.Generator().manual_seed(0), device=torch.device("cpu"),
                          private_training=training)
    assert update.num_steps == 2 and any(bool((d != 0).any()) for d in update.delta.values())
    assert not any(hasattr(p, "grad_sample") and p.grad_sample is not None for p in model.parameters())
    assert steps_per_round(100, dataclasses.replace(LocalTrainingConfig(batch_size=32), local_epochs=2)) == 8


def test_without_clipping_or_noise_dp_sgd_is_full_batch_sgd(tiny_federation, tiny_model_factory):
    """q = 1, huge C, negligible z: the Opacus per-sample gradients (incl. the model's own embedding
    grad samplers) must sum to the ordinary batch gradient."""
    site = tiny_federation.sites[0]
    n, data = len(site.train), CohortDataset(site.train)
    kwargs = dict(site_id=0, training=LocalTrainingConfig(local_steps=1, batch_size=n), device=torch.device("cpu"),
                  optimizer=OptimizerConfig(name="sgd", lr=0.1, momentum=0.0, weight_decay=0.0))
    plain = local_update(tiny_model_factory(), data, generator=torch.Generator().manual_seed(0), **kwargs)
    private = local_update(tiny_model_factory(), data, generator=torch.Generator().manual_seed(0),
                           private_training=PrivateTraining(noise_multiplier=1e-12, max_grad_norm=1e6,
                                                            sample_rate=1.0, expected_batch_size=n), **kwargs)
    for name, d in plain.delta.items():
        torch.testing.assert_close(private.delta[name], d, rtol=1e-4, atol=1e-6)
