"""Membership inference: attack scores from a model's outputs, and the metrics that say how well they work.

What it is for: measuring what an adversary who can query a released model learns about whether a
given patient was in the training data. A score is computed per candidate (higher = "member"); the
metrics compare the scores of true members (training subjects) and non-members (held-out subjects
from the same distribution). Every attack here is a valid attack, so every DP guarantee bounds it:
an (eps, delta)-DP model allows TPR <= e^eps FPR + delta at every threshold.

Attacks (scores only; :mod:`.targets` queries the models):
    * loss threshold (Yeom et al. 2018, "Privacy risk in machine learning"): score = -loss(x, y).
      Members tend to have lower loss. Needs nothing but the target model.
    * reference-calibrated (Watson et al. 2022, "On the importance of difficulty calibration in
      membership inference attacks"): score = -loss_target(x) + mean over reference models of
      loss_ref(x). Reference models are trained by the attacker on other data from the population;
      subtracting their loss removes how hard the example is in general.
    * LiRA, offline (Carlini et al. 2022, "Membership inference attacks from first principles",
      Sec. IV and VI-C): with phi = log(p_y / (1 - p_y)) the logit-scaled confidence, fit a Gaussian
      N(mu_x, sigma^2) to phi of the candidate under OUT reference (shadow) models, and score by the
      one-sided test statistic (phi_target - mu_x) / sigma. With few shadows sigma is one global
      value over all candidates (their "fixed variance" variant), as the paper recommends.

Metrics (:func:`attack_metrics`): ROC AUC, TPR at 1% and 0.1% FPR (low-FPR is what matters, Carlini
et al.), and balanced attack accuracy, each with a bootstrap 95% CI over candidates. The balanced
accuracy uses a threshold fitted on one half of the candidates and applied to the other (two-fold
cross-fitting): tuning the threshold on the same candidates inflates it, by ~0.05-0.1 at 50+50
candidates even for random scores. A TPR at an FPR below 1 / (number of non-members) cannot be
measured: it is reported at FPR 0, the finest level the candidates resolve (``fpr_resolution``).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
from sklearn.metrics import roc_auc_score, roc_curve

from ..errors import DataError
from ..metrics.classification import BootstrapCI, bootstrap_ci

__all__ = [
    "AttackMetrics",
    "attack_metrics",
    "cross_fitted_predictions",
    "lira_offline_scores",
    "logit_confidence",
    "loss_scores",
    "random_guess_auc_band",
    "reference_calibrated_scores",
    "roc",
    "tpr_at_fpr",
]

_EPS = 1e-12


def _true_class(proba: np.ndarray, labels: np.ndarray) -> np.ndarray:
    p, y = np.asarray(proba, dtype=np.float64), np.asarray(labels)
    if p.ndim != 2 or y.shape != (p.shape[0],):
        raise DataError(f"expected proba (N, C) and labels (N,); got {p.shape} and {y.shape}.")
    return p[np.arange(y.size), y]


def loss_scores(proba: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """Yeom et al.: -cross-entropy of the true class, (N,). Higher = more likely a member."""
    return np.log(np.clip(_true_class(proba, labels), _EPS, 1.0))


def logit_confidence(proba: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """LiRA's phi = log p_y - log(1 - p_y), (N,), computed as log p_y - log sum_{j != y} p_j (stable)."""
    p = np.clip(np.asarray(proba, dtype=np.float64), _EPS, 1.0)
    y = np.asarray(labels)
    true = np.log(p[np.arange(y.size), y])
    others = p.copy()
    others[np.arange(y.size), y] = 0.0
    return true - np.log(np.clip(others.sum(axis=1), _EPS, None))


def reference_calibrated_scores(target_loss_scores: np.ndarray, reference_loss_scores: np.ndarray) -> np.ndarray:
    """Watson et al.: target score minus the mean score under the reference models.

    Args:
        target_loss_scores: (N,) :func:`loss_scores` of the target model.
        reference_loss_scores: (S, N) the same for S reference models that never saw the candidates.
    """
    ref = np.atleast_2d(np.asarray(reference_loss_scores, dtype=np.float64))
    if ref.shape[1] != np.shape(target_loss_scores)[0]:
        raise DataError(f"reference scores {ref.shape} must be (num_references, {np.shape(target_loss_scores)[0]}).")
    return np.asarray(target_loss_scores, dtype=np.float64) - ref.mean(axis=0)


def lira_offline_scores(target_phi: np.ndarray, shadow_phi: np.ndarray, *, global_variance: bool = True) -> np.ndarray:
    """Offline LiRA (Carlini et al. 2022, Algorithm 1 without IN models).

    Algorithm:
        1. mu_x = mean of phi_x over the S OUT shadow models (none of them trained on x).
        2. sigma = std over shadows, pooled over all candidates (``global_variance``, needed for
           S < ~64) or per candidate (floored at 1e-3 to avoid dividing by zero).
        3. score_x = (phi_target(x) - mu_x) / sigma: monotone in the likelihood ratio of the
           one-sided test "phi is larger than OUT models make it".

    Args:
        target_phi: (N,) :func:`logit_confidence` under the target model.
        shadow_phi: (S, N) under S >= 2 shadow models.
    """
    shadows = np.atleast_2d(np.asarray(shadow_phi, dtype=np.float64))
    if shadows.shape[0] < 2 or shadows.shape[1] != np.shape(target_phi)[0]:
        raise DataError(
            f"LiRA needs shadow phi of shape (S >= 2, {np.shape(target_phi)[0]}); got {shadows.shape}. "
            "Train at least two shadow models."
        )
    mu = shadows.mean(axis=0)
    sigma = np.sqrt(shadows.var(axis=0, ddof=1).mean()) if global_variance else shadows.std(axis=0, ddof=1)
    return (np.asarray(target_phi, dtype=np.float64) - mu) / np.maximum(sigma, 1e-3)


def _check(is_member: np.ndarray, scores: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    y, s = np.asarray(is_member).astype(np.int64), np.asarray(scores, dtype=np.float64)
    if y.ndim != 1 or y.shape != s.shape or not np.isfinite(s).all():
        raise DataError(
            f"is_member and scores must be equal-length 1-D arrays of finite values; got {y.shape}, {s.shape}."
        )
    if y.min(initial=1) == y.max(initial=0) or not set(np.unique(y)) <= {0, 1}:
        raise DataError("membership metrics need both members (1) and non-members (0) among the candidates.")
    return y, s


def roc(is_member: np.ndarray, scores: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(FPR, TPR) of the ROC curve (sklearn's ``roc_curve``, every threshold kept)."""
    y, s = _check(is_member, scores)
    fpr, tpr, _ = roc_curve(y, s, drop_intermediate=False)
    return fpr, tpr


def tpr_at_fpr(is_member: np.ndarray, scores: np.ndarray, fpr_level: float) -> float:
    """TPR at the most permissive threshold whose FPR is at most ``fpr_level`` (never interpolated up)."""
    fpr, tpr = roc(is_member, scores)
    return float(tpr[fpr <= fpr_level + 1e-15].max())


def _best_threshold(y: np.ndarray, s: np.ndarray) -> float:
    fpr, tpr, thresholds = roc_curve(y, s)
    best = int(np.argmax(tpr - fpr))  # maximises balanced accuracy (TPR + TNR) / 2 on this fold
    # Cut halfway to the next lower score, not at a training member's own score (a margin, as in an SVM).
    return float(thresholds[best] if best + 1 == thresholds.size else 0.5 * (thresholds[best] + thresholds[best + 1]))


def cross_fitted_predictions(is_member: np.ndarray, scores: np.ndarray, *, rng: np.random.Generator) -> np.ndarray:
    """0/1 membership guesses, each from a threshold fitted on the OTHER half (stratified two folds)."""
    y, s = _check(is_member, scores)
    fold = np.zeros(y.size, dtype=bool)
    for cls in (0, 1):
        idx = rng.permutation(np.flatnonzero(y == cls))
        fold[idx[: idx.size // 2]] = True
    guesses = np.zeros(y.size, dtype=np.int64)
    for train in (fold, ~fold):
        if len(np.unique(y[train])) < 2:  # too few candidates to fit: guess "member" on the held-out half
            guesses[~train] = 1
            continue
        guesses[~train] = (s[~train] >= _best_threshold(y[train], s[train])).astype(np.int64)
    return guesses


def _balanced_accuracy(y: np.ndarray, p: np.ndarray) -> float:
    if len(np.unique(y)) < 2:
        return float("nan")
    guess = p[:, 0]
    return 0.5 * (float(np.mean(guess[y == 1] == 1)) + float(np.mean(guess[y == 0] == 0)))


def _auc(y: np.ndarray, p: np.ndarray) -> float:
    return float(roc_auc_score(y, p[:, 0])) if len(np.unique(y)) == 2 else float("nan")


def _tpr_metric(level: float):
    return lambda y, p: tpr_at_fpr(y, p[:, 0], level) if len(np.unique(y)) == 2 else float("nan")


@dataclass(frozen=True)
class AttackMetrics:
    """How well one attack separates members from non-members; every value is ``(point, low, high)``."""

    auc: BootstrapCI
    balanced_accuracy: BootstrapCI
    tpr_at_fpr: dict[float, BootstrapCI] = field(default_factory=dict)
    num_members: int = 0
    num_non_members: int = 0

    @property
    def fpr_resolution(self) -> float:
        """The smallest non-zero FPR these candidates can show (1 / non-members)."""
        return 1.0 / self.num_non_members

    def as_row(self) -> dict[str, float]:
        """Flat dict for tables: point estimates and CI bounds."""
        row = {
            "AUC": self.auc.point,
            "AUC low": self.auc.low,
            "AUC high": self.auc.high,
            "balanced acc": self.balanced_accuracy.point,
            "balanced acc low": self.balanced_accuracy.low,
            "balanced acc high": self.balanced_accuracy.high,
        }
        for level, ci in self.tpr_at_fpr.items():
            row[f"TPR@{level:.1%}FPR"] = ci.point
        return row


def attack_metrics(
    is_member: np.ndarray,
    scores: np.ndarray,
    *,
    rng: np.random.Generator,
    num_resamples: int = 200,
    fpr_levels: tuple[float, ...] = (0.01, 0.001),
    confidence: float = 0.95,
) -> AttackMetrics:
    """AUC, cross-fitted balanced accuracy and TPR at each FPR level, with percentile bootstrap CIs.

    The CIs resample candidates (``metrics.classification.bootstrap_ci``): they say how much the number
    would move with another draw of members and non-members, not across training runs.
    """
    y, s = _check(is_member, scores)
    # bootstrap_ci takes (N, C) class-score matrices with labels < C: column 0 holds the values, column 1 pads.
    column = np.c_[s, np.zeros_like(s)]  # (N, 2)
    guesses = np.c_[cross_fitted_predictions(y, s, rng=rng), np.zeros_like(y)]  # (N, 2)
    ci = {
        name: bootstrap_ci(y, values, metric=fn, num_resamples=num_resamples, confidence=confidence, rng=rng)
        for name, values, fn in (("auc", column, _auc), ("balanced_accuracy", guesses, _balanced_accuracy))
    }
    tprs = {
        level: bootstrap_ci(
            y, column, metric=_tpr_metric(level), num_resamples=num_resamples, confidence=confidence, rng=rng
        )
        for level in fpr_levels
    }
    return AttackMetrics(
        auc=ci["auc"],
        balanced_accuracy=ci["balanced_accuracy"],
        tpr_at_fpr=tprs,
        num_members=int(y.sum()),
        num_non_members=int((1 - y).sum()),
    )


def random_guess_auc_band(num_members: int, num_non_members: int) -> float:
    """Half-width of the ~95% band of AUC under random scores (Mann-Whitney normal approximation)."""
    n1, n0 = num_members, num_non_members
    return float(1.96 * np.sqrt((n0 + n1 + 1) / (12.0 * n0 * n1)))
