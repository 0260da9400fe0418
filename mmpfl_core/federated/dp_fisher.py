"""DP-FedAvg with the Fisher allocation of the noise over parameter groups ("dp-fedavg-fisher", docs/DESIGN.md 4.3).

Same release and accounting as :class:`~mmpfl_core.federated.dp_strategies.DPFedAvg` with per-group
clipping; only the split of the noise over groups changes, and it is computed from the global model
and the PUBLIC server set alone (post-processing: no privacy cost).

When the allocation steps aside (measured on ``make demo``: 5 sites, epsilon 8, z = 2.08). The
allocation minimises a second-order proxy of the loss the noise causes, J / (2 (qN)^2)
(:func:`~mmpfl_core.privacy.allocation.predicted_noise_loss`). There the proxy predicted about 5
nats of loss per round under uniform noise: far outside the range where a quadratic expansion means
anything, and the Fisher split put 2.6x the uniform noise on the patch embeddings (their noise RMS
in the average was 5x their weights' RMS), which lost 0.04 accuracy to uniform noise. So each round
the strategy (1) bounds the ratio of every group's noise to the uniform std by ``max_noise_ratio``
and (2) falls back to uniform noise, logging why, when the proxy's own prediction says it cannot be
trusted (predicted loss under the Fisher split above ``proxy_trust`` nats) or predicts a gain below
``min_gain`` (relative reduction of J). Both tests use only public quantities (the public-set
Fisher, C_g, d_g, z, qN), so the choice stays post-processing.
"""

from __future__ import annotations

import copy
import logging
import math
from typing import Any
from collections.abc import Sequence

import torch
from torch import nn

from ..data.contract import CohortDataset
from ..data.federation import Federation
from ..errors import ConfigError
from ..privacy import (
    diagonal_fisher,
    check_effective_multiplier,
    fisher_noise_allocation,
    fisher_weighted_noise,
    group_fisher,
    predicted_noise_loss,
    uniform_noise_allocation,
)
from ..seeding import Stream, torch_generator
from .config import FederatedConfig
from .dp_strategies import DPFedAvg
from .strategies import State, register_strategy

__all__ = ["DPFedAvgFisher"]

logger = logging.getLogger(__name__)


@register_strategy("dp-fedavg-fisher")
class DPFedAvgFisher(DPFedAvg):
    """DP-FedAvg with Fisher-allocated per-group noise (docs/DESIGN.md 4.3); per-group clipping is forced.

    Every ``fisher_every`` rounds the mean diagonal Fisher F_g of the CURRENT GLOBAL model (already
    released) is estimated on the PUBLIC server set (``federation.public``) with model-sampled
    labels; sigma_g = ``fisher_noise_allocation`` keeps z_eff = z (checked to 1e-9 each round).
    Privacy argument: F_g, C_g and d_g are functions of public data and released models only, so
    the choice of sigma_g is post-processing and costs nothing; the round is accounted with z as in
    DP-FedAvg. The Fisher never touches a site's data (this class keeps no reference to it).

    Args (besides those of ``dp-fedavg``):
        fisher_every, fisher_batch_size, fisher_max_batches: how often and on how much of the
            public set the Fisher is estimated.
        max_noise_ratio: r, every sigma_g within [sigma_u / r, r sigma_u] of the uniform std
            (``None``: the unbounded formula; 1: uniform).
        proxy_trust: fall back to uniform noise when the predicted loss of one round's noise under the
            Fisher split exceeds this many nats (``None``: never for this reason).
        min_gain: fall back when the Fisher split reduces the Fisher-weighted noise J by less than
            this fraction of uniform's J.
    """

    uses_noise_allocation = "fisher"

    def __init__(
        self,
        *,
        fisher_every: int = 1,
        fisher_batch_size: int = 32,
        fisher_max_batches: int = 1,
        max_noise_ratio: float | None = 2.0,
        proxy_trust: float | None = 0.1,
        min_gain: float = 0.05,
        **kwargs: Any,
    ) -> None:
        if kwargs.setdefault("clipping", "per-group") != "per-group":
            raise ConfigError(
                "dp-fedavg-fisher needs clipping='per-group': noise that differs by group "
                "without group-wise clipping must be accounted at its smallest level."
            )
        super().__init__(**kwargs)
        if int(fisher_every) != fisher_every or fisher_every < 1:
            raise ConfigError(f"dp-fedavg-fisher fisher_every={fisher_every!r} must be an integer >= 1.")
        self.fisher_every, self.fisher_batch_size, self.fisher_max_batches = (
            int(fisher_every),
            fisher_batch_size,
            fisher_max_batches,
        )
        if max_noise_ratio is not None and not 1.0 <= max_noise_ratio < math.inf:
            raise ConfigError(f"dp-fedavg-fisher max_noise_ratio={max_noise_ratio!r} must be >= 1 and finite, or None.")
        if proxy_trust is not None and not proxy_trust > 0:
            raise ConfigError(f"dp-fedavg-fisher proxy_trust={proxy_trust!r} must be > 0 (nats), or None.")
        if not 0.0 <= min_gain < 1.0:
            raise ConfigError(f"dp-fedavg-fisher min_gain={min_gain!r} must lie in [0, 1).")
        self.max_noise_ratio, self.proxy_trust, self.min_gain = max_noise_ratio, proxy_trust, float(min_gain)
        self.fisher: dict[str, float] | None = None
        self._fisher_round: int | None = None  # the round whose Fisher ``self.fisher`` is
        self.allocation_used, self.fallback_reason, self.predicted_loss = "fisher", "", float("nan")
        self._fallback_rounds = 0
        self._fisher_method = "hooks"

    def configure(
        self, *, config: FederatedConfig, federation: Federation, client_ids: Sequence[int], model: nn.Module
    ) -> None:
        if federation.public is None or len(federation.public) == 0:
            raise ConfigError("dp-fedavg-fisher needs the public server set; set federation.public_size > 0.")
        super().configure(config=config, federation=federation, client_ids=client_ids, model=model)
        self._public = CohortDataset(federation.public)  # public by construction: no site's subjects
        # A working copy on the engine's device: at paper scale the per-sample gradients of the Fisher
        # cost 30x a FedAvg round on a CPU copy (bench/results/client_dp_overhead_paper_cuda.md).
        self._model = copy.deepcopy(model)

    def compute_fisher(self, round_index: int, global_state: State) -> dict[str, float]:
        """Mean diagonal Fisher per group of the global model on the public set (no private data)."""
        self._model.load_state_dict(global_state, strict=False)

        def run(method: str) -> dict[str, torch.Tensor]:
            return diagonal_fisher(
                self._model,
                self._public.input_batches(self.fisher_batch_size, next(self._model.parameters()).device),
                labels="model",
                method=method,
                generator=torch_generator(self.seed, Stream.FISHER_NOISE, round_index),
                max_batches=self.fisher_max_batches,
            )

        try:  # a model that Opacus's per-sample hooks cannot handle falls back to the exact loop
            fisher = run(self._fisher_method)
        except (RuntimeError, NotImplementedError, ConfigError):
            self._fisher_method = "loop"
            fisher = run("loop")
        return group_fisher(fisher, self.groups)

    def refresh_fisher(self, round_index: int, global_state: State) -> None:
        """Estimate the Fisher when one is due: in rounds 1, 1 + k, 1 + 2k, ... (k = ``fisher_every``).

        A subclass may skip the estimate in rounds that release nothing (MM-PFL-ADP when its noise gate
        keeps every group at home). The first round that needs it afterwards then computes the estimate
        of the round it was due, with that round's random stream, on a global model that the skipped
        rounds left unchanged (they released nothing): the same Fisher, so the same allocation, as
        without the skip. Public inputs only (the public set and the released global model).
        """
        due = round_index - (round_index - 1) % self.fisher_every
        if self.fisher is None or self._fisher_round != due:
            self.fisher = self.compute_fisher(due, global_state)
            self._fisher_round = due

    def noise_allocation(self, round_index: int, global_state: State) -> dict[str, float]:
        if self.update_noise_multiplier == 0:
            return {g: 0.0 for g in self.groups}
        self.refresh_fisher(round_index, global_state)
        alloc = self.choose_allocation(self.group_sizes, self.clip_bounds, round_index)
        check_effective_multiplier(alloc.clip_bounds, alloc.sigmas, self.update_noise_multiplier, "Fisher allocation")
        self.last_allocation = alloc
        return dict(alloc.sigmas)

    def choose_allocation(self, group_sizes: dict[str, int], clip_bounds: dict[str, float], round_index: int):
        """The bounded Fisher allocation over ``group_sizes``, or uniform noise when the proxy says it would
        not help (class docstring); records ``allocation_used``, ``fallback_reason`` and ``predicted_loss``.
        Public inputs only: the public-set Fisher, sizes, bounds, z and qN."""
        z = self.update_noise_multiplier
        assert self.fisher is not None, "refresh_fisher() before choose_allocation()"
        fisher = {g: self.fisher[g] for g in group_sizes}
        uniform = uniform_noise_allocation(group_sizes=group_sizes, clip_bounds=clip_bounds, noise_multiplier=z)
        alloc = fisher_noise_allocation(
            group_sizes=group_sizes,
            fisher=fisher,
            clip_bounds=clip_bounds,
            noise_multiplier=z,
            max_noise_ratio=self.max_noise_ratio,
        )
        j_fisher = fisher_weighted_noise(group_sizes=group_sizes, fisher=fisher, sigmas=alloc.sigmas)
        j_uniform = fisher_weighted_noise(group_sizes=group_sizes, fisher=fisher, sigmas=uniform.sigmas)
        self.predicted_loss = predicted_noise_loss(
            group_sizes=group_sizes, fisher=fisher, sigmas=alloc.sigmas, denominator=self.expected_participants
        )
        gain = 1.0 - j_fisher / j_uniform if j_uniform > 0 else 0.0
        reason = ""
        if self.proxy_trust is not None and self.predicted_loss > self.proxy_trust:
            reason = (
                f"the second-order proxy predicts {self.predicted_loss:.3g} nats of loss per round from the "
                f"noise even under the Fisher split (> proxy_trust={self.proxy_trust:g}): outside the range "
                "where the proxy, and so the allocation, can be trusted"
            )
        elif gain < self.min_gain:
            reason = f"the Fisher split reduces the Fisher-weighted noise by only {gain:.1%} (< min_gain={self.min_gain:.0%})"
        if reason:
            if reason != self.fallback_reason:
                logger.info("round %d: %s uses uniform noise: %s", round_index, self.name, reason)
            self._fallback_rounds += 1
        self.allocation_used, self.fallback_reason = ("uniform", reason) if reason else ("fisher", "")
        return uniform if reason else alloc

    def round_report(self, round_index: int) -> dict[str, float]:
        return {
            **super().round_report(round_index),
            "fisher_fallback": float(self.allocation_used == "uniform"),
            "predicted_noise_loss": float(self.predicted_loss),
        }

    def summary_report(self) -> dict[str, Any]:
        out = super().summary_report()
        out["privacy"]["allocation"] = {
            "used_last_round": self.allocation_used,
            "fallback_rounds": self._fallback_rounds,
            "fallback_reason": self.fallback_reason or None,
            "max_noise_ratio": self.max_noise_ratio,
            "proxy_trust": self.proxy_trust,
            "min_gain": self.min_gain,
        }
        return out

    def state_dict(self) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        tensors, state = super().state_dict()
        return tensors, {
            **state,
            "fisher": self.fisher,
            "fisher_round": self._fisher_round,
            "fallback_rounds": self._fallback_rounds,
            "allocation_used": self.allocation_used,
            "fallback_reason": self.fallback_reason,
        }

    def load_state_dict(self, tensors: dict[str, torch.Tensor], state: dict[str, Any]) -> None:
        super().load_state_dict(tensors, state)
        self.fisher = state["fisher"]
        self._fisher_round = state["fisher_round"]
        self._fallback_rounds = int(state["fallback_rounds"])
        self.allocation_used = state["allocation_used"]
        self.fallback_reason = state["fallback_reason"]
