"""MM-PFL-ADP: client-level DP with a Fisher allocation of the budget, plus dynamic KL personalisation masks.

One round t, for a sampled site k (the multi-modal ViT is the model; nothing here depends on it
beyond its named parameter groups):
    1. The site starts from the global shared groups merged with its own personal groups.
    2. It trains locally (optionally with sample-level DP-SGD, ``sample_level_dp``).
    3. If due (every ``update_every`` of its rounds), it scores every group by the KL divergence,
       on its own validation split, between the global model and the global model with that group
       replaced by its trained version; groups with high scores become personal (with hysteresis).
    4. It clips its update per group (bounds C_g) with personal groups set to zero, then:
       ``server`` placement: sends only the shared groups; the trusted server adds Gaussian noise
       sigma_g per group to the sum (sigma_g from the Fisher allocation on the PUBLIC set);
       ``distributed`` placement: sends every group, personal ones as noise-only placeholders,
       so secure aggregation hides which groups a site keeps and the sum carries the full noise.
    5. The server divides by the expected number of participants qN and records the release.

Privacy argument (DESIGN 4.1-4.4): a personal group contributes zero to the clipped sum, which is
within the clipping bound, so the release is the same Gaussian mechanism as DP-FedAvg with the
Fisher allocation: z_eff = (sum_g C_g^2 / sigma_g^2)^(-1/2) = z, accounted by the ledger with
sampling rate q. The mask is computed from private validation data, but with ``server`` placement
only the trusted server sees it (what it releases, the noisy global model, is covered), and with
``distributed`` placement nobody sees it (placeholders). ``local`` placement would reveal masks to
an untrusted server and needs an accounted release of the scores; it is refused here (use
``dp-fedavg`` with ``placement="local"``). The personal groups themselves never leave the site and
are outside the client-level guarantee (DESIGN 4.6): only sample-level DP protects the patients of
a deployed personalised model.

Ablations are switches: ``fisher=False`` (uniform allocation), ``masks=False`` (exactly
``dp-fedavg-fisher``), ``dp=False`` (no clipping or noise: masked FedAvg with uniform weights and
the fixed denominator). Single-modality ablations are a data choice (``MethodSpec.modalities``).
"""
from __future__ import annotations

import math
from typing import Any, Sequence

import torch
from torch import nn

from ..data.contract import CohortDataset
from ..data.federation import Federation
from ..errors import ConfigError
from ..personalization.masks import DynamicKLMasks, MaskSchedule
from ..privacy import NoisePlacement
from .client import ClientUpdate
from .config import FederatedConfig
from .dp_fisher import DPFedAvgFisher
from .dp_strategies import DPFedAvg
from .strategies import State, register_strategy


#: Mask defaults for MM-PFL-ADP: a group turns personal above 0.05 nats of KL per validation sample
#: (at 1e-3 nearly the whole tiny model turned personal in notebook 05), with 20% hysteresis.
DEFAULT_MASK = {"mode": "threshold", "threshold": 0.05, "hysteresis": 0.2}


@register_strategy("mm-pfl-adp")
class MMPFLADP(DPFedAvgFisher):
    """MM-PFL-ADP (module docstring). Keyword arguments:

    Args:
        fisher: Fisher allocation of the noise over groups (False: uniform, ablation).
        masks: dynamic KL personalisation masks (False: exactly ``dp-fedavg-fisher``, ablation).
        dp: client-level DP (False: no clipping, no noise, epsilon infinite; ablation).
        mask: keyword arguments of :class:`~mmpfl_core.personalization.masks.MaskSchedule`
            (``mode``, ``threshold``, ``top_fraction``, ``update_every``, ``hysteresis``, ...).
        score_batch_size: batch size of the KL scoring pass.
        **dp_kwargs: every argument of ``dp-fedavg`` / ``dp-fedavg-fisher`` (``target_epsilon``,
            ``delta``, ``clip_norm``, ``placement``, ``fisher_every``, ``sample_level_dp``, ...).
            Per-group clipping is forced: the allocation is per group.
    """

    def __init__(self, *, fisher: bool = True, masks: bool = True, dp: bool = True,
                 mask: dict[str, Any] | None = None, score_batch_size: int = 256, **dp_kwargs: Any) -> None:
        if not dp:
            if dp_kwargs.get("target_epsilon") is not None or dp_kwargs.get("noise_multiplier"):
                raise ConfigError("mm-pfl-adp with dp=False takes no target_epsilon/noise_multiplier.")
            dp_kwargs = {**dp_kwargs, "target_epsilon": None, "noise_multiplier": 0.0, "clip_norm": math.inf}
        dp_kwargs.setdefault("clipping", "per-group")
        if dp_kwargs["clipping"] != "per-group":
            raise ConfigError("mm-pfl-adp needs clipping='per-group' (the allocation is per parameter group).")
        if dp_kwargs.get("placement", "server") == "local":
            raise ConfigError("mm-pfl-adp supports placement 'server' or 'distributed'; with 'local' the server would "
                              "see private masks (use dp-fedavg with placement='local').")
        super().__init__(**dp_kwargs)
        self.use_fisher, self.use_masks, self.use_dp = bool(fisher), bool(masks), bool(dp)
        self.uses_noise_allocation = "fisher" if fisher else "uniform"
        self.masker = DynamicKLMasks(MaskSchedule(**{**DEFAULT_MASK, **(mask or {})}), score_batch_size=score_batch_size)
        self.val_sets: dict[int, CohortDataset] = {}
        self._round_global: State | None = None
        self._start_groups: dict[int, frozenset[str]] = {}

    def configure(self, *, config: FederatedConfig, federation: Federation, client_ids: Sequence[int],
                  model: nn.Module) -> None:
        super().configure(config=config, federation=federation, client_ids=client_ids, model=model)
        self.masker.seed = int(config.seed)
        self.masker.set_param_groups(model.parameter_groups(), model.group_sizes())  # type: ignore[operator]
        # Site-side data for the KL scores (the simulation plays every site; only site k's own split
        # is ever used for site k's mask).
        self.val_sets = {s.site_id: CohortDataset(s.val) for s in federation.sites}

    def noise_allocation(self, round_index: int, global_state: State) -> dict[str, float]:
        if self.use_fisher:
            return super().noise_allocation(round_index, global_state)
        return DPFedAvg.noise_allocation(self, round_index, global_state)  # uniform sigma_g = z C

    # ---- masks
    def _personal(self, site_id: int) -> set[str]:
        return self.masker.personal_names(site_id) if self.use_masks else set()

    def client_start_state(self, site_id: int, global_state: State) -> State:
        super().client_start_state(site_id, global_state)
        self._round_global = global_state
        self._start_groups[site_id] = self.masker.personal_groups(site_id) if self.use_masks else frozenset()
        own = self.personal.get(site_id, {})
        return {**global_state, **{n: own[n] for n in self._personal(site_id) if n in own}}

    def broadcast(self, site_id: int, global_state: State) -> State:
        skip = self.masker.names_of(self._start_groups.get(site_id, frozenset()))
        return {n: t for n, t in global_state.items() if n not in skip}

    def personal_state(self, site_id: int, global_state: State) -> State | None:
        """A site deploys the global shared groups merged with its personal groups (outside the client-level
        guarantee, DESIGN 4.6)."""
        own = self.personal.get(site_id) if self.use_masks else None
        return None if not own else {**global_state, **own}

    def after_local(self, site_id: int, model: nn.Module) -> None:
        if not self.use_masks:
            return
        trained = {n: p.detach() for n, p in model.named_parameters()}
        self.masker.maybe_update(site_id, self._round, model, self._round_global, trained, self.val_sets[site_id])
        names = self._personal(site_id)
        if names:
            self.personal[site_id] = {n: trained[n].clone() for n in sorted(names)}
        else:
            self.personal.pop(site_id, None)

    def transmit(self, update: ClientUpdate, round_index: int) -> State:
        personal = self._personal(update.site_id)
        if not personal:
            return super().transmit(update, round_index)
        # Personal groups count as zero update: within the clip bound, so the accounting is unchanged.
        masked = ClientUpdate(site_id=update.site_id, num_examples=update.num_examples, num_steps=update.num_steps,
                              train_loss=update.train_loss, metrics=update.metrics,
                              delta={n: (torch.zeros_like(d) if n in personal else d) for n, d in update.delta.items()})
        sent = super().transmit(masked, round_index)
        if self.placement is NoisePlacement.SERVER:
            return {n: t for n, t in sent.items() if n not in personal}  # never leaves the site
        return sent  # distributed: noise-only placeholders keep the secure sum's noise and hide the mask

    def aggregate(self, global_state: State, updates: Sequence[ClientUpdate], sent: Sequence[State],
                  round_index: int) -> State:
        # A group a site kept personal contributes zero to the clipped sum (fixed denominator qN).
        padded = [{**{n: torch.zeros_like(t) for n, t in global_state.items()}, **s} for s in sent]
        return super().aggregate(global_state, updates, padded, round_index)

    # ---- reports and state
    def round_report(self, round_index: int) -> dict[str, float]:
        sites = sorted(self.val_sets)
        return {**super().round_report(round_index),
                "personal_fraction": self.masker.personal_fraction(sites) if self.use_masks else 0.0,
                "mask_changes": float(self.masker.masks.changes_in(round_index)) if self.use_masks else 0.0}

    def summary_report(self) -> dict[str, Any]:
        out = super().summary_report()
        out["ablation"] = {"fisher": self.use_fisher, "masks": self.use_masks, "dp": self.use_dp}
        if self.use_masks:
            out["masks"] = {str(s): sorted(self.masker.personal_groups(s)) for s in sorted(self.val_sets)}
            out["mask_privacy"] = ("exact scores seen only by the trusted server (server placement)"
                                   if self.placement is NoisePlacement.SERVER else
                                   "masks hidden by secure aggregation (noise-only placeholders)")
        return out

    def state_dict(self) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        tensors, state = super().state_dict()
        return tensors, {**state, "masker": self.masker.state_dict()}

    def load_state_dict(self, tensors: dict[str, torch.Tensor], state: dict[str, Any]) -> None:
        super().load_state_dict(tensors, state)
        self.masker.load_state_dict(state["masker"])
