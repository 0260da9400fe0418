"""Personalisation: KL scores of parameter groups, dynamic masks, and the private release of scores.

May import ``models`` (group names) and ``privacy`` (to release scores); never the round loop.
"""

from .kl_scores import kl_group_scores
from .masks import DynamicKLMasks, MaskSchedule, PersonalizationMasks
from .release import ScoreRelease, clip_scores, mask_release_multiplier, release_scores

__all__ = [
    "DynamicKLMasks",
    "MaskSchedule",
    "PersonalizationMasks",
    "ScoreRelease",
    "clip_scores",
    "kl_group_scores",
    "mask_release_multiplier",
    "release_scores",
]
