"""A restarted Flower server never forgets a release (issue 21, defect 3): its ledger writes ahead to the run
directory, and a run name whose ledger already records releases is refused (unit level, no Ray)."""
from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("flwr")
APP_DIR = Path(__file__).resolve().parent.parent / "flower_app"
sys.path.insert(0, str(APP_DIR))

from mmpfl_core.io.run_directory import RunDirectoryError  # noqa: E402
from mmpfl_core.privacy.ledger import read_journal  # noqa: E402
from mmpfl_flower.server_app import open_run_directory  # noqa: E402
from mmpfl_flower.task import configured_strategy, load_job, new_model  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning", "ignore::RuntimeWarning")


def _server(tmp_path, run_name="dp-run"):
    job = load_job(preset="reproduce_smoke", num_rounds=2, method="dp-fedavg", results_dir=str(tmp_path),
                   run_name=run_name)
    core = configured_strategy(job, new_model(job))
    return job, core


def _release_one_round(core):
    glob = {n: torch.zeros(s) for n, s in core.shapes.items()}
    core.before_round(1)
    core.announce_participants(2)
    core.release_sum(glob, {n: torch.zeros_like(t) for n, t in glob.items()}, 2, 1)


def test_restarted_flower_server_refuses_a_run_name_with_releases(tmp_path):
    job, core = _server(tmp_path)
    run_dir = open_run_directory(job, {"run": 1}, core)
    assert not run_dir.has_releases()
    _release_one_round(core)
    assert [e["round"] for e in read_journal(run_dir.ledger_path)[1]] == [1]  # on disk, before any checkpoint
    job, restarted = _server(tmp_path)  # the server process restarts with a fresh strategy and empty ledger
    with pytest.raises(RunDirectoryError, match="already recorded releases.*run-name"):
        open_run_directory(job, {"run": 1}, restarted)
    assert [e["round"] for e in read_journal(run_dir.ledger_path)[1]] == [1]  # nothing was overwritten
    job, other = _server(tmp_path, run_name="dp-run-2")
    assert open_run_directory(job, {"run": 1}, other).ledger_path.is_file()


def test_a_run_that_released_nothing_may_be_reused(tmp_path):
    job, core = _server(tmp_path)
    open_run_directory(job, {"run": 1}, core)  # died before its first release
    job, again = _server(tmp_path)
    run_dir = open_run_directory(job, {"run": 1}, again)
    _release_one_round(again)
    assert len(read_journal(run_dir.ledger_path)[1]) == len(again.ledger) == 1
