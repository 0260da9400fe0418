"""Fisher noise allocation: exact constraint, optimality, uniform special case, invariances."""
from __future__ import annotations

import inspect
import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from mmpfl_core.errors import PrivacyError
from mmpfl_core.privacy.accounting import effective_noise_multiplier
from mmpfl_core.privacy.allocation import (
    check_effective_multiplier,
    clip_bounds_from_sizes,
    effective_multiplier,
    effective_multiplier_of,
    fisher_noise_allocation,
    fisher_weighted_noise,
    floor_fisher,
    uniform_noise_allocation,
)

SIZES = {"patch_embed": 3_000, "blocks": 400_000, "head": 2_000, "fusion": 20_000}
FISHER = {"patch_embed": 2e-3, "blocks": 1e-5, "head": 5e-2, "fusion": 4e-4}


def z_eff(alloc):
    groups = list(alloc)
    return effective_noise_multiplier([alloc.clip_bounds[g] for g in groups],
                                      [alloc[g] for g in groups])


def test_the_one_z_eff_check_accepts_the_allocation_and_rejects_a_broken_one():
    bounds = clip_bounds_from_sizes(SIZES, 1.0)
    alloc = fisher_noise_allocation(group_sizes=SIZES, fisher=FISHER, clip_bounds=bounds, noise_multiplier=1.3)
    assert check_effective_multiplier(bounds, alloc.sigmas, 1.3, "test") == pytest.approx(z_eff(alloc), rel=1e-12)
    # Broken: one group's noise 1% too small, so the ledger (charged for z = 1.3) would undercount.
    broken = {**alloc.sigmas, "head": alloc.sigmas["head"] * 0.99}
    with pytest.raises(PrivacyError, match="would not cover"):
        check_effective_multiplier(bounds, broken, 1.3, "test")
    assert effective_multiplier({}, {}) == math.inf
    assert effective_multiplier(bounds, {**alloc.sigmas, "head": 0.0}) == 0.0


@pytest.mark.parametrize("z", [0.5, 1.0, 6.0])
def test_effective_multiplier_is_exactly_z(z):
    bounds = clip_bounds_from_sizes(SIZES, 1.0)
    assert sum(c**2 for c in bounds.values()) == pytest.approx(1.0, rel=1e-12)
    fisher = fisher_noise_allocation(group_sizes=SIZES, fisher=FISHER, clip_bounds=bounds,
                                     noise_multiplier=z)
    uniform = uniform_noise_allocation(group_sizes=SIZES, clip_bounds=bounds, noise_multiplier=z)
    for alloc in (fisher, uniform):
        assert z_eff(alloc) == pytest.approx(z, rel=1e-9)
        assert effective_multiplier_of(alloc) == pytest.approx(z, rel=1e-9)
        assert alloc.total_rho == pytest.approx(1 / (2 * z**2), rel=1e-9)
        assert all(s > 0 for s in alloc.values()) and all(r > 0 for r in alloc.rhos.values())
    # among groups of equal size and bound, the more important one gets less noise
    eq = fisher_noise_allocation(group_sizes={"x": 10, "y": 10}, fisher={"x": 1.0, "y": 4.0},
                                 clip_bounds={"x": 1.0, "y": 1.0}, noise_multiplier=z)
    assert eq["y"] < eq["x"]


positive = st.floats(1e-6, 1e3, allow_nan=False)


@settings(max_examples=100, deadline=None)
@given(data=st.lists(st.tuples(st.integers(1, 10**6), positive, st.floats(1e-3, 10.0)),
                     min_size=1, max_size=8),
       z=st.floats(0.1, 20.0))
def test_fisher_allocation_minimises_weighted_noise(data, z):
    sizes = {f"g{i}": d for i, (d, _, _) in enumerate(data)}
    fisher = {f"g{i}": f for i, (_, f, _) in enumerate(data)}
    bounds = {f"g{i}": c for i, (_, _, c) in enumerate(data)}
    fa = fisher_noise_allocation(group_sizes=sizes, fisher=fisher, clip_bounds=bounds,
                                 noise_multiplier=z, floor_fraction=0.0)
    ua = uniform_noise_allocation(group_sizes=sizes, clip_bounds=bounds, noise_multiplier=z)
    jf = fisher_weighted_noise(group_sizes=sizes, fisher=fisher, sigmas=fa)
    ju = fisher_weighted_noise(group_sizes=sizes, fisher=fisher, sigmas=ua)
    assert jf <= ju * (1 + 1e-9)
    # closed-form minimum z^2 (sum sqrt(F d) C)^2
    assert jf == pytest.approx(z**2 * sum(math.sqrt(fisher[g] * sizes[g]) * bounds[g]
                                          for g in sizes) ** 2, rel=1e-9)
    assert z_eff(fa) == pytest.approx(z, rel=1e-9)
    assert min(fa.values()) >= 0.0


def test_equal_fisher_and_sqrt_size_bounds_recover_uniform():
    bounds = clip_bounds_from_sizes(SIZES, 2.5)
    alloc = fisher_noise_allocation(group_sizes=SIZES, fisher={g: 0.3 for g in SIZES},
                                    clip_bounds=bounds, noise_multiplier=1.7)
    for g in SIZES:
        assert alloc[g] == pytest.approx(1.7 * 2.5, rel=1e-12)


def test_scale_invariance_and_zero_fisher_floor():
    bounds = clip_bounds_from_sizes(SIZES, 1.0)
    a = fisher_noise_allocation(group_sizes=SIZES, fisher=FISHER, clip_bounds=bounds,
                                noise_multiplier=1.0)
    b = fisher_noise_allocation(group_sizes=SIZES, fisher={g: 1e7 * f for g, f in FISHER.items()},
                                clip_bounds=bounds, noise_multiplier=1.0)
    assert all(a[g] == pytest.approx(b[g], rel=1e-12) for g in SIZES)
    zero = dict(FISHER, blocks=0.0)
    c = fisher_noise_allocation(group_sizes=SIZES, fisher=zero, clip_bounds=bounds,
                                noise_multiplier=1.0)
    assert all(math.isfinite(s) and s > 0 for s in c.values())
    assert z_eff(c) == pytest.approx(1.0, rel=1e-9)
    all_zero = fisher_noise_allocation(group_sizes=SIZES, fisher={g: 0.0 for g in SIZES},
                                       clip_bounds=bounds, noise_multiplier=1.0)
    assert all(s == pytest.approx(1.0) for s in all_zero.values())


def test_untransmitted_groups_are_left_out():
    sizes = {g: d for g, d in SIZES.items() if g != "head"}  # head is personal
    bounds = clip_bounds_from_sizes(sizes, 1.0)
    alloc = fisher_noise_allocation(group_sizes=sizes, fisher=FISHER, clip_bounds=bounds,
                                    noise_multiplier=2.0)
    assert set(alloc) == set(sizes)


def test_no_dependence_on_sample_counts():
    for fn in (fisher_noise_allocation, uniform_noise_allocation, clip_bounds_from_sizes):
        params = set(inspect.signature(fn).parameters)
        assert not any(w in p for p in params for w in ("sample", "count", "num_examples", "n_"))


def test_invalid_inputs_raise():
    bounds = clip_bounds_from_sizes(SIZES, 1.0)
    with pytest.raises(PrivacyError, match="noise_multiplier"):
        fisher_noise_allocation(group_sizes=SIZES, fisher=FISHER, clip_bounds=bounds,
                                noise_multiplier=0.0)
    with pytest.raises(PrivacyError, match="clip bound"):
        uniform_noise_allocation(group_sizes=SIZES, clip_bounds={}, noise_multiplier=1.0)
    with pytest.raises(PrivacyError, match="Fisher"):
        fisher_noise_allocation(group_sizes=SIZES, fisher=dict(FISHER, head=-1.0),
                                clip_bounds=bounds, noise_multiplier=1.0)
    with pytest.raises(PrivacyError, match="size"):
        clip_bounds_from_sizes({"a": 0}, 1.0)


@pytest.mark.parametrize("z", [0.5, 2.0, 6.0])
@pytest.mark.parametrize("ratio", [1.0, 1.5, 2.0, 4.0])
def test_bounded_ratio_keeps_z_and_bounds_every_sigma(z, ratio):
    bounds = clip_bounds_from_sizes(SIZES, 1.0)
    bounded = fisher_noise_allocation(group_sizes=SIZES, fisher=FISHER, clip_bounds=bounds, noise_multiplier=z,
                                      max_noise_ratio=ratio)
    free = fisher_noise_allocation(group_sizes=SIZES, fisher=FISHER, clip_bounds=bounds, noise_multiplier=z)
    uniform = uniform_noise_allocation(group_sizes=SIZES, clip_bounds=bounds, noise_multiplier=z)
    assert effective_multiplier_of(bounded) == pytest.approx(z, rel=1e-9)
    sigma_u = z * 1.0
    assert all(sigma_u / ratio * (1 - 1e-9) <= s <= sigma_u * ratio * (1 + 1e-9) for s in bounded.values())
    # The bounded optimum lies between uniform and the unbounded optimum in the objective.
    j = {name: fisher_weighted_noise(group_sizes=SIZES, fisher=FISHER, sigmas=a.sigmas)
         for name, a in (("bounded", bounded), ("free", free), ("uniform", uniform))}
    assert j["free"] * (1 - 1e-9) <= j["bounded"] <= j["uniform"] * (1 + 1e-9)
    if ratio == 1.0:
        assert all(s == pytest.approx(sigma_u, rel=1e-9) for s in bounded.values())
    # The unbounded allocation here spreads sigma over a factor > 7, so every bound below binds somewhere.
    assert max(free.values()) / min(free.values()) > 7
    assert max(bounded.values()) / min(bounded.values()) <= ratio ** 2 * (1 + 1e-9)


@settings(max_examples=60, deadline=None)
@given(data=st.lists(st.tuples(st.integers(1, 10**6), positive), min_size=1, max_size=8),
       z=st.floats(0.1, 20.0), ratio=st.floats(1.0, 10.0))
def test_bounded_allocation_is_optimal_among_bounded_ones(data, z, ratio):
    """KKT check: no feasible move of budget between two groups lowers J (bounded water-filling is optimal)."""
    sizes = {f"g{i}": d for i, (d, _) in enumerate(data)}
    fisher = {f"g{i}": f for i, (_, f) in enumerate(data)}
    bounds = clip_bounds_from_sizes(sizes, 1.0)
    alloc = fisher_noise_allocation(group_sizes=sizes, fisher=fisher, clip_bounds=bounds, noise_multiplier=z,
                                    max_noise_ratio=ratio)
    assert effective_multiplier_of(alloc) == pytest.approx(z, rel=1e-9)
    # Marginal value of budget x_g = C_g^2 / sigma_g^2 in J = sum a_g / x_g is -a_g / x_g^2; at the optimum every
    # group strictly inside its box has the same marginal value, at least that of groups at their upper bound.
    x = {g: bounds[g] ** 2 / alloc[g] ** 2 for g in sizes}
    u = {g: bounds[g] ** 2 / z ** 2 for g in sizes}  # uniform x_g (sum_g C_g^2 = 1)
    inside = [g for g in sizes if u[g] / ratio**2 * (1 + 1e-6) < x[g] < u[g] * ratio**2 * (1 - 1e-6)]
    floored = floor_fisher(fisher, list(sizes))  # what the allocation optimises (finite sigmas)
    marginal = {g: floored[g] * sizes[g] * bounds[g] ** 2 / x[g] ** 2 for g in sizes}
    if len(inside) > 1:
        values = [marginal[g] for g in inside]
        assert max(values) == pytest.approx(min(values), rel=1e-6)
