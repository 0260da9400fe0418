"""Membership-inference targets: which model the adversary queries, on whom, and the shadow models.

Threat models (docs/DESIGN.md 4.6):
    * ``"global"``: an outside adversary holds the released global model (what the server
      publishes). Client-level DP covers it: a whole site's contribution, hence each of its patients.
    * ``"personal"``: an adversary queries each hospital's deployed model (its personalised model
      where the method has one, else the global model). Personal groups are trained on the site's
      own data and never released through the DP mechanism: client-level DP does NOT cover them;
      only sample-level DP (DP-SGD inside the site) protects those patients.

Candidates of the attacked sites: members are their training subjects; non-members are their
validation and test subjects (same site, same scanner, same distribution, never trained on).

Shadow models (for the reference-calibrated attack and offline LiRA) are trained by the attacker
with the target's own recipe (same method, same hyperparameters, same engine; trained by
:func:`mmpfl_core.reproduction.membership.train_shadows`)
on a fresh federation drawn from the same population with other seeds: none of the candidates is
in it, so every shadow is an OUT model, as offline LiRA requires (Carlini et al. 2022, Sec. VI-C).
In the synthetic kit "the same population" is the generator with another seed; in a real study it
would be public or purchased data of the same kind, which is a strong assumption to state.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal
from collections.abc import Callable, Sequence

import numpy as np
import torch
from torch import nn

from ..data.contract import Cohort, CohortDataset, concatenate
from ..data.federation import Federation
from ..errors import ConfigError
from ..federated.evaluation import predict_proba
from ..federated.simulation import RunResult
from ..seeding import Stream, numpy_generator
from .membership import (
    AttackMetrics,
    attack_metrics,
    lira_offline_scores,
    logit_confidence,
    loss_scores,
    reference_calibrated_scores,
)

__all__ = [
    "Candidates",
    "MembershipConfig",
    "MembershipResult",
    "deployed_proba",
    "membership_candidates",
    "run_membership_attacks",
]

Target = Literal["global", "personal"]


@dataclass(frozen=True)
class MembershipConfig:
    """What to attack and how (validated; errors name the fix)."""

    target: Target = "global"
    sites: tuple[int, ...] | None = None  # attacked sites; None = every site
    num_shadows: int = 0  # 0: loss attack only; >= 2 adds reference-calibrated and offline LiRA
    shadow_seed_offset: int = 1000  # shadow s uses seeds seed + offset + s (fresh subjects)
    num_resamples: int = 200  # bootstrap resamples for the CIs
    fpr_levels: tuple[float, ...] = (0.01, 0.001)
    seed: int = 0

    def __post_init__(self) -> None:
        if self.target not in ("global", "personal"):
            raise ConfigError(f"membership target={self.target!r} is unknown; use 'global' or 'personal'.")
        if self.num_shadows == 1 or self.num_shadows < 0:
            raise ConfigError(
                f"membership num_shadows={self.num_shadows} must be 0 (loss attack only) or >= 2 "
                "(LiRA fits a variance over shadows)."
            )
        if self.num_resamples < 1 or not all(0 < f < 1 for f in self.fpr_levels):
            raise ConfigError(
                f"membership num_resamples={self.num_resamples} must be >= 1 and fpr_levels "
                f"{self.fpr_levels} must lie in (0, 1)."
            )
        if self.sites is not None:
            object.__setattr__(self, "sites", tuple(int(s) for s in self.sites))


@dataclass(frozen=True)
class Candidates:
    """Members then non-members of the attacked sites, in one cohort."""

    cohort: Cohort
    is_member: np.ndarray  # (N,) 1 = trained on


def membership_candidates(federation: Federation, sites: Sequence[int] | None = None) -> Candidates:
    """Members (train) and non-members (val + test) of ``sites`` (default: every site)."""
    chosen = range(federation.num_sites) if sites is None else sites
    bad = [s for s in chosen if not 0 <= s < federation.num_sites]
    if bad:
        raise ConfigError(
            f"membership sites {bad} do not exist; the federation has sites 0..{federation.num_sites - 1}."
        )
    members = concatenate([federation.sites[s].train for s in chosen])
    non_members = concatenate([c for s in chosen for c in (federation.sites[s].val, federation.sites[s].test)])
    is_member = np.r_[np.ones(len(members), dtype=np.int64), np.zeros(len(non_members), dtype=np.int64)]
    return Candidates(cohort=concatenate([members, non_members]), is_member=is_member)


def deployed_proba(
    run: RunResult,
    model: nn.Module,
    candidates: Candidates,
    *,
    target: Target,
    batch_size: int = 256,
    device: str | torch.device = "cpu",
) -> np.ndarray:
    """Class probabilities (N, C) of the model the adversary queries, for every candidate.

    ``"personal"``: each candidate is scored by its own site's deployed model.
    """
    device = torch.device(device)
    cohort = candidates.cohort
    if target == "global":
        if not run.strategy.has_global_model:
            raise ConfigError(f"{run.strategy.name} releases no global model; attack target='personal' instead.")
        model.load_state_dict(run.global_state, strict=False)
        return predict_proba(model, CohortDataset(cohort), batch_size=batch_size, device=device)
    proba = np.zeros((len(cohort), cohort.num_classes), dtype=np.float64)
    for site in np.unique(cohort.sites):
        rows = np.flatnonzero(cohort.sites == site)
        state = run.strategy.personal_state(int(site), run.global_state)
        model.load_state_dict(state if state is not None else run.global_state, strict=False)
        proba[rows] = predict_proba(model, CohortDataset(cohort.subset(rows)), batch_size=batch_size, device=device)
    return proba


@dataclass
class MembershipResult:
    """Metrics and raw scores per attack (the scores feed the ROC plots)."""

    metrics: dict[str, AttackMetrics]
    scores: dict[str, np.ndarray]
    is_member: np.ndarray
    target: Target
    extra: dict[str, Any] = field(default_factory=dict)

    def table_rows(self, **labels: Any) -> list[dict[str, Any]]:
        return [{**labels, "target": self.target, "attack": name, **m.as_row()} for name, m in self.metrics.items()]


def run_membership_attacks(
    run: RunResult,
    model_factory: Callable[[], nn.Module],
    federation: Federation,
    *,
    config: MembershipConfig = MembershipConfig(),
    shadows: Sequence[RunResult] = (),
    device: str | torch.device = "cpu",
) -> MembershipResult:
    """Score every candidate of the attacked sites with each attack and measure the attacks.

    Algorithm:
        1. Candidates: members and non-members of ``config.sites`` (:func:`membership_candidates`).
        2. Query the target model(s) (:func:`deployed_proba`): loss scores (Yeom) and LiRA's phi.
        3. With shadows: query each shadow's corresponding model (its global model, or its site k's
           deployed model for candidates of site k) on the same candidates; reference-calibrated
           scores and offline LiRA scores (:mod:`.membership`).
        4. :func:`attack_metrics` per attack, bootstrap stream derived from ``config.seed``.
    """
    if shadows and len(shadows) < 2:
        raise ConfigError("LiRA needs at least two shadow runs; pass none (loss attack only) or >= 2.")
    candidates = membership_candidates(federation, config.sites)
    model = model_factory()
    labels = candidates.cohort.labels
    proba = deployed_proba(run, model, candidates, target=config.target, device=device)
    scores = {"loss threshold": loss_scores(proba, labels)}
    if shadows:
        shadow_proba = [deployed_proba(s, model, candidates, target=config.target, device=device) for s in shadows]
        scores["reference-calibrated"] = reference_calibrated_scores(
            scores["loss threshold"], np.stack([loss_scores(p, labels) for p in shadow_proba])
        )
        scores["LiRA (offline)"] = lira_offline_scores(
            logit_confidence(proba, labels), np.stack([logit_confidence(p, labels) for p in shadow_proba])
        )
    metrics = {
        name: attack_metrics(
            candidates.is_member,
            s,
            num_resamples=config.num_resamples,
            fpr_levels=config.fpr_levels,
            rng=numpy_generator(config.seed, Stream.ATTACK_BOOTSTRAP, i),
        )
        for i, (name, s) in enumerate(scores.items())
    }
    accuracy = {
        "member accuracy": float(
            np.mean(proba.argmax(1)[candidates.is_member == 1] == labels[candidates.is_member == 1])
        ),
        "non-member accuracy": float(
            np.mean(proba.argmax(1)[candidates.is_member == 0] == labels[candidates.is_member == 0])
        ),
    }
    return MembershipResult(
        metrics=metrics, scores=scores, is_member=candidates.is_member, target=config.target, extra=accuracy
    )
