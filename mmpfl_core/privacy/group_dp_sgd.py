"""Per-group DP-SGD: per-sample clipping per parameter group and a per-group split of the DP-SGD noise.

What it is for: patient-level DP (DP-SGD inside a site, docs/DESIGN.md 4.5) with the Fisher allocation of the
noise across parameter groups that MM-PFL-ADP uses for its client-level release (docs/DESIGN.md 4.3), so that
the groups the model is most sensitive to get the least noise at the same, exactly accounted, epsilon.

Algorithm of one step at site k (replaces step 2-3 of :mod:`mmpfl_core.privacy.dp_sgd`):
    1. Poisson batch with rate q_k (as plain DP-SGD).
    2. Per-sample gradients g_i (Opacus ``GradSampleModule``), split by parameter group g; each part
       is clipped to its own bound: c_{i,g} = g_{i,g} min(1, C_g / ||g_{i,g}||), with the public rule
       C_g = C sqrt(d_g / d) (:func:`~mmpfl_core.privacy.allocation.clip_bounds_from_sizes`), so
       sum_g C_g^2 = C^2 and ||c_i|| <= C as in plain DP-SGD.
    3. Per group: s_g = sum_i c_{i,g} + N(0, sigma_g^2 I_{d_g}), then g = s / B (B the expected batch).
    4. An optimiser step with g.

Noise split. sigma_g = the allocation of :mod:`mmpfl_core.privacy.allocation` (the same functions as the
client-level release, not a copy) at the site's DP-SGD multiplier z_k: ``"fisher"``, the bounded Fisher
allocation (sigma_g within ``max_noise_ratio`` of the uniform z_k C), or ``"uniform"`` (sigma_g = z_k C,
the ablation). Both are linear in z_k.

Privacy argument. Under add/remove-one-patient the per-group sums s_g move by one clipped part, of
norm at most C_g. Dividing group g by sigma_g turns the step into the isotropic Gaussian mechanism
N(0, I) on a vector whose L2 sensitivity is (sum_g C_g^2 / sigma_g^2)^(1/2) = 1 / z_eff, so the step is
a Poisson-subsampled Gaussian mechanism with multiplier
    z_eff = (sum_g C_g^2 / sigma_g^2)^(-1/2)       (:func:`~mmpfl_core.privacy.allocation.effective_multiplier`)
and rate q_k. The allocation is built so that z_eff = z_k, checked to 1e-9 when the site's settings
are built (:class:`GroupNoise`), and the site's ledger is charged with z_eff and q_k
(:meth:`~mmpfl_core.privacy.dp_sgd.SampleLevelDP.record`). Per-group clipping is what makes this hold:
noise that differs by group WITHOUT group-wise clipping must be accounted at its smallest level (one
patient could put all of C into the least-noised group; the distinguishing test flags that variant).

What the allocation may depend on: the groups, their sizes d_g, C, z_k and the Fisher weights F_g of the
released global model on the server's PUBLIC set (the caller passes them; :mod:`~mmpfl_core.privacy.fisher`),
so sigma_g is post-processing of public quantities and costs no privacy. It must never be given a
Fisher or a norm computed from a site's patients (tested: removing a private patient leaves the
allocation bit-identical).

Why not Opacus' ``clipping="per_layer"`` (``DPPerLayerOptimizer``, a list of ``max_grad_norm``): it clips
every parameter TENSOR to its own bound, not a group of tensors (an MM-PFL-ADP group is a transformer
block, a patch embedding, ...), and it adds the one std z sqrt(sum_p C_p^2) to every tensor, so neither
the group norm nor a per-group noise is expressible with it. :class:`GroupDPOptimizer` therefore
subclasses Opacus' ``DPOptimizer`` and overrides exactly its two steps that change,
``clip_and_accumulate`` and ``add_noise``; Opacus keeps the per-sample gradients, the empty-batch and
accumulation handling, the 1 / B scaling and ``pre_step``.

Must never release: per-sample gradients or group norms, the noise or its seed (as plain DP-SGD).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from mmpfl_core.errors import ConfigError, PrivacyError
from mmpfl_core.privacy.allocation import (
    NoiseAllocation,
    check_effective_multiplier,
    clip_bounds_from_sizes,
    effective_multiplier,
    fisher_noise_allocation,
    uniform_noise_allocation,
)
from mmpfl_core.privacy.randomness import secure_standard_normal

__all__ = [
    "GROUP_ALLOCATIONS",
    "GroupDPSGDPlan",
    "GroupNoise",
    "make_group_optimizer",
    "patients_per_noise",
    "plan_group_dp_sgd",
    "realised_effective_multiplier",
]

#: How the DP-SGD noise is split over groups: the Fisher allocation, or uniform (the ablation).
GROUP_ALLOCATIONS = ("fisher", "uniform")


@dataclass(frozen=True)
class GroupNoise:
    """One site's public per-group DP-SGD settings: the groups, C_g, sigma_g and the accounted z_eff.

    Attributes:
        groups: group -> names of its parameters (every trainable parameter in exactly one group).
        clip_bounds: group -> C_g (per-sample bound of the group's part of a gradient).
        sigmas: group -> sigma_g (std per coordinate of the noise added to the group's clipped SUM).
        noise_multiplier: z_eff = (sum_g C_g^2 / sigma_g^2)^(-1/2), what the ledger is charged with.
        allocation: ``"fisher"`` or ``"uniform"`` (for reports).

    Raises:
        PrivacyError: when the groups, bounds and stds disagree, or when z_eff of (C_g, sigma_g) is not
            ``noise_multiplier`` (:func:`~mmpfl_core.privacy.allocation.check_effective_multiplier`).
    """

    groups: Mapping[str, tuple[str, ...]]
    clip_bounds: Mapping[str, float]
    sigmas: Mapping[str, float]
    noise_multiplier: float
    allocation: str

    def __post_init__(self) -> None:
        if not (set(self.groups) == set(self.clip_bounds) == set(self.sigmas)) or not self.groups:
            raise PrivacyError(
                f"per-group DP-SGD: groups {sorted(self.groups)}, clip bounds {sorted(self.clip_bounds)} and "
                f"noise stds {sorted(self.sigmas)} must name the same non-empty set of groups."
            )
        check_effective_multiplier(
            self.clip_bounds, self.sigmas, self.noise_multiplier, "per-group DP-SGD noise of a site"
        )

    @property
    def max_grad_norm(self) -> float:
        """C = sqrt(sum_g C_g^2): the bound of a whole clipped per-sample gradient."""
        return math.sqrt(math.fsum(c**2 for c in self.clip_bounds.values()))

    def group_of(self) -> dict[str, str]:
        """Parameter name -> its group (each name in one group, else PrivacyError)."""
        out: dict[str, str] = {}
        for g, names in self.groups.items():
            for n in names:
                if n in out:
                    raise PrivacyError(f"parameter {n!r} is in groups {out[n]!r} and {g!r}; groups must be disjoint.")
                out[n] = g
        return out


def _allocate(
    allocation: str,
    *,
    group_sizes: Mapping[str, int],
    clip_bounds: Mapping[str, float],
    fisher: Mapping[str, float] | None,
    max_noise_ratio: float | None,
    noise_multiplier: float,
) -> NoiseAllocation:
    """sigma_g at multiplier z by the client-level allocation functions (z_eff = z by construction)."""
    if allocation == "uniform":
        return uniform_noise_allocation(
            group_sizes=group_sizes, clip_bounds=clip_bounds, noise_multiplier=noise_multiplier
        )
    assert fisher is not None  # checked by plan_group_dp_sgd
    return fisher_noise_allocation(
        group_sizes=group_sizes,
        fisher=fisher,
        clip_bounds=clip_bounds,
        noise_multiplier=noise_multiplier,
        max_noise_ratio=max_noise_ratio,
    )


@dataclass(frozen=True)
class GroupDPSGDPlan:
    """One round's public plan of per-group DP-SGD (the same for every site); built by :func:`plan_group_dp_sgd`.

    ``unit`` is the allocation at z = 1 (what the noise gate reads); a site with multiplier z_k gets its
    own allocation at z_k (:meth:`noise_for`; both allocations are linear in z, so sigma_g = z_k unit_g
    up to rounding).
    """

    allocation: str
    groups: Mapping[str, tuple[str, ...]]
    group_sizes: Mapping[str, int]
    clip_bounds: Mapping[str, float]
    fisher: Mapping[str, float] | None
    max_noise_ratio: float | None
    unit: NoiseAllocation

    def noise_for(self, noise_multiplier: float) -> GroupNoise:
        """The settings of a site whose DP-SGD multiplier is z_k = ``noise_multiplier`` (z_eff = z_k, checked)."""
        alloc = _allocate(
            self.allocation,
            group_sizes=self.group_sizes,
            clip_bounds=self.clip_bounds,
            fisher=self.fisher,
            max_noise_ratio=self.max_noise_ratio,
            noise_multiplier=noise_multiplier,
        )
        return GroupNoise(
            groups=dict(self.groups),
            clip_bounds=dict(alloc.clip_bounds),
            sigmas=dict(alloc.sigmas),
            noise_multiplier=float(noise_multiplier),
            allocation=self.allocation,
        )


def plan_group_dp_sgd(
    *,
    allocation: str,
    groups: Mapping[str, Sequence[str]],
    group_sizes: Mapping[str, int],
    max_grad_norm: float,
    fisher: Mapping[str, float] | None = None,
    max_noise_ratio: float | None = 2.0,
) -> GroupDPSGDPlan:
    """The public per-group plan: C_g = C sqrt(d_g / d) and the split of the noise.

    Args:
        allocation: ``"fisher"`` (needs ``fisher``) or ``"uniform"``.
        groups, group_sizes: the trainable parameter groups and their sizes d_g (the model's shapes).
        max_grad_norm: C, the per-sample bound of the whole gradient.
        fisher: F_g of the released global model on the PUBLIC set (never a site's data: module docstring).
        max_noise_ratio: r of the bounded Fisher allocation (None: unbounded; ignored by ``"uniform"``).
    """
    if allocation not in GROUP_ALLOCATIONS:
        raise ConfigError(f"group_allocation={allocation!r} is unknown; use one of {list(GROUP_ALLOCATIONS)}.")
    if allocation == "fisher" and fisher is None:
        raise ConfigError("group_allocation='fisher' needs the public-set Fisher weights (fisher=...).")
    if set(groups) != set(group_sizes):
        raise ConfigError(f"groups {sorted(groups)} and group_sizes {sorted(group_sizes)} must name the same groups.")
    bounds = clip_bounds_from_sizes(group_sizes, max_grad_norm)
    weights = None if fisher is None or allocation == "uniform" else {g: float(fisher[g]) for g in group_sizes}
    unit = _allocate(
        allocation,
        group_sizes=group_sizes,
        clip_bounds=bounds,
        fisher=weights,
        max_noise_ratio=max_noise_ratio,
        noise_multiplier=1.0,
    )
    check_effective_multiplier(unit.clip_bounds, unit.sigmas, 1.0, "per-group DP-SGD plan")
    return GroupDPSGDPlan(
        allocation=allocation,
        groups={g: tuple(ns) for g, ns in groups.items()},
        group_sizes=dict(group_sizes),
        clip_bounds=bounds,
        fisher=weights,
        max_noise_ratio=max_noise_ratio,
        unit=unit,
    )


def patients_per_noise(sites: Sequence[tuple[int, int, float]], expected_sites: float) -> float:
    """A: patients a round aggregates per unit of noise, for the noise gate under per-group DP-SGD.

    ``sites``: (steps per round S_k, expected batch B_k, multiplier z_k) of every site; ``expected_sites``:
    m = qN, the sites a round averages (fixed denominator). Derivation: one step of site k sums B_k
    clipped per-sample parts (best case all aligned: signal B_k C_g) with N(0, (z_k s_g)^2 I_{d_g}) and
    divides by B_k; S_k such steps make the site's update, and the round averages m sites (Poisson, so
    in expectation m / N of every site). Best-case signal per round C_g mean_k(S_k) (learning rate
    aside), noise norm sqrt(d_g) s_g sqrt(mean_k(S_k z_k^2 / B_k^2) / m). Hence the gate's statistic

        snr_g = sqrt(T) A C_g / (s_g sqrt(d_g)),   A = sqrt(m) mean_k(S_k) / sqrt(mean_k(S_k z_k^2 / B_k^2)),

    :func:`~mmpfl_core.personalization.noise_gate.release_snr` with ``expected_participants`` = A and the
    unit allocation s_g (sigma_g at z = 1). With equal sites A = B sqrt(m S) / z: a round aggregates
    P = m S B patients' gradients and D = m S independent noise draws, and A = P / (z sqrt(D)); the
    client-level release, one draw added to the sum of m sites' updates (P = m, D = 1), gives A = m / z,
    the gate's formula for it.
    Inputs: the DP-SGD settings (C, z_k, B, S_k: the same quantities that set q_k = B / n_k and that the
    kit's DP-SGD treats as public, :mod:`mmpfl_core.privacy.dp_sgd`) and qN; no patient's data.
    """
    if not sites:
        raise ConfigError("patients_per_noise needs the DP-SGD settings of at least one site.")
    if not expected_sites > 0:
        raise ConfigError(f"expected_sites={expected_sites!r} must be > 0 (it is qN).")
    for steps, batch, z in sites:
        if steps < 1 or batch < 1 or not 0 < z < math.inf:
            raise ConfigError(f"site DP-SGD settings steps={steps!r}, batch={batch!r}, z={z!r}: need >= 1, >= 1, > 0.")
    mean_steps = math.fsum(s for s, _, _ in sites) / len(sites)
    mean_noise = math.fsum(s * z**2 / b**2 for s, b, z in sites) / len(sites)
    return math.sqrt(expected_sites) * mean_steps / math.sqrt(mean_noise)


def _group_optimizer_class() -> type:
    """``GroupDPOptimizer`` (built lazily: opacus is imported only when DP-SGD is used)."""
    from opacus.optimizers import DPOptimizer
    from opacus.optimizers.optimizer import _check_processed_flag, _generate_noise, _mark_as_processed

    class GroupDPOptimizer(DPOptimizer):
        """Opacus ``DPOptimizer`` with per-sample clipping per group (C_g) and per-group noise (sigma_g).

        ``noise_multiplier`` is z_eff and ``max_grad_norm`` is C = sqrt(sum_g C_g^2) (what Opacus reports);
        the noise of group g is N(0, sigma_g^2) per coordinate, from the OS CSPRNG (``secure=True``) or
        from ``generator`` (reproducible, NOT private).
        """

        def __init__(
            self,
            optimizer: torch.optim.Optimizer,
            *,
            group_noise: GroupNoise,
            param_groups: Sequence[str],
            expected_batch_size: int,
            generator: torch.Generator | None,
            secure: bool,
        ) -> None:
            super().__init__(
                optimizer,
                noise_multiplier=group_noise.noise_multiplier,
                max_grad_norm=group_noise.max_grad_norm,
                expected_batch_size=expected_batch_size,
                loss_reduction="mean",
                generator=generator,
            )
            if len(param_groups) != len(self.params):
                raise PrivacyError(
                    f"per-group DP-SGD: {len(param_groups)} group labels for {len(self.params)} parameters."
                )
            self.group_noise, self.param_group_names, self.secure = group_noise, list(param_groups), secure

        def clip_and_accumulate(self) -> None:
            """summed_grad_p = sum_i min(1, C_g / ||g_{i,g}||) g_{i,p} for p in group g (one factor per sample
            and group; the same 1e-6 guard as Opacus)."""
            flat = [self._get_flat_grad_sample(p) for p in self.params]
            n = len(flat[0])
            squares: dict[str, torch.Tensor] = {}
            for g, gs in zip(self.param_group_names, flat, strict=True):
                sq = (
                    gs.to(torch.float64).pow(2).reshape(n, -1).sum(dim=1) if n else gs.new_zeros(0, dtype=torch.float64)
                )
                squares[g] = sq if g not in squares else squares[g] + sq
            factors = {
                g: (self.group_noise.clip_bounds[g] / (sq.sqrt() + 1e-6)).clamp(max=1.0) for g, sq in squares.items()
            }
            for p, g, gs in zip(self.params, self.param_group_names, flat, strict=True):
                _check_processed_flag(p.grad_sample)
                gs = gs.to(p.dtype)
                grad = torch.einsum("i,i...", factors[g].to(gs.device, p.dtype), gs)
                p.summed_grad = grad if p.summed_grad is None else p.summed_grad + grad
                _mark_as_processed(p.grad_sample)

        def add_noise(self) -> None:
            """p.grad = summed_grad + N(0, sigma_g^2 I) for p in group g."""
            for p, g in zip(self.params, self.param_group_names, strict=True):
                _check_processed_flag(p.summed_grad)
                std = float(self.group_noise.sigmas[g])
                if self.secure:
                    noise = secure_standard_normal(p.summed_grad.shape, dtype=torch.float64) * std
                    noise = noise.to(p.summed_grad.device, p.summed_grad.dtype)
                else:
                    noise = _generate_noise(std=std, reference=p.summed_grad, generator=self.generator)
                p.grad = (p.summed_grad + noise).view_as(p)
                _mark_as_processed(p.summed_grad)

    return GroupDPOptimizer


def make_group_optimizer(
    *,
    module: nn.Module,
    optimizer: torch.optim.Optimizer,
    group_noise: GroupNoise,
    expected_batch_size: int,
    generator: torch.Generator | None,
    secure: bool,
) -> Any:
    """A :class:`GroupDPOptimizer` over ``optimizer``'s parameters, each labelled with its group.

    Raises:
        PrivacyError: a trainable parameter of ``optimizer`` is in no group (it would be released
            unclipped and unnoised), or a parameter is not a parameter of ``module``.
    """
    name_of = {id(p): n for n, p in module.named_parameters()}
    group_of = group_noise.group_of()
    labels = []
    for pg in optimizer.param_groups:
        for p in pg["params"]:
            if not p.requires_grad:
                continue
            name = name_of.get(id(p))
            if name is None or name not in group_of:
                raise PrivacyError(
                    f"per-group DP-SGD: parameter {name or '<not in the module>'!r} is in no group of "
                    f"{sorted(group_noise.groups)}; every trainable parameter must be clipped and noised "
                    "with its group (freeze it, or build the plan from the model's parameter_groups())."
                )
            labels.append(group_of[name])
    return _group_optimizer_class()(
        optimizer,
        group_noise=group_noise,
        param_groups=labels,
        expected_batch_size=expected_batch_size,
        generator=generator,
        secure=secure,
    )


def realised_effective_multiplier(group_noise: GroupNoise) -> float:
    """(sum_g C_g^2 / sigma_g^2)^(-1/2) of the stds the optimiser draws (== ``group_noise.noise_multiplier``)."""
    return effective_multiplier(group_noise.clip_bounds, group_noise.sigmas)
