"""Noise sources, noise placement and per-placement accounting; diagonal Fisher on public data."""
from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from mmpfl_core.errors import ConfigError, PrivacyError
from mmpfl_core.privacy.allocation import clip_bounds_from_sizes, fisher_noise_allocation
from mmpfl_core.privacy.fisher import diagonal_fisher, group_fisher
from mmpfl_core.privacy.mechanisms import (
    NoisePlacement,
    NoiseSource,
    gaussian_noise_like,
    per_participant_noise_std,
    release_accounting,
    server_top_up_std,
)

GROUPS = {"a": ["w1", "b1"], "b": ["w2"]}


def update():
    return {"w1": torch.zeros(200, 300), "b1": torch.zeros(300), "w2": torch.zeros(100, 500)}


def test_noise_std_matches_configuration():
    noise = gaussian_noise_like(update(), {"a": 0.5, "b": 3.0}, GROUPS, NoiseSource.seeded(0))
    assert float(noise["w1"].std()) == pytest.approx(0.5, rel=0.15)
    assert float(noise["w2"].std()) == pytest.approx(3.0, rel=0.15)
    assert abs(float(noise["w2"].mean())) < 0.1
    flat = gaussian_noise_like(update(), 2.0, None, NoiseSource.seeded(1))
    assert float(flat["w1"].std()) == pytest.approx(2.0, rel=0.15)
    zero = gaussian_noise_like(update(), {"a": 0.0, "b": 1.0}, GROUPS, NoiseSource.seeded(1))
    assert float(zero["b1"].abs().sum()) == 0.0
    assert {k: v.shape for k, v in noise.items()} == {k: v.shape for k, v in update().items()}


def test_seeded_is_reproducible_secure_differs():
    a = gaussian_noise_like(update(), 1.0, None, NoiseSource.seeded(7))
    b = gaussian_noise_like(update(), 1.0, None, NoiseSource.seeded(7))
    assert all(torch.equal(a[k], b[k]) for k in a)
    source = NoiseSource.seeded(7)
    first = gaussian_noise_like(update(), 1.0, None, source)
    second = gaussian_noise_like(update(), 1.0, None, source)
    assert not torch.equal(first["w1"], second["w1"]), "a seeded source advances with every draw"
    secure = NoiseSource.secure()
    s1 = gaussian_noise_like(update(), 1.0, None, secure)
    s2 = gaussian_noise_like(update(), 1.0, None, secure)
    assert not torch.equal(s1["w1"], s2["w1"])


def test_noise_rejects_missing_group_and_negative_std():
    with pytest.raises(PrivacyError, match="no noise std"):
        gaussian_noise_like(update(), {"a": 1.0}, GROUPS, NoiseSource.seeded(0))
    with pytest.raises(PrivacyError):
        gaussian_noise_like(update(), -1.0, None, NoiseSource.seeded(0))


def test_placement_split():
    assert per_participant_noise_std("server", 2.0, 4) == (0.0, 2.0)
    client, server = per_participant_noise_std(NoisePlacement.DISTRIBUTED, 2.0, 4)
    assert client == pytest.approx(1.0) and server == 0.0
    # m announced participants together add exactly the full variance, for every m
    for m in (1, 2, 5, 40):
        share = per_participant_noise_std("distributed", 2.0, m).participant_std
        assert m * share**2 == pytest.approx(2.0**2)
    assert per_participant_noise_std("local", 2.0, 4) == (2.0, 0.0)
    split = per_participant_noise_std("distributed", {"a": 3.0, "b": 6.0}, 9)
    assert split.participant_std == {"a": 1.0, "b": 2.0}
    with pytest.raises(ValueError):
        per_participant_noise_std("nowhere", 1.0, 1)


def test_server_tops_up_missing_distributed_shares():
    # s of m shares arrived: s * sigma^2 / m + top-up^2 = sigma^2, all of it when nobody was sampled
    for m, arrived in [(3, 3), (3, 1), (5, 0), (0, 0)]:
        top = server_top_up_std(2.0, m, arrived)
        shares = arrived * (2.0**2 / m) if m else 0.0
        assert shares + top**2 == pytest.approx(4.0)
    with pytest.raises(PrivacyError, match="announced"):
        server_top_up_std(1.0, 2, 3)


def test_release_accounting_per_placement():
    assert release_accounting("server", 1.5, 0.1) == (1.5, 0.1)
    # distributed: the sum carries sigma^2 whoever took part, so it is the same subsampled Gaussian
    assert release_accounting("distributed", 1.5, 0.1) == (1.5, 0.1)
    # local: sensitivity 2C (replace-one), no amplification by sampling
    assert release_accounting("local", 1.5, 0.1) == (0.75, 1.0)


# ----------------------------------------------------------------------------- Fisher
def tiny_model():
    model = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 3))
    g = torch.Generator().manual_seed(0)  # explicit generator, no global seeding
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(0.5 * torch.randn(p.shape, generator=g))
    return model


def public_batches(seed=0, n=2, b=5):
    g = torch.Generator().manual_seed(seed)
    return [((torch.randn(b, 4, generator=g),), torch.randint(0, 3, (b,), generator=g))
            for _ in range(n)]


def brute_force_fisher(model, batches):
    sums = {k: torch.zeros_like(p) for k, p in model.named_parameters()}
    count = 0
    for (x,), y in batches:
        for i in range(len(y)):
            model.zero_grad()
            nn.functional.cross_entropy(model(x[i:i + 1]), y[i:i + 1]).backward()
            for k, p in model.named_parameters():
                sums[k] += p.grad ** 2
            count += 1
    return {k: s / count for k, s in sums.items()}


@pytest.mark.parametrize("method", ["hooks", "vmap", "loop"])
def test_fisher_matches_brute_force_and_is_nonnegative(method):
    model, batches = tiny_model(), public_batches()
    fisher = diagonal_fisher(model, batches, labels="true", method=method)
    assert all(p.grad is None and not hasattr(p, "grad_sample") for p in model.parameters())  # model untouched
    expected = brute_force_fisher(model, batches)
    for k in expected:
        assert torch.allclose(fisher[k], expected[k], rtol=1e-5, atol=1e-8)
        assert bool((fisher[k] >= 0).all())
    sampled = diagonal_fisher(model, batches, labels="model", method=method,
                              generator=torch.Generator().manual_seed(3), max_batches=1)
    assert all(bool((v >= 0).all()) for v in sampled.values())
    with pytest.raises(ConfigError, match="generator"):
        diagonal_fisher(model, batches, labels="model", method=method)


def test_hooks_fisher_refuses_batch_norm():
    model = nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.Linear(8, 3))
    with pytest.raises(ConfigError, match="method='vmap'"):
        diagonal_fisher(model, public_batches(), labels="true", method="hooks")


def test_allocation_from_public_data_ignores_private_data():
    model = tiny_model()
    groups = {"body": ["0.weight", "0.bias"], "head": ["2.weight", "2.bias"]}
    sizes = {g: sum(dict(model.named_parameters())[n].numel() for n in ns)
             for g, ns in groups.items()}
    bounds = clip_bounds_from_sizes(sizes, 1.0)
    private_x = torch.randn(50, 4)

    def allocate():
        f = group_fisher(diagonal_fisher(model, public_batches(seed=1), labels="model",
                                         generator=torch.Generator().manual_seed(0)), groups)
        return fisher_noise_allocation(group_sizes=sizes, fisher=f, clip_bounds=bounds,
                                       noise_multiplier=1.0)

    before = allocate()
    private_x.mul_(100.0).add_(3.0)  # a site's private data changes...
    after = allocate()
    assert dict(before) == dict(after)  # ...and the released noise scales do not
    assert math.isfinite(before["body"]) and before["body"] > 0
