"""Benchmark: one in-process FedAvg round vs centralized training on the same number of samples.

Both sides run the same model preset, batch size, optimiser and number of optimizer steps: the
FedAvg round trains every site for one local epoch (sum over sites of ceil(n_k / B) steps) and
aggregates; the centralized side trains one model for exactly that many steps on the pooled data
(``local_steps``). Evaluation, checkpoints and bootstrap CIs are switched off on both sides, so the
ratio measures the federation overhead: copying states, per-client optimiser construction, delta
computation, byte counting and aggregation. Target (issue 8): <= 1.15x.

Writes ``bench/results/round_vs_centralized{_cuda}.{csv,md}``. Plain script, no asserts.

    python bench/round_vs_centralized.py --preset tiny --repeats 5
    python bench/round_vs_centralized.py --preset paper --device cuda --num-subjects 400
"""
from __future__ import annotations

import argparse
import math
import statistics
import sys
from pathlib import Path

import pandas as pd

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import bench_federation, bench_simulation, timed, write_results  # noqa: E402

SIDES = (("fedavg_round", "fedavg"), ("centralized", "centralized"))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", choices=["tiny", "teaching", "paper"], default="tiny")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--num-subjects", type=int, default=600)
    parser.add_argument("--num-sites", type=int, default=4)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    federation = bench_federation(args.preset, num_subjects=args.num_subjects, num_sites=args.num_sites, seed=args.seed)
    steps = sum(math.ceil(len(s.train) / args.batch_size) for s in federation.sites)
    samples = sum(len(s.train) for s in federation.sites)
    rows = []
    for repeat in range(args.repeats + 1):  # repeat 0 is a warm-up, not recorded
        for side, strategy in SIDES:  # interleaved, so slow phases of a shared machine hit both sides
            sim = bench_simulation(federation, strategy, preset=args.preset, batch_size=args.batch_size,
                                   seed=args.seed, device=args.device,
                                   local_steps=steps if strategy == "centralized" else None)
            seconds = timed(lambda: sim.run_round(1), args.device)
            if repeat:
                rows.append({"preset": args.preset, "side": side, "repeat": repeat, "seconds": round(seconds, 4),
                             "optimizer_steps": steps, "samples": samples, "batch_size": args.batch_size,
                             "num_sites": args.num_sites, "device": args.device})
    frame = pd.DataFrame(rows)
    median = {side: statistics.median(frame.loc[frame["side"] == side, "seconds"]) for side, _ in SIDES}
    ratio = median["fedavg_round"] / median["centralized"]
    summary = (f"Preset `{args.preset}`, {args.num_sites} sites, {samples} training samples, batch {args.batch_size}, "
               f"{steps} optimizer steps per side, device {args.device}; median of {args.repeats} repeats after one "
               f"warm-up: FedAvg round {median['fedavg_round']:.3f} s, centralized {median['centralized']:.3f} s. "
               f"**Ratio FedAvg round / centralized: {ratio:.2f}x** (limit 1.0x plus aggregation; target <= 1.15x).")
    print(summary)
    suffix = "" if args.device == "cpu" else "_" + args.device.split(":")[0]
    print("wrote", write_results(f"round_vs_centralized{suffix}", frame, summary))


if __name__ == "__main__":
    main()
