"""Privacy maths and mechanisms for client-level and sample-level DP (docs/DESIGN.md 4).

Pure functions and small classes: clipping, Gaussian noise and its placement, accountants, the
per-run privacy ledger, the Fisher-based per-group noise allocation. Knows no model class, no round
loop and no attacker.
"""

from mmpfl_core.privacy.accounting import (
    ACCOUNTANTS,
    calibrate_noise,
    combine_noise_multipliers,
    compose_epsilon,
    compute_epsilon,
    effective_noise_multiplier,
)
from mmpfl_core.privacy.allocation import (
    NoiseAllocation,
    clip_bounds_from_sizes,
    check_effective_multiplier,
    effective_multiplier,
    effective_multiplier_of,
    fisher_noise_allocation,
    fisher_weighted_noise,
    floor_fisher,
    predicted_noise_loss,
    uniform_noise_allocation,
)
from mmpfl_core.privacy.clipping import (
    UpdateRejected,
    clip_flat,
    clip_per_group,
    global_norm,
    group_norms,
    validate_update,
)
from mmpfl_core.privacy.fisher import diagonal_fisher, group_fisher
from mmpfl_core.privacy.ledger import PrivacyLedger
from mmpfl_core.privacy.mechanisms import (
    NOT_PRIVATE_WARNING,
    NoisePlacement,
    NoiseSource,
    NoiseSplit,
    ReleaseAccounting,
    gaussian_noise_like,
    per_participant_noise_std,
    release_accounting,
    server_top_up_std,
)

__all__ = [
    "ACCOUNTANTS",
    "NOT_PRIVATE_WARNING",
    "NoiseAllocation",
    "NoisePlacement",
    "NoiseSource",
    "NoiseSplit",
    "PrivacyLedger",
    "ReleaseAccounting",
    "UpdateRejected",
    "calibrate_noise",
    "clip_bounds_from_sizes",
    "clip_flat",
    "clip_per_group",
    "combine_noise_multipliers",
    "compose_epsilon",
    "compute_epsilon",
    "diagonal_fisher",
    "check_effective_multiplier",
    "effective_multiplier",
    "effective_multiplier_of",
    "effective_noise_multiplier",
    "fisher_noise_allocation",
    "fisher_weighted_noise",
    "floor_fisher",
    "gaussian_noise_like",
    "global_norm",
    "group_fisher",
    "group_norms",
    "per_participant_noise_std",
    "predicted_noise_loss",
    "release_accounting",
    "server_top_up_std",
    "uniform_noise_allocation",
    "validate_update",
]
