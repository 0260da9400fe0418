"""MRI-aware training augmentation of contract batches, built from MONAI transforms.

What it is for: a small-data image model (a few hundred subjects) overfits the exact pixels of its
training slices. Augmentations that mimic what really varies between scans of the same disease state
teach it what does not matter:

* left-right flip (``RandFlip``): MS lesions have no side, and a brain is roughly symmetric;
* a small affine (``RandAffine``: rotation, scale, shift): head position and size in the scanner;
* intensity scale / contrast (``RandScaleIntensity``, ``RandAdjustContrast``): MRI intensities
  have no absolute units, and vendors and field strengths scale them differently;
* a smooth multiplicative bias field (``RandBiasField``): coil inhomogeneity, what N4 removes.

No vertical flips or large rotations: axial slices have an anterior-posterior orientation and the
periventricular lesion pattern depends on it. Geometric transforms are drawn once per subject and
applied to all its sequences (they are co-registered in one session); the intensity scale is drawn
per sequence (each is its own acquisition), gamma and the bias field once per subject (the field
comes from the receive coil, which all sequences of a session share). The sample contract still holds after augmentation: a
missing sequence is zeros (re-masked at the end), intensities are clipped to [0, 1].

What it must never do: run at evaluation time, change labels, clinical values or masks, or use a
global random state (each call takes an explicit seed drawn from the caller's generator).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from ..errors import check_range

__all__ = ["AugmentConfig", "MRIAugment"]


@dataclass(frozen=True)
class AugmentConfig:
    """Probabilities and ranges of the MRI augmentations (each transform fires with its ``p``)."""

    flip_p: float = 0.5  # left-right flip
    affine_p: float = 0.5
    rotate_degrees: float = 10.0  # +/- in-plane rotation
    scale: float = 0.1  # +/- isotropic zoom
    shift: float = 0.06  # +/- translation, fraction of the image side
    intensity_p: float = 0.5  # multiply each sequence by 1 + U(-0.1, 0.1); gamma contrast per subject
    intensity_scale: float = 0.1
    gamma: tuple[float, float] = (0.8, 1.25)
    bias_field_p: float = 0.3  # per subject: smooth multiplicative field (shared coil)
    bias_field_coeff: float = 0.3

    def __post_init__(self) -> None:
        for name in ("flip_p", "affine_p", "intensity_p", "bias_field_p"):
            check_range(f"AugmentConfig.{name}", getattr(self, name), low=0.0, high=1.0)
        check_range("AugmentConfig.rotate_degrees", self.rotate_degrees, low=0.0, high=45.0)
        for name in ("scale", "shift", "intensity_scale", "bias_field_coeff"):
            check_range(f"AugmentConfig.{name}", getattr(self, name), low=0.0, high=0.5)


class MRIAugment:
    """Augment a batch of slices ``(B, M, H, W)`` subject by subject (MONAI works per sample).

    Args:
        config: probabilities and ranges.
        image_size: side of the slices (MONAI's translation is in pixels).
        seed: seed of the MONAI transforms' own random state (``set_random_state``).
    """

    def __init__(self, config: AugmentConfig = AugmentConfig(), *, image_size: int, seed: int = 0) -> None:
        from monai.transforms import (
            Compose,
            RandAdjustContrast,
            RandAffine,
            RandBiasField,
            RandFlip,
            RandScaleIntensity,
        )  # imported here: only training needs MONAI

        c = config
        self.config = config
        self.spatial = Compose(
            [
                RandFlip(prob=c.flip_p, spatial_axis=1),  # (C, H, W): axis 1 is W, left-right
                RandAffine(
                    prob=c.affine_p,
                    rotate_range=np.deg2rad(c.rotate_degrees),
                    scale_range=c.scale,
                    translate_range=(c.shift * image_size, c.shift * image_size),
                    padding_mode="zeros",
                    mode="bilinear",
                ),
            ]
        )
        self.intensity = Compose(
            [
                RandScaleIntensity(factors=c.intensity_scale, prob=c.intensity_p, channel_wise=True),
                RandAdjustContrast(prob=c.intensity_p, gamma=c.gamma),
                RandBiasField(prob=c.bias_field_p, coeff_range=(0.0, c.bias_field_coeff), degree=3),
            ]
        )
        self.reseed(seed)

    def reseed(self, seed: int) -> None:
        """Reset the transforms' random state (called with a seed from the trainer's generator)."""
        self.spatial.set_random_state(seed=int(seed) % 2**32)
        self.intensity.set_random_state(seed=(int(seed) + 1) % 2**32)

    def __call__(self, images: torch.Tensor, modality_mask: torch.Tensor) -> torch.Tensor:
        """Augmented copy of ``images`` (B, M, H, W) in [0, 1]; missing sequences stay zeros."""
        out = torch.empty_like(images)
        for i in range(images.shape[0]):
            x = images[i]  # (M, H, W): MONAI reads dim 0 as channels, so one geometry for all sequences
            x = torch.as_tensor(self.intensity(self.spatial(x)))
            out[i] = x.clamp_(0.0, 1.0)
        return out * modality_mask.to(out.dtype)[:, :, None, None]  # (B, M, H, W)
