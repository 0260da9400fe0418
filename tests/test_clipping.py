"""Clipping: bounds hold for random updates, identity cases are exact, bad updates rejected."""
from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from mmpfl_core.errors import PrivacyError
from mmpfl_core.privacy.clipping import (
    UpdateRejected,
    clip_flat,
    clip_per_group,
    global_norm,
    group_norms,
    validate_update,
)

GROUPS = {"encoder": ["enc.w", "enc.b"], "head": ["head.w"], "personal": ["adapter.w"]}
SHAPES = {"enc.w": (6, 4), "enc.b": (6,), "head.w": (3, 6), "adapter.w": (5,)}


def make_update(seed: int, scale: float) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {k: scale * torch.randn(s, generator=g) for k, s in SHAPES.items()}


@settings(max_examples=60, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), scale=st.floats(1e-4, 1e4),
       bounds=st.lists(st.floats(1e-3, 1e3), min_size=3, max_size=3),
       drop_personal=st.booleans())
def test_group_clipping_never_exceeds_bounds(seed, scale, bounds, drop_personal):
    update = make_update(seed, scale)
    if drop_personal:
        del update["adapter.w"]  # a masked / personal group absent from the update
    clip = dict(zip(GROUPS, bounds))
    clipped, norms = clip_per_group(update, GROUPS, clip)
    after = group_norms(clipped, GROUPS)
    for g, c in clip.items():
        assert after[g] <= c * (1 + 1e-6)
        if norms[g] <= c:
            for name in GROUPS[g]:
                if name in update:
                    assert torch.equal(clipped[name], update[name])
    assert global_norm(clipped) <= math.sqrt(sum(c**2 for c in bounds)) * (1 + 1e-6)
    if drop_personal:
        assert norms["personal"] == 0.0


@settings(max_examples=60, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), scale=st.floats(1e-4, 1e4), bound=st.floats(1e-3, 1e3))
def test_flat_clipping_never_exceeds_bound(seed, scale, bound):
    update = make_update(seed, scale)
    clipped, factor, norm = clip_flat(update, bound)
    assert global_norm(clipped) <= bound * (1 + 1e-6)
    assert 0.0 < factor <= 1.0
    assert norm == pytest.approx(global_norm(update))


def test_below_bound_and_infinite_bound_are_exact_identity():
    update = make_update(0, 0.01)
    clipped, factor, _ = clip_flat(update, 100.0)
    assert factor == 1.0 and all(torch.equal(clipped[k], update[k]) for k in update)
    big = make_update(1, 1e6)
    clipped, factor, _ = clip_flat(big, math.inf)
    assert factor == 1.0 and all(torch.equal(clipped[k], big[k]) for k in big)
    clipped, _ = clip_per_group(big, GROUPS, {g: math.inf for g in GROUPS})
    assert all(torch.equal(clipped[k], big[k]) for k in big)
    # inputs are not modified
    before = {k: v.clone() for k, v in big.items()}
    clip_per_group(big, GROUPS, {g: 1.0 for g in GROUPS})
    assert all(torch.equal(before[k], big[k]) for k in big)


def test_zero_update_and_zero_bound():
    zero = {k: torch.zeros(s) for k, s in SHAPES.items()}
    clipped, factor, norm = clip_flat(zero, 1.0)
    assert norm == 0.0 and factor == 1.0
    clipped, _ = clip_per_group(make_update(2, 1.0), GROUPS, {"encoder": 0.0, "head": 1.0,
                                                               "personal": 1.0})
    assert float(clipped["enc.w"].abs().sum()) == 0.0


@pytest.mark.parametrize("mutate,fragment", [
    (lambda u: u["enc.w"].__setitem__((0, 0), float("nan")), "enc.w.*NaN"),
    (lambda u: u["head.w"].__setitem__((0, 0), float("inf")), "head.w.*NaN or Inf"),
    (lambda u: u.__setitem__("enc.b", torch.zeros(7)), r"enc.b.*shape \(7,\)"),
    (lambda u: u.__setitem__("enc.b", torch.zeros(6, dtype=torch.long)), "enc.b.*dtype"),
    (lambda u: u.__setitem__("rogue", torch.zeros(1)), "unexpected parameters"),
    (lambda u: u.pop("head.w"), "missing parameters"),
])
def test_validate_update_rejects(mutate, fragment):
    update = make_update(3, 1.0)
    mutate(update)
    with pytest.raises(UpdateRejected, match=fragment):
        validate_update(update, SHAPES)
    assert issubclass(UpdateRejected, PrivacyError)


def test_validate_allows_missing_when_masked_and_clip_rejects_nan():
    update = make_update(4, 1.0)
    del update["adapter.w"]
    validate_update(update, SHAPES, allow_missing=True)
    update["enc.w"][0, 0] = float("nan")
    with pytest.raises(UpdateRejected):
        clip_flat(update, 1.0)
    with pytest.raises(UpdateRejected):
        clip_per_group(update, GROUPS, {g: 1.0 for g in GROUPS})


def test_parameter_outside_groups_and_missing_bound_raise():
    update = make_update(5, 1.0)
    with pytest.raises(UpdateRejected, match="belong to no group"):
        clip_per_group(update, {"encoder": ["enc.w", "enc.b"]}, {"encoder": 1.0})
    with pytest.raises(PrivacyError, match="no clip bound"):
        clip_per_group(update, GROUPS, {"encoder": 1.0, "personal": 1.0})
