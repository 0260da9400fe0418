"""Validation and norm clipping of model updates (client-level DP, docs/DESIGN.md 4.1).

What it is for: a site's update is ``dict[str, Tensor]`` (parameter name -> delta). Before anything
is released it is validated (finite, expected names, shapes and float dtypes) and clipped, flat
(McMahan et al. 2018) or group-wise (one bound C_g per named parameter group), so that its norm
is bounded by a constant that does not depend on the data. The bound is the sensitivity used by
the Gaussian mechanism in :mod:`mmpfl_core.privacy.mechanisms` and the accountants.

It must never release the pre-clipping norms it returns: they are computed from private data.
They are for local diagnostics only, or must go through a private mechanism first (adaptive
clipping releases a noisy count of "norm below bound", Andrew et al. 2021, and records it in the
ledger). Functions never modify their inputs.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import torch

from mmpfl_core.errors import PrivacyError

__all__ = ["UpdateRejected", "clip_flat", "clip_per_group", "global_norm", "group_norms", "validate_update"]

Update = Mapping[str, torch.Tensor]


class UpdateRejected(PrivacyError):
    """An update breaks the contract (NaN/Inf, unknown or missing names, wrong shape or dtype).

    A NaN would pass a ``min(1, C / norm)`` clip unchanged (the scale is 1 when the norm is NaN), so
    it must be rejected before clipping, never aggregated.
    """


def validate_update(
    update: Update, reference_shapes: Mapping[str, Sequence[int]], *, allow_missing: bool = False
) -> None:
    """Raise :class:`UpdateRejected` unless ``update`` matches ``reference_shapes``.

    Checks, naming the offending parameter: no names outside ``reference_shapes``; no missing names
    (unless ``allow_missing``, for masked or personal parameters that are not transmitted); each
    tensor has the reference shape, a floating dtype, and only finite values.
    """
    extra = sorted(set(update) - set(reference_shapes))
    if extra:
        raise UpdateRejected(
            f"update has unexpected parameters {extra[:5]}; send only the shared parameters of the global model."
        )
    missing = sorted(set(reference_shapes) - set(update))
    if missing and not allow_missing:
        raise UpdateRejected(
            f"update is missing parameters {missing[:5]}; send every shared "
            "parameter, or pass allow_missing=True for masked groups."
        )
    for name, tensor in update.items():
        if not isinstance(tensor, torch.Tensor):
            raise UpdateRejected(f"update[{name!r}] is a {type(tensor).__name__}, not a tensor.")
        if tuple(tensor.shape) != tuple(reference_shapes[name]):
            raise UpdateRejected(
                f"update[{name!r}] has shape {tuple(tensor.shape)}, expected {tuple(reference_shapes[name])}."
            )
        if not tensor.is_floating_point():
            raise UpdateRejected(
                f"update[{name!r}] has dtype {tensor.dtype}; updates must be floating point (cast before sending)."
            )
        if not bool(torch.isfinite(tensor).all()):
            raise UpdateRejected(
                f"update[{name!r}] contains NaN or Inf; reject this update "
                "(lower the learning rate or check the local data)."
            )


def _norms(tensors: list[torch.Tensor]) -> torch.Tensor:
    """Per-tensor L2 norms as one float64 CPU vector (accumulated in float64 for a safe bound)."""
    if not tensors:
        return torch.zeros(0, dtype=torch.float64)
    return torch.stack([n.cpu() for n in torch._foreach_norm(tensors, 2, dtype=torch.float64)])


def global_norm(update: Update) -> float:
    """L2 norm of the whole update, sqrt(sum over parameters of ||u_p||^2)."""
    return float(torch.linalg.vector_norm(_norms(list(update.values()))))


def _group_index(update: Update, groups: Mapping[str, Sequence[str]]) -> dict[str, str]:
    owner: dict[str, str] = {}
    for group, names in groups.items():
        for name in names:
            if name in owner:
                raise PrivacyError(
                    f"parameter {name!r} is in groups {owner[name]!r} and "
                    f"{group!r}; each parameter must belong to one group."
                )
            owner[name] = group
    orphans = sorted(set(update) - set(owner))
    if orphans:
        raise UpdateRejected(
            f"parameters {orphans[:5]} belong to no group and would be released "
            "unclipped; add them to a group or drop them from the update."
        )
    return owner


def group_norms(update: Update, groups: Mapping[str, Sequence[str]]) -> dict[str, float]:
    """L2 norm per group; a group whose parameters are all absent (masked/personal) has norm 0."""
    owner = _group_index(update, groups)
    names = list(update)
    order = list(groups)
    position = {g: i for i, g in enumerate(order)}
    index = torch.tensor([position[owner[n]] for n in names], dtype=torch.long)
    sq = torch.zeros(len(order), dtype=torch.float64)
    sq.index_add_(0, index, _norms([update[n] for n in names]) ** 2)  # (G,)
    return dict(zip(order, sq.sqrt().tolist(), strict=False))


def _check_bound(name: str, bound: float) -> None:
    if not bound >= 0.0:
        raise PrivacyError(
            f"clip bound for {name} is {bound!r}; it must be >= 0 (inf disables clipping, which gives no privacy)."
        )


def _check_finite_norm(norm: float, what: str) -> None:
    if not math.isfinite(norm):
        raise UpdateRejected(
            f"{what} has norm {norm}; the update contains NaN or Inf and must be rejected, not clipped."
        )


def clip_flat(update: Update, max_norm: float) -> tuple[dict[str, torch.Tensor], float, float]:
    """Scale the whole update to L2 norm at most ``max_norm`` (DP-FedAvg, McMahan et al. 2018).

    Algorithm:
        1. norm = ||u|| over all parameters (float64 accumulation).
        2. scale = min(1, max_norm / norm) (1 for a zero update or max_norm = inf).
        3. Return (scale * u, scale, norm). An update already within the bound is returned
           bit-for-bit unchanged (multiplication by 1.0 is exact).

    Guarantee: ||clipped|| <= max_norm up to float rounding (relative ~1e-7 in float32).

    Returns:
        (clipped update, scale, pre-clipping norm). The norm is private: never release it.
    """
    _check_bound("the update", max_norm)
    norm = global_norm(update)
    _check_finite_norm(norm, "the update")
    scale = 1.0 if norm <= max_norm else max_norm / norm
    names = list(update)
    clipped = torch._foreach_mul([update[n] for n in names], scale) if names else []
    return dict(zip(names, clipped, strict=False)), scale, norm


def clip_per_group(
    update: Update, groups: Mapping[str, Sequence[str]], clip_bounds: Mapping[str, float]
) -> tuple[dict[str, torch.Tensor], dict[str, float]]:
    """Scale each parameter group g to L2 norm at most C_g = ``clip_bounds[g]``.

    Algorithm:
        1. One fused ``_foreach_norm`` call gives every parameter's norm; squared norms are summed
           per group with ``index_add_`` (no Python loop over elements).
        2. scale_g = min(1, C_g / ||u_g||); each parameter is multiplied by its group's scale in one
           fused ``_foreach_mul``.

    Guarantees: ||clipped_g|| <= C_g for every group, hence ||clipped|| <= sqrt(sum_g C_g^2) =: C,
    the sensitivity of the round under add/remove-one-site adjacency (docs/DESIGN.md 4.1). A group whose
    parameters are absent from ``update`` (masked or personal, not transmitted) contributes zero,
    which is within its bound. Groups within their bound are unchanged bit-for-bit.

    Returns:
        (clipped update, pre-clipping norm per group). The norms are private: never release them.

    Raises:
        UpdateRejected: a parameter belongs to no group, or the update is not finite.
        PrivacyError: a present group has no bound, or a bound is negative.
    """
    norms = group_norms(update, groups)
    scales: dict[str, float] = {}
    for group, norm in norms.items():
        if norm == 0.0 and group not in clip_bounds:
            scales[group] = 1.0  # absent / all-zero group: nothing to clip
            continue
        if group not in clip_bounds:
            raise PrivacyError(
                f"group {group!r} has no clip bound; pass clip_bounds for every "
                f"transmitted group (have {sorted(clip_bounds)})."
            )
        bound = float(clip_bounds[group])
        _check_bound(f"group {group!r}", bound)
        _check_finite_norm(norm, f"group {group!r}")
        scales[group] = 1.0 if norm <= bound else bound / norm
    owner = _group_index(update, groups)
    names = list(update)
    clipped = torch._foreach_mul([update[n] for n in names], [scales[owner[n]] for n in names]) if names else []
    return dict(zip(names, clipped, strict=False)), norms
