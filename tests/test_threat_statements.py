"""Honest threat statements (issue 21, defects 5 and 6): epsilon against outsiders (with amplification by
sampling) and against the server and participants (who know who took part: no amplification), both from
the accountant; the per-site DP-SGD epsilon is released only at the end, not every round."""
from __future__ import annotations

import csv
import dataclasses
import json

import pytest
import torch

from mmpfl_core.federated.config import FederatedConfig, LocalTrainingConfig, OptimizerConfig
from mmpfl_core.federated.simulation import FederatedSimulation, run_federated
from mmpfl_core.federated.strategies import create_strategy
from mmpfl_core.io.run_directory import RunDirectory
from mmpfl_core.io.scopes import column_scope
from mmpfl_core.privacy.accounting import compose_epsilon

pytestmark = pytest.mark.filterwarnings("ignore::RuntimeWarning", "ignore::UserWarning")


def _config(**changes) -> FederatedConfig:
    base = FederatedConfig(num_rounds=3, local=LocalTrainingConfig(local_steps=1, batch_size=16),
                           optimizer=OptimizerConfig(name="sgd", lr=0.05, momentum=0.0, weight_decay=0.0),
                           bootstrap_resamples=0, checkpoint_every=0, device="cpu")
    return dataclasses.replace(base, **changes)


def _released_rounds(federation, model_factory, placement, arrived=None, rounds=3):
    """A configured dp-fedavg (q = 0.67) that released ``rounds`` rounds, each from 2 announced participants."""
    strategy = create_strategy("dp-fedavg", noise_multiplier=1.2, accountant="rdp", placement=placement)
    FederatedSimulation(federation, model_factory=model_factory, strategy=strategy,
                        config=_config(client_fraction=0.67, sampling="poisson"), progress=False)
    glob = {n: torch.zeros(s) for n, s in strategy.shapes.items()}
    for t in range(1, rounds + 1):
        strategy.before_round(t)
        strategy.announce_participants(2)
        strategy.release_sum(glob, {n: torch.zeros_like(v) for n, v in glob.items()},
                             2 if arrived is None else arrived, t)
    return strategy


@pytest.mark.parametrize("placement", ["server", "distributed", "local"])
def test_epsilon_against_each_observer_comes_from_the_accountant(tiny_federation, tiny_model_factory, placement):
    strategy = _released_rounds(tiny_federation, tiny_model_factory, placement)
    privacy = strategy.summary_report()["privacy"]
    z, q = strategy.release
    outsiders = compose_epsilon(releases=[(z, q, 3)], delta=strategy.delta, accountant="rdp")
    insiders = compose_epsilon(releases=[(z, 1.0, 3)], delta=strategy.delta, accountant="rdp")
    assert privacy["epsilon"] == privacy["epsilon_outsiders"] == pytest.approx(outsiders, rel=1e-9)
    assert privacy["epsilon_participants"] == pytest.approx(insiders, rel=1e-9)
    assert set(privacy["threats"]) == {"outsiders", "participants", "server"}
    if placement == "local":  # no amplification claimed even for outsiders
        assert privacy["epsilon_outsiders"] == pytest.approx(privacy["epsilon_participants"], rel=1e-9)
    else:  # who took part is secret from outsiders only: insiders get a strictly larger epsilon
        assert privacy["epsilon_participants"] > privacy["epsilon_outsiders"] * 1.2
    if placement == "server":  # the trusted server sees clipped updates: no number is claimed against it
        assert privacy["epsilon_server"] is None and "trusted" in privacy["threats"]["server"]
    else:
        assert privacy["epsilon_server"] == pytest.approx(insiders, rel=1e-9)


def test_no_bound_against_a_server_that_knows_part_of_the_noise(tiny_federation, tiny_model_factory):
    strategy = _released_rounds(tiny_federation, tiny_model_factory, "distributed", arrived=1)  # 1 of 2 shares
    privacy = strategy.summary_report()["privacy"]
    assert privacy["epsilon_server"] is None and privacy["rounds_topped_up"] == 3
    assert "topped up" in privacy["threats"]["server"]


def test_site_dp_sgd_epsilon_is_released_only_at_the_end(tiny_federation, tiny_model_factory, tmp_path):
    assert column_scope("sample_epsilon_max") == "operator-only"
    strategy = create_strategy("dp-fedavg", noise_multiplier=1.5, accountant="rdp",
                               sample_level_dp=dict(noise_multiplier=1.0, max_grad_norm=1.0, accountant="rdp"))
    run_dir = RunDirectory.create(tmp_path, "run", {}, exist_ok_resume=False)
    run = run_federated(tiny_federation, model_factory=tiny_model_factory, strategy=strategy,
                        config=_config(num_rounds=2, client_fraction=0.67, sampling="poisson"), run_dir=run_dir,
                        progress=False)
    with run_dir.metrics_path.open() as fh:
        released_columns = next(csv.reader(fh))
    with run_dir.private_metrics_path.open() as fh:
        operator_columns = next(csv.reader(fh))
    assert "sample_epsilon_max" not in released_columns and "sample_epsilon_max" in operator_columns
    released = json.loads(run_dir.summary_path.read_text())
    assert "sample_epsilon_max" not in released["final"]
    final_max = max(strategy.sample_dp.epsilons().values(), default=0.0)
    assert released["sample_level_privacy"]["max_epsilon"] == pytest.approx(final_max, rel=1e-12)
    assert "per_site_epsilon" not in released["sample_level_privacy"]
    assert run.history[-1]["sample_epsilon_max"] == pytest.approx(final_max, rel=1e-12)  # operator's rows
    privacy = released["privacy"]
    assert privacy["epsilon_outsiders"] == pytest.approx(strategy.ledger.epsilon(), rel=1e-12)
    assert privacy["epsilon_participants"] == pytest.approx(strategy.ledger.epsilon_without_amplification(), rel=1e-12)
    assert "rounds_topped_up" not in privacy  # says when shares went missing: operator-only
