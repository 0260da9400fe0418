"""MM-PFL-ADP: ablation switches really switch, masks keep groups at home, the ledger covers the release."""
from __future__ import annotations

import dataclasses

import pytest
import torch

from conftest import tiny_run_config
from mmpfl_core.errors import ConfigError
from mmpfl_core.federated.config import FederatedConfig
from mmpfl_core.federated.mm_pfl_adp import MMPFLADP
from mmpfl_core.federated.simulation import run_federated
from mmpfl_core.federated.strategies import create_strategy
from mmpfl_core.io.run_directory import RunDirectory
from mmpfl_core.privacy.accounting import compute_epsilon

# Reproducible (not private) noise: these tests compare runs bit for bit.
DP = dict(target_epsilon=8.0, delta=1e-5, clip_norm=0.5, fisher_max_batches=1, fisher_batch_size=8,
          noise="reproducible-insecure")
# A low threshold makes masks appear within two rounds on the tiny federation. The tests of the KL mask
# machinery switch the noise gate off: on a few tiny sites at epsilon 8 it keeps every group personal.
MASK = dict(mode="threshold", threshold=1e-4, update_every=1, hysteresis=0.1)


def _config(**changes) -> FederatedConfig:
    return tiny_run_config(**changes)


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
    spy = _Spy(mask=MASK, noise_gate=False, **DP)
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
                           strategy=create_strategy("mm-pfl-adp", mask=MASK, noise_gate=False, **DP))
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
                          strategy=create_strategy("mm-pfl-adp", mask=MASK, noise_gate=False, **DP),
                          run_dir=RunDirectory.create(tmp_path, "whole", {}, exist_ok_resume=False))
    run_federated(tiny_federation, model_factory=tiny_model_factory, config=cfg, progress=False, stop_after=2,
                  strategy=create_strategy("mm-pfl-adp", mask=MASK, noise_gate=False, **DP),
                  run_dir=RunDirectory.create(tmp_path, "cut", {}, exist_ok_resume=False))
    resumed = run_federated(tiny_federation, model_factory=tiny_model_factory, config=cfg, progress=False,
                            strategy=create_strategy("mm-pfl-adp", mask=MASK, noise_gate=False, **DP),
                            run_dir=RunDirectory.create(tmp_path, "cut", {}, exist_ok_resume=True))
    for name in whole.global_state:
        assert torch.equal(whole.global_state[name], resumed.global_state[name])
    strip = lambda h: [{k: v for k, v in r.items() if k != "seconds"} for r in h]  # noqa: E731
    assert strip(whole.history) == strip(resumed.history)


def test_distributed_placement_sends_placeholders_and_local_is_refused(tiny_federation, tiny_model_factory):
    spy = _Spy(mask=MASK, noise_gate=False, placement="distributed", **DP)
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


# ---- the noise gate (noise-aware masks)
def _configured(federation, model_factory, **kwargs):
    strategy = create_strategy("mm-pfl-adp", **{**DP, **kwargs})
    strategy.configure(config=_config(), federation=federation, client_ids=[s.site_id for s in federation.sites],
                       model=model_factory())
    strategy.before_round(1)
    return strategy


def test_noise_gate_under_heavy_noise_is_local_training_and_charges_nothing(tiny_federation, tiny_model_factory):
    """3 sites at epsilon 8 over 2 rounds: every group's best-case SNR is far below 1, so every group stays at
    home, nothing is released or charged, and each site trains exactly as local-only training would."""
    spy = _Spy(**DP)
    run = run_federated(tiny_federation, model_factory=tiny_model_factory, strategy=spy, config=_config(), progress=False)
    local = run_federated(tiny_federation, model_factory=tiny_model_factory, strategy=create_strategy("local"),
                          config=_config(), progress=False)
    gate = run.summary["noise_gate"]
    assert gate["drowned_last_round"] == sorted(spy.group_sizes)
    assert all(v < 1.0 for v in gate["snr_last_round"].values())
    assert all(not keys for keys in spy.sent)
    assert run.history[-1]["epsilon"] == 0.0 and gate["rounds_with_nothing_released"] == 2
    initial = tiny_model_factory().state_dict()
    assert all(torch.equal(t, initial[n]) for n, t in run.global_state.items())
    for site, own in local.strategy.personal.items():
        assert all(torch.equal(spy.personal[site][n], t) for n, t in own.items())


def test_noise_gate_is_public_and_the_released_groups_get_the_whole_budget(tiny_federation, tiny_model_factory):
    # A threshold between the groups' SNRs (the bounded Fisher split separates them) makes the gate split.
    probe = _configured(tiny_federation, tiny_model_factory, proxy_trust=None, noise_gate={"min_snr": 0.0})
    probe.noise_allocation(1, probe._model.state_dict())
    snrs = sorted(probe.snr.values())
    assert snrs[0] < snrs[-1]
    threshold = (snrs[0] + snrs[-1]) / 2
    strategies = []
    for federation in (tiny_federation, _with_private_data_changed(tiny_federation)):
        s = _configured(federation, tiny_model_factory, proxy_trust=None, noise_gate={"min_snr": threshold})
        strategies.append((s, s.noise_allocation(1, s._model.state_dict())))
    (a, sig_a), (b, sig_b) = strategies
    assert a.drowned and a.drowned != frozenset(a.group_sizes)
    assert a.drowned == b.drowned and sig_a == sig_b  # a site's private data changes nothing
    released = [g for g in a.group_sizes if g not in a.drowned]
    assert sum(a.clip_bounds[g] ** 2 for g in released) == pytest.approx(a.clip_norm ** 2, rel=1e-12)
    assert all(a.clip_bounds[g] == 0.0 and sig_a[g] == 0.0 for g in a.drowned)
    z_eff = sum(a.clip_bounds[g] ** 2 / sig_a[g] ** 2 for g in released) ** -0.5
    assert z_eff == pytest.approx(a.update_noise_multiplier, rel=1e-9)


def _with_private_data_changed(federation):
    """The same federation (same public set) with site 0's train and validation labels permuted."""
    site = federation.sites[0]
    flip = lambda c: dataclasses.replace(c, labels=c.labels[::-1].copy())  # noqa: E731
    sites = [dataclasses.replace(site, train=flip(site.train), val=flip(site.val)), *federation.sites[1:]]
    return dataclasses.replace(federation, sites=sites)


def test_fisher_allocation_falls_back_to_uniform_with_a_logged_reason(tiny_federation, tiny_model_factory, caplog):
    """At epsilon 8 with 3 sites the second-order proxy predicts nats of loss per round: outside its range, so
    dp-fedavg-fisher uses uniform noise, says why, and its run equals per-group uniform DP-FedAvg exactly."""
    with caplog.at_level("INFO", logger="mmpfl_core.federated.dp_fisher"):
        fisher = run_federated(tiny_federation, model_factory=tiny_model_factory, config=_config(), progress=False,
                               strategy=create_strategy("dp-fedavg-fisher", proxy_trust=0.05, **DP))
    allocation = fisher.summary["privacy"]["allocation"]
    assert allocation["used_last_round"] == "uniform" and allocation["fallback_rounds"] == 2
    assert "proxy_trust" in allocation["fallback_reason"] and "proxy_trust" in caplog.text
    assert all(row["predicted_noise_loss"] > 0.05 and row["fisher_fallback"] == 1.0 for row in fisher.history)
    uniform = run_federated(tiny_federation, model_factory=tiny_model_factory, config=_config(), progress=False,
                            strategy=create_strategy("dp-fedavg", clipping="per-group",
                                                     **{k: v for k, v in DP.items() if not k.startswith("fisher")}))
    for name in uniform.global_state:
        assert torch.equal(fisher.global_state[name], uniform.global_state[name]), name


# ---- the Fisher is skipped when the noise gate keeps every group at home (speed, issue 15)
class _CountingFisher(MMPFLADP):
    """Records the round index of every public-set Fisher estimate."""

    def __init__(self, **kw):
        super().__init__(**kw)
        self.fisher_rounds = []

    def compute_fisher(self, round_index, global_state):
        self.fisher_rounds.append(round_index)
        return super().compute_fisher(round_index, global_state)


class _NoShortcut(_CountingFisher):
    """The behaviour before the shortcut: the Fisher is estimated whatever the gate decides."""

    def _snr_bound(self, full_bounds):
        return None


def test_fisher_is_not_estimated_when_the_gate_keeps_every_group_home(tiny_federation, tiny_model_factory):
    """3 sites at epsilon 8: every group is drowned under any bounded split, so the Fisher is never estimated;
    the run is bit for bit the run that estimates it (nothing released either way)."""
    runs = {}
    for cls in (_CountingFisher, _NoShortcut):
        strategy = cls(**DP)
        runs[cls] = (strategy, run_federated(tiny_federation, model_factory=tiny_model_factory, strategy=strategy,
                                             config=_config(), progress=False))
    (fast, fast_run), (slow, slow_run) = runs[_CountingFisher], runs[_NoShortcut]
    assert fast.fisher_rounds == [] and slow.fisher_rounds == [1, 2]
    assert fast.drowned == slow.drowned == frozenset(fast.group_sizes)
    # Reported SNR: uniform noise's, which is what the estimating run used too (its allocator fell back to uniform).
    assert slow.allocation_used == "uniform" and fast.snr == slow.snr
    assert fast_run.summary["privacy"]["allocation"]["used_last_round"] == "none"
    assert "nothing is released" in fast_run.summary["privacy"]["allocation"]["fallback_reason"]
    assert fast_run.summary["noise_gate"]["rounds_fisher_skipped"] == 2
    assert slow_run.summary["noise_gate"]["rounds_fisher_skipped"] == 0
    assert fast_run.history[-1]["epsilon"] == slow_run.history[-1]["epsilon"] == 0.0
    for name, t in slow_run.global_state.items():
        assert torch.equal(fast_run.global_state[name], t), name
    for site, own in slow.personal.items():
        assert all(torch.equal(fast.personal[site][n], t) for n, t in own.items())


def test_snr_bound_holds_for_the_bounded_fisher_split(tiny_federation, tiny_model_factory):
    """The shortcut is sound only if no allocation the allocator may pick beats the bound: check it against the
    bounded split for the real public-set Fisher and for extreme made-up Fisher values."""
    s = _configured(tiny_federation, tiny_model_factory, proxy_trust=None, min_gain=0.0, noise_gate={"min_snr": 0.0})
    total = sum(s.group_sizes.values())
    full = {g: s.clip_norm * (d / total) ** 0.5 for g, d in s.group_sizes.items()}
    bound = s._snr_bound(full)
    real = s.compute_fisher(1, s._model.state_dict())
    extreme = {g: (1e6 if i == 0 else 1e-9) for i, g in enumerate(s.group_sizes)}
    from mmpfl_core.personalization.noise_gate import release_snr
    for fisher in (real, extreme):
        s.fisher = fisher
        alloc = s.choose_allocation(s.group_sizes, full, 1)
        assert s.allocation_used == "fisher"
        snr = release_snr(clip_bounds=full, sigmas=alloc.sigmas, group_sizes=s.group_sizes,
                          expected_participants=s.expected_participants, rounds=s.gate_rounds)
        assert all(snr[g] <= bound[g] for g in snr)
    assert max(snr.values()) > 0.999 * max(bound.values()) / (1 + 1e-6)  # the extreme split reaches it: tight
    assert _configured(tiny_federation, tiny_model_factory, max_noise_ratio=None)._snr_bound(full) is None


def test_a_skipped_fisher_is_computed_later_as_it_was_due(tiny_federation, tiny_model_factory):
    """fisher_every=2: round 1 is skipped (gate keeps everything home), round 2 shares: the Fisher used in
    round 2 is the one due in round 1 (its random stream, the unchanged global model), and so is its allocation."""
    lazy = _configured(tiny_federation, tiny_model_factory, fisher_every=2, proxy_trust=None)
    eager = _configured(tiny_federation, tiny_model_factory, fisher_every=2, proxy_trust=None,
                        noise_gate={"min_snr": 0.0})
    counted = []
    for s in (lazy, eager):
        original = s.compute_fisher
        s.compute_fisher = lambda r, g, _o=original, _s=s: counted.append((_s is lazy, r)) or _o(r, g)
    state = lazy._model.state_dict()
    assert all(v == 0.0 for v in lazy.noise_allocation(1, state).values())  # all drowned: nothing to allocate
    eager.noise_allocation(1, state)
    lazy.gate = dataclasses.replace(lazy.gate, min_snr=0.0)  # round 2: now every group is shared
    lazy_sigmas, eager_sigmas = lazy.noise_allocation(2, state), eager.noise_allocation(2, state)
    assert counted == [(False, 1), (True, 1)]  # eager: due round 1; lazy: computed in round 2 as of round 1
    assert lazy.fisher == eager.fisher and lazy_sigmas == eager_sigmas
