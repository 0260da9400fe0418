"""Benchmark: seconds per round with 100, 1,000 (and 10,000) sites a round, loop vs vectorised engine.

The regime map's setting (``configs/reproduce_regime.yaml``: ``hybrid-tiny``, a conv stem and one
ViT block at 16 px, d = 19,147; batch 16, one local epoch, AdamW) with ``--subjects-per-site`` subjects per site (12: about 8 training subjects)
and every site taking part in every round (q = 1, so sites per round = sites). For each number of
sites and each strategy it times:

* the loop engine (:class:`FederatedSimulation`), the reference. Above ``--loop-sites`` sites it is
  timed on that many sites and scaled linearly (its rounds are a Python loop over sites; the output
  says when a figure is extrapolated);
* the vectorised engine (:class:`VectorizedSimulation`, ``engine: vectorized``), its chunk size, and
  the peak resident memory of the process while it runs (sampled every 5 ms, minus the memory
  before the round);
* one centralised pass over the same examples: one forward and backward pass of the plain model
  over every training example of the round, in batches of up to 8,192 (the same FLOPs as the
  round's training in a few large batches), and one optimiser step: the limit a batched engine can
  approach.

Beside the wall clocks it records the CPU seconds of the process for each engine and the pass (user +
system, all threads; on a shared machine the wall clock measures the other jobs too) and the glibc
allocator variables in effect (:data:`MALLOC_VARS`).

Evaluation, checkpoints and bootstrap CIs are off; rounds are timed after one warm-up round. One line
per setting ends ``speedup_vs_loop=<x> vs_centralized=<y>``. ``--run-rounds R`` also times a whole
DP-FedAvg run (run_federated, ``engine: vectorized``) of R rounds with 1,000 sites per round out of
10,000 (Poisson, q = 0.1), evaluation at the end, and projects 100 rounds. Writes
``bench/results/many_sites.{csv,md}``. Plain script, no asserts; timings on a shared machine are
pessimistic.

    python bench/many_sites.py                       # 100 and 1,000 sites, fedavg and dp-fedavg
    python bench/many_sites.py --sites 100 1000 10000 --run-rounds 5
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import statistics
import sys
import threading
import time
from pathlib import Path

import pandas as pd
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import write_results  # noqa: E402

from mmpfl_core.data.contract import CohortDataset, concatenate  # noqa: E402
from mmpfl_core.experiment import make_federation, model_factory  # noqa: E402
from mmpfl_core.federated.config import FederatedConfig  # noqa: E402
from mmpfl_core.federated.simulation import FederatedSimulation, run_federated  # noqa: E402
from mmpfl_core.federated.strategies import create_strategy  # noqa: E402
from mmpfl_core.federated.vectorized import VectorizedSimulation  # noqa: E402
from mmpfl_core.reproduction.plan import load_reproduction  # noqa: E402

CENTRAL_BATCH = 8192


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * 4096


class PeakMemory:
    """Peak resident memory of this process while the block runs, sampled every 5 ms."""

    def __enter__(self) -> PeakMemory:
        self.before = self.peak = _rss_bytes()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def _sample(self) -> None:
        while not self._stop.wait(0.005):
            self.peak = max(self.peak, _rss_bytes())

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, _rss_bytes())


_SETTINGS: dict[tuple[int, int, int], tuple] = {}


def regime_setting(num_sites: int, subjects_per_site: int, seed: int):
    """The regime map's experiment at ``num_sites`` sites: (config, federation, model factory), built once."""
    key = (num_sites, subjects_per_site, seed)
    if key not in _SETTINGS:
        base = load_reproduction("regime").experiment
        config = base.replace(
            data={"num_subjects": num_sites * subjects_per_site + base.federation.public_size, "seed": seed},
            federation={"num_sites": num_sites, "seed": seed},
        )
        federation = make_federation(config)
        _SETTINGS[key] = (config, federation, model_factory(config, federation))
    return _SETTINGS[key]


def strategy_for(config, name: str):
    """FedAvg, or the regime map's DP-FedAvg (epsilon 8, delta 1e-5, clip 0.5, RDP accountant)."""
    method = next(m for m in config.methods if m.strategy == name) if name != "fedavg" else None
    kwargs = dict(method.kwargs) if method else {}
    return create_strategy(name, **kwargs)


def federated_config(
    config,
    *,
    engine: str,
    num_rounds: int,
    device: str,
    client_fraction: float = 1.0,
    chunk_size: int | None = None,
    eval_every: int = 10**6,
) -> FederatedConfig:
    return dataclasses.replace(
        config.federated,
        num_rounds=num_rounds,
        client_fraction=client_fraction,
        sampling="poisson",
        eval_every=eval_every,
        checkpoint_every=0,
        bootstrap_resamples=0,
        engine=engine,
        chunk_size=chunk_size,
        device=device,
    )


def one_round(sim, t: int, device: str) -> float:
    """Seconds of round t of ``sim`` (evaluation off; CUDA work synchronised before the clock starts and stops)."""
    sim.strategy.before_round(t)
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    started = time.perf_counter()
    sim.run_round(t)
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    return time.perf_counter() - started


#: glibc allocator settings this bench reports (set in the environment before Python starts). With the
#: defaults, tensors above the (dynamic) mmap threshold are mapped and unmapped on every allocation, and
#: the page faults of re-mapping them show up as system CPU time: measured up to a third of a round's
#: CPU on the regime map's model. ``MALLOC_MMAP_THRESHOLD_=4000000000 MALLOC_TRIM_THRESHOLD_=8000000000``
#: keeps freed memory in the heap for reuse.
MALLOC_VARS = ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_")


def malloc_env() -> str:
    """The glibc allocator variables of this process ("default" if none is set)."""
    return " ".join(f"{k}={os.environ[k]}" for k in MALLOC_VARS if k in os.environ) or "default"


class CpuClock:
    """CPU seconds of this process (all threads) over a block: beside the wall clock, because on a
    machine shared with other jobs the wall clock of a 2-thread run measures the other jobs too."""

    def __enter__(self) -> CpuClock:
        self.started = time.process_time()
        return self

    def __exit__(self, *exc) -> None:
        self.seconds = time.process_time() - self.started


def centralized_pass(factory, federation, config, device: str):
    """A function running one forward+backward over all training examples (batches of CENTRAL_BATCH) + one step."""
    model = factory().to(device)
    data = CohortDataset(concatenate([s.train for s in federation.sites]))
    inputs = [t.to(device) for t in (data.images, data.modality_mask, data.clinical, data.labels)]
    opt = torch.optim.AdamW(
        model.parameters(), lr=config.federated.optimizer.lr, weight_decay=config.federated.optimizer.weight_decay
    )
    n = len(data)

    def one_pass() -> float:
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        started = time.perf_counter()
        opt.zero_grad(set_to_none=True)
        for start in range(0, n, CENTRAL_BATCH):
            images, mask, clinical, labels = (t[start : start + CENTRAL_BATCH] for t in inputs)
            loss = torch.nn.functional.cross_entropy(model(images, mask, clinical), labels, reduction="sum") / n
            loss.backward()
        opt.step()
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        return time.perf_counter() - started

    return one_pass


def bench_setting(num_sites: int, strategy: str, args) -> dict:
    config, federation, factory = regime_setting(num_sites, args.subjects_per_site, args.seed)
    examples = sum(len(s.train) for s in federation.sites)
    loop_sites = min(num_sites, args.loop_sites)
    subset = dataclasses.replace(federation, sites=federation.sites[:loop_sites])
    rounds = args.repeats + 1
    loop = FederatedSimulation(
        subset,
        model_factory=factory,
        strategy=strategy_for(config, strategy),
        config=federated_config(config, engine="loop", num_rounds=rounds, device=args.device),
        progress=False,
    )
    vec = VectorizedSimulation(
        federation,
        model_factory=factory,
        strategy=strategy_for(config, strategy),
        config=federated_config(
            config, engine="vectorized", num_rounds=rounds, device=args.device, chunk_size=args.chunk_size
        ),
        progress=False,
    )
    central = centralized_pass(factory, federation, config, args.device)
    loop.evaluate = vec.evaluate = lambda: {}
    times: dict[str, list[float]] = {k: [] for k in ("loop", "vec", "central", "loop_cpu", "vec_cpu", "central_cpu")}
    peak = before = 0
    if args.device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    for t in range(1, rounds + 1):  # interleaved, so slow phases of a shared machine hit every side
        with CpuClock() as loop_cpu:
            loop_s = one_round(loop, t, args.device) * num_sites / loop_sites
        with PeakMemory() as memory, CpuClock() as vec_cpu:
            vec_s = one_round(vec, t, args.device)
        with CpuClock() as central_cpu:
            central_s = central()
        peak, before = max(peak, memory.peak), max(before, memory.before)
        if t > 1:  # round 1 warms up
            times["loop"].append(loop_s)
            times["vec"].append(vec_s)
            times["central"].append(central_s)
            times["vec_cpu"].append(vec_cpu.seconds)
            times["loop_cpu"].append(loop_cpu.seconds * num_sites / loop_sites)
            times["central_cpu"].append(central_cpu.seconds)
    loop_seconds, vec_seconds, central_seconds, loop_cpu_s, vec_cpu_s, central_cpu_s = (
        statistics.median(times[k]) for k in ("loop", "vec", "central", "loop_cpu", "vec_cpu", "central_cpu")
    )
    gpu_peak = torch.cuda.max_memory_allocated() / 1e6 if args.device.startswith("cuda") else float("nan")
    row = {
        "strategy": strategy,
        "device": args.device,
        "sites_per_round": num_sites,
        "train_examples": examples,
        "loop_s_per_round": round(loop_seconds, 3),
        "loop_timed_on_sites": loop_sites,
        "vectorized_s_per_round": round(vec_seconds, 3),
        "chunk_size": vec.chunk_size,
        "centralized_pass_s": round(central_seconds, 3),
        "vectorized_peak_rss_mb": round(peak / 1e6),
        "vectorized_rss_increase_mb": round((peak - before) / 1e6),
        "cuda_peak_allocated_mb": round(gpu_peak) if gpu_peak == gpu_peak else None,
        "loop_cpu_s": round(loop_cpu_s, 3),
        "vectorized_cpu_s": round(vec_cpu_s, 3),
        "centralized_cpu_s": round(central_cpu_s, 3),
        "speedup_vs_loop_cpu_time": round(loop_cpu_s / vec_cpu_s, 2),
        "loop_vs_centralized_cpu_time": round(loop_cpu_s / central_cpu_s, 2),
        "vs_centralized_cpu_time": round(vec_cpu_s / central_cpu_s, 2),
        "load_avg_1min": os.getloadavg()[0],
        "malloc_env": malloc_env(),
        "speedup_vs_loop": round(loop_seconds / vec_seconds, 2),
        "vs_centralized": round(vec_seconds / central_seconds, 2),
    }
    extrapolated = "" if loop_sites == num_sites else f" (timed on {loop_sites} sites, x{num_sites / loop_sites:g})"
    memory_text = (
        f"CUDA peak {row['cuda_peak_allocated_mb']} MB"
        if args.device.startswith("cuda")
        else f"peak RSS {row['vectorized_peak_rss_mb']} MB, +{row['vectorized_rss_increase_mb']} MB"
    )
    print(
        f"{strategy} {args.device} sites={num_sites} examples={examples}: "
        f"loop {loop_seconds:.2f} s/round{extrapolated}, "
        f"vectorized {vec_seconds:.3f} s/round (chunk {vec.chunk_size}, {memory_text}), centralized pass "
        f"{central_seconds:.3f} s (CPU time: loop {loop_cpu_s:.2f} s, vectorized {vec_cpu_s:.3f} s, centralized "
        f"{central_cpu_s:.3f} s; speedup {row['speedup_vs_loop_cpu_time']:.1f}, vs centralized "
        f"{row['vs_centralized_cpu_time']:.2f}, loop vs centralized {row['loop_vs_centralized_cpu_time']:.1f}; "
        f"load average {row['load_avg_1min']:.1f}) speedup_vs_loop={row['speedup_vs_loop']:.1f} "
        f"vs_centralized={row['vs_centralized']:.2f}",
        flush=True,
    )
    return row


def bench_run(args) -> dict:
    """A whole DP-FedAvg run, 1,000 sites a round of 10,000 (q = 0.1), ``args.run_rounds`` rounds."""
    population, per_round = 10 * args.run_sites_per_round, args.run_sites_per_round
    config, federation, factory = regime_setting(population, args.subjects_per_site, args.seed)
    fed_config = federated_config(
        config,
        engine="vectorized",
        num_rounds=args.run_rounds,
        device=args.device,
        client_fraction=per_round / population,
        chunk_size=args.chunk_size,
        eval_every=args.run_rounds,
    )
    started = time.perf_counter()
    with CpuClock() as run_cpu:
        result = run_federated(
            federation,
            model_factory=factory,
            strategy=strategy_for(config, "dp-fedavg"),
            config=fed_config,
            progress=False,
        )
    seconds = time.perf_counter() - started
    per_round_s = statistics.median(row["seconds"] for row in result.history)
    projected = per_round_s * 100
    print(
        f"dp-fedavg run ({args.device}): {args.run_rounds} rounds, {per_round} of {population} sites a round "
        f"(q={per_round / population:g}), "
        f"vectorized: {seconds:.1f} s in all ({run_cpu.seconds:.1f} s CPU; evaluation at the end included), "
        f"median {per_round_s:.2f} s/round; "
        f"100 rounds projected {projected / 60:.1f} min; epsilon {result.summary['privacy']['epsilon']:.3g} "
        f"(calibrated for {args.run_rounds} rounds)",
        flush=True,
    )
    return {
        "strategy": "dp-fedavg run",
        "device": args.device,
        "sites_per_round": per_round,
        "population": population,
        "rounds": args.run_rounds,
        "run_s": round(seconds, 1),
        "run_cpu_s": round(run_cpu.seconds, 1),
        "load_avg_1min": os.getloadavg()[0],
        "malloc_env": malloc_env(),
        "median_s_per_round": round(per_round_s, 3),
        "projected_100_rounds_min": round(projected / 60, 2),
    }


class _Timers:
    """Wall and CPU seconds per named part of a round, by wrapping the engine's functions (--profile)."""

    def __init__(self) -> None:
        self.wall: dict[str, float] = {}
        self.cpu: dict[str, float] = {}

    def wrap(self, owner, attribute: str, part: str, *, static: bool = False) -> None:
        inner = getattr(owner, attribute)

        def timed(*args, **kwargs):
            wall, cpu = time.perf_counter(), time.process_time()
            try:
                return inner(*args, **kwargs)
            finally:
                self.wall[part] = self.wall.get(part, 0.0) + time.perf_counter() - wall
                self.cpu[part] = self.cpu.get(part, 0.0) + time.process_time() - cpu

        setattr(owner, attribute, staticmethod(timed) if static else timed)


def profile_round(strategy: str, args) -> list[dict]:
    """Where a vectorised round's time goes at ``args.sites[-1]`` sites: wall and CPU seconds per part
    (median over ``args.repeats`` rounds after a warm-up), one centralised pass beside it, and the
    torch profiler's top operators of one more round."""
    import mmpfl_core.federated.vectorized as vectorized

    num_sites = args.sites[-1]
    config, federation, factory = regime_setting(num_sites, args.subjects_per_site, args.seed)
    vec = VectorizedSimulation(
        federation,
        model_factory=factory,
        strategy=strategy_for(config, strategy),
        config=federated_config(
            config, engine="vectorized", num_rounds=args.repeats + 3, device=args.device, chunk_size=args.chunk_size
        ),
        progress=False,
    )
    vec.evaluate = lambda: {}
    central = centralized_pass(factory, federation, config, args.device)
    timers = _Timers()
    for attribute, part in (
        ("site_batches", "batch schedules (per-site RNG streams)"),
        ("plan_chunks", "chunk plan"),
        ("_plan_chunk", "chunk plan"),
        ("clipped_sum", "release: stacked clip-and-sum"),
    ):
        timers.wrap(vectorized, attribute, part)
    timers.wrap(vectorized, "train_stacked", "local training (total)")
    timers.wrap(vectorized._SitePool, "gather", "gather batches")
    timers.wrap(vectorized._StackedOptimizer, "first_step", "optimiser", static=True)
    timers.wrap(vectorized._StackedOptimizer, "step", "optimiser")
    timers.wrap(vec, "_stack_starts", "start states")
    timers.wrap(vec, "count_traffic", "release: traffic count")
    timers.wrap(vec, "aggregate", "release: aggregate (strategy)")
    timers.wrap(vec, "train_clients", "train_clients (total)")
    walls: dict[str, list[float]] = {}
    cpus: dict[str, list[float]] = {}
    for t in range(1, args.repeats + 2):
        timers.wall.clear()
        timers.cpu.clear()
        with CpuClock() as round_cpu:
            round_wall = one_round(vec, t, args.device)
        with CpuClock() as central_cpu:
            central_wall = central()
        timers.wall.update({"round": round_wall, "centralised pass (reference)": central_wall})
        timers.cpu.update({"round": round_cpu.seconds, "centralised pass (reference)": central_cpu.seconds})
        if t > 1:
            for part in timers.wall:
                walls.setdefault(part, []).append(timers.wall[part])
                cpus.setdefault(part, []).append(timers.cpu[part])
    wall = {k: statistics.median(v) for k, v in walls.items()}
    cpu = {k: statistics.median(v) for k, v in cpus.items()}
    # the parts inside the totals: vmap forward/backward = training minus gather and optimiser; the rest
    # of train_clients = per-site bookkeeping (ClientUpdate rows, the weighted sum, after_local)
    for d in (wall, cpu):
        d["local training: vmap forward + backward"] = (
            d["local training (total)"] - d.get("gather batches", 0.0) - d.get("optimiser", 0.0)
        )
        d["per-site bookkeeping (rows, updates, weighted sum)"] = (
            d["train_clients (total)"]
            - d["local training (total)"]
            - d.get("batch schedules (per-site RNG streams)", 0)
            - d.get("chunk plan", 0)
            - d.get("start states", 0)
            - d.get("release: traffic count", 0)
            - d.get("release: stacked clip-and-sum", 0)
        )
        d["rest of the round (selection, report)"] = (
            d["round"] - d["train_clients (total)"] - d.get("release: aggregate (strategy)", 0.0)
        )
    order = [
        "batch schedules (per-site RNG streams)",
        "chunk plan",
        "start states",
        "gather batches",
        "local training: vmap forward + backward",
        "optimiser",
        "release: stacked clip-and-sum",
        "per-site bookkeeping (rows, updates, weighted sum)",
        "release: traffic count",
        "release: aggregate (strategy)",
        "rest of the round (selection, report)",
        "round",
        "centralised pass (reference)",
    ]
    rows = [
        {
            "strategy": strategy,
            "sites_per_round": num_sites,
            "threads": args.threads,
            "part": part,
            "wall_s": round(wall.get(part, 0.0), 4),
            "cpu_s": round(cpu.get(part, 0.0), 4),
            "share_of_round_cpu": round(cpu.get(part, 0.0) / cpu["round"], 3),
            "load_avg_1min": os.getloadavg()[0],
        }
        for part in order
        if part in wall
    ]
    for r in rows:
        print(
            f"{strategy} {r['part']:55s} wall {r['wall_s']:.3f} s  cpu {r['cpu_s']:.3f} s  "
            f"({100 * r['share_of_round_cpu']:.0f}% of the round's CPU)",
            flush=True,
        )
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        one_round(vec, args.repeats + 2, args.device)
    events = sorted(prof.key_averages(), key=lambda e: -e.self_cpu_time_total)
    total = sum(e.self_cpu_time_total for e in events)
    for e in events[:12]:
        rows.append(
            {
                "strategy": strategy,
                "sites_per_round": num_sites,
                "threads": args.threads,
                "part": f"op {e.key}",
                "wall_s": None,
                "cpu_s": round(e.self_cpu_time_total / 1e6, 4),
                "share_of_round_cpu": round(e.self_cpu_time_total / total, 3),
                "load_avg_1min": os.getloadavg()[0],
            }
        )
    return rows


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sites", type=int, nargs="+", default=[100, 1000])
    parser.add_argument("--strategies", nargs="+", default=["fedavg", "dp-fedavg"], choices=["fedavg", "dp-fedavg"])
    parser.add_argument("--subjects-per-site", type=int, default=12)
    parser.add_argument("--loop-sites", type=int, default=100, help="time the loop engine on at most this many sites")
    parser.add_argument("--chunk-size", type=int, default=None, help="vectorised chunk (default: from free memory)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--run-rounds", type=int, default=0, help="also time a whole DP-FedAvg run of this many rounds")
    parser.add_argument("--run-sites-per-round", type=int, default=1000)
    parser.add_argument("--threads", type=int, default=2, help="torch threads (2: the laptop target)")
    parser.add_argument("--device", default="cpu", help="cpu or cuda (GPU rows: bench/gpu_suite.py)")
    parser.add_argument("--name", default="many_sites", help="results file name under bench/results")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--profile",
        action="store_true",
        help="instead: where a vectorised round's time goes at the last --sites setting "
        "(writes bench/results/<name>_profile_<threads>t.{csv,md})",
    )
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.profile:
        rows = [row for strategy in args.strategies for row in profile_round(strategy, args)]
        notes = (
            f"Where a vectorised round's time goes: {args.sites[-1]} sites a round, regime map setting, "
            f"{args.threads} torch threads, median of {args.repeats} rounds after a warm-up (wall and CPU "
            "seconds of the whole process; parts timed by wrapping the engine's functions, 'vmap forward + "
            "backward' = local training minus gathering and optimiser). Rows 'op ...': the torch "
            "profiler's self CPU time of the top operators over one more round (share: of all operators' "
            f"self time). glibc allocator: {malloc_env()}. Shared machine: see load_avg_1min."
        )
        print("wrote", write_results(f"{args.name}_profile_{args.threads}t", pd.DataFrame(rows), notes))
        return

    notes = (
        f"Regime map setting (configs/reproduce_regime.yaml: hybrid-tiny, conv stem, 16 px, one block, batch 16, "
        f"one local epoch, AdamW), {args.subjects_per_site} "
        f"subjects per site, every site in every round; median of {args.repeats} rounds after a warm-up; "
        f"{args.threads} torch threads. Loop figures above {args.loop_sites} sites are timed on {args.loop_sites} "
        "sites and scaled linearly. Centralised pass: one forward/backward over the same training examples "
        f"(batches of {CENTRAL_BATCH}) and one optimiser step. Peak RSS: whole process while the vectorised "
        "rounds ran (increase: over the memory before them). CPU columns: CPU seconds of the process (user + "
        "system, all threads) over the same rounds, the comparable figure on a shared machine; glibc allocator: "
        f"{malloc_env()}. Measured on a machine shared with other jobs: wall timings are pessimistic."
    )
    rows = []
    for n in args.sites:  # results rewritten after every setting: a run cut short keeps what it measured
        for strategy in args.strategies:
            rows.append(bench_setting(n, strategy, args))
            write_results(args.name, pd.DataFrame(rows), notes)
    if args.run_rounds:
        rows.append(bench_run(args))
    print("wrote", write_results(args.name, pd.DataFrame(rows), notes))


if __name__ == "__main__":
    main()
