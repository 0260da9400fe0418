"""The Gaussian mechanism on clipped updates: noise sources, noise placement and its accounting.

What it is for: drawing the Gaussian noise that makes a clipped update (see
:mod:`mmpfl_core.privacy.clipping`) a differentially private release, deciding who adds it
(server, every participant, or each site for itself; docs/DESIGN.md 4.2), and mapping each placement to the
(noise multiplier, sample rate) pair the accountant must be given.

It must never release noise, generator seeds or generator states: anyone who knows the noise can
subtract it. Private runs use :meth:`NoiseSource.secure` (the OS CSPRNG, no seed, no state); the
seeded source exists for teaching and tests only and is NOT private.
"""

from __future__ import annotations

import math
from enum import Enum
from typing import NamedTuple
from collections.abc import Mapping, Sequence

import torch

from mmpfl_core.errors import PrivacyError
from mmpfl_core.privacy.randomness import secure_gaussian, secure_standard_normal

__all__ = [
    "NOT_PRIVATE_WARNING",
    "NoisePlacement",
    "NoiseSource",
    "NoiseSplit",
    "ReleaseAccounting",
    "gaussian_noise_like",
    "per_participant_noise_std",
    "release_accounting",
    "server_top_up_std",
]

#: What every artefact of a run with reproducible noise must say beside its epsilon.
NOT_PRIVATE_WARNING = "not private: noise can be regenerated from the seed"


class NoiseSource:
    """Where Gaussian noise comes from. Build with :meth:`secure` (private runs) or :meth:`seeded`.

    * ``secure()`` (the default of every private strategy): each draw reads the OS CSPRNG afresh
      (:func:`~mmpfl_core.privacy.randomness.secure_standard_normal`: ``os.urandom`` + Box-Muller).
      No seed, no state, nothing to write to a checkpoint: noise cannot be regenerated, and a
      resumed run is charged for every release (write-ahead ledger) but does not repeat the bits.
      Each normal is the sum of 4 float64 draws (Opacus ``secure_mode``'s mitigation of
      floating-point attacks) and is scaled by sigma in float64 before the cast
      (:mod:`mmpfl_core.privacy.randomness`).
    * ``seeded(seed)``: one ``torch.Generator`` whose state advances with every draw, so a run is
      reproducible bit for bit. NOT private: whoever knows the seed regenerates the noise and subtracts it (``mmpfl_core.attacks.noise_subtraction``).
    """

    def __init__(self, *, generator: torch.Generator | None) -> None:
        self._generator = generator  # None means secure

    @classmethod
    def seeded(cls, seed: int) -> NoiseSource:
        """Reproducible source (teaching, experiments, tests). Not private."""
        g = torch.Generator(device="cpu")
        g.manual_seed(int(seed))
        return cls(generator=g)

    @classmethod
    def secure(cls) -> NoiseSource:
        """Source that reads the OS CSPRNG for every draw (not reproducible, no state)."""
        return cls(generator=None)

    def standard_normal(self, shape: Sequence[int] | torch.Size, *, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """N(0, 1) draws of ``shape`` on the CPU: OS CSPRNG (secure) or the seeded generator."""
        if self._generator is None:
            return secure_standard_normal(tuple(shape), dtype=dtype)
        return torch.randn(tuple(shape), generator=self._generator, dtype=dtype)

    def gaussian(
        self, shape: Sequence[int] | torch.Size, std: float, *, dtype: torch.dtype = torch.float32
    ) -> torch.Tensor:
        """N(0, std^2) draws of ``shape`` on the CPU. Secure: the multi-draw float64 sampler scaled by
        ``std`` in float64, cast once (:func:`~mmpfl_core.privacy.randomness.secure_gaussian`). Seeded:
        ``torch.randn`` in ``dtype`` times ``std``, bit for bit as before (reproducible runs and tests)."""
        if self._generator is None:
            return secure_gaussian(tuple(shape), std, dtype=dtype)
        return self.standard_normal(shape, dtype=dtype) * std


def gaussian_noise_like(
    update: Mapping[str, torch.Tensor],
    stds: Mapping[str, float] | float,
    groups: Mapping[str, Sequence[str]] | None,
    source: NoiseSource,
) -> dict[str, torch.Tensor]:
    """Noise tensors N(0, sigma_g^2 I) shaped like each parameter of ``update``.

    ``stds`` is one float for every parameter, or sigma per group (then ``groups`` maps group ->
    parameter names). Parameters are drawn in sorted-name order on the CPU (so a seeded source
    gives the same noise on any device) and moved to each parameter's device and dtype. A std of 0
    gives exact zeros without consuming randomness.

    Raises:
        PrivacyError: a std is negative or not finite, or a parameter has no group / no std.
    """
    if isinstance(stds, Mapping):
        if groups is None:
            raise PrivacyError("per-group stds need groups (group -> parameter names).")
        owner = {name: g for g, names in groups.items() for name in names}
        per_param = {}
        for name in update:
            if name not in owner or owner[name] not in stds:
                raise PrivacyError(
                    f"parameter {name!r} has no noise std (its group "
                    f"{owner.get(name)!r} is not in stds); noise every released "
                    "parameter."
                )
            per_param[name] = float(stds[owner[name]])
    else:
        per_param = {name: float(stds) for name in update}
    noise = {}
    for name in sorted(update):
        std, ref = per_param[name], update[name]
        if not 0.0 <= std < math.inf:
            raise PrivacyError(f"noise std {std!r} for {name!r} must be finite and >= 0.")
        if std == 0.0:
            noise[name] = torch.zeros_like(ref)
            continue
        dtype = torch.float64 if ref.dtype == torch.float64 else torch.float32
        noise[name] = source.gaussian(ref.shape, std, dtype=dtype).to(device=ref.device, dtype=ref.dtype)
    return {name: noise[name] for name in update}


class NoisePlacement(str, Enum):
    """Who adds the noise, the adjacency each placement's epsilon is stated for, and whom it protects
    against (docs/DESIGN.md 4.2). In every placement the round's released sum carries noise of variance
    exactly sigma_g^2 per coordinate whoever took part, so the released model is distributed as
    ``theta + (sum_k clip(Delta_k) + N(0, sigma_g^2)) / (qN)``."""

    SERVER = "server"
    """Adjacency: add/remove one site; amplification by Poisson sampling at rate q (the sample is
    secret). Trust: an honest-but-curious server that sees the clipped updates and adds
    N(0, sigma_g^2) per coordinate to their sum; the guarantee covers everything released from the
    server (global models, reports), not the server itself."""

    DISTRIBUTED = "distributed"
    """Adjacency: add/remove one site; amplification by Poisson sampling at rate q against everyone
    outside the protocol. Each of the m participants the server announced for the round adds
    N(0, sigma_g^2 / m), so the sum carries exactly sigma_g^2 whatever m is: the aggregate's noise
    does not depend on who took part (shares of sigma_g^2 / m_min would make its variance grow with
    m and reveal participation). If only s < m announced updates reach the sum (dropouts, a failed
    secure sum), the server tops the noise up with N(0, sigma_g^2 (m - s) / m), all of it when
    nobody's update arrives. There is no threshold and no abort that depends on the sample, so
    nothing is added to delta. Trust: an honest-but-curious server that sees only the sum through
    secure aggregation (SecAgg+ in the Flower app; assumed, not simulated, in-process). The server
    knows whom it sampled, so against the server there is no amplification by sampling: its view
    of a round is the Gaussian mechanism with the round's multiplier on the participants (weaker
    in a round it had to top up). Without secure aggregation this gives NO guarantee against the
    server, which would see each individual, under-noised update."""

    LOCAL = "local"
    """Adjacency: replace one site (its update changes arbitrarily), so sensitivity 2C. Each
    transmitted update is itself private: the site adds the full N(0, sigma_g^2). Trust: none in
    the server, which sees who sent what, so no amplification by sampling; a site's releases compose
    over the rounds it took part in (charged every round here: an upper bound)."""


class NoiseSplit(NamedTuple):
    """Noise std added by each participant and by the server (floats, or dicts per group)."""

    participant_std: float | dict[str, float]
    server_std: float | dict[str, float]


def per_participant_noise_std(
    placement: NoisePlacement | str, sigma: float | Mapping[str, float], participants: int = 1
) -> NoiseSplit:
    """Split the noise std sigma (per coordinate of the sum) between participants and server.

    * server: participants 0, server sigma.
    * distributed: each of the ``participants`` = m announced participants sigma / sqrt(m), server
      0: m shares add variance exactly sigma^2 (with m = 0 the server adds all of it, see
      :func:`server_top_up_std`).
    * local: each participant sigma (its own update is the release), server 0.

    ``sigma`` may be one float or a dict of per-group stds; the split is applied to each.
    """
    placement = NoisePlacement(placement)
    if int(participants) != participants or participants < 1:
        raise PrivacyError(
            f"participants={participants!r} must be an integer >= 1 (the count the server announced for this round)."
        )
    factor = {
        NoisePlacement.SERVER: (0.0, 1.0),
        NoisePlacement.DISTRIBUTED: (1.0 / math.sqrt(participants), 0.0),
        NoisePlacement.LOCAL: (1.0, 0.0),
    }[placement]

    def split(s: float) -> tuple[float, float]:
        if not 0.0 <= s < math.inf:
            raise PrivacyError(f"noise std {s!r} must be finite and >= 0.")
        return s * factor[0], s * factor[1]

    if isinstance(sigma, Mapping):
        parts = {g: split(float(s)) for g, s in sigma.items()}
        return NoiseSplit({g: p[0] for g, p in parts.items()}, {g: p[1] for g, p in parts.items()})
    return NoiseSplit(*split(float(sigma)))


def server_top_up_std(sigma: float, announced: int, arrived: int) -> float:
    """Distributed placement: the std the server adds when only ``arrived`` of the ``announced``
    participants' shares reached the sum, so that the sum carries variance exactly sigma^2:
    sigma * sqrt((m - s) / m), and sigma itself when m = 0 (nobody was sampled)."""
    if int(announced) != announced or int(arrived) != arrived or not 0 <= arrived <= announced:
        raise PrivacyError(
            f"arrived={arrived!r} must be an integer in [0, announced={announced!r}]: more updates "
            "than announced participants would carry too much noise in the sum and shift the release."
        )
    if announced == 0:
        return float(sigma)
    return float(sigma) * math.sqrt((announced - arrived) / announced)


class ReleaseAccounting(NamedTuple):
    """What to give the accountant for one round: multiplier and sampling rate."""

    noise_multiplier: float
    sample_rate: float


def release_accounting(
    placement: NoisePlacement | str, noise_multiplier: float, sample_rate: float
) -> ReleaseAccounting:
    """Map a round's effective multiplier z_eff (docs/DESIGN.md 4.1) to accountant inputs per placement.

    * server / distributed: sites are Poisson-sampled with rate q and what is released is the sum
      with noise of variance exactly sigma_g^2 (distributed: shares sigma_g^2 / m of the m
      announced participants, topped up by the server for missing shares), so the round is the
      subsampled Gaussian mechanism with multiplier z_eff and rate q: amplification by sampling
      applies (add/remove-one-site adjacency, fixed denominator qN), whoever took part.
    * local: each site's update is released on its own. Under replace-one-site adjacency two
      clipped updates differ by up to 2C, so the multiplier is z_eff / 2; the server sees who
      sent what, so there is no amplification: rate 1, and the steps are the rounds this site
      took part in (per-site accounting).

    Returns:
        ReleaseAccounting(noise_multiplier, sample_rate) for ``compute_epsilon`` / the ledger.
    """
    placement = NoisePlacement(placement)
    if not 0.0 <= noise_multiplier < math.inf:
        raise PrivacyError(f"noise_multiplier={noise_multiplier!r} must be finite and >= 0.")
    if not 0.0 < sample_rate <= 1.0:
        raise PrivacyError(f"sample_rate={sample_rate!r} must lie in (0, 1].")
    if placement is NoisePlacement.LOCAL:
        return ReleaseAccounting(noise_multiplier / 2.0, 1.0)
    return ReleaseAccounting(float(noise_multiplier), float(sample_rate))
