"""The one-run privacy audit (Steinke, Nasr and Jagielski, "Privacy auditing with one (1) training run",
NeurIPS 2023): an empirical LOWER bound on epsilon from a single training run.

What it is for: checking that a mechanism is not less private than its accountant claims. The
auditor plants m canaries (records, or whole clients for client-level DP), includes each one
independently with probability 1/2, trains once, scores every canary, and guesses "in" for the k+
highest scores and "out" for the k- lowest (abstaining on the rest). If the mechanism is
(epsilon, delta)-DP, r guesses cannot be right much more often than randomised response with
accuracy e^eps / (1 + e^eps) would be; many correct guesses reject that epsilon.

Guarantee (their Theorem 5.2 / Algorithm 2, reproduced exactly in :func:`p_value_dp_audit`): for an
(eps, delta)-DP mechanism and any guessing rule, with W the number of correct guesses out of r,
    P[W >= v] <= P[Binomial(r, q) >= v] + 2 m delta * max_{i=1..v} P[v - i <= Binomial(r, q) < v] / i,
    q = e^eps / (1 + e^eps).
The lower bound is the largest eps whose p-value is below 1 - confidence: with probability at least
``confidence`` an audit of a truly (eps, delta)-DP mechanism reports a bound <= eps.

Two honest limits: the bound can never exceed about ln(r / 3) at 95% (all r guesses right), so
audit at a claimed epsilon of about 1-2; and it is a lower bound, not an estimate: a bound far below
the claim does not mean the claim is loose. The numbers k+ and k- must be fixed before looking at the
scores (choosing them afterwards is multiple testing). Nothing here touches private data: it only
reads scores and the auditor's own inclusion bits.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from scipy import stats

from ..errors import ConfigError

__all__ = ["AuditResult", "epsilon_lower_bound", "guess_from_scores", "one_run_audit", "p_value_dp_audit"]


def _check_counts(m: int, r: int, v: int) -> None:
    if not (
        isinstance(m, (int, np.integer))
        and isinstance(r, (int, np.integer))
        and isinstance(v, (int, np.integer))
        and 0 <= v <= r <= m
    ):
        raise ConfigError(
            f"audit counts must be integers with 0 <= v <= r <= m; got m={m!r} canaries, "
            f"r={r!r} guesses, v={v!r} correct."
        )


def _check_delta_confidence(delta: float, confidence: float) -> None:
    if not 0.0 <= delta <= 1.0:
        raise ConfigError(f"audit delta={delta!r} must lie in [0, 1]; use the delta the accountant used.")
    if not 0.0 < confidence < 1.0:
        raise ConfigError(f"audit confidence={confidence!r} must lie in (0, 1), e.g. 0.95.")


def p_value_dp_audit(*, m: int, r: int, v: int, epsilon: float, delta: float) -> float:
    """P-value of "at least v of r guesses correct" under the null "the mechanism is (eps, delta)-DP".

    Algorithm (Steinke et al. 2023, Algorithm 2):
        1. q = 1 / (1 + e^-eps), the accuracy of eps-DP randomised response.
        2. beta = P[Binomial(r, q) >= v] (scipy's exact binomial survival function).
        3. alpha = max over i = 1..v of P[v - i <= Binomial(r, q) < v] / i (running pmf sums).
        4. p = min(1, beta + 2 m delta alpha).

    Args:
        m: canaries, each included independently with probability 1/2.
        r: guesses made (canaries not abstained on).
        v: correct guesses.
        epsilon, delta: the DP claim under test (epsilon >= 0).
    """
    _check_counts(m, r, v)
    _check_delta_confidence(delta, 0.5)
    if not epsilon >= 0.0:
        raise ConfigError(f"audit epsilon={epsilon!r} must be >= 0.")
    q = 1.0 / (1.0 + math.exp(-epsilon)) if epsilon < 700 else 1.0
    beta = float(stats.binom.sf(v - 1, r, q))
    if delta == 0.0 or v == 0:
        return min(1.0, beta)
    pmf = stats.binom.pmf(np.arange(v - 1, -1, -1), r, q)  # P[B = v-1], P[B = v-2], ..., P[B = 0]
    alpha = float(np.max(np.cumsum(pmf) / np.arange(1, v + 1)))
    return min(1.0, beta + 2.0 * m * delta * alpha)


def epsilon_lower_bound(
    *, m: int, r: int, v: int, delta: float, confidence: float = 0.95, tolerance: float = 1e-6
) -> float:
    """The largest epsilon rejected at ``confidence``: sup{eps : p_value(eps) < 1 - confidence}.

    Algorithm: the p-value grows with eps (q grows), so bracket the crossing by doubling an upper
    end and bisect to ``tolerance`` (Steinke et al.'s ``get_eps_audit``, with a tolerance instead of
    a fixed number of halvings). Returns 0 when even eps = 0 is not rejected.
    """
    _check_counts(m, r, v)
    _check_delta_confidence(delta, confidence)
    level = 1.0 - confidence

    def rejected(eps: float) -> bool:
        return p_value_dp_audit(m=m, r=r, v=v, epsilon=eps, delta=delta) < level

    if not rejected(0.0):
        return 0.0
    low, high = 0.0, 1.0
    while rejected(high):
        low, high = high, 2.0 * high
        if high > 1e4:  # only reachable with delta = 0 and absurd r; report what is proven
            return low
    while high - low > tolerance:
        mid = 0.5 * (low + high)
        low, high = (mid, high) if rejected(mid) else (low, mid)
    return low


def guess_from_scores(scores: np.ndarray, *, num_in: int, num_out: int) -> np.ndarray:
    """Guesses in {+1 (in), -1 (out), 0 (abstain)}: the ``num_in`` highest and ``num_out`` lowest scores.

    Ties are broken by position (a stable sort), which does not depend on the inclusion bits.
    """
    s = np.asarray(scores, dtype=np.float64)
    if s.ndim != 1 or not np.isfinite(s).all():
        raise ConfigError(f"audit scores must be a finite 1-D array; got shape {s.shape}.")
    if num_in < 0 or num_out < 0 or num_in + num_out > s.size:
        raise ConfigError(
            f"num_in={num_in} + num_out={num_out} guesses must be >= 0 and at most the {s.size} canaries."
        )
    order = np.argsort(-s, kind="stable")  # highest first
    guesses = np.zeros(s.size, dtype=np.int8)
    guesses[order[:num_in]] = 1
    if num_out:
        guesses[order[s.size - num_out :]] = -1
    return guesses


@dataclass(frozen=True)
class AuditResult:
    """One audit: counts, the lower bound, and (for a harness run) the accountant's claim."""

    num_canaries: int
    num_guesses: int
    num_correct: int
    delta: float
    confidence: float
    epsilon_lower_bound: float
    claimed_epsilon: float | None = None  # read from the mechanism's ledger, never typed in
    variant: str = "correct"

    @property
    def precision(self) -> float:
        """Share of correct guesses (0.5 is what guessing at random gives)."""
        return self.num_correct / self.num_guesses if self.num_guesses else float("nan")

    @property
    def violates_claim(self) -> bool:
        """True when the audit proves (at ``confidence``) that the claimed epsilon is false."""
        return self.claimed_epsilon is not None and self.epsilon_lower_bound > self.claimed_epsilon


def one_run_audit(
    scores: np.ndarray,
    included: np.ndarray,
    *,
    num_in: int,
    num_out: int,
    delta: float,
    confidence: float = 0.95,
    claimed_epsilon: float | None = None,
    variant: str = "correct",
) -> AuditResult:
    """Guess from ``scores`` (higher = more likely included), count correct guesses, bound epsilon.

    Args:
        scores: (m,) one score per canary, computed from the trained model(s) only.
        included: (m,) bool, the auditor's coin flips (each True with probability 1/2).
        num_in, num_out: k+ and k-, fixed before the run.
        delta, confidence: as in :func:`epsilon_lower_bound`.
    """
    inc = np.asarray(included, dtype=bool)
    guesses = guess_from_scores(scores, num_in=num_in, num_out=num_out)
    if inc.shape != guesses.shape:
        raise ConfigError(f"included has shape {inc.shape} but scores has {guesses.shape}; one bit per canary.")
    truth = np.where(inc, 1, -1)
    r = int(np.count_nonzero(guesses))
    v = int(np.count_nonzero(guesses == truth))
    bound = epsilon_lower_bound(m=int(inc.size), r=r, v=v, delta=delta, confidence=confidence)
    return AuditResult(
        num_canaries=int(inc.size),
        num_guesses=r,
        num_correct=v,
        delta=float(delta),
        confidence=float(confidence),
        epsilon_lower_bound=bound,
        claimed_epsilon=claimed_epsilon,
        variant=variant,
    )
