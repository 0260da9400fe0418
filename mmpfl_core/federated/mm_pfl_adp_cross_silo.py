"""MM-PFL-ADP under patient-level DP across hospitals with secure aggregation (strategy ``mm-pfl-adp-cross-silo``):
the Fisher allocation of the noise over parameter groups, per-site KL masks hidden by noise-only placeholder
shares, and the public noise gate, on the mechanism of :mod:`.cross_silo_dp_sgd` (docs/DESIGN.md 4.2-4.5).

Why a subclass of ``cross-silo-dp-sgd`` and not an option of ``mm-pfl-adp``: ``mm-pfl-adp`` releases a site's
whole local update once a round (client-level, or per-site DP-SGD with the upload as post-processing); here a
round is ONE DP-SGD step over the union of the sites' patients whose only noise is in the secure sum. The
mechanism (ledger, shares, top-up, fixed denominator q N, server optimiser) is the parent's; this class changes
three things in it: the clipping is per group, the noise std is per group, and the set of coordinates a site
keeps is per site and private.

Round t (parent's steps, with these changes):
    0. (Server, public.) Every ``fisher_every`` rounds: the mean diagonal Fisher F_g of the RELEASED global
       model on the server's PUBLIC set (:func:`~mmpfl_core.privacy.fisher.diagonal_fisher`, model-sampled
       labels). The bounded Fisher allocation (:func:`~mmpfl_core.privacy.allocation.fisher_noise_allocation`,
       ``max_noise_ratio``) over ALL trainable groups at the run's z, with C_g = C sqrt(d_g / d)
       (:func:`~mmpfl_core.privacy.allocation.clip_bounds_from_sizes`); z_eff = z checked to 1e-9
       (:func:`~mmpfl_core.privacy.allocation.check_effective_multiplier`). ``fisher=False``: uniform
       sigma_g = z C (the ablation). The noise gate: snr_g = sqrt(T) q N C_g / (sigma_g sqrt(d_g))
       (:func:`~mmpfl_core.personalization.noise_gate.release_snr` with q N patients per noise draw and T the
       run's rounds); a group below ``min_snr`` is drowned: nobody sends it (the rule is public), and a site
       steps its own copy of it if it holds one (with masks every site does; with ``masks=False`` only the
       ``always_personal`` copies exist, so a drowned group stays at its released value, released nowhere).
    1-2. Site k Poisson-samples its patients at rate q; per-patient gradients clipped PER GROUP:
       c_{i,g} = g_{i,g} min(1, C_g / ||g_{i,g}||), so ||c_i|| <= C.
    3. For every group g that some site may share (not ``always_personal``, not drowned, and not in the
       public warm-up window below), site k sends S_k[g] = sum_i c_{i,g} 1[g not in P_k] + N(0, sigma_g^2 / m I):
       a group it keeps personal (g in P_k, its private mask) gets a noise-only PLACEHOLDER share, so the sum
       has variance sigma_g^2 on every coordinate whoever keeps what, and the server cannot tell P_k.
    4. Server: sum, top-up N(0, sigma_g^2 (m - s) / m) for missing shares, over q N, server optimiser.
    5. For every g in P_k (and every group personal by the public rule): the site adds N(0, sigma_g^2 I) to
       sum_i c_{i,g}, divides by q n_k and steps its personal copy.
    6. Masks (every ``mask.update_every`` rounds, site side): KL scores (:mod:`~mmpfl_core.personalization.kl_scores`)
       on the first ``score_subjects`` subjects of the PUBLIC set, between the released global model and the
       global model with group g replaced by the site's personal copy; :class:`~mmpfl_core.personalization.masks.MaskSchedule`
       (threshold, hysteresis, ``always_personal`` / ``always_shared``) gives the new P_k.

Privacy argument. Unit: one patient of any site (add/remove). Patient i of site k enters, for each group g,
EXACTLY one noised output: the secure sum (if g is not in P_k) or site k's personal sum (if it is), each with
noise sigma_g on every coordinate (the m shares, placeholders included, plus the top-up, sum to sigma_g^2; the
personal sum carries sigma_g^2 itself); the other sites' personal sums do not depend on i. Whitening group g by
sigma_g, the joint output is the isotropic Gaussian mechanism with L2 sensitivity
(sum_g C_g^2 / sigma_g^2)^(1/2) = 1 / z_eff, and the allocation makes z_eff = z whatever P_k is (it is built
over ALL groups, personal or not). So each round is one Poisson-subsampled Gaussian step at (q, z), exactly the
parent's ledger entry; the parent's accountant gives epsilon. What decides sigma_g, the gate and the masks is
post-processing: F_g from the released global model and public data; the gate from (C_g, sigma_g, d_g, q N, T),
all public; the masks from the site's personal copies (its DP outputs: noised personal sums, post-processed by
its optimiser), the released global model and the PUBLIC set, no patient of the site (tested: with the DP
outputs pinned, removing a training patient leaves the mask unchanged, and the scorer is handed the public set).

What the masks can and cannot see (a limit of this mechanism, stated rather than hidden): a site holds a DP copy
of a group only while it keeps that group personal; for a group it shares there is no site-specific DP output
(its share alone has std sigma_g / sqrt(m) and protects nothing), so its score is 0 and it stays shared. Scoring
it would need a second, accounted release. Hence the masks START with every group personal (``mask_start="all"``;
the first ``update_every`` rounds are a public warm-up in which nobody shares and nothing is aggregated) and the
KL rule SHARES a group at a site once its personal copy predicts on the public set like the global model
(score below threshold (1 - h)); ``always_personal`` groups never leave. ``masks=False`` is the ablation "no KL
masks": the fixed ``always_personal`` set only, everything else shared from round 1 (= ``cross-silo-dp-sgd``
with ``personal_groups=always_personal``, plus per-group clipping and the allocation).

Measured (``bench/results/secagg_mmpfl_probe.md``: headline cohort, alpha 10, lesion contrast 0.3, ``head+bias``
d = 2,915, seed 0, patient epsilon 8, 200 rounds of q N = 128; 201 test subjects; one run each, secure noise, so
a rerun draws other noise): personal accuracy 0.726 [0.667, 0.786] (Fisher, masks, gate), 0.726 [0.662, 0.786]
uniform, 0.731 [0.672, 0.791] no masks, and ``cross-silo-dp-sgd`` with the head personal 0.687 [0.627, 0.751] in
the same run (0.706 in ``bench/results/wcp_secagg_probe.md``: the spread of one noise draw). Every arm ended
sharing all but the head at every site (shared_d 2,720 of 2,915): by the last round the KL masks had shared every
candidate group and the gate drowned none; Fisher vs uniform and masks vs none differ by at most 0.005 here, far
inside the intervals (no measured benefit from either on this cohort).

Trust, randomness and what must never be released: as :mod:`.cross_silo_dp_sgd`; in addition a site's mask
P_k, its KL scores and its personal copies never leave it (the summary lists masks as a simulation report,
private to the operator, docs/DESIGN.md 6).
"""

from __future__ import annotations

import copy
import logging
import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch
from torch import nn

from ..data.contract import CohortDataset
from ..data.federation import Federation
from ..errors import ConfigError
from ..personalization.kl_scores import kl_group_scores
from ..personalization.masks import MaskSchedule
from ..personalization.noise_gate import NoiseGate, release_snr
from ..privacy.allocation import (
    NoiseAllocation,
    check_effective_multiplier,
    clip_bounds_from_sizes,
    fisher_noise_allocation,
    uniform_noise_allocation,
)
from ..privacy.fisher import diagonal_fisher, group_fisher
from ..seeding import Stream, torch_generator
from .client import ClientUpdate
from .config import FederatedConfig
from .cross_silo_dp_sgd import CrossSiloDPSGD, group_clip_factors, per_patient_group_clipped_sum
from .strategies import State, register_strategy

logger = logging.getLogger(__name__)

__all__ = ["MMPFLADPCrossSilo"]

#: The KL rule of ``mm-pfl-adp`` (0.05 nats per sample, 20 % hysteresis), rescored every 2 rounds.
DEFAULT_MASK: dict[str, Any] = {"mode": "threshold", "threshold": 0.05, "hysteresis": 0.2, "update_every": 2}
MASK_STARTS = ("all",)


@register_strategy("mm-pfl-adp-cross-silo")
class MMPFLADPCrossSilo(CrossSiloDPSGD):
    """MM-PFL-ADP on cross-silo DP-SGD with secure aggregation (module docstring). Keyword-only.

    Args:
        fisher: Fisher allocation of sigma_g (False: uniform sigma_g = z C, the ablation).
        masks: per-site KL masks (False: the fixed ``mask["always_personal"]`` set only, the ablation).
        mask: keyword arguments of :class:`~mmpfl_core.personalization.masks.MaskSchedule`
            (``threshold``, ``hysteresis``, ``update_every``, ``always_personal``, ``always_shared``, ...).
        mask_start: the masks' starting personal set; only ``"all"`` (module docstring: a site can score only
            the groups it keeps).
        noise_gate: keyword arguments of :class:`~mmpfl_core.personalization.noise_gate.NoiseGate`
            (``min_snr``, ``rounds``), or False (share whatever the masks share).
        max_noise_ratio: r of the bounded Fisher allocation (sigma_g within [sigma_u / r, r sigma_u]).
        fisher_every, fisher_batch_size, fisher_max_batches: how often and on how much of the public set the
            Fisher is estimated.
        score_subjects, score_batch_size: public subjects the KL scores use, and the scoring batch.
        **cross_silo: every argument of ``cross-silo-dp-sgd`` except ``personal_groups`` (use
            ``mask={"always_personal": [...]}``).
    """

    def __init__(
        self,
        *,
        fisher: bool = True,
        masks: bool = True,
        mask: dict[str, Any] | None = None,
        mask_start: str = "all",
        noise_gate: dict[str, Any] | bool = True,
        max_noise_ratio: float | None = 2.0,
        fisher_every: int = 20,
        fisher_batch_size: int = 32,
        fisher_max_batches: int = 4,
        score_subjects: int = 256,
        score_batch_size: int = 128,
        **cross_silo: Any,
    ) -> None:
        if cross_silo.get("personal_groups"):
            raise ConfigError(
                "mm-pfl-adp-cross-silo takes no personal_groups: its personal sets are per-site masks; pass the "
                "groups every site keeps as mask={'always_personal': [...]}."
            )
        super().__init__(**cross_silo)
        if mask_start not in MASK_STARTS:
            raise ConfigError(
                f"mm-pfl-adp-cross-silo mask_start={mask_start!r} is unknown; use 'all' (a site scores only the groups "
                "it keeps personal, so the masks start with every group personal and share what agrees)."
            )
        if max_noise_ratio is not None and not 1.0 <= max_noise_ratio < math.inf:
            raise ConfigError(
                f"mm-pfl-adp-cross-silo max_noise_ratio={max_noise_ratio!r} must be finite and >= 1, or None."
            )
        for name, value in (
            ("fisher_every", fisher_every),
            ("fisher_batch_size", fisher_batch_size),
            ("fisher_max_batches", fisher_max_batches),
            ("score_subjects", score_subjects),
            ("score_batch_size", score_batch_size),
        ):
            if int(value) != value or value < 1:
                raise ConfigError(f"mm-pfl-adp-cross-silo {name}={value!r} must be an integer >= 1.")
        self.use_fisher, self.use_masks = bool(fisher), bool(masks)
        self.schedule = MaskSchedule(**{**DEFAULT_MASK, **(mask or {})})
        if noise_gate is True:
            noise_gate = {}
        self.gate = NoiseGate(**noise_gate) if noise_gate is not False else None
        self.max_noise_ratio = max_noise_ratio
        self.fisher_every, self.fisher_batch_size, self.fisher_max_batches = (
            int(fisher_every),
            int(fisher_batch_size),
            int(fisher_max_batches),
        )
        self.score_subjects, self.score_batch_size = int(score_subjects), int(score_batch_size)
        self.fisher_weights: dict[str, float] | None = None
        self._fisher_round: int | None = None  # the round whose Fisher ``fisher_weights`` is
        self.allocation: NoiseAllocation | None = None
        self.snr: dict[str, float] = {}
        self.drowned: frozenset[str] = frozenset()
        self.site_masks: dict[int, frozenset[str]] = {}
        self._planned_round = 0
        self._round = 1
        self._mask_updates = 0

    # ------------------------------------------------------------------ set-up (public inputs only)
    def configure(
        self, *, config: FederatedConfig, federation: Federation, client_ids: Sequence[int], model: nn.Module
    ) -> None:
        if federation.public is None or len(federation.public) == 0:
            raise ConfigError(
                "mm-pfl-adp-cross-silo needs the server's public set (Fisher and KL scores); set "
                "federation.public_size > 0."
            )
        super().configure(config=config, federation=federation, client_ids=client_ids, model=model)
        trainable = {n: p for n, p in model.named_parameters() if p.requires_grad}
        group_fn = getattr(model, "parameter_groups", None)
        if not callable(group_fn):
            raise ConfigError("mm-pfl-adp-cross-silo needs a model with parameter_groups() (MultiModalViT).")
        self.groups = {
            g: [n for n in names if n in trainable]
            for g, names in group_fn().items()
            if any(n in trainable for n in names)
        }
        self.group_sizes = {g: sum(trainable[n].numel() for n in names) for g, names in self.groups.items()}
        self.group_of = {n: g for g, names in self.groups.items() for n in names}
        fixed = set(self.schedule.always_personal) | set(self.schedule.always_shared)
        unknown = sorted(fixed - set(self.groups))
        if unknown:
            raise ConfigError(
                f"mm-pfl-adp-cross-silo mask groups {unknown} are not trainable groups of the model; use some of "
                f"{list(self.groups)}."
            )
        self.clip_bounds = clip_bounds_from_sizes(self.group_sizes, self.max_grad_norm)
        public = federation.public
        self._score_set = CohortDataset(public.subset(np.arange(min(self.score_subjects, len(public)))))
        self._public = CohortDataset(public)
        self._fisher_model = copy.deepcopy(model)
        self._rounds = config.num_rounds
        self._warmup = self.schedule.update_every if self.use_masks else 0
        start = set(self.groups) - set(self.schedule.always_shared) if self.use_masks else self.schedule.always_personal
        self._start_mask = frozenset(start)  # public: the same rule at every site
        self.site_masks = {k: self._start_mask for k in self.site_sizes}
        self.gate_rounds = self.gate.rounds if self.gate is not None and self.gate.rounds else config.num_rounds

    # ------------------------------------------------------------------ server: the round's public plan
    def plan_round(self, round_index: int, global_state: State) -> NoiseAllocation:
        """sigma_g, the gate's drowned set, from public inputs only (module docstring, step 0); once a round."""
        if self._planned_round == round_index and self.allocation is not None:
            return self.allocation
        assert self.noise_multiplier is not None and self.sample_rate is not None
        z = self.noise_multiplier
        if z == 0:  # tests only (epsilon inf): no noise to allocate
            sigmas = {g: 0.0 for g in self.groups}
            self.allocation = NoiseAllocation(
                sigmas=sigmas, rhos={}, clip_bounds=dict(self.clip_bounds), noise_multiplier=0.0
            )
        else:
            if self.use_fisher:
                due = round_index - (round_index - 1) % self.fisher_every
                if self.fisher_weights is None or self._fisher_round != due:
                    self.fisher_weights = self.compute_fisher(due, global_state)
                    self._fisher_round = due
                alloc = fisher_noise_allocation(
                    group_sizes=self.group_sizes,
                    fisher=self.fisher_weights,
                    clip_bounds=self.clip_bounds,
                    noise_multiplier=z,
                    max_noise_ratio=self.max_noise_ratio,
                )
            else:
                alloc = uniform_noise_allocation(
                    group_sizes=self.group_sizes, clip_bounds=self.clip_bounds, noise_multiplier=z
                )
            self.check_allocation(alloc)
            self.allocation = alloc
            if self.gate is not None:
                self.snr = release_snr(
                    clip_bounds=self.clip_bounds,
                    sigmas=alloc.sigmas,
                    group_sizes=self.group_sizes,
                    expected_participants=self.sample_rate * self.total,
                    rounds=self.gate_rounds,
                )
                drowned = self.gate.drowned(self.snr)
                if drowned != self.drowned:
                    logger.info(
                        "round %d: %s keeps %s personal at every site (noise gate)",
                        round_index,
                        self.name,
                        sorted(drowned),
                    )
                self.drowned = drowned
        self._planned_round = round_index
        return self.allocation

    def check_allocation(self, alloc: NoiseAllocation) -> None:
        """z_eff of (C_g, sigma_g) over EVERY trainable group must equal the accounted z (else PrivacyError)."""
        assert self.noise_multiplier is not None
        missing = sorted(set(self.groups) - set(alloc.sigmas))
        if missing:
            raise ConfigError(f"mm-pfl-adp-cross-silo: the allocation leaves groups {missing} without noise (a bug).")
        check_effective_multiplier(
            self.clip_bounds, alloc.sigmas, self.noise_multiplier, "mm-pfl-adp-cross-silo allocation (all groups)"
        )

    def compute_fisher(self, round_index: int, global_state: State) -> dict[str, float]:
        """Mean diagonal Fisher per group of the released global model on the PUBLIC set (post-processing)."""
        self._fisher_model.load_state_dict(global_state, strict=False)
        fisher = diagonal_fisher(
            self._fisher_model,
            self._public.input_batches(self.fisher_batch_size, next(self._fisher_model.parameters()).device),
            labels="model",
            generator=torch_generator(int(self._config.seed), Stream.FISHER_NOISE, round_index),
            max_batches=self.fisher_max_batches,
        )
        return group_fisher(fisher, self.groups)

    def public_personal(self, round_index: int) -> frozenset[str]:
        """Groups personal at EVERY site by a public rule this round: ``always_personal``, drowned, and every
        group in the masks' warm-up (rounds 1..update_every, when every mask is still its public start)."""
        if self.use_masks and round_index <= self._warmup:
            return self._start_mask | self.drowned
        return frozenset(self.schedule.always_personal) | self.drowned

    def before_round(self, round_index: int) -> None:
        self._round = round_index  # which public personal set applies (warm-up or not) from here on
        super().before_round(round_index)

    def personal_groups_of(self, site_id: int) -> frozenset[str]:
        """P_k: the site's private mask, joined with the public personal groups (this is site-side state)."""
        return self.site_masks.get(site_id, frozenset()) | self.public_personal(self._round)

    def _names(self, groups: frozenset[str] | set[str]) -> set[str]:
        return {n for g in groups for n in self.groups[g]}

    @property
    def personal_names(self) -> frozenset[str]:  # per site here: the parent's field is always empty
        return frozenset()

    @personal_names.setter
    def personal_names(self, value: frozenset[str]) -> None:
        if value:
            raise ConfigError("mm-pfl-adp-cross-silo: personal coordinates are per-site masks, not personal_groups.")

    # ------------------------------------------------------------------ site side
    def broadcast(self, site_id: int, global_state: State) -> State:
        return {n: t for n, t in global_state.items() if n not in self._names(self.personal_groups_of(site_id))}

    def client_start_state(self, site_id: int, global_state: State) -> State:
        mine = self._names(self.personal_groups_of(site_id))
        own = self.personal.get(site_id, {})
        return {**global_state, **{n: t for n, t in own.items() if n in mine}}

    def personal_state(self, site_id: int, global_state: State) -> State | None:
        own = self.personal.get(site_id)
        if not own:
            return None
        mine = self._names(self.personal_groups_of(site_id))
        return {**global_state, **{n: t for n, t in own.items() if n in mine}}

    def local_training(
        self,
        model: nn.Module,
        dataset: CohortDataset,
        *,
        site_id: int,
        global_state: State,
        round_index: int,
        config: FederatedConfig,
        generator: torch.Generator,
        device: torch.device,
    ) -> ClientUpdate:
        """Steps 1-3, 5 and 6 of the module docstring for site k; ``delta`` is the site's share of the sum."""
        alloc = self.plan_round(round_index, global_state)  # server's public plan (in-process: computed once)
        batch_size, sums, loss, noise_gen = self.site_clipped_sums(
            model, dataset, generator, device, site_id=site_id, round_index=round_index, global_state=global_state
        )
        keep = self.personal_groups_of(site_id)
        shares = self.group_shares(sums, alloc, keep, round_index, noise_gen)
        if keep and self.site_sizes.get(site_id, 0) > 0:
            # The copy and optimiser span every group of the site's START mask (all groups, or always_personal);
            # a group the mask has since shared gets no gradient (its copy is kept, unused), so the optimiser's
            # parameter list never changes.
            self.step_personal_copy(
                site_id,
                model,
                sums,
                self._names(self._start_mask | self.public_personal(1)),
                self._names(keep),
                lambda n: alloc.sigmas[self.group_of[n]],
                noise_gen,
                config,
            )
        if self.use_masks and round_index % self.schedule.update_every == 0:
            self._update_mask(site_id, model, global_state, round_index)
        return ClientUpdate(
            site_id=site_id, delta=shares, num_examples=len(dataset), num_steps=1, train_loss=loss / max(batch_size, 1)
        )

    def clip_batch(self, model: nn.Module, batch: Any, device: torch.device) -> tuple[State, float]:
        """Per-patient gradients clipped PER GROUP to C_g (step 1-2 of the module docstring), summed."""
        return per_patient_group_clipped_sum(
            model, batch, clip_bounds=self.clip_bounds, group_of=self.group_of, device=device
        )

    def patient_clip_factors(self, per_sample: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Each patient's clipping factor (B,) by trainable name: :meth:`clip_batch`'s rule, per group to C_g."""
        factors = group_clip_factors(per_sample, self.clip_bounds, self.group_of)
        return {n: factors[self.group_of[n]] for n in per_sample}

    def group_shares(
        self,
        sums: State,
        alloc: NoiseAllocation,
        keep: frozenset[str],
        round_index: int,
        noise_gen: torch.Generator | None,
    ) -> State:
        """S_k[g] for every group any site may share: the clipped sum (zero where g is in ``keep``, the site's
        noise-only placeholder) plus N(0, sigma_g^2 / m I); groups personal everywhere by the public rule are
        not sent at all."""
        out = {}
        public = self.public_personal(round_index)
        for n, s in sums.items():
            g = self.group_of[n]
            if g in public:
                continue
            signal = torch.zeros_like(s) if g in keep else s
            std = alloc.sigmas[g] / math.sqrt(self._m)
            out[n] = signal + self._gaussian(s.shape, std, noise_gen).to(s.device)
        return out

    def _update_mask(self, site_id: int, model: nn.Module, global_state: State, round_index: int) -> None:
        """Step 6: KL scores of the site's personal copies against the released global model on the PUBLIC set."""
        own = self.personal.get(site_id, {})
        current = self.site_masks[site_id]
        fixed = set(self.schedule.always_personal) | set(self.schedule.always_shared) | set(self.drowned)
        to_score = {g: self.groups[g] for g in current if g not in fixed}
        scores = {g: 0.0 for g in self.groups}  # a shared group has no site-specific DP copy: score 0
        if to_score:
            scores.update(self.mask_scores(model, global_state, own, to_score))
        new = self.schedule.select(list(self.groups), scores, current, round_index, forced_personal=self.drowned)
        # one-way: a group the site shares stays shared (no DP copy to score it on; module docstring)
        new = frozenset(new & (current | set(self.schedule.always_personal) | set(self.drowned)))
        if new != current:
            self._mask_updates += 1
        self.site_masks[site_id] = new

    def mask_scores(
        self, model: nn.Module, global_state: State, personal: State, groups: Mapping[str, Sequence[str]]
    ) -> dict[str, float]:
        """KL scores on the PUBLIC scoring set only: (site model, released global, personal copies, public data)."""
        return kl_group_scores(model, global_state, personal, self._score_set, groups, batch_size=self.score_batch_size)

    # ------------------------------------------------------------------ what leaves a site, and the server
    def transmit(self, update: ClientUpdate, round_index: int) -> State:
        public = self._names(self.public_personal(round_index))
        leaked = public.intersection(update.delta)
        if leaked:  # a defect: groups personal everywhere are never sent
            raise RuntimeError(f"mm-pfl-adp-cross-silo: publicly personal tensors {sorted(leaked)} would be sent.")
        return update.delta

    def aggregate(
        self, global_state: State, updates: Sequence[ClientUpdate], sent: Sequence[State], round_index: int
    ) -> State:
        """sum_k S_k + top-up N(0, sigma_g^2 (m - s) / m) per group, over q N, then the server optimiser."""
        assert self.allocation is not None
        shared = self.shared_names(global_state, round_index)
        if not shared:
            return dict(global_state)
        return self.aggregate_shared(global_state, sent, shared, round_index)

    def shared_names(self, global_state: State, round_index: int) -> list[str]:
        """Every tensor of a group not personal at every site by the public rule (placeholders hide the rest)."""
        public = self.public_personal(round_index)
        return [n for n in global_state if n in self.group_of and self.group_of[n] not in public]

    def aggregate_noise_std(self, name: str) -> float:
        """sigma_g of the tensor's group (the round's allocation)."""
        assert self.allocation is not None
        return self.allocation.sigmas[self.group_of[name]]

    # ------------------------------------------------------------------ reporting
    def summary_report(self) -> dict[str, Any]:
        out = super().summary_report()
        privacy = out["sample_level_privacy"]
        released = sorted(g for g in self.groups if g not in self.public_personal(self._rounds))
        shared_somewhere = sorted({g for g in released if any(g not in m for m in self.site_masks.values())})
        privacy.update(
            {
                "personal_groups": sorted(self.schedule.always_personal),
                "allocation": "fisher" if self.use_fisher else "uniform",
                "group_sigmas": dict(self.allocation.sigmas) if self.allocation is not None else {},
                "group_clip_bounds": dict(self.clip_bounds),
                "released_groups": shared_somewhere,
                "released": bool(shared_somewhere),
                "masks": {str(k): sorted(v) for k, v in sorted(self.site_masks.items())},
                "mask_privacy": (
                    "KL scores of each site's DP personal copies against the released global model on the server's "
                    "public set (post-processing); masks hidden by noise-only placeholder shares"
                    if self.use_masks
                    else "no KL masks: the fixed always_personal set at every site"
                ),
                "noise_gate": (
                    {
                        "min_snr": self.gate.min_snr,
                        "rounds": self.gate_rounds,
                        "snr": {g: round(v, 4) for g, v in self.snr.items()},
                        "drowned": sorted(self.drowned),
                    }
                    if self.gate is not None
                    else None
                ),
                "ablation": {"fisher": self.use_fisher, "masks": self.use_masks, "noise_gate": self.gate is not None},
            }
        )
        if not shared_somewhere:
            privacy["release_note"] = "released nothing: every group stayed personal at every site"
        return out

    def state_dict(self) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        tensors, state = super().state_dict()
        return tensors, {
            **state,
            "site_masks": {str(k): sorted(v) for k, v in self.site_masks.items()},
            "drowned": sorted(self.drowned),
            "fisher_weights": self.fisher_weights,  # public (released model, public set): resume reuses it
            "fisher_round": self._fisher_round,
        }

    def load_state_dict(self, tensors: dict[str, torch.Tensor], state: dict[str, Any]) -> None:
        super().load_state_dict(tensors, state)
        self.site_masks = {int(k): frozenset(v) for k, v in state["site_masks"].items()}
        self.drowned = frozenset(state["drowned"])
        self.fisher_weights, self._fisher_round = state["fisher_weights"], state["fisher_round"]
        # the round whose public personal set applies: the last one on the ledger (every round is recorded in
        # before_round), so a finished run read back does not fall into the masks' warm-up again
        self._round = max(self._recorded, default=1)
