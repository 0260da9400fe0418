"""Privacy accounting for Poisson-subsampled Gaussian releases (pure maths, no torch state).

What it is for: turning (noise multiplier z, sampling rate q, number of releases T, delta) into an
epsilon, the inverse (calibrating z for a target budget), and the composition of heterogeneous
releases. Three accountants, chosen by name through a registry:

* ``"rdp"``: Renyi DP of the subsampled Gaussian (Mironov 2017; Mironov, Talwar, Zhang 2019),
  via Opacus. Fast, always a valid upper bound, loose by 8-18 % in few-step, large-q settings.
* ``"prv"`` (default): numerical composition of privacy loss random variables (Gopi et al. 2021),
  via Opacus. Returns the *upper* end of its error interval (``eps_error=0.01``).
* ``"pld"``: privacy loss distributions via Google's ``dp_accounting`` (pessimistic estimate).

All three account for add/remove-one adjacency of the unit that is sampled (a site for client-level
DP, McMahan et al. 2018; a patient for DP-SGD, Abadi et al. 2016). A Gaussian mechanism here means
sensitivity-1 sums with N(0, z^2) noise per coordinate; group-wise clipping and noise are first
reduced to one multiplier by :func:`effective_noise_multiplier` (docs/DESIGN.md 4.1).

This module releases nothing: it only computes numbers about mechanisms described to it.
"""

from __future__ import annotations

import math
import warnings
from functools import lru_cache
from collections.abc import Callable, Sequence

import numpy as np

from mmpfl_core.errors import PrivacyError

__all__ = [
    "ACCOUNTANTS",
    "calibrate_noise",
    "combine_noise_multipliers",
    "compose_epsilon",
    "compute_epsilon",
    "effective_noise_multiplier",
]

Release = tuple[float, float, int]  # (noise_multiplier, sample_rate, steps)

_MAX_NOISE = 1e6  # calibration gives up above this multiplier (as Opacus's get_noise_multiplier)


def _opacus_epsilon(mechanism: str) -> Callable[[list[Release], float], float]:
    def epsilon(history: list[Release], delta: float) -> float:
        from opacus.accountants import create_accountant

        acc = create_accountant(mechanism=mechanism)
        acc.history = list(history)
        # Opacus's PRV takes log(0) for q = 1 and overflows exp() far in the tails; both are
        # handled (masked, or an inf result caught in compose_epsilon), so keep numpy quiet here
        # only, for this call only.
        with np.errstate(divide="ignore", over="ignore", invalid="ignore"):
            return float(acc.get_epsilon(delta=delta))

    return epsilon


@lru_cache(maxsize=4096)
def _rdp_of_one_step(noise_multiplier: float, sample_rate: float) -> np.ndarray:
    """RDP curve of one subsampled Gaussian step at Opacus's default orders (cached: a run's ledger asks
    for the same (z, q) every round, and the fractional orders are slow to evaluate for q < 1)."""
    from opacus.accountants.analysis.rdp import compute_rdp
    from opacus.accountants.rdp import RDPAccountant

    curve = compute_rdp(q=sample_rate, noise_multiplier=noise_multiplier, steps=1, orders=RDPAccountant.DEFAULT_ALPHAS)
    curve = np.asarray(curve, dtype=np.float64)
    curve.setflags(write=False)
    return curve


def _rdp_epsilon(history: list[Release], delta: float) -> float:
    """Opacus's RDP accountant, evaluated the same way: RDP adds over steps and releases
    (compute_rdp(steps=T) is T times the one-step curve), then the optimal order is chosen."""
    from opacus.accountants.analysis.rdp import get_privacy_spent
    from opacus.accountants.rdp import RDPAccountant

    rdp = sum(steps * _rdp_of_one_step(float(z), float(q)) for z, q, steps in history)
    epsilon, _ = get_privacy_spent(orders=RDPAccountant.DEFAULT_ALPHAS, rdp=rdp, delta=delta)
    return float(epsilon)


def _pld_epsilon(history: list[Release], delta: float) -> float:
    import dp_accounting
    from dp_accounting.pld import PLDAccountant

    events = [
        dp_accounting.SelfComposedDpEvent(
            dp_accounting.PoissonSampledDpEvent(q, dp_accounting.GaussianDpEvent(z)), steps
        )
        for z, q, steps in history
    ]
    acc = PLDAccountant()
    acc.compose(dp_accounting.ComposedDpEvent(events))
    return float(acc.get_epsilon(delta))


#: Registry of accountants: name -> function(history, delta) -> epsilon. ``history`` is a list of
#: (noise_multiplier, sample_rate, steps) with noise_multiplier > 0 and steps > 0.
ACCOUNTANTS: dict[str, Callable[[list[Release], float], float]] = {
    "rdp": _rdp_epsilon,
    "prv": _opacus_epsilon("prv"),
    "pld": _pld_epsilon,
}


def _check_accountant(accountant: str) -> None:
    if accountant not in ACCOUNTANTS:
        raise PrivacyError(f"accountant={accountant!r} is unknown; use one of {sorted(ACCOUNTANTS)}.")


def _check_delta(delta: float) -> None:
    if not 0.0 < delta < 1.0:
        raise PrivacyError(
            f"delta={delta!r} must lie in (0, 1); use e.g. 1e-5 or less than 1/(number of sites or patients)."
        )


def _check_release(noise_multiplier: float, sample_rate: float, steps: int) -> None:
    if not noise_multiplier >= 0.0 or math.isinf(noise_multiplier):
        raise PrivacyError(
            f"noise_multiplier={noise_multiplier!r} must be a finite number >= 0; "
            "pass the noise std divided by the clipping bound."
        )
    if not 0.0 < sample_rate <= 1.0:
        raise PrivacyError(
            f"sample_rate={sample_rate!r} must lie in (0, 1]; pass the Poisson "
            "sampling probability (1.0 when every unit takes part)."
        )
    if int(steps) != steps or steps < 0:
        raise PrivacyError(f"steps={steps!r} must be an integer >= 0 (the number of releases).")


def _merge(releases: Sequence[Release]) -> list[Release]:
    """Group identical (z, q) pairs into one history item with summed steps; drop steps == 0."""
    merged: dict[tuple[float, float], int] = {}
    for z, q, steps in releases:
        if steps > 0:
            key = (float(z), float(q))
            merged[key] = merged.get(key, 0) + int(steps)
    return [(z, q, steps) for (z, q), steps in merged.items()]


def compose_epsilon(*, releases: Sequence[Release], delta: float, accountant: str = "prv") -> float:
    """Epsilon of the adaptive composition of heterogeneous subsampled Gaussian releases.

    Algorithm:
        1. Validate every (noise_multiplier, sample_rate, steps) triple and delta.
        2. Drop releases with steps == 0; merge identical (z, q) into one item with summed steps
           (composition is commutative, and PRV is much faster with few distinct items).
        3. If any remaining release has z == 0 it is not private: return ``inf``.
        4. Ask the accountant for epsilon at ``delta`` of the whole history.

    Args:
        releases: (noise_multiplier, sample_rate, steps) for each kind of release.
        delta: target delta in (0, 1).
        accountant: one of ``ACCOUNTANTS`` ("prv", "rdp", "pld").

    Returns:
        epsilon >= 0 (0.0 for an empty history, ``inf`` if some release had no noise).

    Raises:
        PrivacyError: on an invalid parameter or unknown accountant.
    """
    _check_accountant(accountant)
    _check_delta(delta)
    for z, q, steps in releases:
        _check_release(z, q, steps)
    history = _merge(releases)
    if not history:
        return 0.0
    if any(z == 0.0 for z, _, _ in history):
        return math.inf
    # Composition is commutative, so the sorted merged history is the whole question.
    return _epsilon_of_history(tuple(sorted(history)), float(delta), accountant)


@lru_cache(maxsize=1)
def _blas_controller():
    """One threadpoolctl controller for the process (building one scans the loaded libraries: ms)."""
    from threadpoolctl import ThreadpoolController

    return ThreadpoolController()


@lru_cache(maxsize=4096)
def _epsilon_of_history(history: tuple[Release, ...], delta: float, accountant: str) -> float:
    """Epsilon of a validated, merged, sorted history (cached: a DP run asks the same question twice a
    round, once in the budget check before the release and once in the report after it, and PRV or
    PLD take 0.02-1.5 s per question; calibrations and site sweeps repeat questions too).

    The accountants run with numpy's BLAS on one thread. Why: OpenBLAS worker threads spin for a
    while after a call, and on a small machine they took the cores from the local training that
    follows the budget check (bench/client_dp_overhead.py: the first site's training took twice as
    long after a PRV query on 2 cores, DP-FedAvg 1.28x FedAvg per round).
    """
    with _blas_controller().limit(limits=1, user_api="blas"):
        try:
            eps = ACCOUNTANTS[accountant](list(history), delta)
        except (ValueError, OverflowError, MemoryError) as exc:
            if accountant == "rdp":
                raise
            # PRV's discretisation domain grows without bound as z -> 0 (numpy refuses the array).
            eps = _rdp_fallback(accountant, history, delta, f"raised {type(exc).__name__}: {exc}")
        if not math.isfinite(eps) and accountant != "rdp":
            # The PRV discretisation can overflow for huge epsilons (e.g. z=0.8, q=1, T=1000).
            eps = _rdp_fallback(accountant, history, delta, f"returned {eps}")
    return max(0.0, float(eps))


def _rdp_fallback(accountant: str, history: tuple[Release, ...], delta: float, what: str) -> float:
    """RDP is always a valid upper bound, so it stands in when a numerical accountant fails."""
    warnings.warn(
        f"{accountant} accountant {what} for {list(history)}; using the RDP upper bound instead.",
        RuntimeWarning,
        stacklevel=4,
    )
    return ACCOUNTANTS["rdp"](list(history), delta)


def compute_epsilon(
    *, noise_multiplier: float, sample_rate: float, steps: int, delta: float, accountant: str = "prv"
) -> float:
    """Epsilon after ``steps`` Poisson-subsampled Gaussian releases with multiplier z and rate q.

    Returns 0.0 for ``steps == 0`` and ``inf`` for ``noise_multiplier == 0`` with steps > 0.
    For client-level DP, q is the site sampling rate and steps the number of rounds
    (McMahan et al. 2018); for DP-SGD, q is the patient sampling rate and steps the optimiser
    steps (Abadi et al. 2016).

    Raises:
        PrivacyError: delta outside (0, 1), sample_rate outside (0, 1], noise < 0, steps < 0, or
            an unknown accountant.
    """
    return compose_epsilon(releases=[(noise_multiplier, sample_rate, steps)], delta=delta, accountant=accountant)


def calibrate_noise(
    *,
    target_epsilon: float,
    target_delta: float,
    sample_rate: float,
    steps: int,
    accountant: str = "prv",
    epsilon_tolerance: float = 0.01,
) -> float:
    """Smallest noise multiplier (up to tolerance) whose epsilon does not exceed the target.

    Algorithm (as Opacus's ``get_noise_multiplier``, but for every accountant of the registry):
        1. Double z_high from 1 until epsilon(z_high) <= target_epsilon (give up above 1e6).
        2. Bisect [z_low, z_high], keeping epsilon(z_high) <= target_epsilon, until
           target_epsilon - epsilon(z_high) <= epsilon_tolerance.
        3. Return z_high: ``compute_epsilon(z_high) <= target_epsilon`` always holds.

    Returns:
        The noise multiplier (0.0 when ``steps == 0``: nothing is released).

    Raises:
        PrivacyError: target_epsilon <= 0, invalid delta/rate/steps/tolerance, or a budget so small
            that z > 1e6 would be needed.
    """
    if not target_epsilon > 0.0 or math.isinf(target_epsilon):
        raise PrivacyError(
            f"target_epsilon={target_epsilon!r} must be a finite number > 0; "
            "choose a positive privacy budget such as 1, 3 or 8."
        )
    if not epsilon_tolerance > 0.0:
        raise PrivacyError(f"epsilon_tolerance={epsilon_tolerance!r} must be > 0, e.g. 0.01.")
    _check_accountant(accountant)
    _check_delta(target_delta)
    _check_release(0.0, sample_rate, steps)
    if steps == 0:
        return 0.0

    def eps(z: float) -> float:
        return compute_epsilon(
            noise_multiplier=z, sample_rate=sample_rate, steps=steps, delta=target_delta, accountant=accountant
        )

    z_low, z_high = 0.0, 1.0
    eps_high = eps(z_high)
    while eps_high > target_epsilon:
        z_low, z_high = z_high, 2.0 * z_high
        if z_high > _MAX_NOISE:
            raise PrivacyError(
                f"target_epsilon={target_epsilon} at delta={target_delta} needs a "
                f"noise multiplier above {_MAX_NOISE:g} for q={sample_rate}, "
                f"steps={steps}; increase the budget or reduce the steps."
            )
        eps_high = eps(z_high)
    while target_epsilon - eps_high > epsilon_tolerance and z_high - z_low > 1e-9 * z_high:
        z_mid = 0.5 * (z_low + z_high)
        eps_mid = eps(z_mid)
        if eps_mid <= target_epsilon:
            z_high, eps_high = z_mid, eps_mid
        else:
            z_low = z_mid
    return z_high


def effective_noise_multiplier(clip_bounds: Sequence[float], noise_stds: Sequence[float]) -> float:
    """Single multiplier of a release clipped and noised group-wise (docs/DESIGN.md 4.1).

    Derivation: a participant's update u is clipped per group, ||u_g|| <= C_g, and the release is
    u + N(0, diag(sigma_g^2)). Whitening by D = diag(sigma_g) (an invertible, data-independent map,
    so post-processing in both directions) gives D^-1 u + N(0, I). The whitened update has norm
    ||D^-1 u||^2 = sum_g ||u_g||^2 / sigma_g^2 <= sum_g C_g^2 / sigma_g^2 =: Delta^2, so the round is
    the Gaussian mechanism with sensitivity Delta and unit noise, i.e. multiplier

        z_eff = 1 / Delta = (sum_g C_g^2 / sigma_g^2)^(-1/2).

    In zCDP terms, group g spends rho_g = C_g^2 / (2 sigma_g^2), and the round spends
    sum_g rho_g = 1 / (2 z_eff^2). A group with sigma_g = 0 and C_g > 0 makes z_eff = 0 (not
    private); a group with C_g = 0 contributes nothing.

    Raises:
        PrivacyError: lengths differ, or a bound/std is negative or not finite (C_g may be 0).
    """
    if len(clip_bounds) != len(noise_stds):
        raise PrivacyError(
            f"clip_bounds has {len(clip_bounds)} entries but noise_stds has "
            f"{len(noise_stds)}; pass one bound and one std per group."
        )
    total = 0.0
    for c, s in zip(clip_bounds, noise_stds, strict=False):
        if not (0.0 <= c < math.inf and 0.0 <= s < math.inf):
            raise PrivacyError(f"clip bound {c!r} and noise std {s!r} must be finite and >= 0.")
        if c == 0.0:
            continue
        if s == 0.0:
            return 0.0
        total += (c / s) ** 2
    return math.inf if total == 0.0 else total**-0.5


def combine_noise_multipliers(*noise_multipliers: float) -> float:
    """Multiplier of several Gaussian mechanisms applied to the same sampled participant.

    Releasing f_1(D) + N(0, z_1^2) ... f_k(D) + N(0, z_k^2) with sensitivity-1 queries is, after
    whitening each by its z_i, one Gaussian mechanism on the concatenation with sensitivity
    sqrt(sum_i z_i^-2) and unit noise: z = (sum_i z_i^-2)^(-1/2). When the same Poisson sample
    feeds all k queries, the joint release is this one Gaussian subsampled once (docs/DESIGN.md 4.4), and
    that is how it must be accounted: composing k separately subsampled entries would model k
    independent samples and under-report epsilon for q < 1 (they agree at q = 1).

    Raises:
        PrivacyError: no multiplier given, or a multiplier is negative / NaN.
    """
    if not noise_multipliers:
        raise PrivacyError("combine_noise_multipliers needs at least one noise multiplier.")
    total = 0.0
    for z in noise_multipliers:
        if not z >= 0.0:
            raise PrivacyError(f"noise multiplier {z!r} must be >= 0.")
        if z == 0.0:
            return 0.0
        total += z**-2 if math.isfinite(z) else 0.0
    return math.inf if total == 0.0 else total**-0.5
