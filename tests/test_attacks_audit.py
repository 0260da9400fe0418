"""The one-run audit: exact binomial maths, and the audit of the real DP-FedAvg release catches bugs."""
from __future__ import annotations

import math
from fractions import Fraction

import numpy as np
import pytest

from mmpfl_core.attacks.audit import epsilon_lower_bound, guess_from_scores, one_run_audit, p_value_dp_audit
from mmpfl_core.attacks.canaries import BROKEN_VARIANTS, CanaryAuditConfig, audit_client_level_dp
from mmpfl_core.errors import ConfigError


def _brute_force_p_value(m: int, r: int, v: int, eps: float, delta: float) -> float:
    """Steinke et al. (2023) Algorithm 2 written with exact binomial coefficients (no scipy)."""
    q = Fraction(1) / (1 + Fraction(math.exp(-eps)))
    pmf = [Fraction(math.comb(r, k)) * q ** k * (1 - q) ** (r - k) for k in range(r + 1)]
    beta = sum(pmf[v:])
    alpha, running = Fraction(0), Fraction(0)
    for i in range(1, v + 1):
        running += pmf[v - i]
        alpha = max(alpha, running / i)
    return float(min(Fraction(1), beta + alpha * Fraction(delta) * 2 * m))


@pytest.mark.parametrize("m,r,v,eps,delta", [(20, 10, 7, 0.5, 0.0), (50, 30, 24, 1.0, 1e-3), (100, 40, 40, 2.0, 1e-5),
                                             (100, 60, 30, 0.0, 1e-2), (10, 10, 1, 3.0, 0.05)])
def test_p_value_matches_brute_force_binomial(m, r, v, eps, delta):
    assert p_value_dp_audit(m=m, r=r, v=v, epsilon=eps, delta=delta) == pytest.approx(
        _brute_force_p_value(m, r, v, eps, delta), rel=1e-9, abs=1e-15)


def test_all_guesses_right_has_a_closed_form():
    # With v = r and delta = 0 the p-value is q^r, so the bound solves q = 0.05^(1/r): eps = logit(q).
    q = 0.05 ** (1 / 100)
    assert epsilon_lower_bound(m=100, r=100, v=100, delta=0.0) == pytest.approx(math.log(q / (1 - q)), abs=2e-6)
    assert epsilon_lower_bound(m=100, r=100, v=100, delta=0.0) == pytest.approx(3.49297, abs=1e-4)
    # The saturation docs/FACTS.md warns about: r guesses can prove at most about ln(r / 3).
    assert epsilon_lower_bound(m=1000, r=200, v=200, delta=1e-5) == pytest.approx(4.1665, abs=1e-3)


def test_bound_is_where_the_p_value_crosses_the_level():
    m, r, v, delta = 1000, 200, 150, 1e-5
    eps = epsilon_lower_bound(m=m, r=r, v=v, delta=delta)
    assert 0.7 < eps < 1.0  # measured 0.820
    assert p_value_dp_audit(m=m, r=r, v=v, epsilon=eps, delta=delta) < 0.05
    assert p_value_dp_audit(m=m, r=r, v=v, epsilon=eps + 1e-5, delta=delta) >= 0.05


def test_bound_grows_with_correct_guesses_and_shrinks_with_delta_and_confidence():
    bounds = [epsilon_lower_bound(m=500, r=100, v=v, delta=1e-5) for v in range(50, 101, 5)]
    assert bounds == sorted(bounds) and bounds[0] == 0.0 and bounds[-1] > 2.5
    assert epsilon_lower_bound(m=500, r=100, v=90, delta=1e-3) < epsilon_lower_bound(m=500, r=100, v=90, delta=0.0)
    assert (epsilon_lower_bound(m=500, r=100, v=90, delta=1e-5, confidence=0.99)
            < epsilon_lower_bound(m=500, r=100, v=90, delta=1e-5, confidence=0.95))


def test_random_guessing_proves_nothing():
    rng = np.random.default_rng(0)
    included = rng.random(2000) < 0.5
    result = one_run_audit(rng.normal(size=2000), included, num_in=200, num_out=200, delta=1e-5)
    assert result.num_guesses == 400 and result.epsilon_lower_bound < 0.3


def test_guesses_take_the_extremes():
    g = guess_from_scores(np.array([0.1, 5.0, -3.0, 0.0, 2.0]), num_in=2, num_out=1)
    assert g.tolist() == [0, 1, -1, 0, 1]
    with pytest.raises(ConfigError, match="guesses"):
        guess_from_scores(np.zeros(3), num_in=2, num_out=2)


def test_bad_counts_and_configs_are_named():
    with pytest.raises(ConfigError, match="0 <= v <= r <= m"):
        p_value_dp_audit(m=10, r=20, v=5, epsilon=1.0, delta=0.0)
    with pytest.raises(ConfigError, match="confidence"):
        epsilon_lower_bound(m=10, r=10, v=5, delta=0.0, confidence=1.0)
    with pytest.raises(ConfigError, match="k\\+"):
        CanaryAuditConfig(num_canaries=10, num_guesses_in=6, num_guesses_out=6)
    with pytest.raises(ConfigError, match="variant"):
        audit_client_level_dp(CanaryAuditConfig(num_canaries=10, num_guesses_in=2, num_guesses_out=2), variant="typo")


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_the_correct_release_passes_the_audit(seed):
    result, scores, included = audit_client_level_dp(CanaryAuditConfig(seed=seed))
    # The claim is the accountant's epsilon for one release at target 2 (PRV: 1.995).
    assert 1.9 < result.claimed_epsilon <= 2.0
    assert result.epsilon_lower_bound <= result.claimed_epsilon and not result.violates_claim
    # ...and the audit has power: the canaries are detectable (measured bounds 0.45-0.61).
    assert result.precision > 0.6
    assert scores[included].mean() > scores[~included].mean()


@pytest.mark.parametrize("variant", sorted(BROKEN_VARIANTS))
def test_broken_releases_are_caught(variant):
    result, _, _ = audit_client_level_dp(CanaryAuditConfig(seed=0), variant=variant)
    # Every guess is right (measured 200/200): the bound (4.17) proves the claimed 2.0 false.
    assert result.violates_claim and result.epsilon_lower_bound > 2 * result.claimed_epsilon


def test_multi_round_sampled_release_passes_too():
    config = CanaryAuditConfig(num_rounds=5, client_fraction=0.5, seed=0, accountant="rdp")
    result, _, _ = audit_client_level_dp(config)
    assert 0 < result.claimed_epsilon <= 2.0 and result.epsilon_lower_bound <= result.claimed_epsilon
    broken, _, _ = audit_client_level_dp(config, variant="noise-divided-by-10")
    assert broken.violates_claim


def test_broken_variants_restore_exactly_what_they_patched():
    """A broken variant patches the real release only inside its context: afterwards the module functions
    and the strategy's own methods are the originals again (an audit must not leave a broken mechanism behind)."""
    from mmpfl_core.attacks.variants import broken_mechanism
    from mmpfl_core.federated import dp_strategies
    from mmpfl_core.federated.strategies import create_strategy

    strategy = create_strategy("dp-fedavg", noise_multiplier=1.0, accountant="rdp")
    before = (dp_strategies.clip_per_group, dp_strategies.gaussian_noise_like)
    for variant in ("no-clipping", "noise-x0.5", "per-site-noise-over-m-min"):
        with broken_mechanism(variant, strategy):
            patched = (dp_strategies.clip_per_group, dp_strategies.gaussian_noise_like,
                       "participant_noise_stds" in vars(strategy))
            assert patched != (*before, False), variant
        assert (dp_strategies.clip_per_group, dp_strategies.gaussian_noise_like) == before, variant
        assert "participant_noise_stds" not in vars(strategy), variant  # the class's method shows through again
