"""The benchmark suite on a CUDA device in one go, paper-scale presets included (target: under 8 minutes).

Runs, each in its own process with a time limit, and writes ``bench/results/*_cuda.{csv,md}`` plus
``bench/results/gpu_suite.md`` (what ran, how long, what failed):

1. DP-SGD step vs non-private per Opacus mode (hooks, functorch, ghost) for paper (ViT-S/16 at
   224 px), teaching and tiny, in that order, ``bench/dp_sgd_modes.py``;
2. client-level DP round overhead vs FedAvg at paper scale, ``bench/client_dp_overhead.py``;
3. one FedAvg round vs centralized training at paper scale, ``bench/round_vs_centralized.py``;
4. the vectorised engine (``engine: vectorized``) at 1,000 and 10,000 sites a round on the regime
   map's small model, against the loop engine and one centralised pass, ``bench/many_sites.py``
   (``bench/results/many_sites_cuda.{csv,md}``, CUDA peak memory included).

The CUDA steps share one time budget (``--budget``, 450 s by default, so the suite ends inside
8 minutes with start-up): each gets its own limit or what is left of the budget, whichever is
smaller, and a step with under 20 s left is skipped. Every step writes its results as it goes, so
a step that hits its limit keeps what it measured, and ``gpu_suite.md`` says which steps were cut.

``--cpu-reference`` adds the CPU suite pinned to two cores (``taskset -c 0,1``, two torch threads),
which stands in for a Binder/CI machine when a quiet one is at hand (results ``*_cpu2.{csv,md}``).

On Colab (Runtime > Change runtime type > GPU), in a cell::

    !git clone <your fork of mmpfl> mmpfl && cd mmpfl && pip install -q -e . && python bench/gpu_suite.py

then read ``bench/results/gpu_suite.md``. Plain script, no asserts on time.
"""
from __future__ import annotations

import argparse
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from common import RESULTS, machine_description  # noqa: E402

CUDA_STEPS = [  # paper scale first: it is what a GPU is for, and what a cut run should still have
    ("dp_sgd_modes", ["dp_sgd_modes.py", "--device", "cuda", "--presets", "paper", "teaching", "tiny",
                      "--repeats", "5", "--warmup", "2"], 210),
    ("client_dp_overhead", ["client_dp_overhead.py", "--device", "cuda", "--preset", "paper", "--num-subjects", "400",
                            "--batch-size", "16", "--rounds", "4"], 150),
    ("round_vs_centralized", ["round_vs_centralized.py", "--device", "cuda", "--preset", "paper",
                              "--num-subjects", "400", "--batch-size", "16", "--repeats", "3"], 90),
    ("many_sites", ["many_sites.py", "--device", "cuda", "--sites", "1000", "10000", "--loop-sites", "50",
                    "--repeats", "3", "--name", "many_sites_cuda"], 120),
]
MIN_STEP_SECONDS = 20
CPU2_STEPS = [
    ("dp_sgd_modes", ["dp_sgd_modes.py", "--presets", "tiny", "teaching", "--threads", "2", "--repeats", "5"], 200),
    ("client_dp_overhead", ["client_dp_overhead.py", "--preset", "tiny", "--rounds", "5"], 150),
    ("round_vs_centralized", ["round_vs_centralized.py", "--preset", "tiny", "--repeats", "5"], 120),
    ("profile teaching hooks", ["profile_step.py", "--preset", "teaching", "--mode", "hooks"], 90),
    ("profile teaching ghost", ["profile_step.py", "--preset", "teaching", "--mode", "ghost"], 90),
]


def _run(name: str, argv: list[str], limit: float, *, pin_two_cores: bool) -> dict:
    if limit < MIN_STEP_SECONDS:
        print(f"== {name}: skipped, {limit:.0f} s of the budget left", flush=True)
        return {"name": name, "status": "skipped (budget spent)", "seconds": 0.0}
    cmd = [sys.executable, str(HERE / argv[0]), *argv[1:]]
    env = dict(os.environ)
    if pin_two_cores:
        cmd = ["taskset", "-c", "0,1", *cmd] if shutil.which("taskset") else cmd
        env.update(OMP_NUM_THREADS="2", MKL_NUM_THREADS="2")
    started = time.perf_counter()
    # Own process group: a step that overruns is stopped with its workers (dp_sgd_modes runs one
    # process per mode), so nothing of it keeps the GPU busy during the next step.
    process = subprocess.Popen(cmd, env=env, cwd=HERE.parent, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                               text=True, start_new_session=True)
    try:
        output, _ = process.communicate(timeout=limit)
        status = "ok" if process.returncode == 0 else f"failed (exit {process.returncode})"
        tail = output.strip().splitlines()[-3:]
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.communicate()
        status, tail = f"stopped after {limit:.0f} s", []
    seconds = time.perf_counter() - started
    print(f"== {name}: {status} in {seconds:.0f} s", *tail, sep="\n", flush=True)
    return {"name": name, "status": status, "seconds": seconds}


def _rename_cpu_results() -> None:
    """The CPU scripts write ``<name>.{csv,md}``; keep the pinned run apart as ``<name>_cpu2``."""
    for _, argv, _ in CPU2_STEPS:
        stem = argv[0].removesuffix(".py")  # profile_step writes profile_*.txt, which is left as it is
        for ext in ("csv", "md"):
            if (RESULTS / f"{stem}.{ext}").exists():
                (RESULTS / f"{stem}.{ext}").replace(RESULTS / f"{stem}_cpu2.{ext}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cpu-reference", action="store_true", help="also run the CPU suite pinned to 2 cores")
    parser.add_argument("--budget", type=float, default=450.0,
                        help="seconds for all CUDA steps together (default 450: the suite ends inside 8 minutes)")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print("No CUDA device: run `make bench` for the CPU suite, or this script on a GPU machine (e.g. Colab).")
        return 2
    started = time.perf_counter()
    runs = []
    for name, step_argv, limit in CUDA_STEPS:
        left = args.budget - (time.perf_counter() - started)
        runs.append(_run(name, step_argv, min(limit, left), pin_two_cores=False) | {"device": "cuda"})
    if args.cpu_reference:
        runs += [_run(n, a, limit, pin_two_cores=True) | {"device": "cpu, 2 cores"} for n, a, limit in CPU2_STEPS]
        _rename_cpu_results()
    total = time.perf_counter() - started
    lines = ["# GPU suite", "", f"Machine: {machine_description()}", "",
             "| benchmark | device | status | seconds |", "|---|---|---|---|",
             *[f"| {r['name']} | {r['device']} | {r['status']} | {r['seconds']:.0f} |" for r in runs], "",
             f"Total: {total:.0f} s (CUDA budget {args.budget:.0f} s). Results: `*_cuda.md` (and `*_cpu2.md` with --cpu-reference) beside this file.", ""]
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "gpu_suite.md").write_text("\n".join(lines))
    print("\n".join(lines))
    return 0 if all(r["status"] == "ok" for r in runs) else 1


if __name__ == "__main__":
    raise SystemExit(main())
