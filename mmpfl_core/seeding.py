"""Explicit random generators derived from one seed. Nothing here touches global RNG state."""

from __future__ import annotations

import numpy as np
import torch


def numpy_generator(seed: int, *stream: int) -> np.random.Generator:
    """A numpy Generator for ``seed`` and an optional stream path (e.g. ``(seed, site_id, round)``).

    Streams are derived with ``SeedSequence`` so that two different paths never share a stream.
    """
    return np.random.default_rng(np.random.SeedSequence([int(seed), *map(int, stream)]))


def torch_generator(seed: int, *stream: int, device: str | torch.device = "cpu") -> torch.Generator:
    """A torch Generator seeded from the same ``SeedSequence`` scheme as :func:`numpy_generator`."""
    child = np.random.SeedSequence([int(seed), *map(int, stream)])
    g = torch.Generator(device=device)
    g.manual_seed(int(child.generate_state(1, dtype=np.uint64)[0] & 0x7FFF_FFFF_FFFF_FFFF))
    return g
