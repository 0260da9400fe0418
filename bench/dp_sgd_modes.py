"""Benchmark: one sample-level DP-SGD step vs the same step without DP, per Opacus grad-sample mode.

For each model preset the script times one optimiser step (forward, backward, clip, noise, update)
of the kit's ``MultiModalViT`` on one batch, in four ways:

* ``non-private``: plain SGD, the physical limit (ratio 1.0x);
* ``hooks``: Opacus ``GradSampleModule`` (per-sample gradients from module hooks; the kit's
  embedding modules register their own rules in ``mmpfl_core.models.layers``);
* ``functorch``: the same wrapper with ``force_functorch=True`` (per-sample gradients by ``vmap``;
  timm's fused attention is switched off for it, docs/FACTS.md, "Opacus with timm ViTs": SDPA breaks the vmap path);
* ``ghost``: ghost clipping (``GradSampleModuleFastGradientClipping`` + ``DPLossFastGradientClipping``),
  which computes per-sample gradient norms without materialising per-sample gradients and then
  runs a second backward pass with the clipped weights.

Each (preset, mode) runs in its own subprocess, so its peak memory (max RSS on CPU,
``torch.cuda.max_memory_allocated`` on CUDA) is its own and Opacus hooks never leak between modes.
Correctness: with zero noise every private mode must produce the same clipped, averaged gradient;
the script reports the largest relative difference of the parameter update from ``hooks``.

Writes ``bench/results/dp_sgd_modes{_cuda}.{csv,md}``. Plain script, no asserts on time.

    python bench/dp_sgd_modes.py --presets tiny teaching --repeats 5
    python bench/dp_sgd_modes.py --device cuda --presets tiny teaching paper
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import write_results  # noqa: E402

MODES = ("non-private", "hooks", "functorch", "ghost")
BATCH = {"tiny": 32, "teaching": 32, "paper": 16}
CLIP, NOISE = 1.0, 1.0


def _batch(preset: str, batch_size: int, device: torch.device) -> dict[str, torch.Tensor]:
    """A random batch with the sample contract's shapes (one missing T2, so masking is exercised)."""
    from mmpfl_core.models.presets import get_config
    cfg = get_config(preset)
    g = torch.Generator().manual_seed(0)
    mask = torch.ones(batch_size, cfg.num_modalities, dtype=torch.bool)
    mask[0, 1] = False
    return {"images": torch.randn(batch_size, cfg.num_modalities, cfg.image_size, cfg.image_size, generator=g).to(device),
            "modality_mask": mask.to(device), "clinical": torch.randn(batch_size, cfg.num_clinical, generator=g).to(device),
            "label": torch.randint(cfg.num_classes, (batch_size,), generator=g).to(device)}


def _step_function(mode: str, preset: str, batch: dict[str, torch.Tensor], device: torch.device, noise: float):
    """(model, one-step closure) for ``mode``; the closure runs one full optimiser step."""
    from opacus import GradSampleModule
    from opacus.grad_sample import GradSampleModuleFastGradientClipping
    from opacus.optimizers import DPOptimizer, DPOptimizerFastGradientClipping
    from opacus.utils.fast_gradient_clipping_utils import DPLossFastGradientClipping

    from mmpfl_core.models.presets import create_model

    model = create_model(preset, seed=0).to(device)
    if mode == "functorch":
        for module in model.modules():
            if hasattr(module, "fused_attn"):
                module.fused_attn = False
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    inputs = (batch["images"], batch["modality_mask"], batch["clinical"])
    criterion = nn.CrossEntropyLoss()
    B = len(batch["label"])
    generator = torch.Generator(device=device).manual_seed(1)
    if mode == "non-private":
        def step() -> None:
            optimizer.zero_grad(set_to_none=True)
            criterion(model(*inputs), batch["label"]).backward()
            optimizer.step()
    elif mode in ("hooks", "functorch"):
        wrapped = GradSampleModule(model, batch_first=True, loss_reduction="mean", force_functorch=mode == "functorch")
        dp_opt = DPOptimizer(optimizer, noise_multiplier=noise, max_grad_norm=CLIP, expected_batch_size=B,
                             loss_reduction="mean", generator=generator)

        def step() -> None:
            dp_opt.zero_grad(set_to_none=True)
            criterion(wrapped(*inputs), batch["label"]).backward()
            dp_opt.step()
    elif mode == "ghost":
        wrapped = GradSampleModuleFastGradientClipping(model, batch_first=True, loss_reduction="mean",
                                                       max_grad_norm=CLIP, use_ghost_clipping=True)
        dp_opt = DPOptimizerFastGradientClipping(optimizer, noise_multiplier=noise, max_grad_norm=CLIP,
                                                 expected_batch_size=B, loss_reduction="mean", generator=generator)
        dp_loss = DPLossFastGradientClipping(wrapped, dp_opt, nn.CrossEntropyLoss(), loss_reduction="mean")

        def step() -> None:
            dp_opt.zero_grad(set_to_none=True)
            dp_loss(wrapped(*inputs), batch["label"]).backward()  # both ghost passes happen here
            dp_opt.step()
    else:
        raise ValueError(f"unknown mode {mode!r}; choose from {MODES}")
    return model, step


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def measure(preset: str, mode: str, device: torch.device, repeats: int, warmup: int) -> dict:
    """One (preset, mode): median step seconds, peak memory, and the zero-noise update (for checks)."""
    batch = _batch(preset, BATCH[preset], device)
    # correctness: one zero-noise step from the same initial weights; the update is returned
    model, step = _step_function(mode, preset, batch, device, noise=0.0)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    step()
    update = torch.cat([(p.detach() - before[n]).flatten().cpu() for n, p in model.named_parameters()])
    del model, step
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    _, step = _step_function(mode, preset, batch, device, noise=NOISE)
    for _ in range(warmup):
        step()
    _sync(device)
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        step()
        _sync(device)
        times.append(time.perf_counter() - started)
    peak = (torch.cuda.max_memory_allocated() / 2**20 if device.type == "cuda"
            else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)  # Linux: KiB
    return {"median_s": statistics.median(times), "peak_mb": peak, "update": update.tolist()}


def _worker(args: argparse.Namespace) -> None:
    torch.set_num_threads(args.threads) if args.threads else None
    out = measure(args.preset, args.mode, torch.device(args.device), args.repeats, args.warmup)
    Path(args.out).write_text(json.dumps(out))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--presets", nargs="+", default=["tiny", "teaching"], choices=list(BATCH))
    parser.add_argument("--modes", nargs="+", default=list(MODES), choices=list(MODES))
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--threads", type=int, default=0, help="torch threads in each worker (0: torch's default)")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--preset", help=argparse.SUPPRESS)
    parser.add_argument("--mode", help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        return _worker(args)

    rows, updates = [], {}
    scratch = Path(os.environ.get("TMPDIR", "/tmp")) / f"dp_sgd_modes_{os.getpid()}.json"
    for preset in args.presets:
        for mode in args.modes:
            cmd = [sys.executable, __file__, "--worker", "--preset", preset, "--mode", mode, "--device", args.device,
                   "--repeats", str(args.repeats), "--warmup", str(args.warmup), "--threads", str(args.threads),
                   "--out", str(scratch)]
            env = dict(os.environ, TIMM_FUSED_ATTN="0") if mode == "functorch" else None
            done = subprocess.run(cmd, capture_output=True, text=True, env=env)
            if done.returncode != 0:
                error = (done.stderr.strip().splitlines() or ["?"])[-1][:160]
                print(f"{preset:9s} {mode:12s} FAILED: {error}", flush=True)
                rows.append({"preset": preset, "mode": mode, "batch": BATCH[preset], "median_s": None,
                             "peak_mb": None, "error": error})
            else:
                result = json.loads(scratch.read_text())
                updates[preset, mode] = torch.tensor(result.pop("update"))
                rows.append({"preset": preset, "mode": mode, "batch": BATCH[preset], **result, "error": ""})
                print(f"{preset:9s} {mode:12s} {result['median_s']:.4f} s  peak {result['peak_mb']:.0f} MB", flush=True)
            path = _write(rows, updates, args)  # after every mode, so a run stopped early keeps what it measured
    scratch.unlink(missing_ok=True)
    print(Path(path).read_text())


def _write(rows: list[dict], updates: dict, args: argparse.Namespace) -> Path:
    """Ratios to the preset's non-private step and the zero-noise check; writes the result files."""
    frame = pd.DataFrame(rows)
    for preset in frame["preset"].unique():
        at = frame["preset"] == preset
        base = frame.loc[at & (frame["mode"] == "non-private"), ["median_s", "peak_mb"]].dropna()
        if len(base):
            frame.loc[at, "time_vs_non_private"] = (frame.loc[at, "median_s"] / float(base["median_s"].iloc[0])).round(2)
            frame.loc[at, "memory_vs_non_private"] = (frame.loc[at, "peak_mb"] / float(base["peak_mb"].iloc[0])).round(2)
        reference = updates.get((preset, "hooks"))
        for mode in ("hooks", "functorch", "ghost"):
            if reference is not None and (preset, mode) in updates:
                diff = (updates[preset, mode] - reference).norm() / reference.norm().clamp(min=1e-12)
                frame.loc[at & (frame["mode"] == mode), "update_rel_diff_vs_hooks"] = float(f"{diff:.2e}")
    frame["median_s"] = frame["median_s"].astype(float).round(4)
    frame["peak_mb"] = frame["peak_mb"].astype(float).round(0)
    suffix = "" if args.device == "cpu" else "_" + args.device.split(":")[0]
    notes = (f"One optimiser step on one batch (batch sizes {BATCH}), median of {args.repeats} after {args.warmup} "
             f"warm-ups, each (preset, mode) in its own process. Noise multiplier {NOISE}, clip {CLIP}. "
             "Peak memory is max RSS of the process on CPU (model, data and Python included) and "
             "torch.cuda.max_memory_allocated on CUDA. update_rel_diff_vs_hooks: ||u_mode - u_hooks|| / ||u_hooks|| "
             "for one zero-noise step from the same weights (a correct mode gives float rounding only).")
    return write_results(f"dp_sgd_modes{suffix}", frame, notes)

if __name__ == "__main__":
    main()
