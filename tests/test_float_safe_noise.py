"""Float-safe secret noise and CSPRNG site sampling (issue 21, defect 8): each secure normal is the sum of
4 float64 draws (Opacus secure_mode), scaled in float64 before the cast, with variance still exactly
sigma^2; sites are Poisson-sampled by comparing OS-CSPRNG uniforms with q; the reproducible mode is
unchanged bit for bit."""
from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

import mmpfl_core.privacy.randomness as randomness
from mmpfl_core.federated.config import FederatedConfig
from mmpfl_core.federated.simulation import select_round
from mmpfl_core.federated.strategies import create_strategy, select_clients
from mmpfl_core.privacy.mechanisms import NoiseSource, gaussian_noise_like
from mmpfl_core.seeding import numpy_generator

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


def _draws_per_normal(monkeypatch) -> float:
    """How many float draws the secure sampler spends per normal it returns (spying on Box-Muller)."""
    asked = []
    real = randomness._box_muller

    def spy(count):
        asked.append(count)
        return real(count)
    monkeypatch.setattr(randomness, "_box_muller", spy)
    randomness.secure_standard_normal((1000,))
    monkeypatch.setattr(randomness, "_box_muller", real)
    return sum(asked) / 1000


def test_secure_path_sums_several_draws_and_a_single_draw_is_flagged(monkeypatch):
    assert _draws_per_normal(monkeypatch) == 4  # Opacus secure_mode: 2n draws, n = 2
    fixed = torch.arange(1, 4 * 5 + 1, dtype=torch.float64) / 7  # known "draws"
    monkeypatch.setattr(randomness, "_box_muller", lambda count: fixed[:count])
    out = randomness.secure_standard_normal((5,), dtype=torch.float64)
    torch.testing.assert_close(out, fixed.view(4, 5).sum(0) / 2, rtol=0, atol=0)
    monkeypatch.undo()
    monkeypatch.setattr(randomness, "SECURE_NORMAL_DRAWS", 1)  # the old single Box-Muller draw
    assert _draws_per_normal(monkeypatch) == 1  # the measurement above tells the two apart


def test_secure_noise_has_variance_exactly_sigma_squared():
    x = randomness.secure_standard_normal((400_000,), dtype=torch.float64)
    # std of a sample std is about 1 / sqrt(2n) = 0.0011; kurtosis of a Gaussian is 3 (SE 0.008)
    assert abs(float(x.mean())) < 0.006 and float(x.std()) == pytest.approx(1.0, abs=0.005)
    assert float((x ** 4).mean() / (x ** 2).mean() ** 2) == pytest.approx(3.0, abs=0.05)
    update = {"w": torch.zeros(300, 700)}
    noise = gaussian_noise_like(update, 2.5, None, NoiseSource.secure())["w"]
    assert noise.dtype == torch.float32 and float(noise.double().var()) == pytest.approx(6.25, rel=0.015)


def test_secure_noise_is_scaled_in_float64_before_the_cast(monkeypatch):
    fixed = torch.from_numpy(np.random.default_rng(0).standard_normal(4 * 1000))  # float64 "draws"
    monkeypatch.setattr(randomness, "_box_muller", lambda count: fixed[:count])
    std = 0.1
    noise = gaussian_noise_like({"w": torch.zeros(1000)}, std, None, NoiseSource.secure())["w"]
    exact = (fixed.view(4, 1000).sum(0) / 2 * std).to(torch.float32)
    assert torch.equal(noise, exact)
    # scaling after a float32 cast rounds twice and gives other bits: the test can tell the paths apart
    assert not torch.equal((fixed.view(4, 1000).sum(0) / 2).to(torch.float32) * std, exact)


def test_reproducible_noise_is_unchanged_bit_for_bit():
    shapes = {"b": (3,), "a": (4, 5)}
    update = {n: torch.zeros(s) for n, s in shapes.items()}
    noise = gaussian_noise_like(update, 0.7, None, NoiseSource.seeded(11))
    g = torch.Generator().manual_seed(11)
    for name in sorted(shapes):  # drawn in sorted-name order, float32, then scaled: as before issue 21
        assert torch.equal(noise[name], torch.randn(shapes[name], generator=g, dtype=torch.float32) * 0.7)


def test_site_sampling_reads_the_os_csprng(monkeypatch):
    cfg = dataclasses.replace(FederatedConfig(client_fraction=0.3, sampling="poisson", device="cpu"))
    ids = list(range(60))
    read = []
    real = randomness.os.urandom

    def spy(n):
        read.append(n)
        return real(n)
    monkeypatch.setattr(randomness.os, "urandom", spy)

    def no_keyed_prng(*args, **kwargs):
        raise AssertionError("a keyed PRNG was used for the secret sample")
    monkeypatch.setattr(np.random, "Philox", no_keyed_prng)
    secret = create_strategy("dp-fedavg", noise_multiplier=1.0)
    sizes = [len(select_round(secret, ids, cfg, 1)) for _ in range(200)]
    assert read == [8 * len(ids)] * 200  # one 53-bit CSPRNG uniform per site, compared with q
    assert np.mean(sizes) == pytest.approx(0.3 * 60, abs=1.0)  # Poisson(q): mean qN, SE 0.25
    read.clear()
    open_ = create_strategy("dp-fedavg", noise_multiplier=1.0, noise="reproducible-insecure")
    assert select_round(open_, ids, cfg, 4) == select_clients(ids, cfg, numpy_generator(cfg.seed, 1, 4))
    assert read == []  # the reproducible mode is the seeded stream, as before


def test_secure_random_choice_is_a_uniform_subset():
    rng = randomness.secure_numpy_generator()
    picks = [tuple(sorted(rng.choice(np.arange(5), size=2, replace=False).tolist())) for _ in range(2000)]
    assert all(len(set(p)) == 2 for p in picks)
    counts = np.bincount(np.array(picks).ravel(), minlength=5)
    assert counts.min() > 700 and counts.max() < 900  # each item with probability 2/5: 800 of 2000
    with pytest.raises(AttributeError, match="random\\(\\) and choice\\(\\)"):
        rng.integers(3)
