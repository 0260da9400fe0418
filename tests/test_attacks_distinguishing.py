"""The multi-run distinguishing test, CI's audit of the client-level DP release (issue 14).

The statistics are checked against exact maths; then the REAL release of dp-fedavg (server,
distributed, local), dp-fedavg-fisher and mm-pfl-adp (server, distributed) is run on neighbouring
federations: the held-out lower bound must stay at or below the accountant's epsilon for the
correct mechanism and exceed it for every broken variant. All runs use the reproducible (NOT
private) noise mode with fixed seeds, so CI is deterministic.

Power (measured with seeds 0-3, delta = 1e-2, claim 1.999 = the PRV epsilon of one release calibrated to 2.0,
about 2000 runs per world of which 70% are held out, i.e. n = 1393-1407 evaluation runs per world):
    correct release             bound 0.66-1.36  (never above the claim; 7 releases x 4 seeds)
    noise x0.5                  bound 2.20-3.49  (true epsilon of the halved release at delta 1e-2: 5.1)
    no clipping (update 10 C)   bound 5.9        (saturated: ln(n / 3.7))
    per-site sigma^2/m_min      bound 4.12-4.53, accuracy 0.96-1.00 (participation test; correct: 0.0, 0.50-0.53)
On Gaussian samples of the same sizes (30 seeds) halved noise gave 2.60-4.02 and the correct shift 0.68-1.59.
Cost: the per-release calls of this file summed to about 60 s on the shared 2-core machine (other helpers
jobs running); the whole file took 262 s while a seed sweep and other helpers' jobs ran beside it.
"""
from __future__ import annotations

import math

import numpy as np
import pytest
from scipy import stats

from mmpfl_core.attacks.distinguishing import clopper_pearson, distinguishing_lower_bound
from mmpfl_core.attacks.neighbours import NeighbourConfig, participation_test, projection_test
from mmpfl_core.errors import ConfigError


def _gaussian_epsilon(mu: float, delta: float) -> float:
    """Exact epsilon(delta) of a Gaussian shift of mu standard deviations (Balle and Wang 2018)."""
    from scipy.optimize import brentq
    f = lambda e: stats.norm.cdf(-e / mu + mu / 2) - math.exp(e) * stats.norm.cdf(-e / mu - mu / 2) - delta
    return 0.0 if f(0.0) <= 0 else brentq(f, 0.0, 100.0)


def test_clopper_pearson_matches_scipy_exact_interval():
    for k, n in [(0, 50), (3, 50), (25, 50), (50, 50), (7, 2000)]:
        lo, hi = clopper_pearson(k, n, 0.025)
        ci = stats.binomtest(k, n).proportion_ci(confidence_level=0.95, method="exact")
        assert float(lo) == pytest.approx(ci.low, abs=1e-12) and float(hi) == pytest.approx(ci.high, abs=1e-12)


def test_identical_worlds_prove_nothing_much():
    rng = np.random.default_rng(0)
    bounds = [distinguishing_lower_bound(rng.normal(size=2000), rng.normal(size=2000), delta=1e-2,
                                         rng=rng).epsilon_lower_bound for _ in range(5)]
    assert max(bounds) < 0.35  # measured 0.00-0.21


def test_bound_is_valid_for_randomised_response():
    """An exactly eps-DP mechanism (randomised response, eps = 1): the bound stays below eps, but near it."""
    eps, rng = 1.0, np.random.default_rng(1)
    p = math.exp(eps) / (1 + math.exp(eps))
    bounds = []
    for _ in range(10):
        d1 = (rng.random(4000) < p).astype(float)
        d0 = (rng.random(4000) < 1 - p).astype(float)
        bounds.append(distinguishing_lower_bound(d0, d1, delta=0.0, rng=rng).epsilon_lower_bound)
    assert max(bounds) <= eps and min(bounds) > 0.8  # measured 0.86-0.93


@pytest.mark.parametrize("half", [False, True])
def test_power_on_gaussian_samples(half):
    """The sizes the release tests use, on exact Gaussian samples: correct never above, halved noise always above."""
    delta, claim = 1e-2, 2.0
    mu = 1 / 1.1160  # z calibrated to epsilon 2 at delta 1e-2 (one release): eps(mu) = 2.0
    assert _gaussian_epsilon(mu, delta) == pytest.approx(claim, abs=0.01)
    bounds = []
    for seed in range(10):
        rng = np.random.default_rng(seed)
        shift = 2 * mu if half else mu
        bounds.append(distinguishing_lower_bound(rng.normal(size=2000), rng.normal(shift, 1, size=2000),
                                                 delta=delta, rng=rng).epsilon_lower_bound)
    if half:
        assert min(bounds) > claim  # measured 2.60-4.02 over 30 seeds
    else:
        assert max(bounds) <= claim  # measured 0.68-1.59 over 30 seeds


def test_saturation_limit_is_ln_n():
    rng = np.random.default_rng(0)
    result = distinguishing_lower_bound(np.zeros(2000), np.ones(2000), delta=0.0, rng=rng)
    n = result.num_eval_d0
    assert result.accuracy == 1.0 and result.epsilon_lower_bound == pytest.approx(math.log(n / 3.689), abs=0.02)


def test_bad_inputs_are_named():
    rng = np.random.default_rng(0)
    with pytest.raises(ConfigError, match="4 finite samples"):
        distinguishing_lower_bound(np.zeros(2), np.zeros(10), delta=1e-2, rng=rng)
    with pytest.raises(ConfigError, match="delta"):
        distinguishing_lower_bound(np.zeros(10), np.zeros(10), delta=1.5, rng=rng)
    with pytest.raises(ConfigError, match="local"):
        NeighbourConfig(strategy="mm-pfl-adp", placement="local")
    with pytest.raises(ConfigError, match="participation"):
        participation_test(NeighbourConfig(placement="server"))


RELEASES = [("dp-fedavg", "server"), ("dp-fedavg", "distributed"), ("dp-fedavg", "local"),
            ("dp-fedavg-fisher", "server"), ("dp-fedavg-fisher", "distributed"),
            ("mm-pfl-adp", "server"), ("mm-pfl-adp", "distributed")]


@pytest.mark.parametrize("strategy,placement", RELEASES)
def test_release_holds_its_claim_and_halved_noise_is_caught(strategy, placement):
    config = NeighbourConfig(strategy=strategy, placement=placement,
                             num_canaries=2000)
    correct = projection_test(config)
    assert correct.claimed_epsilon == pytest.approx(1.999, abs=0.01)  # the ledger's, one release
    assert not correct.violates_claim, correct
    halved = projection_test(config, variant="noise-x0.5")
    assert halved.violates_claim, halved


@pytest.mark.parametrize("strategy,placement", RELEASES)
def test_missing_clip_is_caught(strategy, placement):
    config = NeighbourConfig(strategy=strategy, placement=placement, num_canaries=300, num_releases=1)
    result = projection_test(config, variant="no-clipping")
    assert result.epsilon_lower_bound > 1.5 * result.claimed_epsilon, result  # measured 3.2-4.0 (saturated: ln(n / 3.7), n about 105)


def test_distributed_aggregate_does_not_reveal_participation():
    correct = participation_test(NeighbourConfig(placement="distributed"))
    assert not correct.violates_claim and correct.accuracy < 0.6, correct
    broken = participation_test(NeighbourConfig(placement="distributed"), variant="per-site-noise-over-m-min")
    assert broken.violates_claim and broken.accuracy > 0.9, broken  # measured accuracy 0.96-1.00, bound 4.1-4.5


@pytest.mark.slow
def test_mm_pfl_adp_participation_with_masks_distributed():
    config = NeighbourConfig(strategy="mm-pfl-adp", placement="distributed")
    assert not participation_test(config).violates_claim
    assert participation_test(config, variant="per-site-noise-over-m-min").violates_claim
