"""FedDPA on the kit's DP release: Fisher masks stay at the site, epsilon from the same accountant as DP-FedAvg,
personal coordinates are zeros (server placement) or noise-only placeholders (distributed), resume is exact."""
from __future__ import annotations

import dataclasses

import pytest
import torch

from mmpfl_core.errors import ConfigError
from mmpfl_core.federated.config import FederatedConfig, LocalTrainingConfig, OptimizerConfig
from mmpfl_core.federated.feddpa import FedDPA, fisher_personal_masks
from mmpfl_core.federated.simulation import FederatedSimulation, run_federated
from mmpfl_core.federated.strategies import create_strategy
from mmpfl_core.io.run_directory import RunDirectory

CONFIG = FederatedConfig(num_rounds=2, local=LocalTrainingConfig(local_steps=1, batch_size=16),
                         optimizer=OptimizerConfig(lr=2e-3), bootstrap_resamples=20, checkpoint_every=0, device="cpu")
# Reproducible (not private) noise: the resume test compares runs bit for bit.
DP = dict(target_epsilon=8.0, delta=1e-5, clip_norm=0.5, accountant="rdp", noise="reproducible-insecure")


class _Spy(FedDPA):
    """Keeps what each site sent and the mask it used."""

    def transmit(self, update, round_index):
        sent = super().transmit(update, round_index)
        self.sent = getattr(self, "sent", []) + [(update.site_id, sent, {n: m.clone() for n, m in self.masks[update.site_id].items()})]
        return sent


def test_masks_threshold_a_layerwise_min_max_normalised_fisher():
    fisher = {"a": torch.tensor([0.0, 1.0, 2.0, 10.0]), "b": torch.full((3,), 5.0)}
    masks = fisher_personal_masks(fisher, 0.15)
    assert masks["a"].tolist() == [False, False, True, True]  # (2 - 0) / 10 = 0.2 > 0.15
    assert not masks["b"].any()  # constant Fisher: nothing is more informative than the rest


@pytest.mark.parametrize("placement", ["server", "distributed"])
def test_personal_coordinates_never_carry_the_sites_update(tiny_federation, tiny_model_factory, placement):
    strategy = _Spy(fisher_threshold=0.3, placement=placement, **DP)
    run = run_federated(tiny_federation, model_factory=tiny_model_factory, strategy=strategy, config=CONFIG,
                        progress=False)
    assert strategy.sent and 0 < run.history[-1]["personal_fraction"] < 1
    for _, sent, mask in strategy.sent:
        personal = torch.cat([sent[n][mask[n]].flatten() for n in mask])
        assert personal.numel() > 0
        if placement == "server":  # zeros, seen only by the trusted server
            assert torch.count_nonzero(personal) == 0
        else:  # noise-only placeholders: the server cannot tell personal coordinates from shared ones
            assert torch.count_nonzero(personal) == personal.numel()
    assert run.summary["privacy"]["placement"] == placement and "mask_privacy" in run.summary["privacy"]


def test_epsilon_and_noise_match_dp_fedavg_at_the_same_budget(tiny_federation, tiny_model_factory):
    runs = {name: run_federated(tiny_federation, model_factory=tiny_model_factory, strategy=create_strategy(name, **DP),
                                config=CONFIG, progress=False) for name in ("feddpa", "dp-fedavg")}
    a, b = runs["feddpa"].summary["privacy"], runs["dp-fedavg"].summary["privacy"]
    assert a["noise_multiplier"] == b["noise_multiplier"] > 0
    assert runs["feddpa"].summary["final"]["epsilon"] == pytest.approx(runs["dp-fedavg"].summary["final"]["epsilon"])
    assert 0 < runs["feddpa"].summary["final"]["epsilon"] <= 8.0


def test_deployed_model_merges_own_personal_coordinates_with_the_global_model(tiny_federation, tiny_model_factory):
    strategy = create_strategy("feddpa", fisher_threshold=0.3, **DP)
    run = run_federated(tiny_federation, model_factory=tiny_model_factory, strategy=strategy, config=CONFIG,
                        progress=False)
    site = next(iter(strategy.masks))
    deployed = strategy.personal_state(site, run.global_state)
    own, mask = strategy.personal[site], strategy.masks[site]
    for n, g in run.global_state.items():
        assert torch.equal(deployed[n][mask[n]], own[n][mask[n]])
        assert torch.equal(deployed[n][~mask[n]], g[~mask[n]])


def test_resume_is_bit_identical(tiny_federation, tiny_model_factory, tmp_path):
    federation = dataclasses.replace(tiny_federation, sites=tiny_federation.sites[:2])
    config = dataclasses.replace(CONFIG, num_rounds=3, checkpoint_every=1, eval_every=3)
    whole = run_federated(federation, model_factory=tiny_model_factory, strategy=create_strategy("feddpa", **DP),
                          config=config, progress=False,
                          run_dir=RunDirectory.create(tmp_path, "whole", {"seed": 0}, exist_ok_resume=False))
    run_dir = RunDirectory.create(tmp_path, "killed", {"seed": 0}, exist_ok_resume=False)
    FederatedSimulation(federation, model_factory=tiny_model_factory, strategy=create_strategy("feddpa", **DP),
                        config=config, run_dir=run_dir, progress=False).run(stop_after=2)
    resumed = run_federated(federation, model_factory=tiny_model_factory, strategy=create_strategy("feddpa", **DP),
                            config=config, progress=False,
                            run_dir=RunDirectory.create(tmp_path, "killed", {"seed": 0}, exist_ok_resume=True))
    assert all(torch.equal(whole.global_state[n], resumed.global_state[n]) for n in whole.global_state)
    assert resumed.summary["final"]["epsilon"] == whole.summary["final"]["epsilon"]
    for site, masks in whole.strategy.masks.items():
        assert all(torch.equal(m, resumed.strategy.masks[site][n]) for n, m in masks.items())


def test_bad_arguments_are_named():
    with pytest.raises(ConfigError, match="fisher_threshold"):
        create_strategy("feddpa", fisher_threshold=1.5, **DP)
    with pytest.raises(ConfigError, match="lambda_1"):
        create_strategy("feddpa", lambda_1=-1.0, **DP)
    with pytest.raises(ConfigError, match="exactly one of target_epsilon"):
        create_strategy("feddpa")
