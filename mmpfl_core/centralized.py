"""Centralized training recipes: how notebook 01 trains and compares its image models.

What it is for: training one model on pooled data (the centralized upper bound of the federated
notebooks) with the choices that make a small ViT learn from a few hundred MRI slices, and measuring
each choice. :func:`train_centralized` runs one recipe; :func:`evaluate` gives balanced accuracy with
a bootstrap CI over test subjects; :func:`compare_over_seeds` repeats a set of variants over seeds and
gives the mean with a Student-t CI over seeds (:func:`~mmpfl_core.metrics.classification.seed_ci`).

A recipe (:class:`TrainingRecipe`) is a budget (epochs over the pooled training set, so results are
comparable across machines, however loaded) plus:

* AdamW with a per-step learning rate: linear warm-up, then cosine decay to ``min_lr``
  (timm's ``CosineLRScheduler``; a transformer's attention is unstable under a full learning rate
  from random init, and the decay lets the last epochs settle);
* optional label smoothing (cross-entropy against ``(1 - s) * onehot + s / C``);
* optional MRI augmentation (:mod:`mmpfl_core.data.augment`, MONAI).

The federated engine (:mod:`mmpfl_core.federated`) builds a fresh optimiser every round (stateless
clients) and does not use these schedules; a centralized run there (``run_method`` with the
``centralized`` strategy) is plain AdamW. What this module must never do: touch data other than the
cohorts it is given, or use a global random state (shuffling, augmentation and init come from seeds).
"""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from collections.abc import Callable, Mapping, Sequence

import pandas as pd
import torch
from torch import nn

from .data.augment import AugmentConfig, MRIAugment
from .data.contract import Cohort, CohortDataset
from .errors import ConfigError, check_range
from .federated.client import forward_batch
from .federated.evaluation import predict_proba
from .metrics.classification import bootstrap_ci, seed_ci
from .seeding import numpy_generator, torch_generator

__all__ = ["TrainingRecipe", "TrainedModel", "train_centralized", "evaluate", "compare_over_seeds"]


@dataclass(frozen=True)
class TrainingRecipe:
    """One centralized training recipe; defaults are the recipe notebook 01 keeps (see its ablation)."""

    epochs: int = 30  # passes over the pooled training set (the budget)
    batch_size: int = 32
    lr: float = 2e-3  # AdamW peak learning rate
    weight_decay: float = 0.05
    warmup_epochs: float = 2.0  # linear warm-up from lr / 100; 0 disables it
    cosine: bool = True  # cosine decay to min_lr after warm-up; False keeps lr constant
    min_lr: float = 1e-5
    label_smoothing: float = 0.0
    augment: AugmentConfig | None = None  # None: no augmentation
    max_grad_norm: float | None = 1.0  # plain gradient clipping, for stability (not privacy)

    def __post_init__(self) -> None:
        check_range("TrainingRecipe.epochs", self.epochs, low=1, high=10_000)
        check_range("TrainingRecipe.batch_size", self.batch_size, low=1, high=65536)
        check_range("TrainingRecipe.lr", self.lr, low=0.0, low_inclusive=False, high=10.0)
        check_range("TrainingRecipe.weight_decay", self.weight_decay, low=0.0, high=1.0)
        check_range(
            "TrainingRecipe.warmup_epochs",
            self.warmup_epochs,
            low=0.0,
            high=float(self.epochs),
            fix="Warm up for fewer epochs than the whole budget.",
        )
        check_range("TrainingRecipe.min_lr", self.min_lr, low=0.0, high=self.lr)
        check_range("TrainingRecipe.label_smoothing", self.label_smoothing, low=0.0, high=1.0, high_inclusive=False)
        if self.max_grad_norm is not None:
            check_range("TrainingRecipe.max_grad_norm", self.max_grad_norm, low=0.0, low_inclusive=False)


@dataclass
class TrainedModel:
    """A trained model with its per-epoch training loss and wall-clock seconds (machine-dependent)."""

    model: nn.Module
    losses: list[float] = field(default_factory=list)
    seconds: float = 0.0


def train_centralized(
    model: nn.Module,
    train: Cohort,
    recipe: TrainingRecipe = TrainingRecipe(),
    *,
    seed: int = 0,
    device: str | torch.device = "cpu",
) -> TrainedModel:
    """Train ``model`` in place on the pooled cohort ``train`` with ``recipe``.

    Steps per epoch: shuffle (torch generator from ``seed``); for each batch, augment the images
    (if the recipe says so; fresh MONAI seed per epoch from the same generator), forward, cross-entropy
    with label smoothing, backward, clip the gradient norm, AdamW step, scheduler step.
    """
    from timm.scheduler import CosineLRScheduler  # the well-kept warm-up + cosine schedule

    device = torch.device(device)
    model.to(device).train()
    data = CohortDataset(train)
    gen = torch_generator(seed, 31)
    steps_per_epoch = -(-len(data) // recipe.batch_size)
    total = recipe.epochs * steps_per_epoch
    opt = torch.optim.AdamW(
        [p for p in model.parameters() if p.requires_grad], lr=recipe.lr, weight_decay=recipe.weight_decay
    )
    warmup = int(round(recipe.warmup_epochs * steps_per_epoch))
    sched = CosineLRScheduler(
        opt,
        t_initial=total if recipe.cosine else 10**12,
        lr_min=recipe.min_lr,
        warmup_t=warmup,
        warmup_lr_init=recipe.lr / 100,
        t_in_epochs=False,
    )
    augment = None if recipe.augment is None else MRIAugment(recipe.augment, image_size=train.image_size)
    loss_fn = nn.CrossEntropyLoss(label_smoothing=recipe.label_smoothing)
    result, step, started = TrainedModel(model), 0, time.perf_counter()
    for _ in range(recipe.epochs):
        if augment is not None:
            augment.reseed(int(torch.randint(2**31, (1,), generator=gen)))
        order = torch.randperm(len(data), generator=gen)
        total_loss = 0.0
        for start in range(0, len(data), recipe.batch_size):
            batch = data.batch(order[start : start + recipe.batch_size])
            if augment is not None:
                batch["images"] = augment(batch["images"], batch["modality_mask"])
            opt.zero_grad(set_to_none=True)
            loss = loss_fn(forward_batch(model, batch, device), batch["label"].to(device))
            loss.backward()
            if recipe.max_grad_norm is not None:
                nn.utils.clip_grad_norm_(model.parameters(), recipe.max_grad_norm)
            opt.step()
            step += 1
            sched.step_update(step)
            total_loss += float(loss.detach()) * len(batch["label"])
        result.losses.append(total_loss / len(data))
    result.seconds = time.perf_counter() - started
    model.eval()
    return result


def evaluate(
    model: nn.Module, test: Cohort, *, seed: int = 0, num_resamples: int = 1000, device: str | torch.device = "cpu"
) -> dict[str, float]:
    """Balanced accuracy (point and 95% bootstrap CI over test subjects) and plain accuracy."""
    proba = predict_proba(model, CohortDataset(test), batch_size=256, device=torch.device(device))
    ci = bootstrap_ci(
        test.labels, proba, metric="balanced_accuracy", num_resamples=num_resamples, rng=numpy_generator(seed, 77)
    )
    return {
        "balanced_accuracy": ci.point,
        "low": ci.low,
        "high": ci.high,
        "accuracy": float((proba.argmax(1) == test.labels).mean()),
    }


def compare_over_seeds(
    variants: Mapping[str, tuple[Callable[[int], nn.Module], TrainingRecipe, Cohort, Cohort]],
    seeds: Sequence[int] | Mapping[str, Sequence[int]],
    *,
    device: str | torch.device = "cpu",
    num_resamples: int = 200,
    workers: int = 1,
) -> tuple[pd.DataFrame, pd.DataFrame, dict[tuple[str, int], nn.Module]]:
    """Train every variant once per seed; return per-run rows and a per-variant summary.

    Args:
        variants: ``{label: (make_model(seed), recipe, train cohort, test cohort)}``.
        seeds: training seeds (model init, shuffling, augmentation); the data stay fixed. One sequence
            for every variant, or ``{label: seeds}`` per variant (variants whose interval must be
            tight get more seeds). Trainings run in the order of ``variants``, then of seeds: with
            ``workers > 1`` put the slowest first, so no worker idles at the end.
        workers: trainings run at once, each in its own Python thread with
            ``torch.get_num_threads() // workers`` intra-op threads (restored afterwards). Why: the
            kit's small models scale poorly over intra-op threads (on 2 CPU cores two trainings
            side by side finished in 0.65x the time of two in a row with 2 threads each), while
            PyTorch releases the GIL inside its ops. Every training owns its model, optimiser and
            generators, so the results do not depend on ``workers`` or on scheduling (tested),
            only on the intra-op thread count, as any float reduction does.

    Returns:
        ``(runs, summary, models)``: ``runs`` has one row per (variant, seed) with balanced accuracy,
        its bootstrap CI, accuracy and seconds; ``summary`` one row per variant with its number of
        seeds, the mean balanced accuracy over seeds and its 95% Student-t interval (``seed_low``, ``seed_high``;
        NaN with one seed); ``models`` the trained models by ``(variant, seed)``.
    """
    check_range("compare_over_seeds workers", workers, low=1, high=64)
    seeds_of = seeds if isinstance(seeds, Mapping) else {label: seeds for label in variants}
    if set(seeds_of) != set(variants):
        raise ConfigError(
            f"compare_over_seeds: seeds are given for {sorted(seeds_of)} but the variants are "
            f"{sorted(variants)}; give seeds for exactly the variants."
        )
    jobs = [(label, seed) for label in variants for seed in seeds_of[label]]

    def run(job: tuple[str, int]) -> tuple[dict, nn.Module]:
        label, seed = job
        make_model, recipe, train, test = variants[label]
        trained = train_centralized(make_model(seed), train, recipe, seed=seed, device=device)
        scores = evaluate(trained.model, test, seed=seed, num_resamples=num_resamples, device=device)
        return (
            {"variant": label, "seed": seed, **scores, "seconds": trained.seconds, "final_loss": trained.losses[-1]},
            trained.model,
        )

    if workers == 1:
        results = [run(job) for job in jobs]
    else:
        threads = torch.get_num_threads()
        torch.set_num_threads(max(1, threads // workers))
        try:
            with ThreadPoolExecutor(max_workers=workers) as pool:
                results = list(pool.map(run, jobs))  # in job order, whatever finishes first
        finally:
            torch.set_num_threads(threads)
    runs = pd.DataFrame([row for row, _ in results])
    models = {job: model for job, (_, model) in zip(jobs, results, strict=True)}
    summary = []
    for label, group in runs.groupby("variant", sort=False):
        mean, low, high = seed_ci(group["balanced_accuracy"].tolist())
        summary.append(
            {
                "variant": label,
                "seeds": len(group),
                "mean": mean,
                "seed_low": low,
                "seed_high": high,
                "accuracy": float(group["accuracy"].mean()),
                "seconds": float(group["seconds"].mean()),
            }
        )
    return runs, pd.DataFrame(summary), models
