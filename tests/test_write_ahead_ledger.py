"""The write-ahead ledger (docs/DESIGN.md 4.8, issue 21 defect 3): a release is on disk before it leaves, and a
run killed between a release and the next checkpoint, then resumed, ends with an epsilon that covers
every release made; the old behaviour (the ledger from the checkpoint only) is shown to under-charge."""
from __future__ import annotations

import dataclasses
import json
import os

import pytest

from mmpfl_core.errors import PrivacyError
from mmpfl_core.federated.config import FederatedConfig, LocalTrainingConfig, OptimizerConfig
from mmpfl_core.federated.sample_level import SampleLevelHooks
from mmpfl_core.federated.simulation import FederatedSimulation
from mmpfl_core.federated.strategies import create_strategy
from mmpfl_core.io.run_directory import RunDirectory
from mmpfl_core.privacy.accounting import compose_epsilon
from mmpfl_core.privacy.ledger import PrivacyLedger, read_journal

pytestmark = pytest.mark.filterwarnings("ignore::RuntimeWarning", "ignore::UserWarning")
DELTA = 1e-5


# ----------------------------------------------------------------------------- the ledger file itself
def test_record_is_on_disk_before_it_returns(tmp_path, monkeypatch):
    path = tmp_path / "ledger.jsonl"
    ledger = PrivacyLedger(delta=DELTA, accountant="rdp")
    ledger.attach_journal(path)
    synced = []
    real_fsync = os.fsync

    def fsync(fd):  # what is in the file at the moment it is forced to disk
        real_fsync(fd)
        synced.append(len(read_journal(path)[1]))
    monkeypatch.setattr(os, "fsync", fsync)
    ledger.record(name="update", noise_multiplier=1.0, sample_rate=0.5, round=1)
    assert synced == [1] and len(ledger) == 1  # fsynced with the entry in it, before record returned
    again = PrivacyLedger(delta=DELTA, accountant="rdp")
    again.attach_journal(path)
    assert again.entries == ledger.entries


def test_failed_write_refuses_the_release(tmp_path, monkeypatch):
    ledger = PrivacyLedger(delta=DELTA, accountant="rdp")
    ledger.attach_journal(tmp_path / "ledger.jsonl")

    def broken(fd):
        raise OSError(28, "No space left on device")
    monkeypatch.setattr(os, "fsync", broken)
    with pytest.raises(PrivacyError, match="NOT made"):
        ledger.record(name="update", noise_multiplier=1.0, sample_rate=0.5, round=1)
    assert len(ledger) == 0


def test_attach_checks_the_file_belongs_to_the_run(tmp_path):
    path = tmp_path / "ledger.jsonl"
    ledger = PrivacyLedger(delta=DELTA, accountant="rdp")
    ledger.attach_journal(path)
    for r in (1, 2, 3):
        ledger.record(name="update", noise_multiplier=1.0, sample_rate=0.5, round=r)
    checkpointed = PrivacyLedger(delta=DELTA, accountant="rdp")
    checkpointed.record(name="update", noise_multiplier=1.0, sample_rate=0.5, round=1)
    checkpointed.attach_journal(path)  # the checkpoint's entries are a prefix: the file's extra ones are adopted
    assert [e["round"] for e in checkpointed.entries] == [1, 2, 3]
    other = PrivacyLedger(delta=DELTA, accountant="rdp")
    other.record(name="update", noise_multiplier=2.0, sample_rate=0.5, round=1)
    with pytest.raises(PrivacyError, match="different runs"):
        other.attach_journal(path)
    with pytest.raises(PrivacyError, match="other settings"):
        PrivacyLedger(delta=1e-6, accountant="rdp").attach_journal(path)
    with pytest.raises(PrivacyError, match="does not exist"):  # entries from a checkpoint, no file: refuse
        other.attach_journal(tmp_path / "missing.jsonl")


def test_torn_last_line_is_dropped_and_the_file_stays_appendable(tmp_path):
    path = tmp_path / "ledger.jsonl"
    ledger = PrivacyLedger(delta=DELTA, accountant="rdp")
    ledger.attach_journal(path)
    ledger.record(name="update", noise_multiplier=1.0, sample_rate=0.5, round=1)
    with open(path, "a", encoding="utf-8") as fh:  # died inside record(): that release never left
        fh.write('{"entry": {"name": "upd')
    resumed = PrivacyLedger(delta=DELTA, accountant="rdp")
    resumed.attach_journal(path)
    assert len(resumed) == 1
    resumed.record(name="update", noise_multiplier=1.0, sample_rate=0.5, round=2)
    assert [e["round"] for e in read_journal(path)[1]] == [1, 2]
    lines = path.read_text().splitlines()
    lines.insert(1, "not json")
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(PrivacyError, match="line 2"):
        read_journal(path)


def test_epsilon_without_amplification_is_the_accountant_at_q_one():
    ledger = PrivacyLedger(delta=DELTA, accountant="rdp")
    for r in range(5):
        ledger.record(name="update", noise_multiplier=2.0, sample_rate=0.2, round=r)
    assert ledger.epsilon_without_amplification() == pytest.approx(
        compose_epsilon(releases=[(2.0, 1.0, 5)], delta=DELTA, accountant="rdp"), abs=1e-12)
    assert ledger.epsilon_without_amplification() > ledger.epsilon()


# ------------------------------------------------------------------ a run killed between release and checkpoint
class _Killed(Exception):
    """Stands for the process dying right after round 3 released its model."""


class _CheckpointOnly(FederatedSimulation):
    """The broken (old) resume: the ledger comes from the last checkpoint only, its file is ignored."""

    def _attach_ledgers(self) -> None:
        return None


def _config() -> FederatedConfig:
    return dataclasses.replace(FederatedConfig(
        num_rounds=4, local=LocalTrainingConfig(local_steps=1, batch_size=16),
        optimizer=OptimizerConfig(name="sgd", lr=0.05, momentum=0.0, weight_decay=0.0), bootstrap_resamples=0,
        checkpoint_every=2, device="cpu"))


_SAMPLE_DP = dict(noise_multiplier=1.0, max_grad_norm=1.0, accountant="rdp")
CASES = {
    "dp-fedavg q<1": ("dp-fedavg", dict(noise_multiplier=1.5, accountant="rdp"),
                      dict(client_fraction=0.67, sampling="poisson")),
    "mm-pfl-adp": ("mm-pfl-adp", dict(noise_multiplier=1.5, accountant="rdp", fisher_batch_size=4, fisher_max_batches=1,
                                      noise_gate=False, mask=dict(mode="threshold", threshold=1e-4, update_every=1)),
                   dict(client_fraction=0.67, sampling="poisson")),
    "dp-fedavg + DP-SGD": ("dp-fedavg", dict(noise_multiplier=1.5, accountant="rdp", sample_level_dp=_SAMPLE_DP), {}),
    "dp-sgd-fedavg": ("dp-sgd-fedavg", _SAMPLE_DP, {}),
}


def _killed_and_resumed(federation, model_factory, root, case, simulation=FederatedSimulation):
    """Run 4 rounds with checkpoints every 2, kill the process right after round 3's release (before the
    round-4 checkpoint), resume. Returns (resumed strategy, server releases made, site uploads made, run dir)."""
    name, kwargs, changes = CASES[case]
    cfg = dataclasses.replace(_config(), **changes)
    server_releases, uploads = [], []  # counted here, independently of any ledger

    def instrument(strategy, kill_after):
        aggregate, transmit = strategy.aggregate, strategy.transmit
        if hasattr(strategy, "release_sum"):
            release_sum = strategy.release_sum

            def counted_release(global_state, total, num_participants, round_index):
                out = release_sum(global_state, total, num_participants, round_index)
                server_releases.append(round_index)
                return out
            strategy.release_sum = counted_release

        def counted_transmit(update, round_index):
            sent = transmit(update, round_index)
            uploads.append((update.site_id, update.num_steps))
            return sent

        def killing_aggregate(global_state, updates, sent, round_index):
            out = aggregate(global_state, updates, sent, round_index)
            if round_index == kill_after:
                raise _Killed
            return out
        strategy.transmit, strategy.aggregate = counted_transmit, killing_aggregate
        return strategy

    run_dir = RunDirectory.create(root, "run", {"case": case}, exist_ok_resume=False)
    first = instrument(create_strategy(name, **kwargs), kill_after=3)
    with pytest.raises(_Killed):
        simulation(federation, model_factory=model_factory, strategy=first, config=cfg, run_dir=run_dir,
                   progress=False).run()
    if hasattr(first, "ledger") and simulation is FederatedSimulation:  # round 3 on disk, in no checkpoint
        assert [e["round"] for e in read_journal(run_dir.ledger_path)[1]] == [1, 2, 3]
    resumed = instrument(create_strategy(name, **kwargs), kill_after=None)
    run_dir = RunDirectory.create(root, "run", {"case": case}, exist_ok_resume=True)
    simulation(federation, model_factory=model_factory, strategy=resumed, config=cfg, run_dir=run_dir,
               progress=False).run()
    return resumed, server_releases, uploads, run_dir


@pytest.mark.parametrize("case", list(CASES))
def test_killed_between_release_and_checkpoint_every_release_is_charged(tiny_federation, tiny_model_factory,
                                                                       tmp_path, case):
    strategy, releases, uploads, run_dir = _killed_and_resumed(tiny_federation, tiny_model_factory, tmp_path / "wal",
                                                              case)
    broken, broken_releases, broken_uploads, _ = _killed_and_resumed(tiny_federation, tiny_model_factory,
                                                                     tmp_path / "old", case, _CheckpointOnly)
    if hasattr(strategy, "ledger"):  # client-level: rounds 1, 2, 3 (killed), then 3 again and 4
        assert sorted(releases) == sorted(broken_releases) == [1, 2, 3, 3, 4]
        z, q = strategy.release
        made = compose_epsilon(releases=[(z, q, len(releases))], delta=strategy.delta, accountant="rdp")
        assert strategy.ledger.epsilon() == pytest.approx(made, rel=1e-9)
        assert [e["round"] for e in read_journal(run_dir.ledger_path)[1]] == [1, 2, 3, 3, 4]
        assert json.loads(run_dir.summary_path.read_text())["privacy"]["epsilon"] == pytest.approx(made, rel=1e-9)
        # the old behaviour forgets round 3's first release: flagged as under-charging
        assert broken.ledger.epsilon() < made - 1e-6
        assert broken.ledger.epsilon() == pytest.approx(
            compose_epsilon(releases=[(z, q, len(releases) - 1)], delta=strategy.delta, accountant="rdp"), rel=1e-9)
    if isinstance(strategy, SampleLevelHooks) and strategy.sample_dp is not None:  # per-site DP-SGD ledgers
        train_sizes = {s.site_id: s.train for s in tiny_federation.sites}
        sites = sorted({site for site, _ in uploads})
        assert sites and run_dir.site_ledger_sites() == sites
        under = []
        for site in sites:
            z = strategy.sample_dp._z[site]
            q = min(1.0, 16 / len(train_sizes[site]))  # B / n_k: Poisson rate of the site's DP-SGD batches
            steps = sum(n for s, n in uploads if s == site)
            made = compose_epsilon(releases=[(z, q, steps)], delta=strategy.sample_dp.delta, accountant="rdp")
            assert strategy.sample_dp.epsilons()[site] == pytest.approx(made, rel=1e-9)
            under.append(broken.sample_dp.epsilons()[site] < made - 1e-6)
        assert all(under), "checkpoint-only resume must forget the killed round's DP-SGD steps at every site"
        scopes = json.loads(run_dir.manifest_path.read_text())["scopes"]
        assert all(scopes[f"private/site_{s}/dp_sgd_ledger.jsonl"] == "private-to-site" for s in sites)


def test_crash_before_the_first_checkpoint_keeps_its_releases(tiny_federation, tiny_model_factory, tmp_path):
    cfg = dataclasses.replace(_config(), num_rounds=2, checkpoint_every=0)
    first = create_strategy("dp-fedavg", noise_multiplier=1.5, accountant="rdp")
    aggregate = first.aggregate

    def killing(global_state, updates, sent, round_index):
        aggregate(global_state, updates, sent, round_index)
        raise _Killed
    first.aggregate = killing
    run_dir = RunDirectory.create(tmp_path, "run", {}, exist_ok_resume=False)
    with pytest.raises(_Killed):
        FederatedSimulation(tiny_federation, model_factory=tiny_model_factory, strategy=first, config=cfg,
                            run_dir=run_dir, progress=False).run()
    assert run_dir.has_releases()
    again = create_strategy("dp-fedavg", noise_multiplier=1.5, accountant="rdp")
    FederatedSimulation(tiny_federation, model_factory=tiny_model_factory, strategy=again, config=cfg,
                        run_dir=RunDirectory.create(tmp_path, "run", {}, exist_ok_resume=True), progress=False).run()
    assert [e["round"] for e in again.ledger.entries] == [1, 1, 2]
    assert json.loads(run_dir.manifest_path.read_text())["scopes"]["private/ledger.jsonl"] == "operator-only"
