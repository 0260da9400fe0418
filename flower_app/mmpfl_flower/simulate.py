"""Run the app on Flower's simulation engine (Ray) from Python, and compare it with the in-process engine.

``flwr run flower_app`` is the command-line path (it starts a managed local SuperLink). Tests,
notebook 08 and the benchmark use :func:`run_flower_simulation`, which runs the SAME ServerApp and
ClientApp objects on the same Ray simulation engine in this process, with run-config overrides
(``flwr.simulation.run_simulation`` passes no run config of its own).

Equivalence (why the numbers match the in-process engine): both engines call the same selection
(stream (seed, 1, t)), the same client step (stream (seed, 2, t, site)), the same strategy
aggregation summed in site order, and the same ledger; the transport is float32 arrays, which is
lossless. Local training runs single-threaded in both (the Ray workers are started with one thread whatever
the caller sets), so the float reductions happen in the same order; the tolerance only guards against another
BLAS. Epsilons are equal (same ledger records).
"""
from __future__ import annotations

import logging
import os
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch

from mmpfl_core.experiment import run_method
from mmpfl_core.io.checkpoint import latest_checkpoint, load_checkpoint
from mmpfl_core.io.run_directory import RunDirectory

from .task import Job, load_jobs, results_dir


def run_flower_simulation(*, num_supernodes: int | None = None, num_cpus: int = 2, verbose: bool = False,
                          **overrides: Any) -> tuple[list[tuple[Job, RunDirectory]], float]:
    """Run the app on the Ray simulation engine; return [(job, run directory)] per method and wall seconds.

    ``overrides`` are run-config keys with ``_`` for ``-`` (``method="fedavg,dp-fedavg", num_rounds=2``);
    several methods share one Ray start-up. One virtual SuperNode per site unless ``num_supernodes``.
    """
    from flwr.simulation import run_simulation  # deprecated for users in favour of `flwr run`; kept for Python

    from .client_app import make_client_app
    from .server_app import make_server_app

    jobs = load_jobs(**overrides)
    n = num_supernodes or jobs[0].num_sites
    started = time.perf_counter()
    # Each virtual SuperNode runs in a Ray actor with one CPU and torch single-threaded inside: no oversubscription,
    # and the thread count of compare_with_inprocess's reference run, so both engines reduce floats in the same
    # order. Ray workers inherit this process's environment and torch reads it at import, so a caller's
    # OMP_NUM_THREADS=2 gave each worker two threads (measured: models 1.1e-3 apart after 3 dp-fedavg rounds). Hence
    # set, not setdefault, and only for the simulation: the caller's own setting comes back afterwards.
    with _single_threaded_workers():
        run_simulation(server_app=make_server_app(**overrides), client_app=make_client_app(**overrides),
                       num_supernodes=n,
                       backend_config={"client_resources": {"num_cpus": 1, "num_gpus": 0.0},
                                       "init_args": {"num_cpus": num_cpus, "include_dashboard": False,
                                                     "logging_level": logging.INFO if verbose else logging.ERROR}},
                       verbose_logging=verbose)
    seconds = time.perf_counter() - started
    return [(job, RunDirectory(results_dir(job) / job.flower.run_name)) for job in jobs], seconds


#: The thread variables torch reads at import in each Ray worker (OpenMP and MKL intra-op pools).
_THREAD_VARIABLES = ("OMP_NUM_THREADS", "MKL_NUM_THREADS")


@contextmanager
def _single_threaded_workers() -> Iterator[None]:
    """Set the thread variables to 1 for the workers Ray starts, and restore the caller's values after."""
    saved = {key: os.environ.get(key) for key in _THREAD_VARIABLES}
    os.environ.update({key: "1" for key in _THREAD_VARIABLES})
    try:
        yield
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def final_global_state(run_dir: RunDirectory) -> dict[str, torch.Tensor]:
    """The global model saved at the end of a Flower run (or an in-process run with checkpoints)."""
    path = latest_checkpoint(run_dir.checkpoint_dir)
    if path is None:
        raise FileNotFoundError(f"{run_dir.path} has no checkpoint; did the run finish?")
    tensors, _ = load_checkpoint(path)
    return tensors["global"]


def compare_with_inprocess(job: Job, run_dir: RunDirectory) -> dict[str, Any]:
    """Run the same job in-process; return max |theta_flower - theta_inprocess| and both epsilons."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as in each virtual SuperNode: the same reduction order, so the same floats
    try:
        result = run_method(job.experiment, job.method, progress=False)
    finally:
        torch.set_num_threads(threads)
    flower_state = final_global_state(run_dir)
    diff = max(float((flower_state[n].float() - result.global_state[n].float()).abs().max()) for n in result.global_state)
    summary = run_dir.read_summary()
    return {"max_abs_diff": diff,
            "epsilon_flower": summary.get("privacy", {}).get("epsilon"),
            "epsilon_inprocess": result.summary.get("privacy", {}).get("epsilon"),
            "test_accuracy_flower": summary["final"].get("global_test_accuracy"),
            "test_accuracy_inprocess": result.history[-1].get("global_test_accuracy"),
            "inprocess": result, "flower_summary": summary}
