"""The pooled learning curve: test accuracy of one model trained on n pooled patients, against n.

What it is for: telling whether a federation is data-starved, i.e. whether pooling can pay at all. For
each training-set size n and seed s, :func:`pooled_learning_curve`

1. draws n patients without replacement from the union of the sites' TRAIN splits (a permutation
   ``pi_s`` of the pooled training set from ``numpy_generator(seed, Stream.LEARNING_CURVE)``; the subset
   is its first n entries, so the subsets of one seed are nested, ``S_{n_1} subset S_{n_2}`` for
   ``n_1 < n_2``, and the curve's steps reflect added patients rather than a fresh draw);
2. trains a fresh ``model_factory(s)`` on them with :func:`~mmpfl_core.centralized.train_centralized`
   (the recipe's epochs, shuffling seed s; with ``min_steps`` a small subset gets extra epochs so that
   it is not also starved of optimiser steps);
3. scores it on the union of the sites' TEST splits (``federation.global_test``): accuracy, and
   balanced accuracy (mean per-class recall), both from
   :func:`~mmpfl_core.metrics.classification.classification_metrics`.

A site of size n_k sits on this curve at x = n_k when its data look like the pool's (same model, same
recipe): sites left of the knee are data-starved and pooling pays there; where the curve is flat from the
smallest site on, pooling cannot help, whatever the privacy mechanism. :func:`learning_curve_summary` gives
the mean over seeds and its 95% Student-t interval (:func:`~mmpfl_core.metrics.classification.seed_ci`).

Privacy: this is a NON-private, teaching and diagnostic quantity. It trains on pooled patients of every
site, i.e. it is the centralized reference that no federated method can be run as; nothing here is
clipped, noised or accounted. Its results are for the operator who plays every site (a notebook records
them under ``private/``), never a site's release. The sites' val splits and the public set are not used.
"""

from __future__ import annotations

import math
from dataclasses import replace
from collections.abc import Callable, Sequence

import numpy as np
import pandas as pd
import torch
from torch import nn

from .centralized import TrainingRecipe, train_centralized
from .data.contract import Cohort, CohortDataset, concatenate
from .data.federation import Federation
from .errors import ConfigError
from .federated.evaluation import predict_proba
from .metrics.classification import classification_metrics, seed_ci
from .seeding import Stream, numpy_generator

__all__ = [
    "draw_training_subset",
    "geometric_sizes",
    "learning_curve_summary",
    "pooled_learning_curve",
    "pooled_training_cohort",
    "site_training_sizes",
]


def site_training_sizes(federation: Federation) -> pd.Series:
    """Training subjects per site (the TRAIN split only), indexed by site name, in site order."""
    return pd.Series(
        [len(site.train) for site in federation.sites],
        index=pd.Index([site.name for site in federation.sites], name="site"),
        name="training subjects",
        dtype=np.int64,
    )


def pooled_training_cohort(federation: Federation) -> Cohort:
    """The union of the sites' TRAIN splits, in site order (what the curve draws from)."""
    return concatenate([site.train for site in federation.sites])


def geometric_sizes(smallest: int, largest: int, num: int) -> list[int]:
    """``num`` training-set sizes spaced evenly on a log axis from ``smallest`` to ``largest`` (both kept).

    Sizes are rounded to integers and deduplicated, so fewer than ``num`` come back when the range is
    narrow. Raises :class:`ConfigError` for ``num < 1`` or ``1 <= smallest <= largest`` violated.
    """
    if num < 1:
        raise ConfigError(f"geometric_sizes: num={num!r} must be >= 1; ask for at least one size.")
    if not 1 <= smallest <= largest:
        raise ConfigError(
            f"geometric_sizes: need 1 <= smallest <= largest, got smallest={smallest!r}, largest={largest!r}; "
            "pass the smallest site's training size and the pooled training size."
        )
    if num == 1:
        return [int(largest)]
    grid = np.geomspace(smallest, largest, num)
    return sorted({int(round(v)) for v in grid} | {int(smallest), int(largest)})


def _check_inputs(
    sizes: Sequence[int], seeds: Sequence[int], pooled: int, min_steps: int
) -> tuple[list[int], list[int]]:
    sizes, seeds = list(sizes), list(seeds)
    if not sizes:
        raise ConfigError(
            "pooled_learning_curve: sizes is empty; give training-set sizes, e.g. "
            f"geometric_sizes(smallest_site, {pooled}, 5)."
        )
    bad = [n for n in sizes if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n < 1]
    if bad:
        raise ConfigError(f"pooled_learning_curve: sizes {bad} are not integers >= 1; every size must be >= 1.")
    too_big = [int(n) for n in sizes if n > pooled]
    if too_big:
        raise ConfigError(
            f"pooled_learning_curve: sizes {too_big} are larger than the pooled training set ({pooled} subjects "
            f"over the sites' train splits); use sizes <= {pooled}."
        )
    if len(set(sizes)) != len(sizes):
        raise ConfigError(f"pooled_learning_curve: sizes {sizes} repeat a size; give each size once.")
    if not seeds:
        raise ConfigError("pooled_learning_curve: seeds is empty; give at least one seed, e.g. seeds=(0, 1, 2).")
    if len(set(seeds)) != len(seeds):
        raise ConfigError(f"pooled_learning_curve: seeds {seeds} repeat a seed; give each seed once.")
    if min_steps < 0:
        raise ConfigError(f"pooled_learning_curve: min_steps={min_steps!r} must be >= 0 (0: the recipe's epochs).")
    return [int(n) for n in sizes], [int(s) for s in seeds]


def draw_training_subset(pooled: int, n: int, seed: int) -> np.ndarray:
    """Positions (into :func:`pooled_training_cohort`) of the n patients the curve trains on for ``seed``.

    The first n entries of one seeded permutation of ``range(pooled)``: a uniform draw without
    replacement, nested across n for a fixed seed.
    """
    return numpy_generator(seed, Stream.LEARNING_CURVE).permutation(pooled)[:n]


def pooled_learning_curve(
    federation: Federation,
    model_factory: Callable[[int], nn.Module],
    recipe: TrainingRecipe,
    sizes: Sequence[int],
    seeds: Sequence[int],
    *,
    min_steps: int = 0,
    device: str | torch.device = "cpu",
) -> pd.DataFrame:
    """Train on n pooled training patients for every (n, seed); score on the pooled test patients.

    Args:
        federation: its sites' train splits are the pool; their test splits (``global_test``) the test set.
        model_factory: ``seed -> fresh model`` (the same preset for every size; ``seed`` sets the init).
        recipe: the centralized recipe; its ``epochs`` are passes over the n drawn patients.
        sizes: training-set sizes, each in ``[1, pooled training size]``.
        seeds: one curve per seed (subset draw, model init and shuffling).
        min_steps: at least this many optimiser steps per run: a size with fewer steps per
            ``recipe.epochs`` gets ``ceil(min_steps / steps_per_epoch)`` epochs instead. 0 keeps the
            recipe's epochs at every size (the budget a local-only site of that size gets in this kit).
        device: where to train.

    Returns:
        One row per (n, seed), sorted by n then seed: ``n``, ``seed``, ``epochs``, ``accuracy``,
        ``balanced_accuracy``, ``seconds`` (training wall clock, machine-dependent).

    Raises:
        ConfigError: empty ``sizes`` or ``seeds``, a size < 1 or above the pooled training size, a repeat.
    """
    pool = pooled_training_cohort(federation)
    sizes, seeds = _check_inputs(sizes, seeds, len(pool), min_steps)
    test = federation.global_test
    test_data = CohortDataset(test)
    rows = []
    for seed in seeds:
        for n in sorted(sizes):
            subset = pool.subset(draw_training_subset(len(pool), n, seed))
            steps_per_epoch = math.ceil(n / recipe.batch_size)
            epochs = max(recipe.epochs, math.ceil(min_steps / steps_per_epoch))
            run_recipe = recipe if epochs == recipe.epochs else _with_epochs(recipe, epochs)
            trained = train_centralized(model_factory(seed), subset, run_recipe, seed=seed, device=device)
            proba = predict_proba(trained.model, test_data, batch_size=256, device=torch.device(device))
            scores = classification_metrics(test.labels, proba, test.num_classes)
            rows.append(
                {
                    "n": n,
                    "seed": seed,
                    "epochs": epochs,
                    "accuracy": scores["accuracy"],
                    "balanced_accuracy": scores["balanced_accuracy"],
                    "seconds": trained.seconds,
                }
            )
    return pd.DataFrame(rows).sort_values(["n", "seed"], ignore_index=True)


def _with_epochs(recipe: TrainingRecipe, epochs: int) -> TrainingRecipe:
    # warm-up stays the same share of the budget, so a longer run is the same schedule stretched
    return replace(recipe, epochs=epochs, warmup_epochs=recipe.warmup_epochs * epochs / recipe.epochs)


def learning_curve_summary(curve: pd.DataFrame, metric: str = "accuracy", confidence: float = 0.95) -> pd.DataFrame:
    """Per size n: seeds, the mean of ``metric`` over seeds and its Student-t interval (NaN with one seed)."""
    if metric not in curve.columns:
        raise ConfigError(f"learning_curve_summary: no column {metric!r}; the curve has {list(curve.columns)}.")
    rows = []
    for n, group in curve.groupby("n", sort=True):
        mean, low, high = seed_ci(group[metric].tolist(), confidence)
        rows.append({"n": int(n), "seeds": len(group), "mean": mean, "low": low, "high": high})
    return pd.DataFrame(rows)
