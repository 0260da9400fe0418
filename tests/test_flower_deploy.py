"""A real Flower deployment on loopback (flower_app/deploy_loopback.py): SuperLink + 3 SuperNodes, FedAvg for
2 rounds, the SuperNode of site 2 killed after round 1. The run must complete with the 2 survivors, write
the usual run directory, and leave no process behind. Insecure mode on 127.0.0.1 only.
"""
from __future__ import annotations

import sys
from pathlib import Path

import pytest

pytest.importorskip("flwr")
psutil = pytest.importorskip("psutil")
APP_DIR = Path(__file__).resolve().parent.parent / "flower_app"
sys.path.insert(0, str(APP_DIR))

from deploy_loopback import deploy  # noqa: E402

from mmpfl_core.io.run_directory import RunDirectory  # noqa: E402


@pytest.mark.flower
@pytest.mark.slow
@pytest.mark.timeout(540)
def test_loopback_deployment_survives_a_killed_supernode(tmp_path):
    out = deploy(sites=3, results_dir=tmp_path / "results", run_name="loopback", timeout=480, kill_site=2,
                 kill_after_round=1, workdir=tmp_path / "deploy",
                 run_config="preset='reproduce_smoke' method='fedavg' num-rounds=2 round-timeout=120.0 node-wait=240.0")
    logs = out["logs"]
    assert out["completed"], f"deployment did not finish ({out['status']}); logs in {logs}"
    assert out["killed_site"] == 2
    summary = out["summary"]
    assert summary["engine"] == "flower" and summary["rounds_run"] == 2
    run_dir = RunDirectory(tmp_path / "results" / "loopback")
    assert "nodes" not in summary["flower"]  # the node -> site map is operator-only (private/summary.json)
    assert sorted(run_dir.read_summary(include_private=True)["flower"]["nodes"].values()) == [0, 1, 2]
    metrics = run_dir.read_metrics(include_private=True)
    assert list(metrics["round"]) == [1, 2]
    # Round 2 went on without the killed site: its reply is a failure/dropout, the survivors were aggregated.
    assert metrics.loc[1, "num_responded"] == 2
    assert metrics.loc[1, "num_clients"] == 3  # it was selected (fraction 1.0) but could not answer
    assert 0.0 <= metrics.loc[1, "global_test_accuracy"] <= 1.0
    assert (tmp_path / "results" / "loopback" / "private" / "checkpoints").is_dir()
    leftovers = [p for p in psutil.Process().children(recursive=True)
                 if any(k in " ".join(p.cmdline()) for k in ("flower-super", "flwr-serverapp", "flwr-clientapp"))]
    assert not leftovers, f"processes left running: {[p.pid for p in leftovers]}"
