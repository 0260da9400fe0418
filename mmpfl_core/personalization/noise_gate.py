"""Noise-aware masks: which parameter groups are worth sharing at all, given the noise they will get.

What it is for: under client-level DP a shared group is averaged WITH Gaussian noise, a personal
group is trained on one site's data WITHOUT noise. When the noise drowns every possible signal in
a group, sharing it can only hurt: the group should stay personal at every site, whatever a site's
KL score (:mod:`.kl_scores`) says. The gate decides this from the release's public parameters.

The statistic. In round t the released average of group g is (sum_k clip_g(Delta_k) + xi_g) / m,
with m = qN the fixed denominator, ||clip_g(Delta_k)|| <= C_g and xi_g ~ N(0, sigma_g^2 I_{d_g}).
The most signal the average can carry is C_g (every participant sending the same direction at the
full bound); the noise has norm about sigma_g sqrt(d_g) / m. Over T rounds a consistent signal adds
up linearly and independent noise as sqrt(T), so the best-case signal-to-noise ratio of the group
over the run is

    snr_g = sqrt(T) * m * C_g / (sigma_g * sqrt(d_g)).

A group with snr_g < ``min_snr`` is *drowned*: even perfectly aligned sites cannot lift it above
the noise, so it is kept personal everywhere (and left out of the release, so its share of the clip
budget goes to the groups that are shared). snr_g is an upper bound, so the gate only ever refuses
hopeless groups; which of the remaining groups a site keeps is the KL rule's decision. With the
per-group bounds C_g = C sqrt(d_g / d) and uniform noise sigma_g = z C, snr_g = sqrt(T) m / (z sqrt(d))
for every group: all groups pass or none does; a Fisher allocation (smaller sigma_g where the
public Fisher is large) separates them. Calibration of ``min_snr = 1``: DP-FedAvg results known to
train well (EMNIST / Stack Overflow scale: m = 100-1000, z about 1, T about 1,500, d = 1-4 M)
have snr of about 4-20; ``make demo`` (m = 5, z = 2.08, T = 12, d = 114k) has 0.025.

Privacy: the inputs are C_g, d_g, T, m = qN and sigma_g, all public (fixed rules, the model's
shapes, the configuration, the accountant's calibration and the Fisher allocation on the PUBLIC set,
docs/DESIGN.md 4.3). No site's data enters, so the gated set is the same for every site, may be announced
by the server, and costs no privacy (tested: changing a site's data leaves it unchanged). It must
never be fed norms or statistics computed from a site's private data.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from collections.abc import Mapping

from ..errors import ConfigError, check_range
from ..privacy.accounting import calibrate_noise

__all__ = ["NoiseGate", "RoundNoise", "release_snr", "round_noise"]


def release_snr(
    *,
    clip_bounds: Mapping[str, float],
    sigmas: Mapping[str, float],
    group_sizes: Mapping[str, int],
    expected_participants: float,
    rounds: int,
) -> dict[str, float]:
    """snr_g = sqrt(T) m C_g / (sigma_g sqrt(d_g)) per group (module docstring); inf where sigma_g = 0."""
    check_range("noise_gate.rounds", rounds, low=1)
    if not expected_participants > 0:
        raise ConfigError(f"expected_participants={expected_participants!r} must be > 0 (it is qN).")
    out = {}
    for g, d in group_sizes.items():
        sigma, bound = float(sigmas[g]), float(clip_bounds[g])
        if not sigma >= 0 or not bound >= 0 or not d > 0:
            raise ConfigError(
                f"group {g!r}: sigma={sigma!r}, clip bound={bound!r}, size={d!r}; need sigma >= 0, "
                "bound >= 0, size > 0."
            )
        out[g] = math.inf if sigma == 0 else math.sqrt(rounds) * expected_participants * bound / (sigma * math.sqrt(d))
    return out


@dataclass(frozen=True)
class NoiseGate:
    """Keep a group personal everywhere when its best-case release SNR is below ``min_snr``.

    Attributes:
        min_snr: threshold on snr_g (module docstring); 0 disables the gate.
        rounds: T in snr_g; None uses the run's number of rounds.
    """

    min_snr: float = 1.0
    rounds: int | None = None

    def __post_init__(self) -> None:
        check_range("noise_gate.min_snr", self.min_snr, low=0.0)
        if self.rounds is not None:
            check_range("noise_gate.rounds", self.rounds, low=1)

    def drowned(self, snr: Mapping[str, float]) -> frozenset[str]:
        """The groups whose snr is below ``min_snr`` (public, the same for every site)."""
        return frozenset(g for g, v in snr.items() if v < self.min_snr)


@dataclass(frozen=True)
class RoundNoise:
    """One round of client-level DP-FedAvg on a whole model of d private parameters, in numbers.

    Attributes:
        sites, sample_rate, epsilon, delta, rounds, dimension, clip_norm, accountant, min_snr: the inputs of
            :func:`round_noise`.
        noise_multiplier: z, from the accountant for (epsilon, delta, q, T).
        participants: m = qN, the expected participants (the fixed denominator).
        noise_norm: z C sqrt(d) / (qN), the typical norm of the noise in the released average.
        signal_norm: C, the most the average of qN clipped updates can carry (all sites at the bound, aligned).
        ratio: noise_norm / signal_norm = z sqrt(d) / (qN), the per-round noise-to-signal ratio.
        viability: sqrt(T) / min_snr, the largest ratio the noise gate accepts (over T rounds a consistent
            signal adds up as T, independent noise as sqrt(T)).
        snr: the gate's best-case signal-to-noise ratio over the run, sqrt(T) / ratio (:func:`release_snr`).
    """

    sites: int
    sample_rate: float
    epsilon: float
    delta: float
    rounds: int
    dimension: int
    clip_norm: float
    accountant: str
    min_snr: float
    noise_multiplier: float
    participants: float
    noise_norm: float
    signal_norm: float
    ratio: float
    viability: float
    snr: float

    @property
    def viable(self) -> bool:
        """True when the gate would share the model: snr >= min_snr, i.e. ratio <= sqrt(T) / min_snr."""
        return self.snr >= self.min_snr


def round_noise(
    *,
    sites: int,
    sample_rate: float,
    epsilon: float,
    rounds: int,
    dimension: int,
    delta: float = 1e-5,
    clip_norm: float = 1.0,
    accountant: str = "prv",
    min_snr: float = 1.0,
) -> RoundNoise:
    """Noise against signal of one round of uniform DP-FedAvg, with z calibrated by the accountant.

    Algorithm:
        1. z = ``calibrate_noise(epsilon, delta, q, T)``: the smallest multiplier whose T Poisson-subsampled
           Gaussian releases at rate q cost at most epsilon (client-level, add/remove one site).
        2. The released average (sum of qN clipped updates + N(0, z^2 C^2 I_d)) / (qN) carries noise of norm
           about z C sqrt(d) / (qN) and at most C of signal, so the ratio is z sqrt(d) / (qN), whatever C.
        3. snr = sqrt(T) / ratio is :func:`release_snr` for one group (C_g = C, sigma_g = z C, d_g = d); the
           round is viable for the noise gate when snr >= ``min_snr``.

    Privacy: every input is public (the budget, the configuration, the model's size), so these numbers
    cost nothing and reveal nothing about a site.

    Raises:
        ConfigError: sites, rounds or dimension below 1, or min_snr < 0.
        PrivacyError: the accountant refuses (epsilon <= 0, delta or q out of range, unknown accountant).
    """
    check_range("sites", sites, low=1, fix="It is N, the number of sites in the federation.")
    check_range("rounds", rounds, low=1, fix="It is T, the number of rounds.")
    check_range("dimension", dimension, low=1, fix="It is d, the number of private (released) parameters.")
    check_range("min_snr", min_snr, low=0.0)
    check_range("clip_norm", clip_norm, low=0.0, low_inclusive=False, high=math.inf, high_inclusive=False)
    z = calibrate_noise(
        target_epsilon=epsilon, target_delta=delta, sample_rate=sample_rate, steps=int(rounds), accountant=accountant
    )
    m = sample_rate * sites
    snr = release_snr(
        clip_bounds={"model": clip_norm},
        sigmas={"model": z * clip_norm},
        group_sizes={"model": int(dimension)},
        expected_participants=m,
        rounds=int(rounds),
    )["model"]
    noise_norm = z * clip_norm * math.sqrt(dimension) / m
    return RoundNoise(
        sites=int(sites),
        sample_rate=float(sample_rate),
        epsilon=float(epsilon),
        delta=float(delta),
        rounds=int(rounds),
        dimension=int(dimension),
        clip_norm=float(clip_norm),
        accountant=accountant,
        min_snr=float(min_snr),
        noise_multiplier=z,
        participants=m,
        noise_norm=noise_norm,
        signal_norm=float(clip_norm),
        ratio=noise_norm / clip_norm,
        viability=math.inf if min_snr == 0 else math.sqrt(rounds) / min_snr,
        snr=snr,
    )
