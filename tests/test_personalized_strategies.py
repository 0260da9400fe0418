"""Personalised strategies on the round loop: what is sent, what stays personal, resume, FedPer == FedAvg."""
from __future__ import annotations

import dataclasses

import pytest
import torch

from conftest import tiny_run_config
from mmpfl_core.federated.config import FederatedConfig, LocalTrainingConfig, OptimizerConfig
from mmpfl_core.federated.personalized_strategies import FedAvgKLMasks, FedPer
from mmpfl_core.federated.simulation import FederatedSimulation, run_federated
from mmpfl_core.federated.strategies import create_strategy
from mmpfl_core.io.run_directory import RunDirectory

LOCAL = LocalTrainingConfig(local_steps=1, batch_size=16)
OPT = OptimizerConfig(name="adamw", lr=2e-3)
TRAINERS = dict(training=LOCAL, optimizer=OPT)
KWARGS = {"fedper": {}, "fedrep": TRAINERS, "ditto": TRAINERS, "fedavg-ft": TRAINERS,
          "fedavg-kl-masks": dict(threshold=1e-4)}


def _config(**changes) -> FederatedConfig:
    return tiny_run_config(**{"local_steps": LOCAL.local_steps, "optimizer": OPT, **changes})


def _two_sites(federation):
    """The heavier tests (resume: three runs) use two of the three sites to stay within the time budget."""
    return dataclasses.replace(federation, sites=federation.sites[:2])


def _without_timing(history):
    return [{k: v for k, v in row.items() if k != "seconds"} for row in history]


@pytest.mark.parametrize("name", sorted(KWARGS))
def test_every_personalised_strategy_runs_two_rounds(tiny_federation, tiny_model_factory, name):
    run = run_federated(tiny_federation, model_factory=tiny_model_factory, strategy=create_strategy(name, **KWARGS[name]),
                        config=_config(), progress=False)
    assert len(run.history) == 2 and 0.0 <= run.history[-1]["personal_test_accuracy"] <= 1.0
    assert run.summary["strategy"] == name


def test_fedper_with_all_groups_shared_is_fedavg(tiny_federation, tiny_model_factory):
    runs = [run_federated(tiny_federation, model_factory=tiny_model_factory, strategy=s, config=_config(), progress=False)
            for s in (create_strategy("fedavg"), create_strategy("fedper", personal_groups=()))]
    assert _without_timing(runs[0].history) == _without_timing(runs[1].history)
    assert all(torch.equal(runs[0].global_state[n], runs[1].global_state[n]) for n in runs[0].global_state)


class _Spy:
    """Records what each site sent and the tensors it trained (to check they are kept, not overwritten)."""

    def after_local(self, site_id, model):
        super().after_local(site_id, model)
        self.trained = getattr(self, "trained", {})
        self.trained[site_id] = {n: p.detach().clone() for n, p in model.named_parameters()}

    def transmit(self, update, round_index):
        sent = super().transmit(update, round_index)
        self.sent = getattr(self, "sent", [])
        self.sent.append((update.site_id, set(sent), set(self.personal_names(update.site_id))))
        return sent


class _SpyFedPer(_Spy, FedPer):
    pass


class _SpyKLMasks(_Spy, FedAvgKLMasks):
    pass


@pytest.mark.parametrize("factory", [lambda: _SpyFedPer(personal_groups=("head", "norm")),
                                     lambda: _SpyKLMasks(threshold=1e-4, hysteresis=0.0)])
def test_personal_groups_are_never_sent_nor_overwritten(tiny_federation, tiny_model_factory, factory):
    strategy = factory()
    tiny_federation = _two_sites(tiny_federation)
    run = run_federated(tiny_federation, model_factory=tiny_model_factory, strategy=strategy,
                        config=_config(), progress=False)
    assert any(personal for _, _, personal in strategy.sent)  # the test is not vacuous
    for _, sent, personal in strategy.sent:
        assert sent.isdisjoint(personal) and sent | personal == set(strategy.trained[0])
    for site, trained in strategy.trained.items():
        deployed = strategy.personal_state(site, run.global_state)
        names = strategy.personal_names(site)
        assert names and all(torch.equal(deployed[n], trained[n]) for n in names)
        # ... and the next round starts from them, with the shared part from the new global model.
        start = strategy.client_start_state(site, run.global_state)
        assert all(torch.equal(start[n], trained[n]) for n in names)
        assert all(torch.equal(start[n], run.global_state[n]) for n in run.global_state if n not in names)


def test_masks_reduce_uploaded_bytes_and_are_reported(tiny_federation, tiny_model_factory):
    cfg = _config()
    plain = run_federated(tiny_federation, model_factory=tiny_model_factory, strategy=create_strategy("fedavg"),
                          config=cfg, progress=False)
    masked = run_federated(tiny_federation, model_factory=tiny_model_factory,
                           strategy=create_strategy("fedavg-kl-masks", threshold=1e-4), config=cfg, progress=False)
    assert masked.summary["megabytes_up"] < plain.summary["megabytes_up"]
    assert masked.history[-1]["bytes_down"] < plain.history[-1]["bytes_down"]
    assert 0.0 < masked.history[-1]["personal_fraction"] < 1.0
    assert set(masked.history[0]) == set(masked.history[1])  # same columns every round
    assert masked.history[0]["mask_changes"] > 0


@pytest.mark.parametrize("name", ["fedavg-kl-masks", "ditto"])
def test_resume_from_checkpoint_matches_uninterrupted_run(tiny_federation, tiny_model_factory, tmp_path, name):
    tiny_federation = _two_sites(tiny_federation)
    cfg = _config(num_rounds=3, checkpoint_every=1, eval_every=3)
    kwargs = dict(KWARGS[name], **({"update_every": 2, "hysteresis": 0.2} if name == "fedavg-kl-masks" else {}))
    whole = run_federated(tiny_federation, model_factory=tiny_model_factory, strategy=create_strategy(name, **kwargs),
                          config=cfg, progress=False,
                          run_dir=RunDirectory.create(tmp_path, "whole", {"seed": 0}, exist_ok_resume=False))
    run_dir = RunDirectory.create(tmp_path, "killed", {"seed": 0}, exist_ok_resume=False)
    FederatedSimulation(tiny_federation, model_factory=tiny_model_factory, strategy=create_strategy(name, **kwargs),
                        config=cfg, run_dir=run_dir, progress=False).run(stop_after=2)
    resumed = run_federated(tiny_federation, model_factory=tiny_model_factory, strategy=create_strategy(name, **kwargs),
                            config=cfg, progress=False,
                            run_dir=RunDirectory.create(tmp_path, "killed", {"seed": 0}, exist_ok_resume=True))
    assert _without_timing(resumed.history) == _without_timing(whole.history)
    assert resumed.summary == whole.summary
    for name_ in whole.global_state:
        assert torch.equal(whole.global_state[name_], resumed.global_state[name_])
    for site, state in whole.strategy.personal.items():
        assert all(torch.equal(t, resumed.strategy.personal[site][n]) for n, t in state.items())
