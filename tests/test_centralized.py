"""Tests of the centralized training recipe (mmpfl_core.centralized) and the MRI augmentation (data.augment)."""
from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch

from mmpfl_core.data.augment import AugmentConfig, MRIAugment
from mmpfl_core.data.contract import concatenate
from mmpfl_core.errors import ConfigError
from mmpfl_core.models import create_model
from mmpfl_core.centralized import TrainingRecipe, compare_over_seeds, evaluate, train_centralized

SMALL_VIT = dict(embed_dim=16, depth=1, num_heads=2)


def _images(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    images = torch.rand(6, 3, 32, 32, generator=g)
    mask = torch.ones(6, 3, dtype=torch.bool)
    mask[1, 1] = False  # subject 1 has no T2
    return images * mask[:, :, None, None], mask


def test_augment_keeps_the_contract_and_is_seeded():
    images, mask = _images()
    out = MRIAugment(AugmentConfig(), image_size=32, seed=3)(images, mask)
    assert out.shape == images.shape and out.dtype == torch.float32
    assert float(out.min()) >= 0.0 and float(out.max()) <= 1.0
    assert torch.count_nonzero(out[1, 1]) == 0, "a missing sequence stays zeros"
    again = MRIAugment(AugmentConfig(), image_size=32, seed=3)(images, mask)
    other = MRIAugment(AugmentConfig(), image_size=32, seed=4)(images, mask)
    assert torch.equal(out, again) and not torch.equal(out, other)
    assert not torch.equal(out, images)


def test_augment_geometry_is_shared_by_the_sequences():
    images, mask = _images()
    flip_only = AugmentConfig(flip_p=1.0, affine_p=0.0, intensity_p=0.0, bias_field_p=0.0)
    out = MRIAugment(flip_only, image_size=32, seed=0)(images, mask)
    torch.testing.assert_close(out, images.flip(-1))  # every sequence mirrored left-right, no vertical flip


def test_augment_config_is_validated():
    with pytest.raises(ConfigError, match="flip_p"):
        AugmentConfig(flip_p=1.5)
    with pytest.raises(ConfigError, match="rotate_degrees"):
        AugmentConfig(rotate_degrees=90.0)


def test_recipe_is_validated():
    with pytest.raises(ConfigError, match="warmup_epochs"):
        TrainingRecipe(epochs=2, warmup_epochs=3.0)
    with pytest.raises(ConfigError, match="label_smoothing"):
        TrainingRecipe(label_smoothing=1.0)


def test_train_centralized_learns_and_is_reproducible(tiny_federation):
    train = concatenate([site.train for site in tiny_federation.sites])
    recipe = TrainingRecipe(epochs=4, batch_size=32, warmup_epochs=1.0)
    a = train_centralized(create_model("hybrid-tiny", seed=0, **SMALL_VIT), train, recipe, seed=1)
    b = train_centralized(create_model("hybrid-tiny", seed=0, **SMALL_VIT), train, recipe, seed=1)
    assert len(a.losses) == 4 and a.losses[-1] < a.losses[0], "the training loss falls"
    for p, q in zip(a.model.parameters(), b.model.parameters()):
        assert torch.equal(p, q)
    scores = evaluate(a.model, tiny_federation.global_test, num_resamples=50)
    assert 0.0 <= scores["low"] <= scores["balanced_accuracy"] <= scores["high"] <= 1.0


def test_train_centralized_with_augmentation_and_the_cnn(tiny_federation):
    train = concatenate([site.train for site in tiny_federation.sites])
    recipe = TrainingRecipe(epochs=1, augment=AugmentConfig(), label_smoothing=0.1, warmup_epochs=0.5)
    result = train_centralized(create_model("cnn", seed=0, channels=(4, 8, 8, 8)), train, recipe, seed=0)
    assert np.isfinite(result.losses).all() and not result.model.training


def test_compare_over_seeds_gives_intervals_over_seeds(tiny_federation):
    train = concatenate([site.train for site in tiny_federation.sites])
    test = tiny_federation.global_test
    recipe = TrainingRecipe(epochs=1, warmup_epochs=0.0)
    variants = {"vit": (lambda s: create_model("hybrid-tiny", seed=s, use_clinical=False, **SMALL_VIT), recipe, train, test)}
    runs, summary, models = compare_over_seeds(variants, (0, 1), num_resamples=50)
    assert list(runs["seed"]) == [0, 1] and set(models) == {("vit", 0), ("vit", 1)}
    row = summary.set_index("variant").loc["vit"]
    assert row["seed_low"] <= row["mean"] <= row["seed_high"]
    assert row["mean"] == pytest.approx(runs["balanced_accuracy"].mean())


def test_compare_over_seeds_in_parallel_threads_gives_the_same_runs(tiny_federation):
    """Trainings side by side (workers=2) equal trainings in a row at the same intra-op thread count."""
    train = concatenate([site.train for site in tiny_federation.sites])
    test = tiny_federation.global_test
    recipe = TrainingRecipe(epochs=1, warmup_epochs=0.0)
    variants = {"vit": (lambda s: create_model("hybrid-tiny", seed=s, use_clinical=False, **SMALL_VIT), recipe, train, test),
                "cnn": (lambda s: create_model("cnn", seed=s, use_clinical=False),
                        recipe, train, test)}
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        in_a_row, _, models_in_a_row = compare_over_seeds(variants, (0, 1), num_resamples=50)
    finally:
        torch.set_num_threads(threads)
    side_by_side, _, models_side_by_side = compare_over_seeds(variants, (0, 1), num_resamples=50, workers=2)
    assert torch.get_num_threads() == threads  # restored
    columns = ["variant", "seed", "balanced_accuracy", "low", "high", "accuracy", "final_loss"]
    pd.testing.assert_frame_equal(in_a_row[columns], side_by_side[columns])
    for key, model in models_in_a_row.items():
        for a, b in zip(model.state_dict().values(), models_side_by_side[key].state_dict().values()):
            assert torch.equal(a, b), key


def test_compare_over_seeds_takes_seeds_per_variant(tiny_federation):
    train = concatenate([site.train for site in tiny_federation.sites])
    recipe = TrainingRecipe(epochs=1, warmup_epochs=0.0)
    make = lambda s: create_model("hybrid-tiny", seed=s, use_clinical=False, **SMALL_VIT)  # noqa: E731
    variants = {"a": (make, recipe, train, tiny_federation.global_test),
                "b": (make, recipe, train, tiny_federation.global_test)}
    runs, summary, _ = compare_over_seeds(variants, {"a": (0, 1, 2), "b": (5,)}, num_resamples=20)
    assert list(zip(runs["variant"], runs["seed"])) == [("a", 0), ("a", 1), ("a", 2), ("b", 5)]
    assert summary.set_index("variant")["seeds"].to_dict() == {"a": 3, "b": 1}
    assert np.isnan(summary.set_index("variant").loc["b", "seed_low"])  # one seed: no interval over seeds
    with pytest.raises(ConfigError, match="give seeds for exactly the variants"):
        compare_over_seeds(variants, {"a": (0,)})
