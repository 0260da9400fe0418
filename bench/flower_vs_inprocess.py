"""Benchmark: per-round time of the Flower simulation engine (Ray) vs the in-process engine on the same work.

Both engines train the same job (a method of a preset, same seed, sites, rounds and model) through the
same client step and aggregation (flower_app/: the results agree bit for bit). Evaluation runs only in
round 1 and the last round (``eval-every`` = rounds), so the steady rounds 2..R-1 hold only training,
transport and aggregation; their median wall time is compared. Flower's one-off start-up (Ray, actors,
the node query) is reported separately. The in-process engine trains the sites one after the other
(``--inprocess-threads`` torch threads, default 1); Flower runs one site per Ray worker (one CPU each,
one torch thread), up to ``--num-cpus`` in parallel, so a ratio below 1 can come from that parallelism. Writes ``bench/results/flower_vs_inprocess.{csv,md}``. Plain script, no asserts.

    python bench/flower_vs_inprocess.py --rounds 6 --method fedavg
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import pandas as pd
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(ROOT / "flower_app"))
from common import write_results  # noqa: E402

from mmpfl_core.experiment import run_method  # noqa: E402
from mmpfl_flower.simulate import run_flower_simulation  # noqa: E402
from mmpfl_flower.task import load_job  # noqa: E402


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="reproduce_smoke")
    parser.add_argument("--method", default="fedavg")
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--num-sites", type=int, default=4)
    parser.add_argument("--num-subjects", type=int, default=600)
    parser.add_argument("--num-cpus", type=int, default=2, help="CPUs Ray may use (one virtual SuperNode each)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--inprocess-threads", type=int, default=1,
                        help="torch threads of the in-process run (1 = the per-site compute of a Ray worker)")
    parser.add_argument("--results-dir", default="/tmp/mmpfl-bench-flower")
    args = parser.parse_args(argv)
    if args.rounds < 3:
        parser.error("--rounds must be >= 3 (rounds 1 and R evaluate; 2..R-1 are timed)")
    overrides = dict(preset=args.preset, method=args.method, num_rounds=args.rounds, eval_every=args.rounds,
                     num_sites=args.num_sites, num_subjects=args.num_subjects, seed=args.seed,
                     results_dir=args.results_dir, run_name=f"{args.method}-bench")
    job = load_job(**overrides)

    threads = torch.get_num_threads()
    torch.set_num_threads(args.inprocess_threads)
    started = time.perf_counter()
    try:
        inprocess = run_method(job.experiment, job.method, progress=False)
    finally:
        torch.set_num_threads(threads)
    inprocess_total = time.perf_counter() - started
    [(_, run_dir)], flower_total = run_flower_simulation(num_cpus=args.num_cpus, **overrides)
    flower_rows = run_dir.read_metrics(include_private=True)  # "seconds" is operator-only

    steady = range(2, args.rounds)
    rows = []
    for r in inprocess.history:
        rows.append({"engine": "in-process", "round": r["round"], "seconds": r["seconds"], "steady": r["round"] in steady})
    for _, r in flower_rows.iterrows():
        rows.append({"engine": "flower-simulation", "round": int(r["round"]), "seconds": float(r["seconds"]),
                     "steady": int(r["round"]) in steady})
    frame = pd.DataFrame(rows)
    median = {e: statistics.median(frame.loc[(frame["engine"] == e) & frame["steady"], "seconds"])
              for e in ("in-process", "flower-simulation")}
    startup = flower_total - float(flower_rows["seconds"].sum())
    ratio = median["flower-simulation"] / median["in-process"]
    summary = (f"Preset `{args.preset}`, method `{args.method}`, {args.num_sites} sites, {args.rounds} rounds, "
               f"Ray with {args.num_cpus} CPUs, in-process with {args.inprocess_threads} torch thread(s). Median steady round (rounds 2..{args.rounds - 1}, no evaluation): "
               f"in-process {median['in-process']:.3f} s, Flower simulation {median['flower-simulation']:.3f} s. "
               f"**Ratio Flower / in-process per round: {ratio:.2f}x.** Totals: in-process {inprocess_total:.1f} s, "
               f"Flower {flower_total:.1f} s, of which about {startup:.1f} s start-up/shutdown outside the rounds "
               f"(Ray, actors importing torch, the node query).")
    print(summary)
    print("wrote", write_results("flower_vs_inprocess", frame, summary))


if __name__ == "__main__":
    main()
