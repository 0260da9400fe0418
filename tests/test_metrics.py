"""Tests for mmpfl_core.metrics: exact agreement with sklearn, interval sanity, byte counts."""
from __future__ import annotations

import math
import time

import numpy as np
import pytest
import torch
from sklearn.metrics import accuracy_score, balanced_accuracy_score, f1_score, roc_auc_score

from mmpfl_core.errors import ConfigError, DataError
from mmpfl_core.metrics import (
    CommunicationCounter,
    auroc_ovr,
    bootstrap_ci,
    classification_metrics,
    metrics_with_ci,
    missing_classes,
    per_group_accuracy,
    rounds_to_target,
    seed_ci,
    smooth,
    tensor_bytes,
)


def _random_problem(n: int, c: int, seed: int, signal: float = 1.0):
    rng = np.random.default_rng(seed)
    y = rng.integers(0, c, size=n)
    logits = rng.normal(size=(n, c)) + signal * np.eye(c)[y]
    proba = np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)
    return y, proba


@pytest.mark.parametrize("c", [2, 3, 5])
@pytest.mark.parametrize("seed", [0, 1])
def test_metrics_match_sklearn(c, seed):
    y, proba = _random_problem(200, c, seed)
    # round scores so that ties occur and mid-ranks matter
    proba = np.round(proba, 2)
    pred = proba.argmax(axis=1)
    got = classification_metrics(y, proba)
    assert got["accuracy"] == pytest.approx(accuracy_score(y, pred), abs=1e-12)
    assert got["balanced_accuracy"] == pytest.approx(balanced_accuracy_score(y, pred), abs=1e-12)
    assert got["macro_f1"] == pytest.approx(f1_score(y, pred, average="macro"), abs=1e-12)
    ref = roc_auc_score(y, proba[:, 1]) if c == 2 else roc_auc_score(
        y, proba / proba.sum(1, keepdims=True), multi_class="ovr", average="macro")
    if c > 2:  # sklearn requires normalised rows; compare on the same normalised scores
        got = classification_metrics(y, proba / proba.sum(1, keepdims=True))
    assert got["auroc"] == pytest.approx(ref, abs=1e-12)


def test_macro_f1_with_class_never_predicted_matches_sklearn():
    y = np.array([0, 0, 1, 1, 2, 2])
    proba = np.eye(3)[[0, 0, 0, 1, 1, 1]]  # class 2 never predicted
    got = classification_metrics(y, proba)
    pred = proba.argmax(1)
    assert got["macro_f1"] == pytest.approx(f1_score(y, pred, average="macro", zero_division=0))
    assert got["balanced_accuracy"] == pytest.approx(balanced_accuracy_score(y, pred))


def test_auroc_nan_when_class_absent_other_metrics_defined():
    y = np.array([0, 1, 0, 1])
    proba = np.array([[0.7, 0.2, 0.1], [0.2, 0.7, 0.1], [0.5, 0.3, 0.2], [0.3, 0.6, 0.1]])
    got = classification_metrics(y, proba)
    assert math.isnan(got["auroc"])
    assert math.isnan(auroc_ovr(y, proba))
    assert got["accuracy"] == 1.0
    assert missing_classes(y, 3) == [2]


def test_bad_inputs_raise_clear_errors():
    with pytest.raises(DataError, match="labels must lie"):
        classification_metrics(np.array([0, 3]), np.ones((2, 3)) / 3)
    with pytest.raises(DataError, match=r"\(N,\)"):
        classification_metrics(np.array([0, 1]), np.ones((3, 3)))
    with pytest.raises(ConfigError, match="confidence"):
        seed_ci([1.0, 2.0], confidence=1.5)


def test_bootstrap_contains_point_and_narrows_with_more_data():
    widths = []
    for n in (100, 1600):
        y, proba = _random_problem(n, 3, seed=5)
        for metric in ("accuracy", "balanced_accuracy", "macro_f1", "auroc"):
            ci = bootstrap_ci(y, proba, metric=metric, num_resamples=500, rng=np.random.default_rng(0))
            assert ci.low <= ci.point <= ci.high, (metric, ci)
            if metric == "accuracy":
                widths.append(ci.high - ci.low)
    assert widths[1] < widths[0] / 2.5  # width ~ 1/sqrt(n): a factor of 4 expected


def test_bootstrap_is_reproducible_and_matches_callable_path():
    y, proba = _random_problem(150, 3, seed=2)
    a = bootstrap_ci(y, proba, metric="macro_f1", num_resamples=200, rng=np.random.default_rng(7))
    b = bootstrap_ci(y, proba, metric=lambda yt, p: f1_score(yt, p.argmax(1), average="macro"),
                     num_resamples=200, rng=np.random.default_rng(7))
    assert a == pytest.approx(tuple(b), abs=1e-12)
    p, lo, hi = a  # unpacks as a 3-tuple
    assert (p, lo, hi) == (a.point, a.low, a.high)


def test_bootstrap_auroc_skips_and_counts_undefined_resamples():
    # class 2 occurs once: about exp(-1) of resamples miss it and are skipped
    y = np.array([0] * 20 + [1] * 19 + [2])
    rng = np.random.default_rng(0)
    proba = rng.dirichlet(np.ones(3), size=y.size)
    ci = bootstrap_ci(y, proba, metric="auroc", num_resamples=1000, rng=np.random.default_rng(1))
    assert 250 < ci.num_skipped < 480
    assert ci.num_resamples == 1000
    assert not math.isnan(ci.low)


def test_bootstrap_coverage_on_bernoulli():
    """A 90% interval for accuracy should cover the true accuracy in roughly 90% of test sets."""
    rng = np.random.default_rng(123)
    true_acc, n, covered, trials = 0.7, 200, 0, 100
    for _ in range(trials):
        y = rng.integers(0, 2, size=n)
        correct = rng.random(n) < true_acc
        pred = np.where(correct, y, 1 - y)
        proba = np.eye(2)[pred]
        _, lo, hi = bootstrap_ci(y, proba, metric="accuracy", num_resamples=300,
                                 confidence=0.9, rng=rng)
        covered += lo <= true_acc <= hi
    assert 0.78 <= covered / trials <= 0.98


def test_bootstrap_auroc_speed():
    y, proba = _random_problem(500, 3, seed=3)
    start = time.perf_counter()
    bootstrap_ci(y, proba, metric="auroc", num_resamples=1000, rng=np.random.default_rng(0))
    assert time.perf_counter() - start < 4.0  # budget 2 s on a laptop; slack for a busy CI box


def test_metrics_with_ci_keys():
    y, proba = _random_problem(120, 3, seed=4)
    out = metrics_with_ci(y, proba, rng=np.random.default_rng(0), num_resamples=200)
    assert set(out) == {"accuracy", "balanced_accuracy", "macro_f1", "auroc"}
    point = classification_metrics(y, proba)
    for name, d in out.items():
        assert d["point"] == point[name]
        assert d["low"] <= d["point"] <= d["high"]


def test_seed_ci_by_hand():
    values = [0.70, 0.74, 0.72]
    mean, lo, hi = seed_ci(values)
    # s = 0.02, t_{0.975, 2} = 4.302652729911275
    half = 4.302652729911275 * 0.02 / math.sqrt(3)
    assert mean == pytest.approx(0.72)
    assert (lo, hi) == pytest.approx((0.72 - half, 0.72 + half), abs=1e-9)
    m, a, b = seed_ci([0.8])
    assert m == 0.8 and math.isnan(a) and math.isnan(b)


def test_per_group_accuracy():
    got = per_group_accuracy([0, 1, 1, 0, 1], [0, 1, 0, 0, 0], [2, 2, 5, 5, 5])
    assert got == {2: 1.0, 5: pytest.approx(1 / 3)}
    assert all(type(k) is int for k in got)


def test_smooth_and_rounds_to_target_exact():
    values = [0.1, 0.5, 0.9, 0.3, 0.8, 0.9]
    np.testing.assert_allclose(smooth(values, 3), [0.1, 0.3, 0.5, 1.7 / 3, 2.0 / 3, 2.0 / 3])
    np.testing.assert_array_equal(smooth(values, 1), values)
    assert rounds_to_target(values, 0.6, window=3) == 5   # raw series first reaches 0.6 at round 3
    assert rounds_to_target(values, 0.6, window=1) == 3
    assert rounds_to_target(values, 0.95) is None
    assert rounds_to_target([0.2, 0.4], 0.2) == 1
    with pytest.raises(ConfigError):
        smooth(values, 0)
    with pytest.raises(DataError):
        smooth([0.1, float("nan")], 2)


def test_tensor_bytes_exact():
    tensors = {"w": torch.zeros(10, 100), "h": torch.zeros(7, dtype=torch.float16),
               "i": torch.zeros(3, dtype=torch.int64), "w2": torch.zeros(5)}
    assert tensor_bytes(tensors) == {"float16": 14, "float32": 4020, "int64": 24}
    assert tensor_bytes([torch.zeros(2, 3).t()]) == {"float32": 24}  # a view counts its elements
    assert tensor_bytes([]) == {}


def test_communication_counter_sums_and_state_round_trip():
    c = CommunicationCounter()
    model = {"a": torch.zeros(100), "b": torch.zeros(10, dtype=torch.float16)}
    for rnd in (1, 2):
        for site in (0, 1, 2):
            assert c.add_download(rnd, site, model) == 420
            assert c.add_upload(rnd, site, [torch.zeros(100)]) == 400
    assert c.round_totals(1) == {"up": 1200, "down": 1260}
    assert c.cumulative_totals() == {"up": 2400, "down": 2520}
    assert c.cumulative_totals(1) == {"up": 1200, "down": 1260}
    assert c.dtype_totals() == {"float16": 120, "float32": 4800}
    assert c.dtype_totals("up") == {"float32": 2400}
    assert c.site_totals("up") == {0: 800, 1: 800, 2: 800}
    assert c.total_bytes() == 4920 and c.megabytes() == pytest.approx(4920 / 1e6)
    assert c.as_rows() == [
        {"round": 1, "bytes_up": 1200, "bytes_down": 1260, "cum_bytes_up": 1200, "cum_bytes_down": 1260},
        {"round": 2, "bytes_up": 1200, "bytes_down": 1260, "cum_bytes_up": 2400, "cum_bytes_down": 2520},
    ]
    import json
    d = CommunicationCounter()
    d.load_state_dict(json.loads(json.dumps(c.state_dict())))
    assert d.as_rows() == c.as_rows() and d.site_totals() == c.site_totals()
    with pytest.raises(DataError, match="direction"):
        c.total_bytes("sideways")


def _scores(pred: np.ndarray, num_classes: int = 3) -> np.ndarray:
    return np.eye(num_classes)[pred]


def test_paired_difference_is_the_accuracy_difference_and_narrower_than_the_marginal_intervals():
    """acc(a) - acc(b) on the same subjects; where a and b err on the same subjects the paired interval is far
    narrower than the two marginal half-widths together (the reason the kit reports it), and an UNPAIRED
    bootstrap (independent resamples for a and b: the broken variant) is not."""
    from mmpfl_core.metrics.classification import paired_accuracy_difference

    rng = np.random.default_rng(0)
    n = 4000
    y = rng.integers(0, 3, n)
    b = np.where(rng.random(n) < 0.7, y, (y + 1) % 3)  # ~70% right
    a = b.copy()
    fixed = np.flatnonzero(b != y)[: n // 100]  # a also gets 40 of b's errors right: +0.01
    a[fixed] = y[fixed]
    diff = paired_accuracy_difference(y, _scores(a), _scores(b), rng=np.random.default_rng(1))
    assert diff.point == pytest.approx((a == y).mean() - (b == y).mean()) == pytest.approx(0.01)
    assert 0.0 < diff.low < diff.point < diff.high  # excludes 0
    ci_a = bootstrap_ci(y, _scores(a), metric="accuracy", rng=np.random.default_rng(2))
    ci_b = bootstrap_ci(y, _scores(b), metric="accuracy", rng=np.random.default_rng(3))
    assert ci_a.low < ci_b.high  # the marginal intervals overlap ...
    marginal = (ci_a.high - ci_a.low + ci_b.high - ci_b.low) / 2
    assert diff.high - diff.low < marginal / 3  # ... while the paired interval is a fraction of their widths
    # the broken variant: resampling a and b independently loses the pairing and does not exclude 0
    ia, ib = (np.random.default_rng(s).integers(0, n, (1000, n)) for s in (4, 5))
    unpaired = (a[ia] == y[ia]).mean(axis=1) - (b[ib] == y[ib]).mean(axis=1)
    assert np.quantile(unpaired, 0.025) < 0.0 < np.quantile(unpaired, 0.975)


def test_paired_difference_of_a_model_with_itself_is_zero_and_bad_inputs_are_named():
    from mmpfl_core.metrics.classification import paired_accuracy_difference

    y = np.array([0, 1, 2, 1, 0])
    p = _scores(np.array([0, 1, 1, 1, 2]))
    same = paired_accuracy_difference(y, p, p, rng=np.random.default_rng(0), num_resamples=50)
    assert (same.point, same.low, same.high) == (0.0, 0.0, 0.0)
    with pytest.raises(DataError, match="expected y_true"):
        paired_accuracy_difference(y, p, p[:4], rng=np.random.default_rng(0))
    with pytest.raises(DataError, match="num_classes"):
        paired_accuracy_difference(y, p, _scores(np.array([0, 1, 1, 1, 2]), 4), rng=np.random.default_rng(0))


@pytest.mark.parametrize("num_classes,levels,n", [(3, None, 25), (3, 4, 25), (2, 5, 25), (4, None, 8)])
def test_resampled_auroc_equals_ranking_each_resample(num_classes, levels, n):
    """The counting path of the bootstrap AUROC (one sort per class) gives what ranking every resample gives, with
    tied scores (``levels``: scores rounded to so many values) and with resamples that miss a class (NaN, n = 8);
    a variant that breaks the ties instead of giving tied subjects their mid-rank is caught."""
    from mmpfl_core.metrics.classification import _batched_auroc, _resample_indices, _resampled_auroc

    rng = np.random.default_rng(num_classes)
    y = rng.integers(0, num_classes, n)
    p = rng.dirichlet(np.ones(num_classes), n)
    if levels:
        p = np.round(p * levels) / levels
    idx = _resample_indices(n, 300, rng)
    ranked = _batched_auroc(y[idx], p[idx], num_classes)
    counted = _resampled_auroc(y, p, num_classes, idx)
    assert np.array_equal(np.isnan(counted), np.isnan(ranked))
    assert np.isnan(ranked).any() or n > 8  # at n = 8 some resamples miss a class
    np.testing.assert_allclose(counted[~np.isnan(counted)], ranked[~np.isnan(ranked)], rtol=0, atol=1e-12)
    if levels:
        ties_broken = _resampled_auroc(y, p + 1e-9 * rng.random(p.shape), num_classes, idx)
        assert np.nanmax(np.abs(ties_broken - ranked)) > 1e-3
