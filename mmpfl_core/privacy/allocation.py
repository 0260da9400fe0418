"""Per-group noise allocation: spending the privacy budget where the model is least sensitive.

What it is for: given named parameter groups g with sizes d_g, clip bounds C_g, non-negative
importance weights F_g (mean diagonal Fisher information, :mod:`mmpfl_core.privacy.fisher`) and a
target effective noise multiplier z, choose per-group noise stds sigma_g that keep the privacy of
the round fixed (z_eff = z, docs/DESIGN.md 4.1) while putting less noise on groups that matter more.

Derivation (docs/DESIGN.md 4.3). Minimise the Fisher-weighted noise energy
    J(sigma) = sum_g F_g d_g sigma_g^2    subject to    sum_g C_g^2 / sigma_g^2 = z^-2.
Write x_g = C_g^2 / sigma_g^2 (twice the zCDP cost rho_g of group g) and a_g = F_g d_g C_g^2, so
J = sum_g a_g / x_g with sum_g x_g = z^-2. By Cauchy-Schwarz,
    (sum_g sqrt(a_g))^2 = (sum_g sqrt(a_g / x_g) sqrt(x_g))^2 <= J * sum_g x_g = J z^-2,
with equality iff sqrt(a_g / x_g) is proportional to sqrt(x_g), i.e. x_g proportional to sqrt(a_g)
(the Lagrange condition a_g / x_g^2 = lambda gives the same). Hence
    C_g^2 / sigma_g^2 = z^-2 sqrt(a_g) / sum_h sqrt(a_h),
    sigma_g^2 = z^2 C_g (sum_h C_h sqrt(F_h d_h)) / sqrt(F_g d_g),
    rho_g = C_g^2 / (2 sigma_g^2) proportional to sqrt(a_g),  sum_g rho_g = 1 / (2 z^2),
and the minimum is J* = z^2 (sum_g sqrt(a_g))^2. With equal F_g and C_g = C sqrt(d_g / sum d) the
allocation is sigma_g = z C for every g: uniform isotropic noise.

Privacy argument: F_g come from the global model on the public server set (or from already
released noisy aggregates) and C_g, d_g are public, so sigma_g is a function of public quantities:
choosing it is post-processing and costs no privacy; the round is accounted with z alone. Nothing
here depends on site sample counts (there is no such argument). It releases nothing itself, and
must never be fed Fisher values or norms computed from a site's private data.

Bounded ratio (``max_noise_ratio`` r). The objective is a second-order proxy for the loss the
noise causes; under heavy noise it sends very large noise to low-Fisher groups, which then dominates
their update (docs/DESIGN.md 4.3: on ``make demo`` the unbounded allocation lost 0.04 accuracy to uniform noise). With
r, every sigma_g is kept within [sigma_u / r, r sigma_u] of the uniform std sigma_u = z C, i.e.
x_g in [x_g^u / r^2, r^2 x_g^u] with x_g^u = C_g^2 / (z C)^2. The problem stays convex: the KKT
conditions give the clipped water-filling x_g = clip(lambda sqrt(a_g), x_g^u / r^2, r^2 x_g^u), with
lambda chosen so that sum_g x_g = z^-2 (exists because the uniform point is feasible; the left-hand
side is continuous and non-decreasing in lambda). r = 1 is uniform noise; r = None the formula above.

Zero weights: a group with F_g = 0 would get sigma_g = inf (no information sent). To keep every
sigma finite, F_g is floored at ``floor_fraction`` (default 1e-3) times the mean F over the
transmitted groups; if all F_g are 0 they are treated as equal. Groups not transmitted (personal
or masked) are simply left out of ``group_sizes``: they get no sigma and spend no budget.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from collections.abc import Iterator, Mapping

from mmpfl_core.errors import PrivacyError

__all__ = [
    "NoiseAllocation",
    "clip_bounds_from_sizes",
    "check_effective_multiplier",
    "effective_multiplier",
    "effective_multiplier_of",
    "fisher_noise_allocation",
    "fisher_weighted_noise",
    "floor_fisher",
    "predicted_noise_loss",
    "uniform_noise_allocation",
]

DEFAULT_FLOOR_FRACTION = 1e-3


@dataclass(frozen=True)
class NoiseAllocation(Mapping[str, float]):
    """Per-group noise stds (a read-only mapping group -> sigma_g) with their zCDP costs.

    Attributes:
        sigmas: group -> noise std sigma_g.
        rhos: group -> zCDP cost rho_g = C_g^2 / (2 sigma_g^2); sum is 1 / (2 z^2).
        clip_bounds: group -> C_g used.
        noise_multiplier: the target z (equal to the effective multiplier of the allocation).
    """

    sigmas: dict[str, float]
    rhos: dict[str, float]
    clip_bounds: dict[str, float]
    noise_multiplier: float

    def __getitem__(self, group: str) -> float:
        return self.sigmas[group]

    def __iter__(self) -> Iterator[str]:
        return iter(self.sigmas)

    def __len__(self) -> int:
        return len(self.sigmas)

    @property
    def total_rho(self) -> float:
        return sum(self.rhos.values())


def _check_inputs(group_sizes: Mapping[str, int], clip_bounds: Mapping[str, float], noise_multiplier: float) -> None:
    if not group_sizes:
        raise PrivacyError("group_sizes is empty; pass the sizes of the transmitted groups.")
    if not 0.0 < noise_multiplier < math.inf:
        raise PrivacyError(
            f"noise_multiplier={noise_multiplier!r} must be finite and > 0; get it from calibrate_noise."
        )
    for g, d in group_sizes.items():
        if not d > 0:
            raise PrivacyError(f"group {g!r} has size {d!r}; sizes must be > 0 (leave untransmitted groups out).")
        c = clip_bounds.get(g)
        if c is None or not 0.0 < c < math.inf:
            raise PrivacyError(
                f"group {g!r} has clip bound {c!r}; every transmitted group needs "
                "a finite bound > 0 (see clip_bounds_from_sizes)."
            )


def floor_fisher(
    fisher: Mapping[str, float], groups: list[str], *, floor_fraction: float = DEFAULT_FLOOR_FRACTION
) -> dict[str, float]:
    """F_g floored at ``floor_fraction`` x mean over ``groups`` (all equal if all are 0)."""
    values = {}
    for g in groups:
        f = fisher.get(g)
        if f is None or not 0.0 <= f < math.inf:
            raise PrivacyError(
                f"Fisher weight for group {g!r} is {f!r}; it must be finite and "
                ">= 0 (compute it with group_fisher on the public set)."
            )
        values[g] = float(f)
    mean = sum(values.values()) / len(values)
    if mean == 0.0:
        return {g: 1.0 for g in groups}
    return {g: max(f, floor_fraction * mean) for g, f in values.items()}


def _allocation(sigmas: dict[str, float], clip_bounds: Mapping[str, float], z: float) -> NoiseAllocation:
    bounds = {g: float(clip_bounds[g]) for g in sigmas}
    rhos = {g: bounds[g] ** 2 / (2.0 * s**2) for g, s in sigmas.items()}
    return NoiseAllocation(sigmas=sigmas, rhos=rhos, clip_bounds=bounds, noise_multiplier=z)


def fisher_noise_allocation(
    *,
    group_sizes: Mapping[str, int],
    fisher: Mapping[str, float],
    clip_bounds: Mapping[str, float],
    noise_multiplier: float,
    floor_fraction: float = DEFAULT_FLOOR_FRACTION,
    max_noise_ratio: float | None = None,
) -> NoiseAllocation:
    """Noise stds minimising sum_g F_g d_g sigma_g^2 at effective multiplier z (module docstring).

    Algorithm:
        1. Floor F_g (finite sigmas); b_g = sqrt(F_g d_g); S = sum_h C_h b_h.
        2. sigma_g = z sqrt(C_g S / b_g).
        3. rho_g = C_g^2 / (2 sigma_g^2) = C_g b_g / (2 z^2 S).
        With ``max_noise_ratio`` r: the clipped water-filling of the module docstring instead, so
        that sigma_u / r <= sigma_g <= r sigma_u (sigma_u = z sqrt(sum_g C_g^2), the uniform std).

    Returns:
        NoiseAllocation (mapping group -> sigma_g, with ``.rhos``) over the groups of
        ``group_sizes``. Invariant to scaling all F_g by one positive constant.
    """
    _check_inputs(group_sizes, clip_bounds, noise_multiplier)
    groups = list(group_sizes)
    f = floor_fisher(fisher, groups, floor_fraction=floor_fraction)
    b = {g: math.sqrt(f[g] * group_sizes[g]) for g in groups}
    z = float(noise_multiplier)
    if max_noise_ratio is not None:
        if not 1.0 <= max_noise_ratio < math.inf:
            raise PrivacyError(
                f"max_noise_ratio={max_noise_ratio!r} must be finite and >= 1 "
                "(1 is uniform noise; None leaves the ratio unbounded)."
            )
        return _bounded_allocation(b, clip_bounds, z, float(max_noise_ratio))
    total = math.fsum(clip_bounds[g] * b[g] for g in groups)
    sigmas = {g: z * math.sqrt(clip_bounds[g] * total / b[g]) for g in groups}
    return _allocation(sigmas, clip_bounds, z)


def _bounded_allocation(
    b: Mapping[str, float], clip_bounds: Mapping[str, float], z: float, ratio: float
) -> NoiseAllocation:
    """Clipped water-filling x_g = clip(lam s_g, lo_g, hi_g) with sum_g x_g = z^-2 (module docstring).

    s_g = C_g b_g = sqrt(a_g). Bisection on log(lam) finds which groups sit at a bound; lambda is
    then solved exactly over the free groups, so the constraint holds to rounding (the strategies
    check z_eff = z to 1e-9 every round). Hand-written: a 1-D monotone root, no solver needed.
    """
    groups = list(b)
    target = z**-2
    total_clip_sq = math.fsum(clip_bounds[g] ** 2 for g in groups)
    uniform = {g: clip_bounds[g] ** 2 / (z**2 * total_clip_sq) for g in groups}  # x_g^u, sums to z^-2
    lo = {g: uniform[g] / ratio**2 for g in groups}
    hi = {g: uniform[g] * ratio**2 for g in groups}
    s = {g: clip_bounds[g] * b[g] for g in groups}

    def filled(lam: float) -> dict[str, float]:
        return {g: min(hi[g], max(lo[g], lam * s[g])) for g in groups}

    low, high = min(lo[g] / s[g] for g in groups), max(hi[g] / s[g] for g in groups)
    for _ in range(200):  # geometric bisection: lam spans many decades
        mid = math.sqrt(low * high)
        if math.fsum(filled(mid).values()) < target:
            low = mid
        else:
            high = mid
    lam = math.sqrt(low * high)
    x = filled(lam)
    free = [g for g in groups if lo[g] < lam * s[g] < hi[g]]
    if free:  # exact lambda over the free groups, bounds of the clamped ones kept
        fixed = math.fsum(x[g] for g in groups if g not in free)
        lam = (target - fixed) / math.fsum(s[g] for g in free)
        x.update({g: lam * s[g] for g in free})
    scale = target / math.fsum(x.values())  # 1 up to rounding; exact when every group is clamped
    sigmas = {g: clip_bounds[g] / math.sqrt(x[g] * scale) for g in groups}
    return _allocation(sigmas, clip_bounds, z)


def uniform_noise_allocation(
    *, group_sizes: Mapping[str, int], clip_bounds: Mapping[str, float], noise_multiplier: float
) -> NoiseAllocation:
    """Isotropic noise sigma_g = z C for every group, C = sqrt(sum_g C_g^2) (plain DP-FedAvg)."""
    _check_inputs(group_sizes, clip_bounds, noise_multiplier)
    total_clip = math.sqrt(math.fsum(clip_bounds[g] ** 2 for g in group_sizes))
    z = float(noise_multiplier)
    return _allocation({g: z * total_clip for g in group_sizes}, clip_bounds, z)


def clip_bounds_from_sizes(group_sizes: Mapping[str, int], total_clip: float) -> dict[str, float]:
    """C_g = C sqrt(d_g / sum_h d_h), so that sum_g C_g^2 = C^2 (a public, data-free rule)."""
    if not 0.0 < total_clip < math.inf:
        raise PrivacyError(f"total_clip={total_clip!r} must be finite and > 0.")
    total = sum(group_sizes.values())
    if not group_sizes or any(d <= 0 for d in group_sizes.values()):
        raise PrivacyError(f"group sizes {dict(group_sizes)} must be non-empty and all > 0.")
    return {g: total_clip * math.sqrt(d / total) for g, d in group_sizes.items()}


def fisher_weighted_noise(
    *, group_sizes: Mapping[str, int], fisher: Mapping[str, float], sigmas: Mapping[str, float]
) -> float:
    """The objective J = sum_g F_g d_g sigma_g^2 (expected Fisher-weighted squared noise)."""
    return math.fsum(float(fisher[g]) * group_sizes[g] * float(sigmas[g]) ** 2 for g in group_sizes)


def predicted_noise_loss(
    *, group_sizes: Mapping[str, int], fisher: Mapping[str, float], sigmas: Mapping[str, float], denominator: float
) -> float:
    """Second-order prediction of the loss increase (nats) one round's noise causes in the model.

    The released average carries noise xi_g ~ N(0, (sigma_g / m)^2 I) with m = ``denominator``
    (the fixed qN). Expanding the loss to second order and using the Fisher as the expected Hessian
    of the negative log-likelihood, E[L(theta + xi)] - L(theta) ~ 0.5 sum_g F_g d_g sigma_g^2 / m^2
    = J / (2 m^2). The expansion, and hence the whole Fisher allocation, is only trustworthy while
    this is small (a fraction of a nat); the strategies fall back to uniform noise beyond that.
    """
    if not denominator > 0:
        raise PrivacyError(f"denominator={denominator!r} must be > 0 (the expected participant count qN).")
    return 0.5 * fisher_weighted_noise(group_sizes=group_sizes, fisher=fisher, sigmas=sigmas) / denominator**2


#: Relative tolerance of every z_eff = z check (float round-off of the allocation, nothing more).
Z_EFF_REL_TOL = 1e-9


def effective_multiplier(clip_bounds: Mapping[str, float], sigmas: Mapping[str, float]) -> float:
    """z_eff = (sum_g C_g^2 / sigma_g^2)^(-1/2) over the groups of ``clip_bounds`` (docs/DESIGN.md 4.1).

    The per-group Gaussian releases of one clipped update compose into a single Gaussian mechanism
    with this multiplier (each group's sensitivity C_g over its noise sigma_g adds in quadrature), so
    it is what the ledger must be charged. ``inf`` when there are no groups (nothing released), 0
    when a group has sigma_g = 0 (that group leaks without bound).
    """
    if not clip_bounds:
        return math.inf
    if any(sigmas[g] == 0 for g in clip_bounds):
        return 0.0
    return math.fsum(c**2 / sigmas[g] ** 2 for g, c in clip_bounds.items()) ** -0.5


def check_effective_multiplier(
    clip_bounds: Mapping[str, float], sigmas: Mapping[str, float], noise_multiplier: float, what: str
) -> float:
    """Return z_eff of the groups of ``clip_bounds``, raising unless it equals the accounted ``noise_multiplier``.

    The one place the invariant z_eff = z is enforced (the Fisher strategies before they send sigma_g,
    :class:`~mmpfl_core.privacy.release.RoundRelease` when it is built): a mismatch means the ledger,
    which is charged for z, would not cover what is released.

    Raises:
        PrivacyError: |z_eff - z| > 1e-9 z (an allocation bug, never a user setting).
    """
    z_eff = effective_multiplier(clip_bounds, sigmas)
    if not math.isclose(z_eff, noise_multiplier, rel_tol=Z_EFF_REL_TOL):
        raise PrivacyError(
            f"{what}: (sum_g C_g^2 / sigma_g^2)^(-1/2) over the released groups is {z_eff!r}, not the "
            f"accounted noise_multiplier={noise_multiplier!r}; the ledger would not cover the release "
            "(report this bug)."
        )
    return z_eff


def effective_multiplier_of(allocation: NoiseAllocation) -> float:
    """(sum_g C_g^2 / sigma_g^2)^(-1/2) of an allocation (equals its target z)."""
    return effective_multiplier(allocation.clip_bounds, allocation.sigmas)
