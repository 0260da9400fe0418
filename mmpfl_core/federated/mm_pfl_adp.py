"""MM-PFL-ADP: client-level DP with a Fisher allocation of the budget, plus dynamic KL personalisation masks.

One round t, for a sampled site k (the multi-modal ViT is the model; nothing here depends on it
beyond its named parameter groups):
    1. The site starts from the global shared groups merged with its own personal groups.
    2. It trains locally (optionally with sample-level DP-SGD, ``sample_level_dp``).
    0. (Server, public.) The noise gate (:mod:`~mmpfl_core.personalization.noise_gate`) computes each
       group's best-case signal-to-noise ratio over the run from the clip bounds, the noise scales,
       qN and T; groups below ``min_snr`` are *drowned*: personal at every site and left out of the
       release, whose clip budget C and noise are spread over the remaining groups only. When every
       group is drowned even under the most favourable split the allocator may pick (r = ``max_noise_ratio``
       times uniform SNR), the round releases nothing and the public-set Fisher is not estimated at all
       (allocation ``used_last_round: none``, the SNR reported is uniform noise's, and the summary's
       ``noise_gate.rounds_fisher_skipped`` counts such rounds); the next round that shares computes
       the Fisher that was due.
    3. If due (every ``update_every`` of its rounds), it scores every group not drowned by the KL
       divergence, on the mask scoring set (``mask_data``: its own validation split, or the server's
       PUBLIC set under patient-level DP), between the global model and the global model with that
       group replaced by its trained version; groups with high scores become personal (with
       hysteresis).
    4. It clips its update per group (bounds C_g) with personal groups set to zero, then:
       ``server`` placement: sends only the shared groups; the trusted server adds Gaussian noise
       sigma_g per group to the sum (sigma_g from the Fisher allocation on the PUBLIC set);
       ``distributed`` placement: sends every group, personal ones as noise-only placeholders,
       so secure aggregation hides which groups a site keeps and the sum carries the full noise.
    5. The server divides by the expected number of participants qN and records the release.

Privacy argument (docs/DESIGN.md 4.1-4.4): a personal group contributes zero to the clipped sum, which is
within the clipping bound, so the release is the same Gaussian mechanism as DP-FedAvg with the
Fisher allocation: z_eff = (sum_g C_g^2 / sigma_g^2)^(-1/2) = z over the released groups (sum of
their C_g^2 = C^2), accounted by the ledger with sampling rate q. The drowned set is a function of
public quantities only (no site's data), so excluding those groups from the release is fixed in
advance of the data, like the model's shapes; a round in which every group is drowned releases
nothing that depends on any site (the global model is returned unchanged), so it is not charged. The mask is computed from private validation data, but with ``server`` placement
only the trusted server sees it (what it releases, the noisy global model, is covered), and with
``distributed`` placement nobody sees it (placeholders). ``local`` placement would reveal masks to
an untrusted server and needs an accounted release of the scores; it is refused here (use
``dp-fedavg`` with ``placement="local"``). The personal groups themselves never leave the site and
are outside the client-level guarantee (docs/DESIGN.md 4.6): only sample-level DP protects the patients of
a deployed personalised model.

Patient-level DP (``sample_level_dp``, docs/DESIGN.md 4.5). The unit is one patient of one site, and the
server is not trusted with patients: whatever the site lets show is a release of its patients,
which groups it uploads included. Scoring the masks on the site's raw validation patients would
release them outside the DP-SGD ledger (measured: removing one of 16 validation patients flipped
``block.0`` from personal to shared and the upload went from 16 to 28 tensors, at the same DP-SGD
epsilon). So under patient-level DP the scores are

    s_g = KL score of (trained_state, global_state) on the server's PUBLIC set,

a function of the DP-SGD-trained model (the site's DP release, accounted in its ledger), the
released global model and public data only (:meth:`MMPFLADP.mask_scoring_data`), i.e.
post-processing: the mask, the groups sent and the bytes add no privacy cost, and no validation
patient enters what leaves the site. ``mask_data="validation"`` together with ``sample_level_dp`` is
refused (an accounted release of validation scores composed into the site's DP-SGD ledger is not
implemented). Tested: removing a validation patient leaves every transmitted tensor unchanged, and
with the trained model pinned, removing a training patient does too
(``tests/test_patient_dp_masks.py``, which also flags the variant scored on raw data).

Ablations are switches: ``fisher=False`` (uniform allocation), ``masks=False`` (exactly
``dp-fedavg-fisher``), ``dp=False`` (no clipping or noise: masked FedAvg with uniform weights and
the fixed denominator). Single-modality ablations are a data choice (``MethodSpec.modalities``).
"""

from __future__ import annotations

import logging
import math
from typing import Any
from collections.abc import Sequence

import torch
from torch import nn

from ..data.contract import CohortDataset
from ..data.federation import Federation
from ..errors import ConfigError
from ..personalization.masks import DynamicKLMasks, MaskSchedule
from ..personalization.noise_gate import NoiseGate, release_snr
from ..privacy import NoisePlacement, check_effective_multiplier, uniform_noise_allocation
from .client import ClientUpdate
from .config import FederatedConfig
from .dp_fisher import DPFedAvgFisher
from .dp_strategies import CLIP_INDICATOR, DPFedAvg
from .strategies import State, register_strategy

logger = logging.getLogger(__name__)

#: Mask defaults for MM-PFL-ADP: a group turns personal above 0.05 nats of KL per validation sample
#: (at 1e-3 nearly the whole tiny model turned personal in notebook 05), with 20% hysteresis; a site
#: rescores every second round it takes part in (the KL pass cost 0.56x a FedAvg round on the teaching
#: preset when run every round: bench/client_dp_overhead.py).
DEFAULT_MASK = {"mode": "threshold", "threshold": 0.05, "hysteresis": 0.2, "update_every": 2}


MASK_DATA = ("validation", "public")


def _mask_data(mask_data: str | None, *, patient_dp: bool, masks: bool) -> str:
    """Resolve and check where masks are scored (module docstring, "Patient-level DP")."""
    if mask_data is None:
        return "public" if patient_dp else "validation"
    if mask_data not in MASK_DATA:
        raise ConfigError(f"mm-pfl-adp mask_data={mask_data!r} is unknown; use 'validation' or 'public'.")
    if mask_data == "validation" and patient_dp and masks:
        raise ConfigError(
            "mm-pfl-adp with sample_level_dp and mask_data='validation' would score masks on the "
            "site's raw validation patients, and the groups it uploads would release them outside the "
            "DP-SGD ledger (docs/DESIGN.md 4.5). Use mask_data='public' (the default with sample_level_dp: "
            "scores on the server's public set with the DP-trained model, post-processing), or masks=False."
        )
    return mask_data


@register_strategy("mm-pfl-adp")
class MMPFLADP(DPFedAvgFisher):
    """MM-PFL-ADP (module docstring). Keyword arguments (``sample_level_dp`` may set ``group_allocation``:
    per-group DP-SGD with its own noise gate, :mod:`~mmpfl_core.federated.sample_level`):

    Args:
        fisher: Fisher allocation of the noise over groups (False: uniform, ablation).
        masks: dynamic KL personalisation masks (False: exactly ``dp-fedavg-fisher``, ablation).
        dp: client-level DP (False: no clipping, no noise, epsilon infinite; ablation).
        mask: keyword arguments of :class:`~mmpfl_core.personalization.masks.MaskSchedule`
            (``mode``, ``threshold``, ``top_fraction``, ``update_every``, ``hysteresis``, ...).
        noise_gate: keyword arguments of :class:`~mmpfl_core.personalization.noise_gate.NoiseGate`
            (``min_snr``, ``rounds``), or False to share whatever the KL rule shares (ablation).
        score_batch_size: batch size of the KL scoring pass.
        mask_data: where the KL scores are computed: ``"validation"`` (the site's own validation split;
            the default without ``sample_level_dp``: exact masks, hidden by the trusted server or by
            placeholders, docs/DESIGN.md 4.4) or ``"public"`` (the server's public set, scored with the site's
            trained model: the default, and the only choice, with ``sample_level_dp``; module docstring).
        **dp_kwargs: every argument of ``dp-fedavg`` / ``dp-fedavg-fisher`` (``target_epsilon``,
            ``delta``, ``clip_norm``, ``placement``, ``fisher_every``, ``sample_level_dp``, ...).
            Per-group clipping is forced: the allocation is per group.
    """

    supports_group_allocation = True  # per-group DP-SGD planned in noise_allocation (sample_level.py)

    def __init__(
        self,
        *,
        fisher: bool = True,
        masks: bool = True,
        dp: bool = True,
        mask: dict[str, Any] | None = None,
        score_batch_size: int = 256,
        noise_gate: dict[str, Any] | bool = True,
        mask_data: str | None = None,
        **dp_kwargs: Any,
    ) -> None:
        if not dp:
            if dp_kwargs.get("target_epsilon") is not None or dp_kwargs.get("noise_multiplier"):
                raise ConfigError("mm-pfl-adp with dp=False takes no target_epsilon/noise_multiplier.")
            dp_kwargs = {**dp_kwargs, "target_epsilon": None, "noise_multiplier": 0.0, "clip_norm": math.inf}
        dp_kwargs.setdefault("clipping", "per-group")
        if dp_kwargs["clipping"] != "per-group":
            raise ConfigError("mm-pfl-adp needs clipping='per-group' (the allocation is per parameter group).")
        if dp_kwargs.get("placement", "server") == "local":
            raise ConfigError(
                "mm-pfl-adp supports placement 'server' or 'distributed'; with 'local' the server would "
                "see private masks (use dp-fedavg with placement='local')."
            )
        super().__init__(**dp_kwargs)
        self.use_fisher, self.use_masks, self.use_dp = bool(fisher), bool(masks), bool(dp)
        self.mask_data = _mask_data(mask_data, patient_dp=self.sample_dp is not None, masks=self.use_masks)
        self.uses_noise_allocation = "fisher" if fisher else "uniform"
        self.masker = DynamicKLMasks(
            MaskSchedule(**{**DEFAULT_MASK, **(mask or {})}), score_batch_size=score_batch_size
        )
        if noise_gate is True:
            noise_gate = {}
        gated = dp or self.group_dp_sgd  # client-level noise, or the patient-level per-group DP-SGD noise
        self.gate = NoiseGate(**noise_gate) if noise_gate is not False and masks and gated else None
        self.drowned: frozenset[str] = frozenset()  # public: the same at every site
        self.snr: dict[str, float] = {}
        self._skipped_rounds = self._fisher_skipped = 0
        self.val_sets: dict[int, CohortDataset] = {}
        self.site_ids: tuple[int, ...] = ()
        self._round_global: State | None = None
        self._start_groups: dict[int, frozenset[str]] = {}

    def configure(
        self, *, config: FederatedConfig, federation: Federation, client_ids: Sequence[int], model: nn.Module
    ) -> None:
        super().configure(config=config, federation=federation, client_ids=client_ids, model=model)
        self.masker.seed = int(config.seed)
        self._configure_group_dp_sgd(federation)
        # Only the trainable (private) groups: frozen public parameters (mmpfl_core.pretraining) are never
        # trained, sent or personal; self.groups / self.group_sizes already hold just those.
        self.masker.set_param_groups(self.groups, self.group_sizes)
        self.site_ids = tuple(sorted(s.site_id for s in federation.sites))
        # Site-side data for the KL scores (the simulation plays every site; only site k's own split
        # is ever used for site k's mask). Under patient-level DP no site's split is even held here.
        self.val_sets = (
            {s.site_id: CohortDataset(s.val) for s in federation.sites} if self.mask_data == "validation" else {}
        )
        self.gate_rounds = (
            self.gate.rounds
            if self.gate is not None and self.gate.rounds
            else self.calibration_rounds or config.num_rounds
        )

    # ---- noise: allocation and the public noise gate
    def _set_bounds(self, clip_norm: float) -> None:
        """C_g = C sqrt(d_g / d_S) over the released groups S (not drowned), 0 for drowned ones, so that
        sum_g C_g^2 = C^2 over what is released (docs/DESIGN.md 4.1). Public: sizes and the gate only."""
        self.clip_norm = clip_norm
        drowned: frozenset[str] = getattr(self, "drowned", frozenset())
        total = sum(d for g, d in self.group_sizes.items() if g not in drowned)
        self.clip_bounds = {
            g: (0.0 if g in drowned else clip_norm * math.sqrt(d / total)) for g, d in self.group_sizes.items()
        }

    def _allocate(self, sizes: dict[str, int], bounds: dict[str, float], round_index: int):
        if self.use_fisher:
            return self.choose_allocation(sizes, bounds, round_index)
        return uniform_noise_allocation(
            group_sizes=sizes, clip_bounds=bounds, noise_multiplier=self.update_noise_multiplier
        )  # sigma_g = z C

    def noise_allocation(self, round_index: int, global_state: State) -> dict[str, float]:
        """sigma_g of this round; with the gate on, first decides the drowned groups (module docstring)."""
        if self.group_dp_sgd:  # per-group DP-SGD plan; without client-level noise, its gate (sample_level.py)
            if self.sample_dp is not None and self.sample_dp.group_allocation == "fisher":
                self.refresh_fisher(round_index, global_state)  # public set, released model
            patient_gate = self.gate if self.update_noise_multiplier == 0 else None
            drowned = self.plan_group_dp_sgd(
                groups=self.groups,
                group_sizes=self.group_sizes,
                fisher=self.fisher,
                max_noise_ratio=self.max_noise_ratio,
                gate=patient_gate,
                expected_sites=self.expected_participants,
                rounds=self.gate_rounds,
            )
            if patient_gate is not None:
                self.drowned, self.snr = drowned, dict(self.group_dp_snr)
                self._set_bounds(self.clip_norm)
        if self.gate is None or self.update_noise_multiplier == 0:
            if self.use_fisher:
                return super().noise_allocation(round_index, global_state)
            return DPFedAvg.noise_allocation(self, round_index, global_state)  # uniform sigma_g = z C
        # The gate looks at the allocation over ALL groups (the full-model clip rule): conservative,
        # since leaving drowned groups out only raises the others' signal-to-noise.
        total = sum(self.group_sizes.values())
        full_bounds = {g: self.clip_norm * math.sqrt(d / total) for g, d in self.group_sizes.items()}
        bound = self._snr_bound(full_bounds)
        if bound is not None and self.gate.drowned(bound) == frozenset(self.group_sizes):
            # Every group is drowned whatever the Fisher says: skip the public-set Fisher (the round
            # releases nothing, so no allocation is used; bench/client_dp_overhead.py). Reported: the SNR
            # under uniform noise (what the allocator's fallback gives; the bound is max_noise_ratio times it).
            self.snr = self._uniform_snr(full_bounds)
            reason = (
                f"the noise gate keeps every group at every site (best-case SNR at most {max(bound.values()):.3g} "
                f"< min_snr={self.gate.min_snr:g} under any allocation): nothing is released, so no allocation "
                "is used and the Fisher is not estimated"
            )
            if reason != self.fallback_reason:
                logger.info("round %d: %s: %s", round_index, self.name, reason)
            self.allocation_used, self.fallback_reason, self.predicted_loss = "none", reason, float("nan")
            self._fisher_skipped += 1
        else:
            if self.use_fisher:
                self.refresh_fisher(round_index, global_state)  # public set, released model
            reference = self._allocate(self.group_sizes, full_bounds, round_index)
            self.snr = release_snr(
                clip_bounds=full_bounds,
                sigmas=reference.sigmas,
                group_sizes=self.group_sizes,
                expected_participants=self.expected_participants,
                rounds=self.gate_rounds,
            )
        drowned = self.gate.drowned(self.snr)
        if drowned != self.drowned:
            logger.info(
                "round %d: %s keeps %s personal at every site: best-case release SNR %s < min_snr=%g "
                "(z=%.3g, qN=%g, T=%d)",
                round_index,
                self.name,
                sorted(drowned),
                {g: round(self.snr[g], 4) for g in sorted(drowned)},
                self.gate.min_snr,
                self.update_noise_multiplier,
                self.expected_participants,
                self.gate_rounds,
            )
        self.drowned = drowned
        self._set_bounds(self.clip_norm)
        released = {g: d for g, d in self.group_sizes.items() if g not in drowned}
        sigmas = {g: 0.0 for g in self.group_sizes}
        if released:
            alloc = self._allocate(released, {g: self.clip_bounds[g] for g in released}, round_index)
            check_effective_multiplier(
                alloc.clip_bounds, alloc.sigmas, self.update_noise_multiplier, "allocation over the released groups"
            )
            self.last_allocation = alloc
            sigmas.update(alloc.sigmas)
        return sigmas

    def _snr_bound(self, full_bounds: dict[str, float]) -> dict[str, float] | None:
        """An upper bound on every group's gate SNR under any allocation :meth:`_allocate` may return, computed
        without the Fisher; None when there is none (the unbounded Fisher split, ``max_noise_ratio=None``).

        The allocator returns uniform noise sigma_u (uniform ablation, or its fallback) or the bounded
        Fisher split, whose every sigma_g >= sigma_u / r (r = ``max_noise_ratio``, up to rounding: margin
        1e-6). snr_g is proportional to 1 / sigma_g, so snr_g <= r snr_g(uniform). Public inputs only.
        """
        ratio = self.max_noise_ratio if self.use_fisher else 1.0
        if ratio is None:
            return None
        return {g: v * ratio * (1 + 1e-6) for g, v in self._uniform_snr(full_bounds).items()}

    def _uniform_snr(self, full_bounds: dict[str, float]) -> dict[str, float]:
        uniform = uniform_noise_allocation(
            group_sizes=self.group_sizes, clip_bounds=full_bounds, noise_multiplier=self.update_noise_multiplier
        )
        return release_snr(
            clip_bounds=full_bounds,
            sigmas=uniform.sigmas,
            group_sizes=self.group_sizes,
            expected_participants=self.expected_participants,
            rounds=self.gate_rounds,
        )

    def release_sum(self, global_state: State, total: State, num_participants: int, round_index: int) -> State:
        if self.gate is not None and self.drowned and len(self.drowned) == len(self.group_sizes):
            # Every group is drowned: nothing leaves any site, the global model is returned as it was
            # (a data-independent output), so nothing is released and nothing is charged.
            self._skipped_rounds += 1
            return global_state
        return super().release_sum(global_state, total, num_participants, round_index)

    def _drowned_groups(self) -> frozenset[str]:
        return self.drowned  # the gate's public decision, part of the round's release

    def apply_round_instructions(self, round_index: int, instructions: dict[str, Any]) -> None:
        """Site side: the server's release, whole; its drowned groups are personal at this site too."""
        super().apply_round_instructions(round_index, instructions)
        assert self.round_release is not None  # installed by the call above
        self.drowned = self.round_release.drowned

    # ---- masks
    def _personal_groups(self, site_id: int) -> frozenset[str]:
        return self.masker.personal_groups(site_id) | self.drowned if self.use_masks else frozenset()

    def _personal(self, site_id: int) -> set[str]:
        return self.masker.names_of(self._personal_groups(site_id)) if self.use_masks else set()

    def client_start_state(self, site_id: int, global_state: State) -> State:
        super().client_start_state(site_id, global_state)
        self._round_global = global_state
        self._start_groups[site_id] = self._personal_groups(site_id)
        own = self.personal.get(site_id, {})
        return {**global_state, **{n: own[n] for n in self._personal(site_id) if n in own}}

    def broadcast(self, site_id: int, global_state: State) -> State:
        skip = self.masker.names_of(self._start_groups.get(site_id, frozenset()))
        return {n: t for n, t in global_state.items() if n not in skip}

    def personal_state(self, site_id: int, global_state: State) -> State | None:
        """A site deploys the global shared groups merged with its personal groups (outside the client-level
        guarantee, docs/DESIGN.md 4.6)."""
        own = self.personal.get(site_id) if self.use_masks else None
        return None if not own else {**global_state, **own}

    def mask_scoring_data(self, site_id: int) -> CohortDataset:
        """The samples site ``site_id`` scores its mask on: the server's PUBLIC set (``mask_data="public"``,
        forced under patient-level DP: the scores are then a function of the site's DP-trained model, the
        released global model and public data only) or the site's own validation split (``"validation"``)."""
        return self._public if self.mask_data == "public" else self.val_sets[site_id]

    def after_local(self, site_id: int, model: nn.Module) -> None:
        """Site side: rescore the mask when due, from (trained model, round's global model, scoring set)
        only, and keep the personal groups' trained tensors at the site."""
        if not self.use_masks:
            return
        trained = {n: p.detach() for n, p in model.named_parameters()}
        assert self._round_global is not None  # client_start_state ran for this round
        self.masker.maybe_update(
            site_id,
            self._round,
            model,
            self._round_global,
            trained,
            self.mask_scoring_data(site_id),
            forced_personal=self.drowned,
        )
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
        masked = ClientUpdate(
            site_id=update.site_id,
            num_examples=update.num_examples,
            num_steps=update.num_steps,
            train_loss=update.train_loss,
            metrics=update.metrics,
            delta={n: (torch.zeros_like(d) if n in personal else d) for n, d in update.delta.items()},
        )
        sent = super().transmit(masked, round_index)
        # server: personal groups never leave the site; distributed: noise-only placeholders keep the secure
        # sum's noise and hide the (private) KL mask; drowned groups are released by nobody (RoundRelease).
        keep = self.release_for(round_index).names_to_send(self.groups, personal=personal) | {CLIP_INDICATOR}
        return {n: t for n, t in sent.items() if n in keep}

    def aggregate(
        self, global_state: State, updates: Sequence[ClientUpdate], sent: Sequence[State], round_index: int
    ) -> State:
        # A group a site kept personal contributes zero to the clipped sum (fixed denominator qN).
        padded = [{**{n: torch.zeros_like(t) for n, t in global_state.items()}, **s} for s in sent]
        return super().aggregate(global_state, updates, padded, round_index)

    # ---- reports and state
    def round_report(self, round_index: int) -> dict[str, float]:
        sites = list(self.site_ids)
        return {
            **super().round_report(round_index),
            "personal_fraction": self._personal_fraction(sites) if self.use_masks else 0.0,
            "drowned_groups": float(len(self.drowned)),
            "mask_changes": float(self.masker.masks.changes_in(round_index)) if self.use_masks else 0.0,
        }

    def _personal_fraction(self, sites: Sequence[int]) -> float:
        sizes = self.group_sizes
        total = sum(sizes.values())
        return float(sum(sum(sizes[g] for g in self._personal_groups(s)) / total for s in sites) / max(len(sites), 1))

    def summary_report(self) -> dict[str, Any]:
        out = super().summary_report()
        out["ablation"] = {
            "fisher": self.use_fisher,
            "masks": self.use_masks,
            "dp": self.use_dp,
            "noise_gate": self.gate is not None,
        }
        if self.gate is not None:
            out["noise_gate"] = {
                "min_snr": self.gate.min_snr,
                "rounds": self.gate_rounds,
                "snr_last_round": {g: (v if math.isfinite(v) else None) for g, v in self.snr.items()},
                "drowned_last_round": sorted(self.drowned),
                "rounds_with_nothing_released": self._skipped_rounds,
                # rounds whose gate decided from max_noise_ratio x the uniform SNR, without the Fisher
                "rounds_fisher_skipped": self._fisher_skipped,
            }
        if self.use_masks:
            out["masks"] = {str(s): sorted(self._personal_groups(s)) for s in self.site_ids}
            if self.mask_data == "public":
                out["mask_privacy"] = (
                    "scored on the server's public set with each site's DP-SGD-trained model: "
                    "post-processing of the patient-level release, no validation patient used"
                )
            else:
                out["mask_privacy"] = (
                    "exact scores seen only by the trusted server (server placement)"
                    if self.placement is NoisePlacement.SERVER
                    else "masks hidden by secure aggregation (noise-only placeholders)"
                )
        return out

    def state_dict(self) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        tensors, state = super().state_dict()
        return tensors, {
            **state,
            "masker": self.masker.state_dict(),
            "drowned": sorted(self.drowned),
            "skipped_rounds": self._skipped_rounds,
        }

    def load_state_dict(self, tensors: dict[str, torch.Tensor], state: dict[str, Any]) -> None:
        super().load_state_dict(tensors, state)
        self.masker.load_state_dict(state["masker"])
        self.drowned = frozenset(state["drowned"])
        self._skipped_rounds = int(state["skipped_rounds"])
        self._set_bounds(self.clip_norm)
