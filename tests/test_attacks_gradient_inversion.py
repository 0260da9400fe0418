"""Gradient inversion: exact image metrics, config validation, and the attack against each defence.

One module-scoped comparison (tiny preset, one subject, 100 steps, three releases) is shared by the
attack tests; measured values are in the comments (torch 2.14.1, 2 CPU cores), bands keep margin.
"""
from __future__ import annotations

import math

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np
import pytest
import torch

from mmpfl_core.attacks.gradient_inversion import (DefenceResult, InversionConfig, compare_defences, invert_update,
                                                   psnr, ssim, transmitted_update)
from mmpfl_core.data.contract import CohortDataset
from mmpfl_core.data.synthetic import SyntheticCohortConfig, generate_subjects
from mmpfl_core.errors import ConfigError
from mmpfl_core.models.presets import create_model
from mmpfl_core.plots.attacks_inversion import plot_reconstructions
from mmpfl_core.privacy.accounting import calibrate_noise
from mmpfl_core.privacy.clipping import global_norm

CLIP_NORM = 1e-3  # below the update's norm (about 0.02 with local_lr 0.01), so clipping binds


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    # The attack is thousands of tiny ops: one intra-op thread is never slower here, and on a
    # shared 2-core machine two threads spin against other processes (measured 10x slower under
    # load). Restored after this module.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def dataset() -> CohortDataset:
    return CohortDataset(generate_subjects(SyntheticCohortConfig(num_subjects=4, image_size=32, seed=0)))


@pytest.fixture(scope="module")
def comparison(dataset):
    model = create_model("tiny", seed=0)
    batch = dataset.batch([0])
    results = compare_defences(model, batch, clip_norm=CLIP_NORM, epsilons=[1.0], config=InversionConfig(seed=0))
    return model, batch, results


# ----------------------------------------------------------------------------------- metrics
def test_identical_images_give_infinite_psnr_and_unit_ssim():
    x = torch.rand(2, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    assert psnr(x, x) == math.inf
    assert ssim(x, x) == pytest.approx(1.0, abs=1e-12)


def test_psnr_of_a_known_mse_and_ssim_of_constant_images():
    a, b = torch.zeros(1, 2, 16, 16), torch.full((1, 2, 16, 16), 0.25)  # 0.25 is exact in float32
    assert psnr(a, b) == pytest.approx(10 * math.log10(16.0), abs=1e-12)  # MSE 1/16
    assert psnr(a, b, data_range=2.0) == pytest.approx(10 * math.log10(64.0), abs=1e-12)
    # constant images: sigma = 0, so SSIM = (2 a b + C1) / (a^2 + b^2 + C1) exactly
    x, y, c1 = torch.full((1, 1, 16, 16), 0.2), torch.full((1, 1, 16, 16), 0.6), 0.01 ** 2
    assert ssim(x, y) == pytest.approx((2 * 0.2 * 0.6 + c1) / (0.2 ** 2 + 0.6 ** 2 + c1), rel=1e-6)


def test_ssim_matches_an_independent_scipy_reference():
    # scikit-image's algorithm (gaussian_weights=True, use_sample_covariance=False): a reflect-padded
    # Gaussian filter (sigma 1.5, radius 5 = an 11 x 11 window), cropped by 5 on each side
    from scipy.ndimage import gaussian_filter

    rng = np.random.default_rng(0)
    x = rng.random((32, 32))
    y = np.clip(x + 0.2 * rng.standard_normal((32, 32)), 0.0, 1.0)

    def blur(a):
        return gaussian_filter(a, 1.5, truncate=3.5, mode="reflect")[5:-5, 5:-5]

    mx, my = blur(x), blur(y)
    vx, vy, cxy = blur(x * x) - mx ** 2, blur(y * y) - my ** 2, blur(x * y) - mx * my
    c1, c2 = 0.01 ** 2, 0.03 ** 2
    expected = float((((2 * mx * my + c1) * (2 * cxy + c2)) / ((mx ** 2 + my ** 2 + c1) * (vx + vy + c2))).mean())
    assert expected == pytest.approx(0.8023, abs=1e-4)  # a noisy copy: clearly below 1
    assert ssim(torch.tensor(y)[None, None], torch.tensor(x)[None, None]) == pytest.approx(expected, abs=1e-12)


def test_metrics_average_over_present_sequences_only():
    target = torch.zeros(1, 3, 16, 16)
    recon = target.clone()
    recon[0, 0] = 0.25  # MSE 1/16 on the first sequence: 10 log10(16) dB
    recon[0, 2] = 0.5  # the missing sequence's error must not count
    mask = torch.tensor([[True, True, False]])
    assert psnr(recon, target, mask) == math.inf  # mean of a finite value and inf
    recon[0, 1] = 0.125  # MSE 1/64: 10 log10(64) dB
    assert psnr(recon, target, mask) == pytest.approx(5 * math.log10(16.0 * 64.0), abs=1e-12)
    with pytest.raises(ValueError, match="no sequence"):
        psnr(recon, target, torch.zeros(1, 3, dtype=torch.bool))


# ------------------------------------------------------------------------------------ config
@pytest.mark.parametrize("field,value,match", [
    ("steps", 0, "steps=0"), ("steps", 2.5, "must be an int"), ("restarts", 0, "restarts=0"),
    ("lr", 0.0, "lr=0.0"), ("lr", math.nan, "lr=nan"), ("tv_weight", -1.0, "tv_weight=-1.0"),
    ("seed", -1, "seed=-1"), ("local_lr", math.inf, "local_lr=inf"), ("seed", True, "must be an int"),
])
def test_config_rejects_bad_values_naming_value_and_fix(field, value, match):
    with pytest.raises(ConfigError, match=match) as info:
        InversionConfig(**{field: value})
    assert "e.g." in str(info.value) or "Use" in str(info.value)  # every message says how to fix it


def test_compare_defences_rejects_bad_clip_norm_and_accountant(dataset):
    model, batch = create_model("tiny", seed=0), dataset.batch([0])
    with pytest.raises(ConfigError, match="clip_norm=0.0"):
        compare_defences(model, batch, clip_norm=0.0, epsilons=[1.0], config=InversionConfig(steps=1))
    with pytest.raises(ConfigError, match="accountant='nope'"):
        compare_defences(model, batch, clip_norm=1.0, epsilons=[1.0], config=InversionConfig(steps=1),
                         accountant="nope")


# ------------------------------------------------------------------------------------ attack
def test_no_defence_recovers_images_and_clinical_data(comparison):
    _, batch, results = comparison
    assert [r.name for r in results] == ["no defence", "clipping", "clipping + noise"]
    clean = results[0]
    assert isinstance(clean, DefenceResult) and clean.epsilon is None and clean.noise_multiplier is None
    # measured: PSNR 12.6 dB vs 6.5 dB for the random start; SSIM 0.17 (0.01 for the start)
    assert clean.psnr - clean.baseline_psnr > 3.5
    assert clean.ssim > 0.09
    # measured clinical RMSE 0.12 (standardised units; 0.67 with seed 1) vs 1.6 under noise
    assert clean.clinical_rmse < 0.5


def test_clipping_alone_does_not_stop_the_attack(comparison):
    model, batch, results = comparison
    assert global_norm(transmitted_update(model, batch, local_lr=0.01)) > 5 * CLIP_NORM  # it binds
    # flat clipping only rescales the update and the cosine ignores scale: same reconstruction
    assert results[1].psnr == pytest.approx(results[0].psnr, abs=0.5)


def test_noise_at_small_epsilon_defeats_the_attack(comparison):
    _, _, results = comparison
    noisy = results[2]
    assert noisy.epsilon == 1.0
    # z from the accountant, doubled for local placement (replace-one sensitivity 2C)
    z = calibrate_noise(target_epsilon=1.0, target_delta=1e-5, sample_rate=1.0, steps=1, accountant="rdp")
    assert noisy.noise_multiplier == 2.0 * z
    # measured: 7.9 dB, SSIM 0.00 (chance: the random start is 6.5 dB) vs 12.6 dB without defence;
    # clinical RMSE 1.6
    assert noisy.psnr < results[0].psnr - 2.5
    assert noisy.ssim < 0.05
    assert noisy.clinical_rmse > 0.8


def test_attack_is_reproducible_and_seed_dependent(dataset):
    model, batch = create_model("tiny", seed=0), dataset.batch([0, 1])
    update = transmitted_update(model, batch, local_lr=0.01)

    def run(seed: int):
        return invert_update(model, update, modality_mask=batch["modality_mask"], labels=batch["label"],
                             config=InversionConfig(steps=5, seed=seed))

    first, again, other = run(0), run(0), run(1)
    assert torch.equal(first.images, again.images) and torch.equal(first.clinical, again.clinical)
    assert not torch.equal(first.images, other.images)


def test_missing_sequence_stays_zero_and_model_is_left_unchanged(dataset):
    model = create_model("tiny", seed=0)
    batch = dataset.batch([0, 1])
    batch["images"] = batch["images"].clone()
    batch["modality_mask"] = torch.tensor([[True, False, True], [True, True, True]])
    batch["images"][0, 1] = 0.0  # the contract: a missing sequence is zeros with mask False
    fused = [m.fused_attn for m in model.modules() if hasattr(m, "fused_attn")]
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    results = compare_defences(model, batch, clip_norm=1.0, epsilons=[8.0], config=InversionConfig(steps=3))
    for r in results:
        assert r.reconstruction.shape == batch["images"].shape
        assert torch.count_nonzero(r.reconstruction[0, 1]) == 0
        assert math.isfinite(r.psnr) and 0.0 <= r.reconstruction.min() and r.reconstruction.max() <= 1.0
    assert [m.fused_attn for m in model.modules() if hasattr(m, "fused_attn")] == fused  # restored
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())


def test_plot_has_one_row_per_subject_and_sequence(comparison):
    _, batch, results = comparison
    fig = plot_reconstructions(batch, results)
    axes = fig.get_axes()
    assert len(axes) == 3 * (1 + len(results))  # 1 subject x 3 sequences, original + 3 defences
    titles = [ax.get_title() for ax in axes if ax.get_title()]
    assert titles[0] == "original" and "\u03b5 = 1" in titles[-1] and "PSNR" in titles[1]
    plt.close(fig)
