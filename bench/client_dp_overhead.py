"""Benchmark: the per-round cost of client-level DP (clip, allocate, noise, account) vs plain FedAvg.

Every variant trains the same sites for the same local steps from the same seed; they differ only
in what happens around local training:

* ``fedavg``: no privacy (the limit, 1.0x);
* ``dp-fedavg``: flat clipping, server-placed Gaussian noise, the PRV ledger's budget check and report;
* ``dp-fedavg per-group``: group-wise clipping with uniform noise;
* ``dp-fedavg-fisher``: group-wise clipping with the Fisher allocation (diagonal Fisher on the public set);
* ``mm-pfl-adp``: the full method (Fisher allocation, noise gate, KL masks on each site's validation
  split, personal groups); ``mm-pfl-adp (no gate)`` scores every group whatever the noise; and
  ``mm-pfl-adp (no DP)``, which separates the masks' cost from the DP cost. The KL scores are what
  costs: groups the noise gate keeps at home are not scored, and a site rescores every
  ``update_every`` (default 2) of its rounds. Target (issue 15): an MM-PFL-ADP round <= 1.25x FedAvg.

A round is ``before_round`` (the budget check) plus ``run_round`` without evaluation; the median is
over rounds 2..R (round 1 also sets up first masks and warms caches). Each strategy hook is timed
too, so the table says where the overhead sits. Noise is calibrated once in ``configure`` (outside
the rounds) for epsilon 8 over the run; that one-off cost is reported separately. Target (issue 8):
client-level DP round <= 1.10x plain FedAvg.

Writes ``bench/results/client_dp_overhead{_<preset> unless tiny}{_cuda}.{csv,md}``. Plain script, no asserts.

    python bench/client_dp_overhead.py --preset tiny --rounds 6
"""
from __future__ import annotations

import argparse
import sys
import time
from collections import defaultdict
from pathlib import Path

import pandas as pd

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import bench_federation, bench_simulation, timed, write_results  # noqa: E402

from mmpfl_core.privacy import accounting  # noqa: E402

HOOKS = ("client_start_state", "transmit", "aggregate", "round_report", "after_local", "before_round")
DP = {"target_epsilon": 8.0, "delta": 1e-5}
VARIANTS: dict[str, tuple[str, dict]] = {
    "fedavg": ("fedavg", {}),
    "dp-fedavg": ("dp-fedavg", DP),
    "dp-fedavg per-group": ("dp-fedavg", {**DP, "clipping": "per-group"}),
    "dp-fedavg-fisher": ("dp-fedavg-fisher", DP),
    "mm-pfl-adp": ("mm-pfl-adp", DP),
    "mm-pfl-adp (no gate)": ("mm-pfl-adp", {**DP, "noise_gate": False}),
    "mm-pfl-adp (no DP)": ("mm-pfl-adp", {"dp": False}),
}


def _time_hooks(strategy, seconds: dict[str, float]) -> None:
    """Wrap the strategy's hooks on the instance so each call adds its wall time to ``seconds``."""
    for name in HOOKS:
        hook = getattr(strategy, name)

        def wrapper(*args, _hook=hook, _name=name, **kwargs):
            started = time.perf_counter()
            try:
                return _hook(*args, **kwargs)
            finally:
                seconds[_name] += time.perf_counter() - started
        setattr(strategy, name, wrapper)


def measure(federation, args: argparse.Namespace) -> list[dict]:
    """Per-round times of every variant, interleaved: round t of each variant runs before round t + 1 of any,
    so a slow phase of a shared machine hits all variants alike."""
    sims, setup, rows = {}, {}, []
    for label in args.variants:
        strategy_name, kwargs = VARIANTS[label]
        started = time.perf_counter()
        sims[label] = bench_simulation(federation, strategy_name, preset=args.preset, batch_size=args.batch_size,
                                       seed=args.seed, num_rounds=args.rounds, device=args.device, **kwargs)
        setup[label] = time.perf_counter() - started
    for t in range(1, args.rounds + 1):
        for label, sim in sims.items():
            hooks: dict[str, float] = defaultdict(float)
            _time_hooks(sim.strategy, hooks)

            def one_round(sim=sim, t=t):
                # Variants with the same noise ask the accountant the same question; a real run asks
                # it alone, so each variant pays for its own query rather than finding it cached.
                accounting._epsilon_of_history.cache_clear()
                sim.strategy.before_round(t)
                sim.run_round(t)
            seconds = timed(one_round, args.device)
            for name in HOOKS:  # unwrap: the next round wraps afresh with its own counters
                delattr(sim.strategy, name)
            rows.append({"variant": label, "round": t, "seconds": seconds, "setup_s": setup[label],
                         **{f"{h}_s": hooks[h] for h in HOOKS}})
    return rows


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", choices=["tiny", "teaching", "paper"], default="tiny")
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--num-subjects", type=int, default=600)
    parser.add_argument("--num-sites", type=int, default=4)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    parser.add_argument("--note", default="", help="conditions of the measurement to record (e.g. other jobs running)")
    args = parser.parse_args(argv)

    federation = bench_federation(args.preset, num_subjects=args.num_subjects, num_sites=args.num_sites, seed=args.seed)
    rows = measure(federation, args)
    for label in args.variants:
        print(f"{label:22s} rounds: {[round(r['seconds'], 3) for r in rows if r['variant'] == label]}", flush=True)
    per_round = pd.DataFrame(rows)
    steady = per_round[per_round["round"] > 1]
    table = steady.groupby("variant", sort=False).median(numeric_only=True).drop(columns="round").reset_index()
    table["setup_s"] = per_round.groupby("variant", sort=False)["setup_s"].first().values
    base = float(table.loc[table["variant"] == "fedavg", "seconds"].iloc[0]) if "fedavg" in args.variants else None
    if base:
        table["ratio_vs_fedavg"] = table["seconds"] / base
        # Paired: each variant's round t over FedAvg's round t (run next to each other), then the median; less
        # sensitive than the ratio of medians when other jobs slow some rounds of a shared machine.
        wide = steady.pivot(index="round", columns="variant", values="seconds")
        table["paired_ratio_median"] = [float((wide[v] / wide["fedavg"]).median()) for v in table["variant"]]
    table = table.round(4)
    notes = (f"Preset `{args.preset}`, {args.num_sites} sites (all take part), batch {args.batch_size}, one local epoch, "
             f"device {args.device}; median over rounds 2..{args.rounds} of before_round + run_round (no evaluation). "
             "Variants run interleaved (round t of each before round t + 1 of any). Hook columns are medians of the "
             "time spent inside each strategy hook per round (client_start_state sets the round's noise scales, "
             "with the Fisher where used; transmit runs once per site: clipping and, with distributed placement, "
             "noise; aggregate adds server noise; before_round asks the accountant for the budget check, and "
             "round_report finds that answer cached; the epsilon cache is cleared before every round of every variant, "
             "so each pays for its own query as a run on its own does). paired_ratio_median: the median over rounds of "
             "the variant's round over FedAvg's same round. setup_s: building the simulation, including noise calibration and "
             "Fisher/mask set-up. Target: DP round <= 1.10x FedAvg." + (f" {args.note}" if args.note else ""))
    print(table.to_string(index=False))
    suffix = ("" if args.preset == "tiny" else f"_{args.preset}") + ("" if args.device == "cpu" else "_" + args.device.split(":")[0])
    print("wrote", write_results(f"client_dp_overhead{suffix}", table, notes))


if __name__ == "__main__":
    main()
