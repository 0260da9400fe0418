"""Secret randomness for private releases: Gaussian noise, uniforms and sampling generators.

What it is for: every random draw that a differential-privacy argument assumes secret (client-level
noise, DP-SGD noise, Poisson sampling of sites and of patients) comes from here in a private run.
Anyone who can regenerate such a draw can undo it (subtract the noise, or learn who was sampled,
which voids amplification by sampling), so these draws take no seed, keep no state and write
nothing anywhere.

Sources, stated honestly:
  * :func:`secure_uniform` reads the operating system's CSPRNG (``os.urandom``, i.e. Linux
    ``getrandom``) for every draw: 53-bit uniforms in float64.
  * :func:`secure_standard_normal` turns them into Gaussians by the Box-Muller transform in float64
    and returns the SUM of ``SECURE_NORMAL_DRAWS`` = 4 independent draws divided by 2, cast to the
    requested dtype only at the end (callers scale by sigma in float64 first, see
    :func:`secure_gaussian`). Why: a single floating-point Gaussian draw has gaps and a non-uniform
    spread of its low-order bits, from which the exact draw, hence the noise, can be recovered
    (Mironov 2012 for the Laplace mechanism; Holohan and Braghin 2021, "Secure random sampling in
    differential privacy", and Jin et al. 2022 for Gaussian samplers and Opacus). Summing 2n
    independent draws (n = 2) raises the cost of that attack from about 2^53 to about 2^159
    (Holohan and Braghin, section 5.1); it is exactly what Opacus' ``secure_mode`` does in
    ``opacus.optimizers.optimizer._generate_noise`` (4 draws of std sigma, sum divided by 2). The
    sum of 4 independent N(0, 1) divided by sqrt(4) is exactly N(0, 1), so sigma is unchanged. It is
    a mitigation, not an exact sampler: a discrete Gaussian on quantised values would be one. Cost:
    4x the entropy and the maths (measured on the shared 2-core machine, one thread: 2.6 M secure
    normals/s against 12 M/s for a single draw, i.e. 0.38 s per million noised parameters).
  * :func:`secure_numpy_generator` returns a :class:`SecureRandom`: the subset of the
    ``numpy.random.Generator`` interface that the strategies' ``select`` hook uses (``random``,
    ``choice``), every value read from the same OS CSPRNG. Poisson sampling of sites compares
    CSPRNG uniforms with q; nothing is keyed, nothing is stored.

We hand-write this because ``torchcsprng`` (what Opacus' ``secure_mode`` needs) is not installable
with current torch, and torch's own CPU generator is a Mersenne Twister with a 64-bit seed.
"""

from __future__ import annotations

import math
import os

import numpy as np
import torch

__all__ = [
    "SECURE_NORMAL_DRAWS",
    "SecureRandom",
    "secure_gaussian",
    "secure_numpy_generator",
    "secure_standard_normal",
    "secure_uniform",
]

_TWO_POW_53 = float(2**53)
#: Independent float64 Gaussian draws summed per secure normal (Opacus secure_mode: 2n with n = 2).
SECURE_NORMAL_DRAWS = 4


def secure_uniform(count: int) -> np.ndarray:
    """``count`` independent uniforms on (0, 1) from the OS CSPRNG, float64 (53 random bits each).

    The value 0 is excluded (``(k + 0.5) / 2^53``), so ``log`` of a draw is always finite.
    """
    count = int(count)
    if count < 0:
        raise ValueError(f"count={count} must be >= 0.")
    if count == 0:
        return np.empty(0, dtype=np.float64)
    words = np.frombuffer(os.urandom(8 * count), dtype=np.uint64)
    return ((words >> np.uint64(11)).astype(np.float64) + 0.5) / _TWO_POW_53


def _box_muller(count: int) -> torch.Tensor:
    """``count`` independent N(0, 1) in float64 from CSPRNG uniforms: for uniforms u1, u2 on (0, 1),
    r = sqrt(-2 ln u1) and angle 2 pi u2 give two independent normals r cos(angle), r sin(angle)."""
    pairs = (count + 1) // 2
    u = torch.from_numpy(secure_uniform(2 * pairs)).view(2, pairs)  # (2, P)
    radius = torch.sqrt(-2.0 * torch.log(u[0]))
    angle = (2.0 * math.pi) * u[1]
    return torch.cat([radius * torch.cos(angle), radius * torch.sin(angle)])[:count]  # (2P,) -> (count,)


def _secure_normals64(shape: tuple[int, ...]) -> torch.Tensor:
    count = math.prod(shape)
    draws = _box_muller(SECURE_NORMAL_DRAWS * count).view(SECURE_NORMAL_DRAWS, count)  # (D, count)
    # sum of D independent N(0, 1) is N(0, D): divide by sqrt(D) for unit variance (exactly 2 for D = 4)
    return (draws.sum(dim=0) / math.sqrt(SECURE_NORMAL_DRAWS)).reshape(shape)


def secure_standard_normal(shape: tuple[int, ...] | torch.Size, *, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """A CPU tensor of independent N(0, 1) from the OS CSPRNG: each the sum of
    ``SECURE_NORMAL_DRAWS`` Box-Muller draws in float64 divided by its square root (module
    docstring), cast to ``dtype`` at the end."""
    return _secure_normals64(tuple(int(s) for s in shape)).to(dtype)


def secure_gaussian(
    shape: tuple[int, ...] | torch.Size, std: float, *, dtype: torch.dtype = torch.float32
) -> torch.Tensor:
    """N(0, std^2) noise: :func:`secure_standard_normal` scaled by ``std`` in float64, then cast once, so
    the scaling adds no float32 rounding of its own."""
    return (_secure_normals64(tuple(int(s) for s in shape)) * float(std)).to(dtype)


class SecureRandom:
    """The part of ``numpy.random.Generator`` the sampling hooks use, read from the OS CSPRNG.

    Holds no key and no state: every call reads fresh bytes from ``os.urandom``. Poisson sampling
    (``rng.random(n) < q``) therefore compares CSPRNG uniforms with q, the same source as the noise.
    """

    def random(self, size: int | tuple[int, ...] | None = None) -> float | np.ndarray:
        """Uniforms on (0, 1), 53 random bits each (a float when ``size`` is None)."""
        if size is None:
            return float(secure_uniform(1)[0])
        shape = (size,) if isinstance(size, (int, np.integer)) else tuple(size)
        return secure_uniform(math.prod(shape)).reshape(shape)

    def choice(self, a: int | np.ndarray | list, size: int | None = None, replace: bool = True) -> np.ndarray:
        """Uniform choice from ``a`` (an int n means ``range(n)``): a uniformly random subset ordered by
        CSPRNG keys (``replace=False``; ties have probability about n^2 / 2^53), or independent picks."""
        pool = np.arange(a) if isinstance(a, (int, np.integer)) else np.asarray(a)
        n, k = len(pool), 1 if size is None else int(size)
        if not replace and k > n:
            raise ValueError(f"cannot take {k} of {n} items without replacement.")
        picks = (
            np.argsort(secure_uniform(n), kind="stable")[:k]
            if not replace
            else np.minimum((secure_uniform(k) * n).astype(np.int64), n - 1)
        )
        out = pool[picks]
        return out[0] if size is None else out

    def __getattr__(self, name: str):
        raise AttributeError(
            f"SecureRandom has no {name!r}: it offers random() and choice() from the OS CSPRNG; "
            "draw other secret quantities with mmpfl_core.privacy.randomness.secure_uniform."
        )


def secure_numpy_generator() -> SecureRandom:
    """The sampling source of a private run: a :class:`SecureRandom` (OS CSPRNG, no key, no state)."""
    return SecureRandom()
