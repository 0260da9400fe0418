"""Shared helpers of the benchmark scripts: machine description, timing, result files.

Benchmarks print ratios against a stated limit and write CSV + markdown under ``bench/results``;
they never assert on time (speed targets live here, not in tests).
"""
from __future__ import annotations

import os
import platform
import statistics
import time
from pathlib import Path
from typing import Callable

import pandas as pd
import torch

from mmpfl_core.data import FederationConfig, SyntheticCohortConfig, build_federation
from mmpfl_core.data.federation import Federation
from mmpfl_core.federated.config import FederatedConfig, LocalTrainingConfig
from mmpfl_core.federated.simulation import FederatedSimulation
from mmpfl_core.federated.strategies import create_strategy
from mmpfl_core.models.presets import create_model, get_config

#: Where results go: ``bench/results`` unless ``MMPFL_BENCH_RESULTS`` names another folder (a Colab
#: user's Drive, or a test's temporary folder, so that a test never rewrites the committed results).
RESULTS = Path(os.environ.get("MMPFL_BENCH_RESULTS") or Path(__file__).resolve().parent / "results")


def machine_description() -> str:
    cpu = platform.processor() or platform.machine()
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "none"
    return (f"{platform.platform()}; CPU {cpu}, {os.cpu_count()} cores, torch threads {torch.get_num_threads()}; "
            f"GPU {gpu}; python {platform.python_version()}, torch {torch.__version__}")


def median_seconds(fn: Callable[[], object], *, repeats: int, warmup: int = 1) -> float:
    """Median wall time of ``fn`` over ``repeats`` calls after ``warmup`` untimed calls."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def write_results(name: str, frame: pd.DataFrame, notes: str = "") -> Path:
    """``bench/results/<name>.csv`` and ``<name>.md`` (table, machine, notes)."""
    RESULTS.mkdir(parents=True, exist_ok=True)
    frame.to_csv(RESULTS / f"{name}.csv", index=False)
    from mmpfl_core.tables import markdown_table
    text = [f"# {name}", "", f"Machine: {machine_description()}", "", markdown_table(frame), ""]
    if notes:
        text += [notes, ""]
    path = RESULTS / f"{name}.md"
    path.write_text("\n".join(text))
    return path


def bench_federation(preset: str, *, num_subjects: int, num_sites: int, seed: int = 0) -> Federation:
    """The synthetic federation at the preset's image size (built once per script, outside timing)."""
    image_size = get_config(preset).image_size
    return build_federation(SyntheticCohortConfig(num_subjects=num_subjects, image_size=image_size, seed=seed),
                            FederationConfig(num_sites=num_sites, seed=seed))


def bench_simulation(federation: Federation, strategy: str, *, preset: str, batch_size: int, seed: int = 0,
                     local_steps: int | None = None, num_rounds: int = 1, device: str = "cpu",
                     **strategy_kwargs) -> FederatedSimulation:
    """A simulation for timing: no checkpoints, no bootstrap, and evaluation switched off.

    The loop always evaluates round 1 and the last round; benchmarks time training, so
    ``evaluate`` is replaced by a no-op on the instance.
    """
    ref = federation.sites[0].train
    factory = lambda: create_model(preset, seed=seed, image_size=ref.image_size, num_modalities=ref.num_modalities,  # noqa: E731
                                   num_clinical=len(ref.clinical_names), num_classes=ref.num_classes)
    config = FederatedConfig(num_rounds=num_rounds, eval_every=10**6, checkpoint_every=0, bootstrap_resamples=0,
                             seed=seed, device=device,
                             local=LocalTrainingConfig(local_epochs=1, local_steps=local_steps, batch_size=batch_size))
    sim = FederatedSimulation(federation, model_factory=factory, strategy=create_strategy(strategy, **strategy_kwargs),
                              config=config, progress=False)
    sim.evaluate = lambda: {}
    return sim


def timed(fn: Callable[[], object], device: str = "cpu") -> float:
    """Seconds of one call of ``fn`` (CUDA work synchronised before the clock stops)."""
    started = time.perf_counter()
    fn()
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    return time.perf_counter() - started
