"""Private runs draw their noise and samples from the OS CSPRNG by default; the reproducible mode says
it is not private. (Issue 14: the seed written beside the model regenerated the noise.)"""
from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from conftest import PLAIN_SGD, tiny_run_config
from mmpfl_core.errors import ConfigError
from mmpfl_core.federated.config import FederatedConfig
from mmpfl_core.federated.simulation import FederatedSimulation, run_federated, select_round
from mmpfl_core.federated.strategies import create_strategy
from mmpfl_core.io.run_directory import RunDirectory
from mmpfl_core.privacy import NOT_PRIVATE_WARNING, compute_epsilon
from mmpfl_core.privacy.dp_sgd import poisson_batch
from mmpfl_core.privacy.randomness import secure_numpy_generator, secure_standard_normal, secure_uniform


def _config(**changes) -> FederatedConfig:
    return tiny_run_config(**{"client_fraction": 0.67, "sampling": "poisson", "local_steps": 1, "optimizer": PLAIN_SGD,
                              "bootstrap_resamples": 0, **changes})


def test_secure_draws_are_standard_and_unrepeatable():
    x = secure_standard_normal((200_000,), dtype=torch.float64)
    assert abs(float(x.mean())) < 0.01 and float(x.std()) == pytest.approx(1.0, abs=0.01)
    assert float((x.abs() > 1.96).double().mean()) == pytest.approx(0.05, abs=0.003)  # the tails are Gaussian
    assert not torch.equal(secure_standard_normal((64,)), secure_standard_normal((64,)))
    u = secure_uniform(100_000)
    assert 0 < u.min() and u.max() < 1 and abs(u.mean() - 0.5) < 0.01
    assert secure_numpy_generator().random() != secure_numpy_generator().random()
    picks = np.array([len(poisson_batch(1000, 0.3, None)) for _ in range(50)])
    assert abs(picks.mean() - 300) < 15 and len(set(picks.tolist())) > 1


def test_same_private_config_and_seed_release_different_models(tiny_federation, tiny_model_factory, tmp_path):
    """Done-when of issue 14: by default the noise cannot be regenerated from anything in the run dir."""
    cfg = _config()
    runs = []
    for name in ("a", "b"):
        run_dir = RunDirectory.create(tmp_path, name, {"seed": cfg.seed}, exist_ok_resume=False)
        runs.append(run_federated(tiny_federation, model_factory=tiny_model_factory, config=cfg, progress=False,
                                  strategy=create_strategy("dp-fedavg", noise_multiplier=1.0, accountant="rdp"),
                                  run_dir=run_dir))
    assert not torch.equal(runs[0].global_state["head.weight"], runs[1].global_state["head.weight"])
    privacy = runs[0].summary["privacy"]
    assert privacy["noise"] == "secure" and "not_private" not in privacy
    # The reproducible mode gives the same model twice, warns, and says "not private" in the summary.
    with pytest.warns(UserWarning, match="not private"):
        twins = [run_federated(tiny_federation, model_factory=tiny_model_factory, config=cfg, progress=False,
                               strategy=create_strategy("dp-fedavg", noise_multiplier=1.0, accountant="rdp",
                                                        noise="reproducible-insecure")) for _ in range(2)]
    assert torch.equal(twins[0].global_state["head.weight"], twins[1].global_state["head.weight"])
    assert twins[0].summary["privacy"]["not_private"] == NOT_PRIVATE_WARNING


def test_site_sampling_is_secret_by_default(tiny_federation, tiny_model_factory):
    cfg = _config(client_fraction=0.5)
    ids = list(range(60))
    secret = create_strategy("dp-fedavg", noise_multiplier=1.0)
    draws = [tuple(select_round(secret, ids, cfg, 1)) for _ in range(5)]
    assert len(set(draws)) > 1  # the same round and seed give different samples: not derived from the seed
    with pytest.warns(UserWarning):
        open_ = create_strategy("dp-fedavg", noise_multiplier=1.0, noise="reproducible-insecure")
    assert len({tuple(select_round(open_, ids, cfg, 1)) for _ in range(3)}) == 1
    assert len({tuple(select_round(create_strategy("fedavg"), ids, cfg, 1)) for _ in range(3)}) == 1


def test_resumed_private_run_has_the_same_epsilon_and_no_secret_in_the_checkpoint(tiny_federation, tiny_model_factory,
                                                                                  tmp_path):
    cfg = _config(num_rounds=3, checkpoint_every=1)
    make = lambda: create_strategy("dp-fedavg", noise_multiplier=1.2, accountant="rdp")  # noqa: E731
    FederatedSimulation(tiny_federation, model_factory=tiny_model_factory, strategy=make(), config=cfg,
                        run_dir=RunDirectory.create(tmp_path, "r", {}, exist_ok_resume=False),
                        progress=False).run(stop_after=1)
    resumed = run_federated(tiny_federation, model_factory=tiny_model_factory, strategy=make(), config=cfg,
                            progress=False, run_dir=RunDirectory.create(tmp_path, "r", {}, exist_ok_resume=True))
    assert resumed.history[-1]["epsilon"] == compute_epsilon(noise_multiplier=1.2, sample_rate=0.67, steps=3,
                                                             delta=1e-5, accountant="rdp")
    metas = sorted((tmp_path / "r").rglob("round_*.json"))
    assert metas and metas[-1].name == "round_0003.json"  # older ones are pruned
    for meta in metas:  # no generator state or noise seed is checkpointed, in the JSON or in the tensors
        assert _generator_state_in(json.loads(meta.read_text())) == [], meta
        tensors = load_file(meta.with_suffix(".safetensors"))
        assert not [n for n, t in tensors.items() if t.dtype == torch.uint8 and t.numel() == _TORCH_STATE_BYTES], meta
    # The check must catch what it guards against: a checkpoint holding a generator's state or its seed.
    leaky = {"strategy": {"noise": {"rng": np.random.default_rng(5).bit_generator.state}}}
    assert _generator_state_in(leaky) and _generator_state_in({"x": torch.Generator().get_state().tolist()})
    assert _generator_state_in({"dp": {"noise_seed": 1234}})


_TORCH_STATE_BYTES = torch.Generator().get_state().numel()  # a CPU generator's state (Mersenne twister)


def _generator_state_in(obj, path: str = "") -> list[str]:
    """Where ``obj`` (parsed JSON) holds a numpy bit-generator state, a torch generator's byte state or a seed."""
    found = []
    if isinstance(obj, dict):
        if "bit_generator" in obj and "state" in obj:
            found.append(path)
        for key, value in obj.items():
            if "seed" in str(key).lower() and isinstance(value, int):
                found.append(f"{path}/{key}")
            found += _generator_state_in(value, f"{path}/{key}")
    elif isinstance(obj, list):
        if len(obj) == _TORCH_STATE_BYTES and all(isinstance(v, int) and 0 <= v < 256 for v in obj):
            found.append(path)
        else:
            for i, value in enumerate(obj):
                found += _generator_state_in(value, f"{path}[{i}]")
    return found


def test_dp_sgd_noise_is_secret_by_default(tiny_federation, tiny_model_factory):
    cfg = _config(client_fraction=1.0, sampling="fraction", num_rounds=1)
    kwargs = dict(noise_multiplier=1.0, max_grad_norm=1.0, accountant="rdp")
    states = [run_federated(tiny_federation, model_factory=tiny_model_factory, config=cfg, progress=False,
                            strategy=create_strategy("dp-sgd-fedavg", **kwargs)).global_state for _ in range(2)]
    assert not torch.equal(states[0]["head.weight"], states[1]["head.weight"])
    with pytest.warns(UserWarning, match="not private"):
        twins = [run_federated(tiny_federation, model_factory=tiny_model_factory, config=cfg, progress=False,
                               strategy=create_strategy("dp-sgd-fedavg", noise="reproducible-insecure", **kwargs)
                               ).global_state for _ in range(2)]
    assert torch.equal(twins[0]["head.weight"], twins[1]["head.weight"])
    assert math.isfinite(float(states[0]["head.weight"].sum()))


def test_an_unknown_noise_mode_is_refused_naming_the_modes():
    with pytest.raises(ConfigError, match="reproducible-insecure"):
        create_strategy("dp-fedavg", noise_multiplier=1.0, noise="seeded")
    with pytest.raises(ConfigError, match="reproducible-insecure"):
        create_strategy("dp-sgd-fedavg", noise_multiplier=1.0, noise="seeded")


def test_noise_subtraction_breaks_the_reproducible_mode_only(tiny_federation, tiny_model_factory):
    from mmpfl_core.attacks.noise_subtraction import attack_one_round
    cfg = _config(client_fraction=1.0, sampling="fraction", num_rounds=1)
    with pytest.warns(UserWarning, match="not private"):
        broken = attack_one_round(tiny_federation, model_factory=tiny_model_factory, config=cfg,
                                  noise="reproducible-insecure", accountant="rdp")
    secure = attack_one_round(tiny_federation, model_factory=tiny_model_factory, config=cfg, noise="secure",
                              accountant="rdp")
    assert broken.succeeded and broken.relative_error < 1e-3 and broken.noise_to_signal > 10  # float32 rounding only
    # Secure noise: the regenerated noise is independent, so the error is about sqrt(2) x the noise.
    assert not secure.succeeded and secure.relative_error == pytest.approx(math.sqrt(2) * secure.noise_to_signal,
                                                                           rel=0.05)
