"""A real Flower deployment on this machine: one SuperLink, one SuperNode per site, ``flwr run``, clean shutdown.

Every process listens on 127.0.0.1 only and runs in ``--insecure`` mode: acceptable on loopback, for
tests and teaching, NEVER across a network. For real hospitals:

* TLS: start the SuperLink with ``--ssl-ca-certfile ca.crt --ssl-certfile server.pem --ssl-keyfile
  server.key`` and each SuperNode with ``--root-certificates ca.crt`` (no ``--insecure``); the
  ``flwr`` CLI connection gets ``root-certificates = "ca.crt"`` instead of ``insecure = true``.
* SuperNode authentication: ``flower-superlink --enable-supernode-auth`` and register each
  hospital's public key (``flwr supernode register``); each SuperNode starts with
  ``--auth-supernode-private-key``. Only registered sites can join or impersonate a site.
* User authentication for ``flwr run`` (who may submit apps) is a SuperLink/CLI account setting
  (``flwr login``); see Flower's "authenticate SuperNodes" and "enable TLS" guides.
* Each SuperNode loads ITS OWN data (here: ``partition-id`` of the synthetic cohort). Everything
  a site sends besides the (clipped, noised or SecAgg+-masked) update -- loss, counts,
  accuracies -- is outside the DP guarantee (DESIGN 4.6).

Usage (from the repository root, ``make flower-deploy`` / ``make flower-sim`` run the first two lines)::

    python flower_app/deploy_loopback.py --sites 3 --run-config "preset='reproduce_smoke' method='fedavg'"
    python flower_app/deploy_loopback.py --engine simulation --sites 5 --run-config "method='mm-pfl-adp'"
    python flower_app/deploy_loopback.py --sites 3 --kill-site 2 --kill-after-round 1   # survive a lost site

Bounded: every wait has a timeout; all processes run in their own process groups and are killed
in a ``finally`` (SIGTERM, then SIGKILL), whatever happens.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import psutil  # a dependency of flwr[simulation] (via ray): to find the SuperLink's detached children

APP_DIR = Path(__file__).resolve().parent
BIN = Path(sys.executable).parent
LOOPBACK = "127.0.0.1"


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((LOOPBACK, 0))
        return int(s.getsockname()[1])


@dataclass
class Deployment:
    """The processes of one loopback deployment and where they log."""

    workdir: Path
    processes: dict[str, subprocess.Popen] = field(default_factory=dict)

    def start(self, name: str, args: list[str], env: dict[str, str]) -> subprocess.Popen:
        log = open(self.workdir / f"{name}.log", "w")
        # A new session = a new process group: killing it also ends the ServerApp/ClientApp children.
        proc = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
        self.processes[name] = proc
        return proc

    def kill(self, name: str, grace: float = 5.0) -> None:
        """End one started process, its process group and every descendant (the SuperLink starts its
        SuperExec/ServerApp in NEW sessions, so a process-group kill alone would leave them running)."""
        proc = self.processes.get(name)
        if proc is None:
            return
        try:
            descendants = psutil.Process(proc.pid).children(recursive=True)
        except psutil.NoSuchProcess:
            descendants = []
        groups = {proc.pid}
        for child in descendants:
            try:
                groups.add(os.getpgid(child.pid))
            except ProcessLookupError:
                pass
        for sig in (signal.SIGTERM, signal.SIGKILL):
            for group in groups:
                try:
                    os.killpg(group, sig)
                except (ProcessLookupError, PermissionError):
                    pass
            _, alive = psutil.wait_procs([p for p in descendants if p.is_running()], timeout=grace)
            try:
                proc.wait(timeout=grace)
            except subprocess.TimeoutExpired:
                continue
            if not alive:
                return

    def kill_all(self) -> None:
        for name in reversed(list(self.processes)):
            self.kill(name)


def _flwr(args: list[str], env: dict[str, str]) -> str:
    try:
        return subprocess.run([str(BIN / "flwr"), *args], env=env, capture_output=True, text=True, timeout=60).stdout
    except subprocess.TimeoutExpired:
        return ""


def _metrics_rows(results_dir: Path) -> int:
    """Rounds logged so far by the run(s) writing under ``results_dir``."""
    paths = list(results_dir.glob("*/metrics.csv"))
    return max((max(0, len(p.read_text().splitlines()) - 1) for p in paths), default=0)


def _json_object(text: str) -> dict:
    """The JSON object in a ``flwr ... --format json`` reply, without ANSI colour codes and with any notice
    printed before it skipped. Raises ``json.JSONDecodeError`` when there is none."""
    text = re.sub(r"\x1b\[[0-9;]*m", "", text)
    start = text.find("{")
    if start < 0:
        raise json.JSONDecodeError("no JSON object in the flwr reply", text, 0)
    return json.JSONDecoder().raw_decode(text[start:])[0]


def _run_status(run_id: str, env: dict[str, str]) -> str:
    text = _flwr(["ls", "loopback", "--format", "json"], env)
    try:
        runs = _json_object(text).get("runs", [])
    except json.JSONDecodeError:
        return "unknown"
    return next((f"{r['status']} {r['status-details']}" for r in runs if str(r["run-id"]) == str(run_id)), "unknown")


def deploy(*, sites: int, run_config: str, results_dir: Path, run_name: str = "", timeout: float = 600.0,
           kill_site: int | None = None, kill_after_round: int = 1, workdir: Path | None = None,
           engine: str = "deployment") -> dict:
    """Start SuperLink + ``sites`` SuperNodes on loopback, run the app, optionally kill one SuperNode after
    ``kill_after_round`` rounds, wait until the run is finished; always shut everything down.

    ``engine="simulation"``: the SuperLink runs Flower's simulation engine (Ray) with ``sites`` virtual
    SuperNodes instead (``flwr run`` from the CLI, as in production, but with a SuperLink this function
    owns and stops, unlike the managed local SuperLink that a bare ``flwr run`` leaves running).

    Returns a dict with ``completed`` (the run finished without error), ``status``, ``summaries`` (run
    folder -> summary.json), ``summary`` (``run_name``'s, or the only one), ``killed_site``, ``run_id``,
    ``seconds`` and ``logs`` (the folder with every process's log and the ServerApp's).
    """
    workdir = Path(workdir or tempfile.mkdtemp(prefix="mmpfl-flower-"))
    home = workdir / "flwr-home"
    home.mkdir(parents=True, exist_ok=True)
    port = free_port()
    if engine not in ("deployment", "simulation"):
        raise ValueError(f"engine={engine!r} must be 'deployment' or 'simulation'.")
    if engine == "simulation" and kill_site is not None:
        raise ValueError("kill_site needs engine='deployment' (virtual SuperNodes are not processes).")
    options = (f"options.num-supernodes = {sites}\noptions.backend.client-resources.num-cpus = 1\n"
               if engine == "simulation" else "")
    (home / "config.toml").write_text(
        f'[superlink]\ndefault = "loopback"\n\n[superlink.loopback]\naddress = "{LOOPBACK}:{port}"\ninsecure = true\n'
        + options)
    # NO_COLOR: run from a Jupyter kernel, `flwr ... --format json` coloured its JSON with ANSI codes
    env = {**os.environ, "FLWR_HOME": str(home), "OMP_NUM_THREADS": "1", "FLWR_DISABLE_UPDATE_CHECK": "1",
           "NO_COLOR": "1",
           "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}"}  # flower-superexec etc. from this venv
    dep = Deployment(workdir)
    started = time.monotonic()
    deadline = started + timeout
    killed = None
    try:
        dep.start("superlink", [str(BIN / "flower-superlink"), "--insecure", "--host", LOOPBACK, "--port", str(port),
                                "--isolation", "subprocess", "--disable-runtime-dependency-installation",
                                *(["--simulation"] if engine == "simulation" else [])], env)
        for site in range(sites if engine == "deployment" else 0):
            dep.start(f"supernode-{site}", [str(BIN / "flower-supernode"), "--insecure", "--superlink", f"{LOOPBACK}:{port}",
                                            "--host", LOOPBACK, "--port", str(free_port()),
                                            "--node-config", f"partition-id={site} num-partitions={sites}"], env)
        config = f"{run_config} num-sites={sites} results-dir='{results_dir}'"
        config += f" run-name='{run_name}'" if run_name else ""
        submit = None
        while submit is None or submit.returncode != 0:  # the SuperLink needs a moment to listen
            if time.monotonic() > deadline or dep.processes["superlink"].poll() is not None:
                raise RuntimeError(f"could not submit the run (see {workdir}/superlink.log): "
                                   f"{submit.stdout if submit else ''}")
            time.sleep(1.0)
            submit = subprocess.run([str(BIN / "flwr"), "run", str(APP_DIR), "loopback", "--run-config", config,
                                     "--format", "json"], env=env, capture_output=True, text=True, timeout=120)
            (workdir / "submit.log").write_text(submit.stdout + submit.stderr)
            if submit.returncode == 0 and '"run-id"' not in submit.stdout:
                submit.returncode = 1  # `flwr run --format json` reports some failures with exit status 0
        try:
            run_id = _json_object(submit.stdout)["run-id"]
        except (json.JSONDecodeError, KeyError) as exc:
            raise RuntimeError(f"`flwr run` gave no run id (its output is in {workdir}/submit.log): "
                               f"{submit.stdout[-300:]!r}") from exc
        status = "unknown"
        while time.monotonic() < deadline:
            if kill_site is not None and killed is None and _metrics_rows(results_dir) >= kill_after_round:
                dep.kill(f"supernode-{kill_site}", grace=2.0)
                killed = kill_site
            status = _run_status(run_id, env)
            if status.startswith("finished") or dep.processes["superlink"].poll() is not None:
                break
            time.sleep(4.0)  # each status query starts the flwr CLI: keep it rare on a small machine
        (workdir / "serverapp.log").write_text(_flwr(["log", str(run_id), "loopback", "--show"], env))
        summaries = {p.parent.name: json.loads(p.read_text()) for p in sorted(results_dir.glob("*/summary.json"))}
        summary = summaries.get(run_name) if run_name else (next(iter(summaries.values())) if len(summaries) == 1 else None)
        return {"completed": status.startswith("finished:completed"), "status": status, "summary": summary,
                "summaries": summaries, "killed_site": killed, "run_id": run_id,
                "seconds": round(time.monotonic() - started, 1), "logs": str(workdir)}
    finally:
        dep.kill_all()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--engine", choices=["deployment", "simulation"], default="deployment",
                        help="real SuperNode processes, or Flower's simulation engine (Ray) behind the SuperLink")
    parser.add_argument("--sites", type=int, default=3, help="SuperNodes, one per site (default 3)")
    parser.add_argument("--run-config", default="preset='reproduce_smoke' method='fedavg'",
                        help="run-config overrides of flower_app/pyproject.toml")
    parser.add_argument("--results-dir", type=Path, default=None, help="default: results/flower/loopback")
    parser.add_argument("--run-name", default="", help="one method: the run folder (default <method>-flower)")
    parser.add_argument("--timeout", type=float, default=600.0, help="seconds for the whole deployment")
    parser.add_argument("--kill-site", type=int, default=None, help="kill this site's SuperNode mid-run")
    parser.add_argument("--kill-after-round", type=int, default=1)
    args = parser.parse_args(argv)
    results = args.results_dir or Path(__file__).resolve().parent.parent / "results" / "flower" / f"loopback-{args.engine}"
    out = deploy(sites=args.sites, run_config=args.run_config, results_dir=results.resolve(), run_name=args.run_name,
                 timeout=args.timeout, kill_site=args.kill_site, kill_after_round=args.kill_after_round,
                 engine=args.engine)
    finals = {name: s.get("final", {}) for name, s in out["summaries"].items()}
    print(json.dumps({k: v for k, v in out.items() if k not in ("summary", "summaries")} | {"final": finals}, indent=1))
    return 0 if out["completed"] else 1


if __name__ == "__main__":
    sys.exit(main())
