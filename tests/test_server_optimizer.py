"""Server optimisers: plain SGD is the average, momentum follows FedAvgM by hand, DP epsilon is unchanged,
and a resumed run is bit-identical (the optimiser's buffers are checkpointed)."""
from __future__ import annotations

import pytest
import torch

from conftest import tiny_run_config
from mmpfl_core.errors import ConfigError
from mmpfl_core.federated.config import FederatedConfig
from mmpfl_core.federated.server_optimizer import ServerOptimizer, ServerOptimizerConfig, make_server_optimizer
from mmpfl_core.federated.simulation import run_federated
from mmpfl_core.federated.strategies import create_strategy
from mmpfl_core.io.run_directory import RunDirectory


def _config(**changes) -> FederatedConfig:
    return tiny_run_config(**{"num_rounds": 3, **changes})


def test_momentum_is_fedavgm_by_hand_and_sgd_lr1_is_the_average():
    theta = {"w": torch.tensor([1.0, -2.0])}
    deltas = [torch.tensor([0.5, 0.1]), torch.tensor([-0.2, 0.3])]
    sgd = ServerOptimizer(ServerOptimizerConfig(name="sgd", lr=1.0))
    momentum = ServerOptimizer(ServerOptimizerConfig(name="momentum", lr=0.5, momentum=0.9))
    plain, state, buf = dict(theta), dict(theta), torch.zeros(2)
    for d in deltas:
        agg = {"w": plain["w"] + d}
        assert torch.equal(sgd.step(plain, agg)["w"], agg["w"])
        plain = agg
        buf = 0.9 * buf + d
        expected = state["w"] + 0.5 * buf
        state = momentum.step(state, {"w": state["w"] + d})
        assert torch.allclose(state["w"], expected, atol=1e-7)


def test_config_errors_name_the_field():
    with pytest.raises(ConfigError, match="server_optimizer.name"):
        ServerOptimizerConfig(name="lamb")
    with pytest.raises(ConfigError, match="server_optimizer.momentum"):
        make_server_optimizer({"momentum": 1.0})
    with pytest.raises(ConfigError, match="bad server_optimizer"):
        make_server_optimizer({"betas": 0.9})


def test_dp_epsilon_is_unchanged_by_the_server_optimizer(tiny_federation, tiny_model_factory):
    dp = dict(target_epsilon=8.0, clip_norm=0.5)
    runs = [run_federated(tiny_federation, model_factory=tiny_model_factory, config=_config(), progress=False,
                          strategy=create_strategy("dp-fedavg", **dp, **extra))
            for extra in ({}, {"server_optimizer": {"name": "adam", "lr": 0.01}})]
    assert runs[0].history[-1]["epsilon"] == runs[1].history[-1]["epsilon"] > 0
    assert any(not torch.equal(runs[0].global_state[n], runs[1].global_state[n]) for n in runs[0].global_state)


@pytest.mark.parametrize("strategy,kwargs", [("fedavg", {}), ("dp-fedavg", {"target_epsilon": 8.0, "clip_norm": 0.5,
                                                                                       "noise": "reproducible-insecure"})])
def test_resume_with_server_momentum_is_bit_identical(strategy, kwargs, tiny_federation, tiny_model_factory, tmp_path):
    make = lambda: create_strategy(strategy, server_optimizer={"name": "momentum", "momentum": 0.9}, **kwargs)  # noqa: E731
    cfg = _config(checkpoint_every=1)
    whole = run_federated(tiny_federation, model_factory=tiny_model_factory, config=cfg, progress=False, strategy=make(),
                          run_dir=RunDirectory.create(tmp_path, "whole", {}, exist_ok_resume=False))
    run_federated(tiny_federation, model_factory=tiny_model_factory, config=cfg, progress=False, stop_after=2,
                  strategy=make(), run_dir=RunDirectory.create(tmp_path, "cut", {}, exist_ok_resume=False))
    resumed = run_federated(tiny_federation, model_factory=tiny_model_factory, config=cfg, progress=False,
                            strategy=make(), run_dir=RunDirectory.create(tmp_path, "cut", {}, exist_ok_resume=True))
    for name in whole.global_state:
        assert torch.equal(whole.global_state[name], resumed.global_state[name]), name
