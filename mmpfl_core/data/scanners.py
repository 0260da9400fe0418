"""Simulated MRI scanners: how one hospital's acquisition turns tissue into the images it stores.

What it is for: the "feature skew" of a federation. The same brain looks different at two sites
because of (docs/FACTS.md "MRI and MS facts"):

* field strength: 3 T gives more SNR and slightly different T1 contrast than 1.5 T (here: lower
  ``noise_sigma`` and per-sequence contrast ``gain`` / ``gamma``);
* smooth multiplicative bias fields from coil sensitivity (what N4 correction removes): a
  low-order polynomial in the image coordinates, exponentiated, per subject;
* Rician noise: a magnitude image is |signal + complex Gaussian noise|;
* resolution / slice thickness: a Gaussian blur;
* vendor intensity scales (MRI intensities have no absolute unit): ``intensity_scale``/``offset``;
* protocol gaps: ``missing_modalities`` are returned as zeros with mask False (never imputed).

After the scanner, each (subject, sequence) image is normalised to [0, 1] by its 99.5th percentile,
exactly like a real loader would (:func:`mmpfl_core.data.contract.normalise_intensity`).
What it must never do: change anatomy or labels, or look at which class a subject belongs to.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy.ndimage import gaussian_filter

from ..errors import ConfigError, check_range
from ..seeding import numpy_generator
from .contract import MODALITIES

_BLOCK = 256  # subjects per block in apply_scanner


@dataclass(frozen=True)
class ScannerProfile:
    """One site's acquisition, as parameters of the forward model in :func:`apply_scanner`."""

    name: str = "reference 3T"
    field_strength_t: float = 3.0  # 1.5 or 3.0 tesla
    contrast_gain: tuple[float, ...] = (1.0, 1.0, 1.0)  # per sequence, stretch around the brain mean
    contrast_gamma: tuple[float, ...] = (1.0, 1.0, 1.0)  # per sequence, intensity ** gamma
    bias_field_strength: float = 0.0  # std of the log bias field's polynomial coefficients
    noise_sigma: float = 0.01  # Rician noise std, relative to the tissue scale (max ~1)
    blur_sigma: float = 0.0  # pixels at 64x64 (scaled with image size)
    intensity_scale: float = 1.0  # vendor scale (arbitrary units)
    intensity_offset: float = 0.0  # vendor offset (arbitrary units, before noise)
    missing_modalities: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if self.field_strength_t not in (1.5, 3.0):
            raise ConfigError(f"field_strength_t={self.field_strength_t!r} must be 1.5 or 3.0 (tesla).")
        for name in ("contrast_gain", "contrast_gamma"):
            vals = tuple(float(v) for v in getattr(self, name))
            if len(vals) != len(MODALITIES) or min(vals) <= 0:
                raise ConfigError(
                    f"{name}={getattr(self, name)!r} must hold {len(MODALITIES)} positive "
                    f"numbers, one per sequence {MODALITIES}."
                )
            object.__setattr__(self, name, vals)
        check_range("bias_field_strength", self.bias_field_strength, low=0.0, high=2.0)
        check_range("noise_sigma", self.noise_sigma, low=0.0, high=1.0)
        check_range("blur_sigma", self.blur_sigma, low=0.0, high=8.0)
        check_range("intensity_scale", self.intensity_scale, low=0.0, low_inclusive=False)
        unknown = set(self.missing_modalities) - set(MODALITIES)
        if unknown:
            raise ConfigError(
                f"missing_modalities={self.missing_modalities!r} names unknown sequences "
                f"{sorted(unknown)}; known: {MODALITIES}."
            )
        object.__setattr__(self, "missing_modalities", tuple(self.missing_modalities))


def reference_profile() -> ScannerProfile:
    """A clean 3 T research protocol: mild noise, no bias field. Used for the public server set."""
    return ScannerProfile(name="reference 3T", field_strength_t=3.0, noise_sigma=0.01, blur_sigma=0.0)


# Templates cycled by default_site_profiles: (field strength, gain, gamma, bias, noise, blur, scale, offset).
_TEMPLATES = (
    (3.0, (1.10, 1.05, 1.10), (1.00, 1.00, 0.95), 0.10, 0.020, 0.3, 1200.0, 0.0),
    (1.5, (0.85, 0.90, 0.85), (1.10, 0.95, 1.05), 0.25, 0.050, 0.8, 800.0, 20.0),
    (3.0, (1.00, 1.10, 1.00), (0.90, 1.05, 1.00), 0.35, 0.030, 0.5, 4095.0, 0.0),
    (1.5, (0.80, 0.85, 0.90), (1.15, 1.00, 1.10), 0.20, 0.070, 1.0, 1000.0, 50.0),
    (3.0, (1.05, 0.95, 1.15), (1.00, 0.90, 0.90), 0.15, 0.025, 0.4, 2000.0, 10.0),
)


def default_site_profiles(
    num_sites: int, seed: int, *, missing_modalities: tuple[tuple[int, str], ...] = ()
) -> list[ScannerProfile]:
    """``num_sites`` diverse, deterministic scanner profiles ("site-A 3T", "site-B 1.5T", ...).

    The first five follow fixed templates (two 1.5 T, three 3 T, different vendors' scales); more
    sites cycle the templates with seeded jitter, so every site differs.

    Args:
        num_sites: how many sites.
        seed: seed of the jitter (sites beyond the templates).
        missing_modalities: ``(site index, sequence)`` pairs; pairs for non-existent sites are ignored.
    """
    check_range("num_sites", num_sites, low=1)
    rng = numpy_generator(seed, 7001)
    missing: dict[int, list[str]] = {}
    for site, mod in missing_modalities:
        missing.setdefault(int(site), []).append(mod)
    profiles = []
    for k in range(num_sites):
        field, gain3, gamma3, bias, noise, blur, scale, offset = _TEMPLATES[k % len(_TEMPLATES)]
        gain: tuple[float, ...] = gain3
        gamma: tuple[float, ...] = gamma3
        # Draw the jitter for every site (so site k's profile does not depend on num_sites); apply
        # it only after the first cycle so the documented templates stay exact.
        j = rng.normal(0.0, 1.0, 9)
        if k >= len(_TEMPLATES):
            gain = tuple(float(np.clip(g * (1 + 0.05 * e), 0.5, 2.0)) for g, e in zip(gain, j[:3], strict=True))
            gamma = tuple(float(np.clip(g * (1 + 0.05 * e), 0.5, 2.0)) for g, e in zip(gamma, j[3:6], strict=True))
            bias = float(np.clip(bias * (1 + 0.3 * j[6]), 0.0, 1.0))
            noise = float(np.clip(noise * (1 + 0.3 * j[7]), 0.005, 0.2))
            scale = float(scale * np.exp(0.3 * j[8]))
        label = chr(ord("A") + k) if k < 26 else str(k)
        field_txt = "3T" if field == 3.0 else "1.5T"
        profiles.append(
            ScannerProfile(
                name=f"site-{label} {field_txt}",
                field_strength_t=field,
                contrast_gain=gain,
                contrast_gamma=gamma,
                bias_field_strength=bias,
                noise_sigma=noise,
                blur_sigma=blur,
                intensity_scale=scale,
                intensity_offset=offset,
                missing_modalities=tuple(m for m in MODALITIES if m in missing.get(k, ())),
            )
        )
    return profiles


def apply_scanner(
    images: np.ndarray,
    profile: ScannerProfile,
    rng: np.random.Generator,
    *,
    modality_names: tuple[str, ...] = MODALITIES,
    percentile: float = 99.5,
) -> tuple[np.ndarray, np.ndarray]:
    """Image clean tissue maps with ``profile``'s scanner, then normalise like a loader would.

    Steps (vectorised over subjects and sequences): (1) contrast: ``x ** gamma``, stretched by
    ``gain`` around the subject's mean foreground intensity; (2) blur; (3) multiplicative bias field
    ``exp(sum_j c_j p_j(u, v))`` with low-order polynomials p_j, one draw per subject shared by its
    sequences (same coil) plus a small per-sequence part; (4) vendor scale and offset; (5) Rician
    noise ``|s + n_1 + i n_2|``; (6) divide by the 99.5th percentile per (subject, sequence), clip to
    [0, 1]; (7) zero the missing sequences.

    Args:
        images: (N, M, H, W) float32 clean tissue intensities in [0, 1].
        profile: the scanner.
        rng: the site's generator (noise and bias fields are random per subject).
        modality_names: names of the M sequences (to match ``missing_modalities``).
        percentile: normalisation percentile.

    Returns:
        ``(images, modality_mask)``: (N, M, H, W) float32 in [0, 1] and (N, M) bool.
    """
    n, m, h, w = images.shape
    lin = (np.arange(h, dtype=np.float32) + 0.5) / h * 2 - 1
    v, u = np.meshgrid(lin, lin, indexing="ij")  # (H, W) each
    basis = np.stack([u, v, u * v, u**2 - 1 / 3, v**2 - 1 / 3])  # (P, H, W) low-order polynomials
    out = np.empty((n, m, h, w), dtype=np.float32)
    # Blocks of subjects keep temporaries cache-sized; the random stream is consumed block by block.
    for lo in range(0, n, _BLOCK):
        x = np.asarray(images[lo : lo + _BLOCK], dtype=np.float32)
        out[lo : lo + _BLOCK] = _acquire(x, profile, rng, basis, percentile)
    mask = np.array([name not in profile.missing_modalities for name in modality_names], dtype=bool)
    out[:, ~mask] = 0.0
    return out, np.broadcast_to(mask, (n, m)).copy()


def _acquire(
    x: np.ndarray, profile: ScannerProfile, rng: np.random.Generator, basis: np.ndarray, percentile: float
) -> np.ndarray:
    """Steps 1-6 of :func:`apply_scanner` for one block x (B, M, H, W)."""
    b, m, h, w = x.shape
    fg = x > 0.02  # (B, M, H, W) head; background stays dark under contrast changes
    gamma = np.asarray(profile.contrast_gamma, dtype=np.float32)[None, :, None, None]
    gain = np.asarray(profile.contrast_gain, dtype=np.float32)[None, :, None, None]
    y = np.power(np.clip(x, 0.0, None), gamma)
    mu = (y * fg).sum(axis=(2, 3), keepdims=True) / np.maximum(fg.sum(axis=(2, 3), keepdims=True), 1)
    y = np.where(fg, np.clip(mu + gain * (y - mu), 0.0, None), y)
    if profile.blur_sigma > 0:
        s = profile.blur_sigma * h / 64.0
        y = gaussian_filter(y, sigma=(0, 0, s, s), mode="constant")

    coef = profile.bias_field_strength * (
        rng.standard_normal((b, 1, basis.shape[0])) + 0.3 * rng.standard_normal((b, m, basis.shape[0]))
    )
    log_bias = np.einsum("bmp,phw->bmhw", coef.astype(np.float32), basis)  # (B, M, H, W)
    y = y * np.exp(log_bias)

    y = profile.intensity_scale * y + profile.intensity_offset
    sigma = np.float32(profile.noise_sigma * profile.intensity_scale)
    n1 = rng.standard_normal(y.shape, dtype=np.float32)
    n2 = rng.standard_normal(y.shape, dtype=np.float32)
    y = np.sqrt((y + sigma * n1) ** 2 + (sigma * n2) ** 2)

    flat = y.reshape(b, m, h * w)  # (B, M, H*W)
    scale = np.percentile(flat, percentile, axis=2)[:, :, None, None]  # (B, M, 1, 1)
    return np.clip(y / np.maximum(scale, 1e-12), 0.0, 1.0)
