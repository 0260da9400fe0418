"""The noise-subtraction attack: regenerate a round's DP noise from the published seed and subtract it.

What it is for: showing why private noise must be secret (issue 14). DP-FedAvg with server placement
releases theta_{t+1} = theta_t + (S_t + N_t) / (qN), where S_t is the sum of the participants'
clipped updates and N_t ~ N(0, sigma_g^2) per coordinate. An attacker who holds the two released
models, the public round settings (sigma_g, groups, qN: all public by design) and the run seed
written in the run directory computes

    S_hat = (theta_{t+1} - theta_t) qN - N_hat_t,

where N_hat_t is the noise regenerated from the seed exactly as ``noise="reproducible-insecure"``
draws it (the stream (seed, 41, t, party 0)). If the noise came from the seed, S_hat = S_t up to
float rounding: the sum of clipped updates, with no privacy left. With the default
``noise="secure"`` (OS CSPRNG, no seed) N_hat_t is independent of N_t and the error of S_hat is
about sqrt(2) times the noise itself.

This module only attacks; it never changes how a strategy draws its noise. Server placement only
(distributed shares are drawn at the sites, from streams (seed, 41, t, k + 1), and are regenerable
the same way in the reproducible mode).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any
from collections.abc import Callable, Mapping, Sequence

import torch
from torch import nn

from ..data.federation import Federation
from ..federated.config import FederatedConfig
from ..federated.dp_strategies import DPFedAvg
from ..federated.simulation import FederatedSimulation
from ..federated.strategies import create_strategy
from ..privacy.mechanisms import NoisePlacement, NoiseSource, gaussian_noise_like
from ..seeding import Stream, torch_generator

__all__ = ["NoiseSubtractionResult", "attack_one_round", "subtract_regenerated_noise"]

State = dict[str, torch.Tensor]


@dataclass(frozen=True)
class NoiseSubtractionResult:
    """How well the attacker recovered the round's sum of clipped updates.

    ``relative_error`` = ||S_hat - S|| / ||S||; ``noise_to_signal`` = ||N|| / ||S|| (what the error
    would be if the attacker simply ignored the noise); ``succeeded``: relative error below 1e-3.
    """

    noise: str
    relative_error: float
    noise_to_signal: float
    succeeded: bool


def subtract_regenerated_noise(
    *,
    before: Mapping[str, torch.Tensor],
    after: Mapping[str, torch.Tensor],
    sigmas: Mapping[str, float],
    groups: Mapping[str, Sequence[str]],
    expected_participants: float,
    seed: int,
    round_index: int,
) -> State:
    """The attacker's estimate S_hat of round t's sum of clipped updates (module docstring).

    Every input is public or published: the released models before and after round t, the round's
    per-group noise scales and groups, the fixed denominator qN and the seed of the run directory.
    """
    source = NoiseSource(generator=torch_generator(seed, Stream.DP_NOISE, round_index, 0))
    regenerated = gaussian_noise_like({n: before[n] for n in before}, dict(sigmas), groups, source)
    return {n: (after[n] - before[n]).double() * expected_participants - regenerated[n].double() for n in before}


def _norm(state: Mapping[str, torch.Tensor]) -> float:
    return math.sqrt(sum(float(t.double().pow(2).sum()) for t in state.values()))


def attack_one_round(
    federation: Federation,
    *,
    model_factory: Callable[[], nn.Module],
    config: FederatedConfig,
    noise: str,
    noise_multiplier: float = 1.0,
    clip_norm: float = 0.5,
    **strategy_kwargs: Any,
) -> NoiseSubtractionResult:
    """Run round 1 of DP-FedAvg (server placement) with ``noise`` and attack it.

    The ground truth S (the sum of what the sites transmitted, i.e. their clipped updates) is
    recorded by wrapping the strategy's ``aggregate``, for scoring only; the attacker sees only
    the released models, the public settings and ``config.seed``.
    """
    strategy = create_strategy(
        "dp-fedavg",
        noise_multiplier=noise_multiplier,
        clip_norm=clip_norm,
        noise=noise,
        placement="server",
        **strategy_kwargs,
    )
    assert isinstance(strategy, DPFedAvg) and strategy.placement is NoisePlacement.SERVER
    sim = FederatedSimulation(federation, model_factory=model_factory, strategy=strategy, config=config, progress=False)
    truth: dict[str, State] = {}
    aggregate = strategy.aggregate

    def spy(global_state, updates, sent, round_index):
        truth["sum"] = {
            n: sum((s[n].double() for s in sent), torch.zeros_like(t, dtype=torch.float64))
            for n, t in global_state.items()
        }
        return aggregate(global_state, updates, sent, round_index)

    strategy.aggregate = spy  # type: ignore[method-assign]  # the attacker's spy on this one instance
    before = {n: t.clone() for n, t in sim.global_state.items()}
    strategy.before_round(1)
    sim.run_round(1)
    after = sim.global_state
    public = strategy.round_instructions(1, before)  # what every site was told: public by design
    sigmas = {g: public[f"sigma/{g}"] for g in strategy.groups}
    estimate = subtract_regenerated_noise(
        before=before,
        after=after,
        sigmas=sigmas,
        groups=strategy.groups,
        expected_participants=strategy.expected_participants,
        seed=config.seed,
        round_index=1,
    )
    true_sum = truth["sum"]
    actual_noise = {n: (after[n] - before[n]).double() * strategy.expected_participants - true_sum[n] for n in before}
    signal = max(_norm(true_sum), 1e-12)
    error = _norm({n: estimate[n] - true_sum[n] for n in before}) / signal
    return NoiseSubtractionResult(
        noise=noise, relative_error=error, noise_to_signal=_norm(actual_noise) / signal, succeeded=error < 1e-3
    )
