"""Private release of mask scores (docs/DESIGN.md 4.4): clip the score vector, add Gaussian noise.

What it is for: a site's personalisation mask (which groups it keeps) is computed from its private
validation data, and the server sees it through what the site uploads. Whether that costs privacy
depends on the noise placement:

* ``server`` (trusted aggregator): a masked group contributes zero to the clipped sum, which is
  within the clipping bound, so the released models stay (epsilon, delta)-DP whatever the masks
  are. The trusted server may see exact masks: the scores can stay exact, nothing to record.
* ``distributed`` / ``local``: the server sees which groups each site sends. The scores must then
  go through :func:`release_scores` (clip to L2 norm ``clip``, add N(0, (z clip)^2) per group);
  selecting groups from the noisy scores is post-processing. The release happens on the same
  sampled participant, in the same round, as its update release, so the two Gaussian mechanisms
  are ONE mechanism with multiplier (z_eff^-2 + z_mask^-2)^(-1/2): record them jointly with
  ``PrivacyLedger.record_joint(noise_multipliers=[z_update, mask_release_multiplier(...)])``, never
  as two separately subsampled entries (that would under-report epsilon for q < 1).
  Caveat for ``distributed``: secure aggregation hides the individual updates but not which groups
  each site sends, so against the server itself the mask release is a per-site release; the joint
  record covers what is released onward (the models, reports).

It must never release the exact scores, their pre-clipping norm, or the noise / generator state.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from collections.abc import Mapping

import torch

from ..errors import ConfigError, PrivacyError
from ..privacy.mechanisms import NoisePlacement

__all__ = ["ScoreRelease", "clip_scores", "mask_release_multiplier", "release_scores"]


def clip_scores(scores: Mapping[str, float], clip: float) -> dict[str, float]:
    """Scale the score vector (in the mapping's order) to L2 norm at most ``clip``."""
    if not 0.0 < clip < math.inf:
        raise PrivacyError(f"clip={clip!r} must be finite and > 0; it is the sensitivity of the score release.")
    values = torch.tensor([float(v) for v in scores.values()], dtype=torch.float64)
    if not bool(torch.isfinite(values).all()):
        raise PrivacyError(f"mask scores {dict(scores)} contain NaN/Inf; refuse to release them.")
    norm = float(values.norm()) if len(values) else 0.0
    scale = min(1.0, clip / norm) if norm > 0 else 1.0
    return {g: float(v) * scale for g, v in zip(scores, values.tolist(), strict=False)}


def release_scores(
    scores: Mapping[str, float], *, clip: float, noise_multiplier: float, generator: torch.Generator
) -> dict[str, float]:
    """The Gaussian mechanism on a site's mask scores.

    Steps: 1) clip the vector (s_g)_g to L2 norm <= ``clip`` (the sensitivity under add/remove-one-
    site adjacency); 2) add independent N(0, (noise_multiplier * clip)^2) to every coordinate, drawn
    in float64 on the CPU from ``generator``. Any selection made from the result is post-processing.

    Returns:
        ``{group: noisy score}`` in the order of ``scores`` (noisy scores may be negative).
    """
    if not 0.0 <= noise_multiplier < math.inf:
        raise PrivacyError(
            f"noise_multiplier={noise_multiplier!r} must be finite and >= 0 "
            "(0 releases clipped but exact scores: no privacy)."
        )
    clipped = clip_scores(scores, clip)
    noise = torch.randn(len(clipped), generator=generator, dtype=torch.float64) * (noise_multiplier * clip)
    return {g: v + float(e) for (g, v), e in zip(clipped.items(), noise, strict=False)}


def mask_release_multiplier(*, placement: NoisePlacement | str, noise_multiplier: float) -> float | None:
    """The multiplier to record JOINTLY with the round's update release, or ``None`` (nothing).

    * server: ``None``; masks add no privacy cost to the released models (module docstring).
    * distributed: ``noise_multiplier`` (sensitivity ``clip`` under add/remove-one-site).
    * local: ``noise_multiplier / 2``: under replace-one-site adjacency two clipped score vectors
      differ by up to 2 clip, as for updates (:func:`mmpfl_core.privacy.mechanisms.release_accounting`).

    Usage: ``ledger.record_joint(name="update+mask_scores", noise_multipliers=[z_update, z_mask], ...)``.
    """
    placement = NoisePlacement(placement)
    if placement is NoisePlacement.SERVER:
        return None
    if not 0.0 < noise_multiplier < math.inf:
        raise PrivacyError(
            f"mask score noise_multiplier={noise_multiplier!r} must be finite and > 0 with "
            f"{placement.value!r} placement: the server sees each site's mask."
        )
    return noise_multiplier / 2.0 if placement is NoisePlacement.LOCAL else float(noise_multiplier)


@dataclass(frozen=True)
class ScoreRelease:
    """Configuration of the private score release: L2 bound ``clip`` and multiplier ``noise_multiplier``."""

    clip: float = 1.0
    noise_multiplier: float = 1.0

    def __post_init__(self) -> None:
        if not 0.0 < self.clip < math.inf:
            raise ConfigError(f"score_release.clip={self.clip!r} must be finite and > 0.")
        if not 0.0 <= self.noise_multiplier < math.inf:
            raise ConfigError(f"score_release.noise_multiplier={self.noise_multiplier!r} must be finite and >= 0.")

    def apply(self, scores: Mapping[str, float], generator: torch.Generator) -> dict[str, float]:
        return release_scores(scores, clip=self.clip, noise_multiplier=self.noise_multiplier, generator=generator)

    def accounting_multiplier(self, placement: NoisePlacement | str) -> float | None:
        return mask_release_multiplier(placement=placement, noise_multiplier=self.noise_multiplier)
