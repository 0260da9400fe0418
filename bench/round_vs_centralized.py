"""Benchmark: one in-process FedAvg round vs centralized training on the same number of samples.

Both sides run the same model preset, batch size, optimiser and number of optimizer steps: the
FedAvg round trains every site for one local epoch (sum over sites of ceil(n_k / B) steps) and
aggregates; the centralized side trains one model for exactly that many steps on the pooled data
(``local_steps``). Evaluation, checkpoints and bootstrap CIs are switched off on both sides
(``eval_every`` large, one round), so the ratio measures the federation overhead: copying states,
per-client optimiser construction, delta computation, byte counting and aggregation.

Writes ``bench/results/round_vs_centralized.csv`` (one row per repeat and side) and a short
``round_vs_centralized.md`` with the medians, the ratio and the machine. Plain script, no asserts.

    python bench/round_vs_centralized.py --preset tiny --repeats 5
"""
from __future__ import annotations

import argparse
import csv
import math
import platform
import resource
import statistics
import sys
import time
import tracemalloc
from pathlib import Path

import torch

from mmpfl_core.data import FederationConfig, SyntheticCohortConfig, build_federation
from mmpfl_core.federated.config import FederatedConfig, LocalTrainingConfig
from mmpfl_core.federated.simulation import FederatedSimulation
from mmpfl_core.federated.strategies import create_strategy
from mmpfl_core.models.presets import create_model, get_config

RESULTS = Path(__file__).resolve().parent / "results"


def _simulation(federation, strategy: str, preset: str, batch_size: int, steps: int | None, seed: int):
    ref = federation.sites[0].train
    factory = lambda: create_model(preset, seed=seed, image_size=ref.image_size, num_modalities=ref.num_modalities,  # noqa: E731
                                   num_clinical=len(ref.clinical_names), num_classes=ref.num_classes)
    config = FederatedConfig(num_rounds=1, eval_every=10**6, checkpoint_every=0, bootstrap_resamples=0, seed=seed,
                             device="cpu", local=LocalTrainingConfig(local_epochs=1, local_steps=steps, batch_size=batch_size))
    return FederatedSimulation(federation, model_factory=factory, strategy=create_strategy(strategy), config=config,
                               progress=False)


def _time_round(sim) -> tuple[float, float]:
    """Seconds and tracemalloc peak (MB) of ``run_round(1)`` without its evaluation."""
    sim.evaluate = lambda: {}  # round 1 is always evaluated by the loop; the benchmark measures training only
    tracemalloc.start()
    started = time.perf_counter()
    sim.run_round(1)
    seconds = time.perf_counter() - started
    peak = tracemalloc.get_traced_memory()[1] / 1e6
    tracemalloc.stop()
    return seconds, peak


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", choices=["tiny", "teaching"], default="tiny")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--num-subjects", type=int, default=600)
    parser.add_argument("--num-sites", type=int, default=4)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    image_size = get_config(args.preset).image_size
    federation = build_federation(SyntheticCohortConfig(num_subjects=args.num_subjects, image_size=image_size, seed=args.seed),
                                  FederationConfig(num_sites=args.num_sites, seed=args.seed))
    steps = sum(math.ceil(len(s.train) / args.batch_size) for s in federation.sites)
    samples = sum(len(s.train) for s in federation.sites)
    rows = []
    for repeat in range(args.repeats + 1):  # repeat 0 is a warm-up, not recorded
        for side, strategy, local_steps in (("fedavg_round", "fedavg", None), ("centralized", "centralized", steps)):
            seconds, peak = _time_round(_simulation(federation, strategy, args.preset, args.batch_size, local_steps, args.seed))
            if repeat:
                rows.append({"preset": args.preset, "side": side, "repeat": repeat, "seconds": round(seconds, 4),
                             "tracemalloc_peak_mb": round(peak, 2), "optimizer_steps": steps, "samples": samples,
                             "batch_size": args.batch_size, "num_sites": args.num_sites})
    median = {side: statistics.median(r["seconds"] for r in rows if r["side"] == side) for side in ("fedavg_round", "centralized")}
    peak = {side: max(r["tracemalloc_peak_mb"] for r in rows if r["side"] == side) for side in median}
    ratio = median["fedavg_round"] / median["centralized"]
    max_rss_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB

    RESULTS.mkdir(parents=True, exist_ok=True)
    with open(RESULTS / "round_vs_centralized.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    machine = (f"{platform.platform()}; Python {sys.version.split()[0]}; {torch.get_num_threads()} torch threads, "
               f"{__import__('os').cpu_count()} CPUs; torch {torch.__version__}")
    text = [
        "# One FedAvg round vs centralized training (same steps)", "",
        f"Preset `{args.preset}` ({image_size} px), {args.num_sites} sites, {samples} training samples, batch "
        f"{args.batch_size}, {steps} optimizer steps per side; median of {args.repeats} repeats after one warm-up.", "",
        "| side | median seconds | tracemalloc peak (MB) |", "|---|---|---|",
        *[f"| {side} | {median[side]:.3f} | {peak[side]:.1f} |" for side in median], "",
        f"**Ratio FedAvg round / centralized: {ratio:.2f}x.** Process max RSS: {max_rss_mb:.0f} MB.", "",
        f"Machine: {machine}. Timings on shared CPUs are noisy; compare ratios, not absolute seconds.", "",
    ]
    (RESULTS / "round_vs_centralized.md").write_text("\n".join(text))
    print("\n".join(text))


if __name__ == "__main__":
    main()
