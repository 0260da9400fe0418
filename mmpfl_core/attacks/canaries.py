"""Canary clients for the one-run audit of the kit's client-level DP release (DP-FedAvg, docs/DESIGN.md 4.1).

What it is for: running the REAL release path (``DPFedAvg.configure`` -> ``transmit`` (validate,
``clip_per_group``, participant noise) -> ``aggregate`` (server noise from ``gaussian_noise_like``,
fixed denominator qN, ledger)) with canary clients instead of hospitals, and auditing it with
:func:`mmpfl_core.attacks.audit.one_run_audit`. This is the "white-box, gradient canary" setting of
Steinke et al. (2023, Sec. 6): the auditor chooses the updates directly, so the audit is fast and has
power, and it tests exactly the clipping and noise code that training uses.

Algorithm (:func:`audit_client_level_dp`):
    1. The model is one parameter vector of m coordinates; canary i's update is ``canary_norm`` times
       the basis vector e_i (so canaries never interfere; a norm above the clip bound tests clipping).
    2. Each canary is included with probability 1/2 (the auditor's coins, seeded).
    3. ``num_rounds`` rounds of the strategy: Poisson sampling with rate ``client_fraction`` over all m
       canary clients; sampled included canaries transmit, the server aggregates and releases.
    4. Score of canary i = coordinate i of (final released model - initial model).
    5. Guess the top k+ "in", the bottom k- "out"; the bound comes from :mod:`.audit`; the claimed
       epsilon is the strategy ledger's (the accountant's), never a typed-in number.

Broken variants (:mod:`.variants`) patch the functions the real strategy calls, inside a context
manager, so the correct and broken runs share every other line. :data:`BROKEN_VARIANTS` lists the
ones this audit catches: ``no-clipping``, ``noise-divided-by-10`` and ``noise-on-mean-scale`` (noise
calibrated for the average, i.e. divided by qN, but added to the sum: a classic bug). Its power is
limited (it saturates near ln(k/3) and misses halved noise): it is a teaching tool; the audit CI
relies on is the multi-run distinguishing test (:mod:`.neighbours`).
"""

from __future__ import annotations

from dataclasses import dataclass
from collections.abc import Callable

import numpy as np
import torch
from torch import nn

from ..errors import ConfigError
from ..federated.strategies import create_strategy  # first: it registers every strategy module
from ..federated.client import ClientUpdate
from ..federated.config import FederatedConfig
from ..seeding import Stream, numpy_generator
from .audit import AuditResult, one_run_audit
from .variants import BROKEN_VARIANTS as ALL_VARIANTS, broken_mechanism

__all__ = ["BROKEN_VARIANTS", "CanaryAuditConfig", "audit_client_level_dp", "broken_mechanism"]

_PARAM = "canary"


@dataclass(frozen=True)
class CanaryAuditConfig:
    """An audit of one DP-FedAvg configuration with m canary clients."""

    num_canaries: int = 1000  # m; more canaries = more power (the bound saturates near ln(k / 3))
    num_guesses_in: int = 100  # k+, fixed in advance
    num_guesses_out: int = 100  # k-, fixed in advance
    target_epsilon: float = 2.0  # the budget the strategy calibrates z to (audit power is best near 1-2)
    delta: float = 1e-5
    clip_norm: float = 1.0
    canary_norm: float = 10.0  # canary update norm (> clip_norm, so that clipping matters)
    num_rounds: int = 1
    client_fraction: float = 1.0  # Poisson sampling rate q of canary clients per round
    placement: str = "server"
    accountant: str = "prv"
    confidence: float = 0.95
    seed: int = 0
    noise: str = "reproducible-insecure"  # the audit's own runs are deterministic (NOT private; never for training)

    def __post_init__(self) -> None:
        if (
            self.num_canaries < 2
            or self.num_guesses_in < 0
            or self.num_guesses_out < 0
            or self.num_guesses_in + self.num_guesses_out > self.num_canaries
        ):
            raise ConfigError(
                f"audit needs num_canaries >= 2 and 0 <= k+ + k- <= m; got m={self.num_canaries}, "
                f"k+={self.num_guesses_in}, k-={self.num_guesses_out}."
            )
        if not self.canary_norm > 0 or not self.clip_norm > 0:
            raise ConfigError(f"canary_norm={self.canary_norm} and clip_norm={self.clip_norm} must be > 0.")


#: The bugs the one-run audit catches at its default size (each proven with bound > 2x the claim). It does
#: NOT catch ``noise-x0.5`` (measured bound 1.43-1.62 vs the halved mechanism's true epsilon 4.37): CI
#: uses the multi-run distinguishing test of :mod:`.neighbours` for that (notebook 07 explains why).
BROKEN_VARIANTS: dict[str, Callable] = {
    name: ALL_VARIANTS[name] for name in ("no-clipping", "noise-divided-by-10", "noise-on-mean-scale")
}


def audit_client_level_dp(
    config: CanaryAuditConfig = CanaryAuditConfig(), *, variant: str = "correct", strategy_name: str = "dp-fedavg"
) -> tuple[AuditResult, np.ndarray, np.ndarray]:
    """Run the canary audit (module docstring) on the real strategy; optionally with a broken variant.

    Returns:
        (audit result, scores (m,), inclusion bits (m,)).
    """
    m = config.num_canaries
    strategy = create_strategy(
        strategy_name,
        target_epsilon=config.target_epsilon,
        delta=config.delta,
        clip_norm=config.clip_norm,
        placement=config.placement,
        accountant=config.accountant,
        budget_stop=False,
        noise=config.noise,
    )
    fed_config = FederatedConfig(
        num_rounds=config.num_rounds,
        client_fraction=config.client_fraction,
        sampling="poisson",
        seed=config.seed,
        checkpoint_every=0,
    )
    model = nn.ParameterDict({_PARAM: nn.Parameter(torch.zeros(m))})  # one coordinate per canary
    client_ids = list(range(m))
    # DP-FedAvg's configure reads sampling, the clients and the model; the federation is unused (no data).
    strategy.configure(config=fed_config, federation=None, client_ids=client_ids, model=model)
    included = numpy_generator(config.seed, Stream.CANARY_COIN).random(m) < 0.5
    start = {_PARAM: torch.zeros(m)}
    state = dict(start)
    with broken_mechanism(variant, strategy):
        for t in range(1, config.num_rounds + 1):
            strategy.before_round(t)
            sampled = strategy.select(client_ids, fed_config, numpy_generator(config.seed, Stream.CANARY_SAMPLING, t))
            updates, sent = [], []
            for i in (c for c in sampled if included[c]):
                delta = torch.zeros(m)
                delta[i] = config.canary_norm
                update = ClientUpdate(site_id=i, delta={_PARAM: delta}, num_examples=1, num_steps=1, train_loss=0.0)
                strategy.client_start_state(i, state)  # fixes the round's noise allocation; no training
                updates.append(update)
                sent.append(strategy.transmit(update, t))
            state = strategy.aggregate(state, updates, sent, t)
    scores = (state[_PARAM] - start[_PARAM]).double().numpy()
    claimed = strategy.ledger.epsilon()
    result = one_run_audit(
        scores,
        included,
        num_in=config.num_guesses_in,
        num_out=config.num_guesses_out,
        delta=config.delta,
        confidence=config.confidence,
        claimed_epsilon=claimed,
        variant=variant,
    )
    return result, scores, included
