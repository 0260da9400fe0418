"""Privacy attacks and audits: what an adversary can learn from what the kit releases.

Membership inference (:mod:`.membership` scores and metrics, :mod:`.targets` the models attacked;
the shadow runs, the table and the paper's claim are orchestration: :mod:`mmpfl_core.reproduction.membership`), gradient inversion
(:mod:`.gradient_inversion`), the noise-subtraction attack on reproducible noise (:mod:`.noise_subtraction`),
the one-run DP audit (:mod:`.audit` the bound, :mod:`.canaries` the canary clients through the real
DP-FedAvg release; a teaching tool with limited power) and the multi-run distinguishing test that CI
relies on (:mod:`.distinguishing` the held-out threshold test and its bound, :mod:`.neighbours` the real
release on neighbouring federations), with the deliberately broken releases both must catch
(:mod:`.variants`). These modules attack the mechanisms in
:mod:`mmpfl_core.privacy`; the privacy package never imports them (the mechanism never knows its attacker).
"""

from .audit import AuditResult, epsilon_lower_bound, guess_from_scores, one_run_audit, p_value_dp_audit
from .canaries import BROKEN_VARIANTS, CanaryAuditConfig, audit_client_level_dp, broken_mechanism
from .distinguishing import DistinguishingResult, clopper_pearson, distinguishing_lower_bound
from .gradient_inversion import DefenceResult, Inversion, InversionConfig, compare_defences, invert_update
from .membership import (
    AttackMetrics,
    attack_metrics,
    lira_offline_scores,
    logit_confidence,
    loss_scores,
    random_guess_auc_band,
    reference_calibrated_scores,
    roc,
    tpr_at_fpr,
)
from .neighbours import NeighbourConfig, participation_test, projection_test
from .targets import (
    Candidates,
    MembershipConfig,
    MembershipResult,
    deployed_proba,
    membership_candidates,
    run_membership_attacks,
)

__all__ = [
    "AttackMetrics",
    "AuditResult",
    "BROKEN_VARIANTS",
    "CanaryAuditConfig",
    "Candidates",
    "DefenceResult",
    "DistinguishingResult",
    "NeighbourConfig",
    "clopper_pearson",
    "distinguishing_lower_bound",
    "participation_test",
    "projection_test",
    "Inversion",
    "InversionConfig",
    "MembershipConfig",
    "MembershipResult",
    "attack_metrics",
    "audit_client_level_dp",
    "broken_mechanism",
    "compare_defences",
    "deployed_proba",
    "epsilon_lower_bound",
    "guess_from_scores",
    "invert_update",
    "lira_offline_scores",
    "logit_confidence",
    "loss_scores",
    "membership_candidates",
    "one_run_audit",
    "p_value_dp_audit",
    "random_guess_auc_band",
    "reference_calibrated_scores",
    "roc",
    "run_membership_attacks",
    "tpr_at_fpr",
]
