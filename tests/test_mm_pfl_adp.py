"""MM-PFL-ADP: ablation switches really switch, masks keep groups at home, the ledger covers the release."""
from __future__ import annotations

import dataclasses

import pytest
import torch

from mmpfl_core.errors import ConfigError
from mmpfl_core.federated.config import FederatedConfig, LocalTrainingConfig, OptimizerConfig
from mmpfl_core.federated.mm_pfl_adp import MMPFLADP
from mmpfl_core.federated.simulation import run_federated
from mmpfl_core.federated.strategies import create_strategy
from mmpfl_core.io.run_directory import RunDirectory
from mmpfl_core.privacy.accounting import compute_epsilon

# Reproducible (not private) noise: these tests compare runs bit for bit.
DP = dict(target_epsilon=8.0, delta=1e-5, clip_norm=0.5, fisher_max_batches=1, fisher_batch_size=8,
          noise="reproducible-insecure")
# A low threshold makes masks appear within two rounds on the tiny federation.
MASK = dict(mode="threshold", threshold=1e-4, update_every=1, hysteresis=0.1)


def _config(**changes) -> FederatedConfig:
    base = FederatedConfig(num_rounds=2, local=LocalTrainingConfig(local_steps=2, batch_size=16),
                           optimizer=OptimizerConfig(lr=3e-3), bootstrap_resamples=20, checkpoint_every=0,
                           device="cpu")
    return dataclasses.replace(base, **changes)


class _Spy(MMPFLADP):
    """Records what every site sends and starts from."""

    def __init__(self, **kw):
        super().__init__(**kw)
        self.sent, self.personal_at_send = [], []

    def transmit(self, update, round_index):
        out = super().transmit(update, round_index)
        self.sent.append(set(out))
        self.personal_at_send.append(self._personal(update.site_id))
        return out


def test_masks_off_is_dp_fedavg_fisher_exactly(tiny_federation, tiny_model_factory):
    runs = [run_federated(tiny_federation, model_factory=tiny_model_factory, strategy=s, config=_config(), progress=False)
            for s in (create_strategy("mm-pfl-adp", masks=False, **DP), create_strategy("dp-fedavg-fisher", clipping="per-group", **DP))]
    for name in runs[0].global_state:
        assert torch.equal(runs[0].global_state[name], runs[1].global_state[name]), name
    assert runs[0].history[-1]["epsilon"] == runs[1].history[-1]["epsilon"]


def test_fisher_off_uses_the_uniform_allocation(tiny_federation, tiny_model_factory):
    fisher_off = run_federated(tiny_federation, model_factory=tiny_model_factory, config=_config(), progress=False,
                               strategy=create_strategy("mm-pfl-adp", masks=False, fisher=False, **DP))
    uniform = run_federated(tiny_federation, model_factory=tiny_model_factory, config=_config(), progress=False,
                            strategy=create_strategy("dp-fedavg", clipping="per-group", **{k: v for k, v in DP.items()
                                                                                         if not k.startswith("fisher")}))
    for name in uniform.global_state:
        assert torch.equal(fisher_off.global_state[name], uniform.global_state[name]), name


def test_personal_groups_are_never_sent_or_overwritten(tiny_federation, tiny_model_factory):
    spy = _Spy(mask=MASK, **DP)
    run = run_federated(tiny_federation, model_factory=tiny_model_factory, strategy=spy, config=_config(num_rounds=3),
                        progress=False)
    assert any(spy.personal_at_send), "masks never turned any group personal: the test would prove nothing"
    for keys, personal in zip(spy.sent, spy.personal_at_send):
        assert not keys & personal
    # The global model never carries a site's personal tensors: they live only in the strategy's state.
    for site, own in spy.personal.items():
        for name, tensor in own.items():
            assert not torch.equal(tensor, run.global_state[name])
    # Each site deploys the global shared groups merged with its own personal groups (what is evaluated).
    for site, own in spy.personal.items():
        deployed = spy.personal_state(site, run.global_state)
        assert all(torch.equal(deployed[n], t) for n, t in own.items())
        assert any(not torch.equal(deployed[n], run.global_state[n]) for n in own)
    # Masks partition the groups exactly.
    groups = set(spy.masker.param_groups)
    for site in spy.val_sets:
        shared, personal = spy.masker.masks.partition(site)
        assert set(shared) | set(personal) == groups and not set(shared) & set(personal)


def test_masks_reduce_uploaded_bytes_and_epsilon_is_the_accountants(tiny_federation, tiny_model_factory):
    cfg = _config(num_rounds=3)
    masked = run_federated(tiny_federation, model_factory=tiny_model_factory, config=cfg, progress=False,
                           strategy=create_strategy("mm-pfl-adp", mask=MASK, **DP))
    full = run_federated(tiny_federation, model_factory=tiny_model_factory, config=cfg, progress=False,
                         strategy=create_strategy("mm-pfl-adp", masks=False, **DP))
    assert masked.summary["megabytes_up"] < full.summary["megabytes_up"]
    privacy = masked.summary["privacy"]
    expected = compute_epsilon(noise_multiplier=privacy["noise_multiplier"], sample_rate=1.0, steps=3, delta=1e-5)
    assert masked.history[-1]["epsilon"] == pytest.approx(expected, rel=1e-6)
    assert masked.history[-1]["epsilon"] <= 8.0 + 1e-6


def test_resume_is_bit_identical(tiny_federation, tiny_model_factory, tmp_path):
    cfg = _config(num_rounds=3, checkpoint_every=1)
    whole = run_federated(tiny_federation, model_factory=tiny_model_factory, config=cfg, progress=False,
                          strategy=create_strategy("mm-pfl-adp", mask=MASK, **DP),
                          run_dir=RunDirectory.create(tmp_path, "whole", {}, exist_ok_resume=False))
    run_federated(tiny_federation, model_factory=tiny_model_factory, config=cfg, progress=False, stop_after=2,
                  strategy=create_strategy("mm-pfl-adp", mask=MASK, **DP),
                  run_dir=RunDirectory.create(tmp_path, "cut", {}, exist_ok_resume=False))
    resumed = run_federated(tiny_federation, model_factory=tiny_model_factory, config=cfg, progress=False,
                            strategy=create_strategy("mm-pfl-adp", mask=MASK, **DP),
                            run_dir=RunDirectory.create(tmp_path, "cut", {}, exist_ok_resume=True))
    for name in whole.global_state:
        assert torch.equal(whole.global_state[name], resumed.global_state[name])
    strip = lambda h: [{k: v for k, v in r.items() if k != "seconds"} for r in h]  # noqa: E731
    assert strip(whole.history) == strip(resumed.history)


def test_distributed_placement_sends_placeholders_and_local_is_refused(tiny_federation, tiny_model_factory):
    spy = _Spy(mask=MASK, placement="distributed", **DP)
    run_federated(tiny_federation, model_factory=tiny_model_factory, strategy=spy, config=_config(num_rounds=3),
                  progress=False)
    assert len({frozenset(k) for k in spy.sent}) == 1  # every site sends every group: masks stay hidden
    with pytest.raises(ConfigError, match="local"):
        create_strategy("mm-pfl-adp", placement="local", **DP)


def test_no_dp_ablation_runs_without_noise(tiny_federation, tiny_model_factory):
    run = run_federated(tiny_federation, model_factory=tiny_model_factory, config=_config(), progress=False,
                        strategy=create_strategy("mm-pfl-adp", dp=False, mask=MASK))
    assert run.summary["privacy"]["noise_multiplier"] == 0.0
    assert run.history[-1]["epsilon"] == float("inf")
