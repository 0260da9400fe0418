"""The federated engine: aggregation maths, sampling, FedAvg == SGD, determinism, checkpoint/resume."""
from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
from torch import nn

from conftest import tiny_run_config
from mmpfl_core.data.contract import CohortDataset
from mmpfl_core.errors import ConfigError
from mmpfl_core.federated.client import forward_batch, trainable_state
from mmpfl_core.federated.config import FederatedConfig, LocalTrainingConfig, OptimizerConfig
from mmpfl_core.federated.simulation import FederatedSimulation, run_federated
from mmpfl_core.federated.strategies import available_strategies, create_strategy, select_clients, weighted_average_update
from mmpfl_core.io.run_directory import RunDirectory
from mmpfl_core.seeding import numpy_generator


def _config(**changes) -> FederatedConfig:
    return tiny_run_config(**{"num_rounds": 3, "local_steps": None, "optimizer": OptimizerConfig(name="adamw", lr=2e-3),
                              "bootstrap_resamples": 50, "checkpoint_every": 1, **changes})


def _without_timing(history):
    return [{k: v for k, v in row.items() if k != "seconds"} for row in history]


def test_registry_lists_the_baselines():
    assert {"centralized", "local", "fedavg", "fedprox"} <= set(available_strategies())
    with pytest.raises(ConfigError, match="unknown strategy 'fedsgd'"):
        create_strategy("fedsgd")
    with pytest.raises(ConfigError, match="mu"):
        create_strategy("fedprox", mu=-1.0)


def test_weighted_average_uses_example_counts_and_skips_unsent_parameters():
    glob = {"a": torch.zeros(2), "b": torch.ones(1)}
    sent = [{"a": torch.tensor([1.0, 2.0])}, {"a": torch.tensor([4.0, 8.0]), "b": torch.tensor([2.0])}]
    new = weighted_average_update(glob, sent, [1, 3])
    torch.testing.assert_close(new["a"], torch.tensor([(1 + 12) / 4, (2 + 24) / 4]), rtol=0, atol=0)
    # Only the second client sent "b": its update applies with full weight.
    torch.testing.assert_close(new["b"], torch.tensor([3.0]), rtol=0, atol=0)


def test_fraction_sampling_picks_the_requested_share():
    cfg = _config(client_fraction=0.4)
    picks = select_clients(list(range(10)), cfg, numpy_generator(0, 1))
    assert len(picks) == 4 and len(set(picks)) == 4


def test_poisson_sampling_matches_its_rate():
    cfg = _config(client_fraction=0.3, sampling="poisson")
    sizes = [len(select_clients(list(range(100)), cfg, numpy_generator(0, t))) for t in range(200)]
    assert abs(np.mean(sizes) / 100 - 0.3) < 0.02
    assert min(sizes) != max(sizes)  # the number of participants varies, as Poisson sampling must


def test_invalid_configs_name_the_field():
    with pytest.raises(ConfigError, match="federated.client_fraction"):
        _config(client_fraction=0.0)
    with pytest.raises(ConfigError, match="optimizer.lr"):
        OptimizerConfig(lr=-1)
    with pytest.raises(ConfigError, match="unknown key"):
        FederatedConfig.from_dict({"num_round": 3})
    with pytest.raises(ConfigError, match="training.batch_size"):
        LocalTrainingConfig(batch_size=0)


def test_fedavg_one_client_one_step_equals_centralized_sgd(tiny_federation, tiny_model_factory):
    """FedAvg with one client, full participation and one full-batch local step is one SGD step."""
    site = tiny_federation.sites[0]
    one_site = dataclasses.replace(tiny_federation, sites=(site,))
    n = len(site.train)
    cfg = _config(num_rounds=1, local=LocalTrainingConfig(local_steps=1, batch_size=n),
                  optimizer=OptimizerConfig(name="sgd", lr=0.1, momentum=0.0, weight_decay=0.0), checkpoint_every=0)
    run = run_federated(one_site, model_factory=tiny_model_factory, strategy=create_strategy("fedavg"),
                        config=cfg, progress=False)

    model = tiny_model_factory()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    batch = CohortDataset(site.train).batch(torch.arange(n))
    nn.CrossEntropyLoss()(forward_batch(model, batch, torch.device("cpu")), batch["label"]).backward()
    opt.step()
    expected = trainable_state(model)
    assert expected.keys() == run.global_state.keys()
    for name, value in expected.items():
        # theta + (theta' - theta) in float32 can differ from theta' by one rounding step.
        torch.testing.assert_close(run.global_state[name], value, rtol=0, atol=4 * torch.finfo(torch.float32).eps)
    # ... and the update is not trivially zero.
    assert any(not torch.equal(v, tiny_model_factory().state_dict()[k]) for k, v in run.global_state.items())


def test_fedprox_with_zero_mu_is_fedavg(tiny_federation, tiny_model_factory):
    cfg = _config(num_rounds=1, checkpoint_every=0)
    a = run_federated(tiny_federation, model_factory=tiny_model_factory, strategy=create_strategy("fedavg"),
                      config=cfg, progress=False)
    b = run_federated(tiny_federation, model_factory=tiny_model_factory, strategy=create_strategy("fedprox", mu=0.0),
                      config=cfg, progress=False)
    for name in a.global_state:
        assert torch.equal(a.global_state[name], b.global_state[name])


def test_same_seed_same_run_different_seed_different_run(tiny_federation, tiny_model_factory):
    cfg = _config(num_rounds=2, checkpoint_every=0, client_fraction=0.67)
    runs = [run_federated(tiny_federation, model_factory=tiny_model_factory, strategy=create_strategy("fedavg"),
                          config=c, progress=False) for c in (cfg, cfg, dataclasses.replace(cfg, seed=7))]
    assert _without_timing(runs[0].history) == _without_timing(runs[1].history)
    assert _without_timing(runs[0].history) != _without_timing(runs[2].history)


@pytest.mark.parametrize("strategy", ["fedavg", "local"])
def test_resume_from_checkpoint_matches_uninterrupted_run(tiny_federation, tiny_model_factory, tmp_path, strategy):
    cfg = _config(num_rounds=3)
    whole = run_federated(tiny_federation, model_factory=tiny_model_factory, strategy=create_strategy(strategy),
                          config=cfg, progress=False,
                          run_dir=RunDirectory.create(tmp_path, "whole", {"seed": 0}, exist_ok_resume=False))
    run_dir = RunDirectory.create(tmp_path, "killed", {"seed": 0}, exist_ok_resume=False)
    FederatedSimulation(tiny_federation, model_factory=tiny_model_factory, strategy=create_strategy(strategy),
                        config=cfg, run_dir=run_dir, progress=False).run(stop_after=2)
    # A fresh process would see only the run directory: new strategy, new model, new simulation.
    resumed = run_federated(tiny_federation, model_factory=tiny_model_factory, strategy=create_strategy(strategy),
                            config=cfg, progress=False,
                            run_dir=RunDirectory.create(tmp_path, "killed", {"seed": 0}, exist_ok_resume=True))
    assert _without_timing(resumed.history) == _without_timing(whole.history)
    assert resumed.summary == whole.summary
    assert len(run_dir.read_metrics()) == 3
    for name in whole.global_state:
        assert torch.equal(whole.global_state[name], resumed.global_state[name])


def test_communication_counts_what_is_sent(tiny_federation, tiny_model_factory):
    cfg = _config(num_rounds=1, checkpoint_every=0)
    run = run_federated(tiny_federation, model_factory=tiny_model_factory, strategy=create_strategy("fedavg"),
                        config=cfg, progress=False)
    model_bytes = sum(p.numel() * p.element_size() for p in tiny_model_factory().parameters())
    row = run.history[0]
    assert row["bytes_up"] == row["bytes_down"] == 3 * model_bytes
    central = run_federated(tiny_federation, model_factory=tiny_model_factory,
                            strategy=create_strategy("centralized"), config=cfg, progress=False)
    assert central.history[0]["bytes_up"] == 0


def test_summary_has_confidence_intervals_and_per_site_accuracy(tiny_federation, tiny_model_factory):
    run = run_federated(tiny_federation, model_factory=tiny_model_factory, strategy=create_strategy("fedavg"),
                        config=_config(num_rounds=1, checkpoint_every=0), progress=False)
    acc = run.summary["global_test"]["accuracy"]
    assert acc["low"] <= acc["point"] <= acc["high"]
    assert {f"site{s.site_id}_personal_test_accuracy" for s in tiny_federation.sites} <= set(run.history[-1])


def test_rounds_to_target_follows_the_deployed_models(tiny_federation, tiny_model_factory):
    """A personalised method is judged on what its sites deploy: the personal curve crosses the target at
    round 3 while the global curve never does, so rounds-to-target is 3 (and MB to target is counted to it)."""
    sim = FederatedSimulation(tiny_federation, model_factory=tiny_model_factory, strategy=create_strategy("fedper"),
                              config=_config(num_rounds=4, checkpoint_every=0, target_accuracy=0.6,
                                             smoothing_window=1, bootstrap_resamples=0), progress=False)
    for t in range(1, 5):
        sim.counter.add_upload(t, 0, {"w": torch.zeros(250)})
    sim.history = [{"round": t, "global_val_accuracy": 0.3, "personal_val_accuracy": p}
                   for t, p in zip(range(1, 5), (0.4, 0.5, 0.7, 0.8))]
    summary = sim.summarise()
    assert summary["rounds_to_target"] == 3
    assert summary["megabytes_to_target"] == pytest.approx(3 * 250 * 4 / 1e6)


@pytest.mark.parametrize("strategy", ["fedavg", "local"])
def test_summary_reuses_the_final_evaluation_and_equals_a_fresh_prediction(tiny_federation, tiny_model_factory,
                                                                          strategy):
    """summarise() takes the final round's test predictions instead of predicting again; dropping them (as a
    resumed, finished run has none) gives the same summary, and a round run after evaluate() drops them."""
    sim = FederatedSimulation(tiny_federation, model_factory=tiny_model_factory, strategy=create_strategy(strategy),
                              config=_config(num_rounds=2, checkpoint_every=0, eval_every=10), progress=False)
    run = sim.run()
    assert sim._test_predictions is not None
    # the cross-site rows are built only where a site model is scored on everyone's data (no global model)
    assert ("cross_site" in sim.test.__dict__) == (strategy == "local")
    sim._test_predictions = None
    assert {**sim.summarise(), "stopped_early": None} == run.summary
    row = sim.run_round(3)  # trains, and is not an evaluation round (eval_every=10): the predictions are gone
    assert "personal_test_accuracy" not in row and sim._test_predictions is None


def test_cross_site_diagnostic_scores_each_site_model_on_evenly_spaced_pooled_rows(tiny_federation, tiny_model_factory,
                                                                                   monkeypatch):
    """Local-only's "global" accuracy: the mean over the site models, each on at most CROSS_SITE_ROWS pooled test
    rows spread over every site; below the cap it is the whole pooled split."""
    from mmpfl_core.federated import simulation
    from mmpfl_core.federated.evaluation import predict_proba

    monkeypatch.setattr(simulation, "CROSS_SITE_ROWS", 7)
    sim = FederatedSimulation(tiny_federation, model_factory=tiny_model_factory, strategy=create_strategy("local"),
                              config=_config(num_rounds=1, checkpoint_every=0), progress=False)
    sim.run()
    view = sim.test
    assert len(view.cross_site) == 7 < len(view.cohort)
    assert set(view.cross_site.sites) == set(view.cohort.sites)  # every site keeps rows in the diagnostic
    accuracies = []
    for site in view.per_site:
        sim.model.load_state_dict(sim._deployed(site), strict=False)
        proba = predict_proba(sim.model, view.cross_site_dataset, batch_size=64, device=sim.device)
        accuracies.append((proba.argmax(1) == view.cross_site.labels).mean())
    expected = np.mean(accuracies)
    assert sim.history[-1]["global_test_accuracy"] == pytest.approx(expected)
    monkeypatch.setattr(simulation, "CROSS_SITE_ROWS", 10_000)
    assert len(simulation._SplitView([s.test for s in tiny_federation.sites]).cross_site) == len(view.cohort)


def test_proximal_term_is_half_weight_squared_distance_and_its_gradient():
    """FedProx's and Ditto's shared term: (w/2)||theta - anchor||^2 over the anchored parameters only."""
    from mmpfl_core.federated.strategies import proximal_term

    model = torch.nn.Linear(3, 2)
    anchor = {"weight": torch.zeros(2, 3), "bias": torch.ones(2)}
    anchor_weight_only = {"weight": anchor["weight"]}
    term = proximal_term(anchor, 0.4)(model)
    expected = 0.2 * (model.weight.detach().pow(2).sum() + (model.bias.detach() - 1).pow(2).sum())
    assert float(term) == pytest.approx(float(expected), rel=1e-6)
    term.backward()
    assert torch.allclose(model.weight.grad, 0.4 * model.weight.detach())
    assert torch.allclose(model.bias.grad, 0.4 * (model.bias.detach() - 1))
    assert float(proximal_term(anchor_weight_only, 0.4)(model)) == pytest.approx(
        float(0.2 * model.weight.detach().pow(2).sum()), rel=1e-6)  # unanchored parameters are free
