"""Membership inference: exact attack scores, honest metrics, and the attacks run on real federated models."""
from __future__ import annotations

import math

import numpy as np
import pytest
from scipy import stats
from sklearn.metrics import roc_auc_score

from mmpfl_core.attacks.membership import (attack_metrics, cross_fitted_predictions, lira_offline_scores,
                                           logit_confidence, loss_scores, random_guess_auc_band,
                                           reference_calibrated_scores, roc, tpr_at_fpr)
from mmpfl_core.attacks.targets import MembershipConfig, membership_candidates, run_membership_attacks
from mmpfl_core.reproduction.membership import train_shadows
from mmpfl_core.errors import ConfigError, DataError
from mmpfl_core.experiment import ExperimentConfig, MethodSpec, make_federation, model_factory, run_method


def test_scores_are_exact():
    proba = np.array([[0.8, 0.15, 0.05], [0.2, 0.5, 0.3]])
    labels = np.array([0, 2])
    np.testing.assert_allclose(loss_scores(proba, labels), [math.log(0.8), math.log(0.3)])
    np.testing.assert_allclose(logit_confidence(proba, labels), [math.log(4.0), math.log(0.3 / 0.7)])
    np.testing.assert_allclose(reference_calibrated_scores(np.array([-1.0, -2.0]), np.array([[-3.0, -1.0], [-1.0, -1.0]])),
                               [1.0, -1.0])


def test_lira_standardises_against_out_shadows():
    shadow = np.array([[0.0, 1.0, 2.0], [2.0, 3.0, 2.0]])  # per-candidate means 1, 2, 2; variances 2, 2, 0
    target = np.array([3.0, 2.0, 2.0])
    np.testing.assert_allclose(lira_offline_scores(target, shadow), np.array([2.0, 0.0, 0.0]) / math.sqrt(4 / 3))
    per_example = lira_offline_scores(target, shadow, global_variance=False)
    np.testing.assert_allclose(per_example[:2], [2.0 / math.sqrt(2), 0.0])
    with pytest.raises(DataError, match="at least two shadow"):
        lira_offline_scores(target, shadow[:1])


def test_roc_and_tpr_at_fpr_never_round_up():
    is_member = np.array([1, 1, 1, 0, 0, 0, 0])
    scores = np.array([0.9, 0.8, 0.1, 0.85, 0.3, 0.2, 0.0])
    fpr, tpr = roc(is_member, scores)
    assert fpr[-1] == tpr[-1] == 1.0
    assert tpr_at_fpr(is_member, scores, 0.0) == pytest.approx(1 / 3)  # only 0.9 sits above every non-member
    assert tpr_at_fpr(is_member, scores, 0.25) == pytest.approx(2 / 3)  # one false positive (0.85) allowed
    with pytest.raises(DataError, match="both members"):
        roc(np.ones(3), np.arange(3.0))


def test_perfect_and_gaussian_attacks():
    rng = np.random.default_rng(0)
    y = np.r_[np.ones(200), np.zeros(200)].astype(int)
    perfect = attack_metrics(y, y + 0.01 * rng.normal(size=400), rng=rng, num_resamples=50)
    assert perfect.auc.point == 1.0 and perfect.balanced_accuracy.point == 1.0
    assert all(ci.point == 1.0 for ci in perfect.tpr_at_fpr.values())
    # Unit-variance Gaussians a distance mu apart: AUC = Phi(mu / sqrt 2) (here 0.760).
    mu = 1.0
    scores = np.r_[rng.normal(mu, 1, 2000), rng.normal(0, 1, 2000)]
    y = np.r_[np.ones(2000), np.zeros(2000)].astype(int)
    m = attack_metrics(y, scores, rng=rng, num_resamples=100)
    assert m.auc.low <= stats.norm.cdf(mu / math.sqrt(2)) <= m.auc.high
    assert m.auc.point == pytest.approx(roc_auc_score(y, scores))
    assert m.balanced_accuracy.point == pytest.approx(stats.norm.cdf(mu / 2), abs=0.03)  # best threshold at mu / 2
    assert m.fpr_resolution == 1 / 2000


def test_random_scores_sit_at_chance_and_the_threshold_is_not_tuned_in_sample():
    rng = np.random.default_rng(1)
    y = np.r_[np.ones(50), np.zeros(50)].astype(int)
    cross, in_sample = [], []
    for _ in range(40):
        s = rng.normal(size=100)
        guesses = cross_fitted_predictions(y, s, rng=rng)
        cross.append(0.5 * (guesses[y == 1].mean() + 1 - guesses[y == 0].mean()))
        fpr, tpr = roc(y, s)
        in_sample.append(0.5 + 0.5 * float(np.max(tpr - fpr)))
    assert abs(np.mean(cross) - 0.5) < 0.03  # unbiased
    assert np.mean(in_sample) > 0.55  # what tuning on the same candidates would have reported
    m = attack_metrics(y, rng.normal(size=100), rng=rng, num_resamples=100)
    assert m.auc.low <= 0.5 <= m.auc.high
    assert random_guess_auc_band(50, 50) == pytest.approx(1.96 * math.sqrt(101 / 30000))


def test_membership_config_is_validated():
    with pytest.raises(ConfigError, match="target"):
        MembershipConfig(target="server")
    with pytest.raises(ConfigError, match="num_shadows"):
        MembershipConfig(num_shadows=1)


@pytest.fixture(scope="module")
def tiny_runs():
    config = ExperimentConfig.from_dict({
        "data": {"num_subjects": 90, "image_size": 32, "seed": 0},
        "federation": {"num_sites": 2, "public_size": 8, "seed": 0},
        "model": {"preset": "tiny", "overrides": {"embed_dim": 32, "depth": 1}},
        "federated": {"num_rounds": 1, "local": {"local_steps": 2, "batch_size": 16}, "bootstrap_resamples": 0,
                      "checkpoint_every": 0}})
    method = MethodSpec("mm-pfl-adp", kwargs={"target_epsilon": 8.0, "accountant": "rdp", "fisher_max_batches": 1,
                                              "fisher_batch_size": 8})
    federation = make_federation(config)
    run = run_method(config, method, federation, progress=False)
    shadows = train_shadows(config, method, num_shadows=2)
    return config, federation, run, shadows


def test_candidates_are_members_then_held_out_subjects(tiny_runs):
    _, federation, _, _ = tiny_runs
    c = membership_candidates(federation, sites=[1])
    site = federation.sites[1]
    assert c.is_member.sum() == len(site.train) and len(c.cohort) == len(site.train) + len(site.val) + len(site.test)
    assert set(c.cohort.sites.tolist()) == {1}
    assert not set(c.cohort.subject_ids[c.is_member == 1]) & set(c.cohort.subject_ids[c.is_member == 0])
    with pytest.raises(ConfigError, match="do not exist"):
        membership_candidates(federation, sites=[5])


@pytest.mark.parametrize("target", ["global", "personal"])
def test_attacks_run_on_the_global_and_personal_models(tiny_runs, target):
    config, federation, run, shadows = tiny_runs
    # Shadows are trained on other subjects: none of the target's candidates.
    shadow_ids = set(make_federation(config.replace(data={"seed": 1000}, federation={"seed": 1000})).sites[0].train.subject_ids)
    assert shadows[0].summary["seed"] == 1000 and len(shadow_ids) > 0
    result = run_membership_attacks(run, model_factory(config, federation), federation,
                                    config=MembershipConfig(target=target, num_shadows=2, num_resamples=20), shadows=shadows)
    assert set(result.metrics) == {"loss threshold", "reference-calibrated", "LiRA (offline)"}
    for m in result.metrics.values():
        assert 0.0 <= m.auc.low <= m.auc.point <= m.auc.high <= 1.0
        assert set(m.tpr_at_fpr) == {0.01, 0.001}
    assert len(result.table_rows(method="mm-pfl-adp")) == 3
    loss_only = run_membership_attacks(run, model_factory(config, federation), federation,
                                       config=MembershipConfig(target=target, num_resamples=20))
    assert list(loss_only.metrics) == ["loss threshold"]
    np.testing.assert_allclose(loss_only.scores["loss threshold"], result.scores["loss threshold"])


def test_the_papers_claim_is_judged_by_the_confidence_interval():
    import pandas as pd

    from mmpfl_core.reproduction.membership import PAPER_MIA_SUCCESS, membership_claim

    def frame(low: float, point: float) -> pd.DataFrame:
        return pd.DataFrame([{"method": "mm-pfl-adp", "target": "global model", "attack": "LiRA (offline)",
                              "epsilon (site)": 7.994, "balanced acc": point, "balanced acc low": low,
                              "balanced acc [95% CI]": f"{point} [{low}, 1]", "AUC [95% CI]": "0.6 [0.5, 0.7]"}])
    text, ok = membership_claim(frame(0.45, 0.52), "mm-pfl-adp")
    assert ok is True and "epsilon 7.99" in text
    assert membership_claim(frame(PAPER_MIA_SUCCESS + 0.01, 0.62), "mm-pfl-adp")[1] is False
    assert membership_claim(frame(0.45, 0.52), "dp-fedavg")[1] is None
