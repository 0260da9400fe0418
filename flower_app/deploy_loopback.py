"""A real Flower deployment on this machine: one SuperLink, one SuperNode per site, ``flwr run``, clean shutdown.

Every process listens on 127.0.0.1 only. Two modes:

* default, ``--insecure``: no TLS and no SuperNode authentication. Acceptable on loopback, for tests
  and teaching, NEVER across a network.
* ``--secure`` (:func:`deploy` with ``secure=True``), set up as Flower documents it ("Enable TLS
  connections", "Authenticate SuperNodes"; the flags are those of flwr 1.42):
  - TLS: a throw-away CA and a server certificate for 127.0.0.1/localhost are generated into the
    run's work folder (:mod:`credentials`, never in the repository); the SuperLink starts with
    ``--ssl-ca-certfile ca.crt --ssl-certfile server.pem --ssl-keyfile server.key``, each SuperNode
    with ``--root-certificates ca.crt`` and the ``flwr`` CLI connection with ``root-certificates``.
  - SuperNode authentication (CLI-managed): the SuperLink starts with ``--enable-supernode-auth``;
    each site has its own EC (P-384) key pair; the operator registers the site's PUBLIC key with
    ``flwr supernode register site_k.pub <connection>``; the SuperNode starts with
    ``--auth-supernode-private-key site_k`` and signs its requests. A SuperNode whose key was not
    registered (or that has no key) is refused: ``intruders=n`` starts n such SuperNodes to show it.
  For real hospitals, use certificates from the hospital's PKI instead of the throw-away CA, keep
  each private key on its site only, and add user authentication for ``flwr run`` (``flwr login``).
* Each SuperNode loads ITS OWN data (here: ``partition-id`` of the synthetic cohort). Everything
  a site sends besides the (clipped, noised or SecAgg+-masked) update -- loss, counts,
  accuracies -- is outside the DP guarantee (docs/DESIGN.md 4.6). TLS protects the traffic from the
  network and authentication keeps unknown machines out; neither protects a site's data from the
  server: that is what client-level DP (and secure aggregation for distributed noise) is for.

Usage (from the repository root, ``make flower-deploy`` / ``make flower-sim`` run the first two lines)::

    python flower_app/deploy_loopback.py --sites 3 --run-config "preset='reproduce_smoke' method='fedavg'"
    python flower_app/deploy_loopback.py --engine simulation --sites 5 --run-config "method='mm-pfl-adp'"
    python flower_app/deploy_loopback.py --sites 3 --kill-site 2 --kill-after-round 1   # survive a lost site
    python flower_app/deploy_loopback.py --sites 2 --secure --intruders 1              # TLS + authenticated sites

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

sys.path.insert(0, str(Path(__file__).resolve().parent))
from credentials import make_credentials  # noqa: E402  (this folder is not a package)

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


def _register(public_key: Path, env: dict[str, str], dep: Deployment, deadline: float) -> str:
    """``flwr supernode register KEY loopback`` (the operator's step), retried while the SuperLink starts."""
    reply = ""
    while time.monotonic() < deadline and dep.processes["superlink"].poll() is None:
        out = subprocess.run([str(BIN / "flwr"), "supernode", "register", str(public_key), "loopback", "--format", "json"],
                             env=env, capture_output=True, text=True, timeout=60)
        reply = out.stdout + out.stderr
        try:
            if out.returncode == 0 and _json_object(out.stdout).get("success", False):
                return str(_json_object(out.stdout).get("node-id", ""))
        except json.JSONDecodeError:
            pass
        time.sleep(1.0)
    raise RuntimeError(f"could not register {public_key.name} with the SuperLink: {reply[-300:]!r}")


def _intruder_report(dep: Deployment, name: str) -> dict:
    """How an unregistered SuperNode ended: its exit code and Flower's error line ("[code: NNNN] ...")."""
    log = re.sub(r"\x1b\[[0-9;]*m", "", (dep.workdir / f"{name}.log").read_text(errors="replace"))
    reason = re.search(r"\[code: \d+\][^\n]*", log)
    return {"exit_code": dep.processes[name].poll(), "reason": reason.group(0) if reason else "",
            "connected": "SuperNode ID:" in log}


def deploy(*, sites: int, run_config: str, results_dir: Path, run_name: str = "", timeout: float = 600.0,
           kill_site: int | None = None, kill_after_round: int = 1, workdir: Path | None = None,
           engine: str = "deployment", secure: bool = False, intruders: int = 0) -> dict:
    """Start SuperLink + ``sites`` SuperNodes on loopback, run the app, optionally kill one SuperNode after
    ``kill_after_round`` rounds, wait until the run is finished; always shut everything down.

    ``engine="simulation"``: the SuperLink runs Flower's simulation engine (Ray) with ``sites`` virtual
    SuperNodes instead (``flwr run`` from the CLI, as in production, but with a SuperLink this function
    owns and stops, unlike the managed local SuperLink that a bare ``flwr run`` leaves running).

    ``secure=True``: TLS and CLI-managed SuperNode authentication (module docstring); the credentials
    are generated under ``workdir/credentials``. ``intruders=n`` (secure only) also starts n SuperNodes
    the operator did not register -- the first without a key, the others with a key of their own -- which
    the SuperLink must refuse; the run needs only the ``sites`` registered ones.

    Returns a dict with ``completed`` (the run finished without error), ``status``, ``summaries`` (run
    folder -> summary.json), ``summary`` (``run_name``'s, or the only one), ``killed_site``, ``run_id``,
    ``seconds``, ``logs`` (the folder with every process's log and the ServerApp's), and with
    ``secure=True`` ``registered`` (site -> node id) and ``intruders`` (name -> exit code, log tail).
    """
    workdir = Path(workdir or tempfile.mkdtemp(prefix="mmpfl-flower-"))
    home = workdir / "flwr-home"
    home.mkdir(parents=True, exist_ok=True)
    port = free_port()
    if engine not in ("deployment", "simulation"):
        raise ValueError(f"engine={engine!r} must be 'deployment' or 'simulation'.")
    if engine == "simulation" and kill_site is not None:
        raise ValueError("kill_site needs engine='deployment' (virtual SuperNodes are not processes).")
    if (secure or intruders) and engine != "deployment":
        raise ValueError("secure=True / intruders need engine='deployment' (virtual SuperNodes do not connect).")
    if intruders and not secure:
        raise ValueError("intruders need secure=True: without SuperNode authentication any SuperNode may join.")
    options = (f"options.num-supernodes = {sites}\noptions.backend.client-resources.num-cpus = 1\n"
               if engine == "simulation" else "")
    intruder_names = [f"intruder-{j}" for j in range(intruders)]
    creds = (make_credentials(workdir / "credentials", [f"site-{k}" for k in range(sites)] + intruder_names[1:])
             if secure else None)
    transport = f'root-certificates = "{creds.ca_cert}"\n' if creds else "insecure = true\n"
    (home / "config.toml").write_text(
        f'[superlink]\ndefault = "loopback"\n\n[superlink.loopback]\naddress = "{LOOPBACK}:{port}"\n{transport}'
        + options)
    link_security = (["--ssl-ca-certfile", str(creds.ca_cert), "--ssl-certfile", str(creds.server_cert),
                      "--ssl-keyfile", str(creds.server_key), "--enable-supernode-auth"] if creds else ["--insecure"])
    # NO_COLOR: run from a Jupyter kernel, `flwr ... --format json` coloured its JSON with ANSI codes
    env = {**os.environ, "FLWR_HOME": str(home), "OMP_NUM_THREADS": "1", "FLWR_DISABLE_UPDATE_CHECK": "1",
           "NO_COLOR": "1",
           "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}"}  # flower-superexec etc. from this venv
    dep = Deployment(workdir)
    started = time.monotonic()
    deadline = started + timeout
    killed = None
    try:
        dep.start("superlink", [str(BIN / "flower-superlink"), *link_security, "--host", LOOPBACK, "--port", str(port),
                                "--isolation", "subprocess", "--disable-runtime-dependency-installation",
                                *(["--simulation"] if engine == "simulation" else [])], env)
        registered = {f"site-{k}": _register(creds.node_public_keys[f"site-{k}"], env, dep, deadline)
                      for k in range(sites)} if creds else {}
        for name, site in [*((f"supernode-{k}", k) for k in range(sites if engine == "deployment" else 0)),
                           *((n, j % sites) for j, n in enumerate(intruder_names))]:
            key = creds.node_keys.get(f"site-{site}" if name.startswith("supernode") else name) if creds else None
            node_security = (["--root-certificates", str(creds.ca_cert)] if creds else ["--insecure"]) + \
                            (["--auth-supernode-private-key", str(key)] if key else [])
            dep.start(name, [str(BIN / "flower-supernode"), *node_security, "--superlink", f"{LOOPBACK}:{port}",
                             "--host", LOOPBACK, "--port", str(free_port()),
                             *([] if name.startswith("supernode") else ["--max-retries", "5"]),  # a refused node gives up
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
        out = {"completed": status.startswith("finished:completed"), "status": status, "summary": summary,
               "summaries": summaries, "killed_site": killed, "run_id": run_id,
               "seconds": round(time.monotonic() - started, 1), "logs": str(workdir)}
        if creds:
            out["registered"] = registered
            out["intruders"] = {n: _intruder_report(dep, n) for n in intruder_names}
            (workdir / "supernodes.json").write_text(_flwr(["supernode", "list", "loopback", "--format", "json"], env))
        return out
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
    parser.add_argument("--secure", action="store_true",
                        help="TLS + SuperNode authentication with throw-away credentials (default: --insecure)")
    parser.add_argument("--intruders", type=int, default=0,
                        help="with --secure: also start this many unregistered SuperNodes (they must be refused)")
    args = parser.parse_args(argv)
    results = args.results_dir or Path(__file__).resolve().parent.parent / "results" / "flower" / f"loopback-{args.engine}"
    out = deploy(sites=args.sites, run_config=args.run_config, results_dir=results.resolve(), run_name=args.run_name,
                 timeout=args.timeout, kill_site=args.kill_site, kill_after_round=args.kill_after_round,
                 engine=args.engine, secure=args.secure, intruders=args.intruders)
    finals = {name: s.get("final", {}) for name, s in out["summaries"].items()}
    print(json.dumps({k: v for k, v in out.items() if k not in ("summary", "summaries")} | {"final": finals}, indent=1))
    return 0 if out["completed"] else 1


if __name__ == "__main__":
    sys.exit(main())
