"""Explicit random generators derived from one seed. Nothing here touches global RNG state."""

from __future__ import annotations

import enum

import numpy as np
import torch

__all__ = ["Stream", "numpy_generator", "torch_generator"]


@enum.unique
class Stream(enum.IntEnum):
    """Every named random-stream id of ``mmpfl_core``: the first element of a generator's stream path.

    A draw is addressed as ``(seed, stream, *path)`` (e.g. ``(seed, Stream.DP_NOISE, round, site)``), so
    two modules that picked the same id would draw the *same* numbers for the same path: a DP-FedAvg
    noise vector equal to an MM-PFL-ADP score-release noise vector is exactly the correlation a noise
    argument assumes away. ``enum.unique`` turns a duplicate id into an import-time ``ValueError``;
    ``tests/test_seeding.py`` checks that no module defines its own ``_..._STREAM`` integer.

    The values are part of every recorded result (changing one changes reproducible draws), so a new
    stream takes a new value and an existing value is never reused.
    """

    #: federated/simulation.py: per-round client sampling ``(seed, 1, round)``.
    SAMPLING = 1
    #: federated/simulation.py and vectorized.py: local training ``(seed, 2, round, site)``.
    TRAINING = 2
    #: federated/simulation.py: bootstrap of the final evaluation ``(seed, 3)``.
    EVAL_BOOTSTRAP = 3
    #: federated/personalized_strategies.py: FedRep head / body training ``(seed, 31, round, site)``.
    FEDREP = 31
    #: federated/personalized_strategies.py: Ditto personal training.
    DITTO = 32
    #: federated/personalized_strategies.py: FedAvg + fine-tuning.
    FINETUNE = 33
    #: federated/dp_strategies.py (and attacks/noise_subtraction.py, which replays it): the Gaussian
    #: noise of a party's release ``(seed, 41, round, party)``.
    DP_NOISE = 41
    #: federated/dp_fisher.py: the noise of the released Fisher diagonal ``(seed, 42, round)``.
    FISHER_NOISE = 42
    #: personalization/masks.py: the noise of a site's score release ``(seed, 43, round, site)``
    #: (was 41, which it shared with DP_NOISE).
    SCORE_RELEASE = 43
    #: attacks/canaries.py: the in/out coin of each canary.
    CANARY_COIN = 71
    #: attacks/canaries.py: client sampling of the audit runs.
    CANARY_SAMPLING = 72
    #: attacks/neighbours.py: the D0/D1 coin.
    NEIGHBOUR_COIN = 81
    #: attacks/neighbours.py: client sampling of the neighbour runs.
    NEIGHBOUR_SAMPLING = 82
    #: attacks/neighbours.py: the attacker's calibration / test split.
    NEIGHBOUR_SPLIT = 83
    #: attacks/neighbours.py: which canaries are masked.
    NEIGHBOUR_MASK = 84
    #: attacks/targets.py: bootstrap CIs of each attack's metrics ``(seed, 85, i)`` (was 81, which it
    #: shared with NEIGHBOUR_COIN).
    ATTACK_BOOTSTRAP = 85
    #: pretraining.py: the public cohort's scanner noise ``(seed, 91)``.
    PUBLIC_SCAN = 91
    #: learning_curve.py: the permutation of the pooled training set a curve draws its subsets from ``(seed, 61)``.
    LEARNING_CURVE = 61


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
