"""Empirical epsilon lower bounds from a distinguishing test between two neighbouring datasets.

What it is for: checking, with many runs, that a released mechanism is not less private than its
accountant says. Run the mechanism on D0 and on a neighbouring D1 many times, reduce each release
to a 1-D statistic T, and test "D1" against "D0" with a threshold on T. If the mechanism is
(epsilon, delta)-DP then for EVERY event S (here S = {T > t} or {T <= t}) both
    P_1[S] <= e^eps P_0[S] + delta    and    P_0[S] <= e^eps P_1[S] + delta,
so any S with P_a[S] > delta gives eps >= ln((P_a[S] - delta) / P_b[S]) (Kairouz et al. 2015;
used for auditing by Jagielski et al. 2020 and Nasr et al. 2021).

Algorithm (:func:`distinguishing_lower_bound`):
    1. Split each world's samples in half at random (the split uses the caller's generator).
    2. On the SELECTION halves, for every candidate threshold (midpoints of the pooled sorted
       samples, thinned to ``num_thresholds``), event and direction, compute the bound of step 3;
       keep the (threshold, event, direction) with the largest one.
    3. On the held-out EVALUATION halves only, count the chosen event in each world and bound
           eps_lb = ln((p_a^low - delta) / p_b^high),
       with p^low / p^high the one-sided Clopper-Pearson bounds at level (1 - confidence) / 2 each.
       By the union bound both hold with probability >= ``confidence``; the choice in step 2 saw
       none of these samples, so there is no multiple testing.
    Returns 0 when the chosen event is not frequent enough to prove anything.

Guarantee: if the mechanism is (eps, delta)-DP and the runs are independent, P[eps_lb > eps] <=
1 - confidence. Power limit: with n evaluation samples per world, p_b^high >= about 3.7 / n (no
event at all), so eps_lb <= ln(n / 3.7) (for n = 2000: 6.3); and a threshold test sees the privacy
curve only where events are frequent, so small deltas (1e-5) need many more runs than moderate ones
(1e-2): the numbers are in notebook 07. Nothing here touches private data: it reads the auditor's
statistics only.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from scipy import stats

from ..errors import ConfigError

__all__ = ["DistinguishingResult", "clopper_pearson", "distinguishing_lower_bound"]


def clopper_pearson(successes: np.ndarray | int, trials: int, alpha: float) -> tuple[np.ndarray, np.ndarray]:
    """One-sided exact binomial bounds at level ``alpha`` each: (lower, upper), vectorised over counts.

    lower = Beta(alpha; k, n - k + 1) quantile (0 when k = 0); upper = Beta(1 - alpha; k + 1, n - k)
    quantile (1 when k = n). P[p < lower] <= alpha and P[p > upper] <= alpha.
    """
    k = np.asarray(successes, dtype=np.float64)
    if trials < 1 or np.any(k < 0) or np.any(k > trials) or not 0 < alpha < 1:
        raise ConfigError(
            f"Clopper-Pearson needs 0 <= successes <= trials={trials} (>= 1) and alpha in (0, 1); got alpha={alpha}."
        )
    with np.errstate(invalid="ignore"):
        lower = np.where(k > 0, stats.beta.ppf(alpha, k, trials - k + 1), 0.0)
        upper = np.where(k < trials, stats.beta.ppf(1 - alpha, k + 1, trials - k), 1.0)
    return lower, upper


def _bounds(count_a: np.ndarray, count_b: np.ndarray, n_a: int, n_b: int, delta: float, alpha: float) -> np.ndarray:
    """ln((p_a^low - delta) / p_b^high) elementwise; -inf where p_a^low <= delta."""
    low_a, _ = clopper_pearson(count_a, n_a, alpha)
    _, high_b = clopper_pearson(count_b, n_b, alpha)
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(low_a > delta, np.log(np.maximum(low_a - delta, 1e-300) / high_b), -np.inf)


@dataclass(frozen=True)
class DistinguishingResult:
    """One distinguishing test: the chosen test, its held-out counts and the lower bound."""

    epsilon_lower_bound: float
    threshold: float
    event: str  # "T > t" or "T <= t"
    direction: str  # "D1 vs D0": ln P_1[S] / P_0[S]; "D0 vs D1": the reverse
    rate_d0: float  # P_0[S] on the evaluation half
    rate_d1: float  # P_1[S] on the evaluation half
    num_eval_d0: int
    num_eval_d1: int
    delta: float
    confidence: float
    claimed_epsilon: float | None = None  # from the mechanism's accountant, never typed in
    variant: str = "correct"
    label: str = ""

    @property
    def accuracy(self) -> float:
        """Balanced accuracy of the chosen threshold test on the evaluation halves."""
        hit = self.rate_d1 if self.direction == "D1 vs D0" else self.rate_d0
        miss = self.rate_d0 if self.direction == "D1 vs D0" else self.rate_d1
        return 0.5 * (hit + 1.0 - miss)

    @property
    def violates_claim(self) -> bool:
        """True when the test proves (at ``confidence``) that the claimed epsilon is false."""
        return self.claimed_epsilon is not None and self.epsilon_lower_bound > self.claimed_epsilon


def _select(t0: np.ndarray, t1: np.ndarray, delta: float, alpha: float, num_thresholds: int):
    # A coarse grid of pooled quantiles, log-spaced towards both tails: choosing among few candidates
    # overfits the selection half less than a search over every midpoint (measured: more power).
    tail = np.geomspace(0.5 / t0.size, 0.5, num_thresholds // 2)
    mids = np.quantile(np.concatenate([t0, t1]), np.unique(np.concatenate([tail, 1.0 - tail])))
    s0, s1 = np.sort(t0), np.sort(t1)
    above0 = t0.size - np.searchsorted(s0, mids, side="right")  # count of T > t
    above1 = t1.size - np.searchsorted(s1, mids, side="right")
    best = (-np.inf, 0.0, "T > t", "D1 vs D0")
    for event, c0, c1 in (("T > t", above0, above1), ("T <= t", t0.size - above0, t1.size - above1)):
        for direction, ca, cb, na, nb in (
            ("D1 vs D0", c1, c0, t1.size, t0.size),
            ("D0 vs D1", c0, c1, t0.size, t1.size),
        ):
            bound = _bounds(ca, cb, na, nb, delta, alpha)
            i = int(np.argmax(bound))
            if bound[i] > best[0]:
                best = (float(bound[i]), float(mids[i]), event, direction)
    return best


def distinguishing_lower_bound(
    stat_d0: np.ndarray,
    stat_d1: np.ndarray,
    *,
    delta: float,
    rng: np.random.Generator,
    confidence: float = 0.95,
    selection_fraction: float = 0.3,
    num_thresholds: int = 40,
    claimed_epsilon: float | None = None,
    variant: str = "correct",
    label: str = "",
) -> DistinguishingResult:
    """The best threshold test on a 1-D statistic and its held-out epsilon lower bound (module docstring).

    Args:
        stat_d0, stat_d1: (n0,), (n1,) the statistic of independent runs on D0 and on D1.
        delta: the delta of the claim under test (the accountant's).
        rng: the auditor's generator for the selection/evaluation split.
        confidence: probability that the bound holds for a truly (eps, delta)-DP mechanism.
    """
    t0, t1 = (np.asarray(x, dtype=np.float64).ravel() for x in (stat_d0, stat_d1))
    if t0.size < 4 or t1.size < 4 or not (np.isfinite(t0).all() and np.isfinite(t1).all()):
        raise ConfigError(f"distinguishing test needs >= 4 finite samples per world; got {t0.size} and {t1.size}.")
    if not 0.0 <= delta < 1.0 or not 0.0 < confidence < 1.0:
        raise ConfigError(f"delta={delta!r} must lie in [0, 1) and confidence={confidence!r} in (0, 1).")
    alpha = (1.0 - confidence) / 2.0
    p0, p1 = rng.permutation(t0.size), rng.permutation(t1.size)
    k0, k1 = int(t0.size * selection_fraction), int(t1.size * selection_fraction)
    sel0, ev0 = t0[p0[:k0]], t0[p0[k0:]]
    sel1, ev1 = t1[p1[:k1]], t1[p1[k1:]]
    _, threshold, event, direction = _select(sel0, sel1, delta, alpha, num_thresholds)
    in0 = ev0 > threshold if event == "T > t" else ev0 <= threshold
    in1 = ev1 > threshold if event == "T > t" else ev1 <= threshold
    c0, c1 = int(in0.sum()), int(in1.sum())
    ca, cb, na, nb = (c1, c0, ev1.size, ev0.size) if direction == "D1 vs D0" else (c0, c1, ev0.size, ev1.size)
    bound = float(_bounds(np.array(ca), np.array(cb), na, nb, delta, alpha))
    return DistinguishingResult(
        epsilon_lower_bound=max(0.0, bound) if math.isfinite(bound) else 0.0,
        threshold=threshold,
        event=event,
        direction=direction,
        rate_d0=c0 / ev0.size,
        rate_d1=c1 / ev1.size,
        num_eval_d0=int(ev0.size),
        num_eval_d1=int(ev1.size),
        delta=float(delta),
        confidence=float(confidence),
        claimed_epsilon=claimed_epsilon,
        variant=variant,
        label=label,
    )
