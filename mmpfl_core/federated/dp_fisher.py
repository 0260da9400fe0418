"""DP-FedAvg with the Fisher allocation of the noise over parameter groups ("dp-fedavg-fisher", DESIGN 4.3).

Same release and accounting as :class:`~mmpfl_core.federated.dp_strategies.DPFedAvg` with per-group
clipping; only the split of the noise over groups changes, and it is computed from the global model
and the PUBLIC server set alone (post-processing: no privacy cost).
"""
from __future__ import annotations

import copy
import math
from typing import Any, Sequence

import torch
from torch import nn

from ..data.contract import CohortDataset
from ..data.federation import Federation
from ..errors import ConfigError, PrivacyError
from ..privacy import diagonal_fisher, effective_multiplier_of, fisher_noise_allocation, group_fisher
from ..seeding import torch_generator
from .config import FederatedConfig
from .dp_strategies import DPFedAvg
from .strategies import State, register_strategy

__all__ = ["DPFedAvgFisher"]

_FISHER_STREAM = 42


@register_strategy("dp-fedavg-fisher")
class DPFedAvgFisher(DPFedAvg):
    """DP-FedAvg with Fisher-allocated per-group noise (DESIGN 4.3); per-group clipping is forced.

    Every ``fisher_every`` rounds the mean diagonal Fisher F_g of the CURRENT GLOBAL model (already
    released) is estimated on the PUBLIC server set (``federation.public``) with model-sampled
    labels; sigma_g = ``fisher_noise_allocation`` keeps z_eff = z (checked to 1e-9 each round).
    Privacy argument: F_g, C_g and d_g are functions of public data and released models only, so
    the choice of sigma_g is post-processing and costs nothing; the round is accounted with z as in
    DP-FedAvg. The Fisher never touches a site's data (this class keeps no reference to it).
    """

    uses_noise_allocation = "fisher"

    def __init__(self, *, fisher_every: int = 1, fisher_batch_size: int = 32, fisher_max_batches: int = 1,
                 **kwargs: Any) -> None:
        if kwargs.setdefault("clipping", "per-group") != "per-group":
            raise ConfigError("dp-fedavg-fisher needs clipping='per-group': noise that differs by group "
                              "without group-wise clipping must be accounted at its smallest level.")
        super().__init__(**kwargs)
        if int(fisher_every) != fisher_every or fisher_every < 1:
            raise ConfigError(f"dp-fedavg-fisher fisher_every={fisher_every!r} must be an integer >= 1.")
        self.fisher_every, self.fisher_batch_size, self.fisher_max_batches = int(fisher_every), fisher_batch_size, fisher_max_batches
        self.fisher: dict[str, float] | None = None
        self._fisher_method = "hooks"

    def configure(self, *, config: FederatedConfig, federation: Federation, client_ids: Sequence[int],
                  model: nn.Module) -> None:
        if federation.public is None or len(federation.public) == 0:
            raise ConfigError("dp-fedavg-fisher needs the public server set; set federation.public_size > 0.")
        super().configure(config=config, federation=federation, client_ids=client_ids, model=model)
        self._public = CohortDataset(federation.public)  # public by construction: no site's subjects
        # A working copy on the engine's device: at paper scale the per-sample gradients of the Fisher
        # cost 30x a FedAvg round on a CPU copy (bench/results/client_dp_overhead_paper_cuda.md).
        self._model = copy.deepcopy(model)

    def _public_batches(self):
        n = len(self._public)
        for start in range(0, n, self.fisher_batch_size):
            b = self._public.batch(torch.arange(start, min(n, start + self.fisher_batch_size)))
            device = next(self._model.parameters()).device
            yield tuple(b[k].to(device) for k in ("images", "modality_mask", "clinical")), b["label"].to(device)

    def compute_fisher(self, round_index: int, global_state: State) -> dict[str, float]:
        """Mean diagonal Fisher per group of the global model on the public set (no private data)."""
        self._model.load_state_dict(global_state, strict=False)
        def run(method: str) -> dict[str, torch.Tensor]:
            return diagonal_fisher(self._model, self._public_batches(), labels="model", method=method,
                                   generator=torch_generator(self.seed, _FISHER_STREAM, round_index),
                                   max_batches=self.fisher_max_batches)
        try:  # a model that Opacus's per-sample hooks cannot handle falls back to the exact loop
            fisher = run(self._fisher_method)
        except (RuntimeError, NotImplementedError, ConfigError):
            self._fisher_method = "loop"
            fisher = run("loop")
        return group_fisher(fisher, self.groups)

    def noise_allocation(self, round_index: int, global_state: State) -> dict[str, float]:
        if self.update_noise_multiplier == 0:
            return {g: 0.0 for g in self.groups}
        if self.fisher is None or (round_index - 1) % self.fisher_every == 0:
            self.fisher = self.compute_fisher(round_index, global_state)
        alloc = fisher_noise_allocation(group_sizes=self.group_sizes, fisher=self.fisher,
                                        clip_bounds=self.clip_bounds, noise_multiplier=self.update_noise_multiplier)
        z_eff = effective_multiplier_of(alloc)
        if not math.isclose(z_eff, self.update_noise_multiplier, rel_tol=1e-9):
            raise PrivacyError(f"Fisher allocation has z_eff={z_eff!r} != z={self.update_noise_multiplier!r}; "
                               "the round would not be accounted correctly (report this bug).")
        self.last_allocation = alloc
        return dict(alloc.sigmas)

    def state_dict(self) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        tensors, state = super().state_dict()
        return tensors, {**state, "fisher": self.fisher}

    def load_state_dict(self, tensors: dict[str, torch.Tensor], state: dict[str, Any]) -> None:
        super().load_state_dict(tensors, state)
        self.fisher = state.get("fisher")
