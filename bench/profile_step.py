"""Profile one training step of the kit's ViT with torch.profiler: where does a DP-SGD step spend its time?

Prints the operators with the largest self time for one (preset, mode) of ``bench/dp_sgd_modes.py``
and writes the table to ``bench/results/profile_<preset>_<mode>.txt``. Use it when a benchmark misses
its target, before changing code.

    python bench/profile_step.py --preset teaching --mode hooks
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import RESULTS, machine_description  # noqa: E402
from dp_sgd_modes import BATCH, MODES, _batch, _step_function  # noqa: E402


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", choices=list(BATCH), default="teaching")
    parser.add_argument("--mode", choices=list(MODES), default="hooks")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--rows", type=int, default=25)
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    _, step = _step_function(args.mode, args.preset, _batch(args.preset, BATCH[args.preset], device), device, noise=1.0)
    step()
    step()  # warm-up: first calls allocate and pick kernels
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=activities) as prof:
        for _ in range(args.steps):
            step()
        if device.type == "cuda":
            torch.cuda.synchronize()
    sort = "self_cuda_time_total" if device.type == "cuda" else "self_cpu_time_total"
    table = prof.key_averages().table(sort_by=sort, row_limit=args.rows)
    text = f"# {args.preset} / {args.mode}, {args.steps} steps, batch {BATCH[args.preset]}\n{machine_description()}\n\n{table}\n"
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / f"profile_{args.preset}_{args.mode}.txt").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
