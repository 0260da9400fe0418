"""A real Flower deployment on loopback (flower_app/deploy_loopback.py), secured as Flower documents it: TLS
(throw-away CA generated at test time) and CLI-managed SuperNode authentication (one EC key pair per site,
registered with `flwr supernode register`). SuperLink + 3 registered SuperNodes + 2 unregistered ones (one
without a key, one with a key the operator never registered), FedAvg for 2 rounds, the SuperNode of site 2
killed after round 1. The unregistered SuperNodes must be refused; the run must complete with the registered
sites (2 survivors in round 2), write the usual run directory, and leave no process behind. 127.0.0.1 only.
One deployment covers TLS, authentication and fault tolerance: each costs minutes on 2 cores.
"""
from __future__ import annotations

import sys
from pathlib import Path

import pytest

pytest.importorskip("flwr")
psutil = pytest.importorskip("psutil")
APP_DIR = Path(__file__).resolve().parent.parent / "flower_app"
sys.path.insert(0, str(APP_DIR))

from credentials import make_credentials  # noqa: E402
from deploy_loopback import deploy  # noqa: E402

from mmpfl_core.io.run_directory import RunDirectory  # noqa: E402


def test_credentials_are_generated_private_and_loadable(tmp_path):
    from cryptography import x509
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.hazmat.primitives.serialization import load_ssh_private_key, load_ssh_public_key
    creds = make_credentials(tmp_path / "c", ["site-0", "site-1"])
    cert = x509.load_pem_x509_certificate(creds.server_cert.read_bytes())
    ca = x509.load_pem_x509_certificate(creds.ca_cert.read_bytes())
    cert.verify_directly_issued_by(ca)  # raises if the server certificate was not signed by the CA
    sans = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert {str(ip) for ip in sans.get_values_for_type(x509.IPAddress)} == {"127.0.0.1", "::1"}
    for name in ("site-0", "site-1"):
        key = load_ssh_private_key(creds.node_keys[name].read_bytes(), None)  # what flower-supernode loads
        assert isinstance(key, ec.EllipticCurvePrivateKey) and key.curve.name == "secp384r1"
        assert load_ssh_public_key(creds.node_public_keys[name].read_bytes()) == key.public_key()
        assert creds.node_keys[name].stat().st_mode & 0o077 == 0  # owner-only
    assert creds.server_key.stat().st_mode & 0o077 == 0
    assert not (tmp_path / "c" / "ca.key").exists()  # the CA key is never written
    assert creds.node_keys["site-0"].read_bytes() != creds.node_keys["site-1"].read_bytes()


@pytest.mark.flower
@pytest.mark.slow
@pytest.mark.timeout(660)
def test_secure_loopback_deployment_refuses_intruders_and_survives_a_killed_supernode(tmp_path):
    out = deploy(sites=3, results_dir=tmp_path / "results", run_name="loopback", timeout=600, kill_site=2,
                 kill_after_round=1, workdir=tmp_path / "deploy", secure=True, intruders=2,
                 run_config="preset='reproduce_smoke' method='fedavg' num-rounds=2 round-timeout=120.0 node-wait=240.0")
    logs = out["logs"]
    assert out["completed"], f"deployment did not finish ({out['status']}); logs in {logs}"
    assert out["killed_site"] == 2
    summary = out["summary"]
    assert summary["engine"] == "flower" and summary["rounds_run"] == 2
    run_dir = RunDirectory(tmp_path / "results" / "loopback")
    assert "nodes" not in summary["flower"]  # the node -> site map is operator-only (private/summary.json)
    nodes = run_dir.read_summary(include_private=True)["flower"]["nodes"]
    assert sorted(nodes.values()) == [0, 1, 2]
    # Only the registered sites took part; both unregistered SuperNodes were refused by the SuperLink.
    assert set(nodes) == set(out["registered"].values())
    for name, report in out["intruders"].items():
        assert report["exit_code"] not in (None, 0) and not report["connected"], (name, report)
    assert "must be registered" in out["intruders"]["intruder-0"]["reason"]  # no key at all
    assert "activate" in out["intruders"]["intruder-1"]["reason"]  # a key nobody registered
    # TLS: the SuperLink served HTTPS with the generated certificate; no key material in the repository.
    assert "running on https://127.0.0.1" in (tmp_path / "deploy" / "superlink.log").read_text()
    assert not list(APP_DIR.glob("**/*.key")) and not list(APP_DIR.glob("**/*.pem"))
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
