"""FedDPA (Yang, Huang, Ye, NeurIPS 2023, "Dynamic Personalized Federated Learning with Adaptive
Differential Privacy") as a baseline on the kit's client-level DP release ("feddpa").

Algorithm of one round t at a sampled site k (after the authors' code, github.com/xiyuanyang45/DynamicPFL):
    1. Fisher. The site computes the empirical diagonal Fisher F (true labels, Opacus per-sample
       gradients) of its previous local model (the global model at its first round) on its OWN
       training data, and min-max normalises it within each parameter tensor to [0, 1].
    2. Personal coordinates. m = 1[F_norm > ``fisher_threshold``] per coordinate (default 0.4, the
       authors'). The start model is m * own + (1 - m) * global: informative coordinates keep the
       site's values and are never noised.
    3. Constrained local update, with w the round's global model:
         R1 = (lambda_1 / 2) * sum_layers ||m (theta - w)||_2          (personal part stays near w)
         R2 = (lambda_2 / 2) * | sum_layers ||(1 - m)(theta - w)||_2 - C |   (shared update norm near
              the clip bound C, so clipping removes little of it: the paper's "adaptive constraint")
    4. Release. The shared part (1 - m)(theta_T - w) goes through DP-FedAvg unchanged (clip, noise,
       fixed denominator qN, ledger): epsilon comes from the same accountant, so it is comparable.
    5. The site keeps theta_T as its own model; it deploys m * theta_T + (1 - m) * w_current.

Simplifications (stated, not hidden): the authors train the personal coordinates (step 3, R1) and
then the shared ones (R2) in two sequential passes of ``local_epochs`` each, with the other part's
gradients masked; here both parts train in ONE joint pass of the run's local training with R1 + R2
(the loop trains one model per round, and one pass keeps FedDPA's compute equal to every other
method's). The authors' R2 sums the personal differences in too (constants in their phase 2); here
it sums the shared part only. Their noise (C z / sqrt(N) per site, sample-weighted mean) is replaced
by the kit's accounted release (docs/DESIGN.md 4.1), and their personal coordinates are sent un-noised
inside the update; here they are never sent (zeros, within the clip bound).

Privacy: m is a function of the site's private data (its Fisher). It is never released on its
own: with ``placement="server"`` the personal coordinates are zeros in the clipped update, which
only the trusted server sees (as MM-PFL-ADP's masks, docs/DESIGN.md 4.4); the released model is covered
by the Gaussian mechanism because the zeroed update is still within the clip bound. With
``"distributed"`` every coordinate, personal ones included, carries the site's noise share
(noise-only placeholders: the server sees only the secure sum, never the mask); with ``"local"``
every coordinate carries the full noise, so the zeros are hidden the same way. The deployed personal
model is outside the client-level guarantee (docs/DESIGN.md 4.6). Never released: F, m, exact norms.

Patient-level DP (``sample_level_dp``, docs/DESIGN.md 4.5): the server is not trusted with patients, and
the zeros of the update show m to it, so a Fisher on the site's raw training patients would release
them outside the DP-SGD ledger. Under patient-level DP the Fisher is therefore computed on the
server's PUBLIC set (``fisher_data="public"``, the default there and the only choice):

    F = empirical Fisher of (the site's previous DP-SGD-trained model, or the global model) on public data,

a function of the site's own DP release (accounted in its ledger), the released global model and
public data only (:meth:`FedDPA.fisher_scoring_data`): m and everything it changes in the upload
are post-processing. ``fisher_data="train"`` together with ``sample_level_dp`` is refused. Tested:
with the trained model pinned, removing a training patient leaves what the site sends unchanged
(``tests/test_patient_dp_masks.py``, which also flags the variant with the Fisher on raw data).
"""

from __future__ import annotations

import copy
from typing import Any
from collections.abc import Sequence

import torch
from torch import nn

from ..data.contract import CohortDataset
from ..data.federation import Federation
from ..errors import ConfigError
from ..privacy import diagonal_fisher
from .client import ClientUpdate, LossRegulariser
from .config import FederatedConfig
from .dp_strategies import DPFedAvg
from .strategies import State, register_strategy

__all__ = ["FedDPA", "fisher_personal_masks"]


def fisher_personal_masks(fisher: dict[str, torch.Tensor], threshold: float) -> dict[str, torch.Tensor]:
    """m = 1[(F - min F) / (max F - min F) > threshold] within each tensor (the authors' layer-wise
    min-max normalisation); a constant tensor (max = min) has no informative coordinate: m = 0."""
    masks = {}
    for name, f in fisher.items():
        low, high = f.min(), f.max()
        if float(high - low) <= 0:
            masks[name] = torch.zeros_like(f, dtype=torch.bool)
        else:
            masks[name] = (f - low) / (high - low) > threshold
    return masks


@register_strategy("feddpa")
class FedDPA(DPFedAvg):
    """FedDPA (module docstring) on the kit's DP-FedAvg release. Keyword arguments:

    Args:
        fisher_threshold: normalised-Fisher threshold above which a coordinate is personal (0.4).
        lambda_1: weight of R1, the personal coordinates' pull toward the global model (0.1).
        lambda_2: weight of R2, the shared update's norm toward the clip bound C (0.05).
        fisher_batch_size, fisher_max_batches: the site's Fisher pass.
        fisher_data: where the Fisher is computed: ``"train"`` (the site's training split, the authors'
            choice and the default without ``sample_level_dp``) or ``"public"`` (the server's public set:
            the default, and the only choice, with ``sample_level_dp``; module docstring).
        **dp_kwargs: every argument of ``dp-fedavg`` (``target_epsilon`` or ``noise_multiplier``,
            ``delta``, ``clip_norm``, ``placement``, ``accountant``, ...).
    """

    def __init__(
        self,
        *,
        fisher_threshold: float = 0.4,
        lambda_1: float = 0.1,
        lambda_2: float = 0.05,
        fisher_batch_size: int = 32,
        fisher_max_batches: int = 1,
        fisher_data: str | None = None,
        **dp_kwargs: Any,
    ) -> None:
        super().__init__(**dp_kwargs)
        patient_dp = self.sample_dp is not None
        fisher_data = fisher_data if fisher_data is not None else ("public" if patient_dp else "train")
        if fisher_data not in ("train", "public"):
            raise ConfigError(f"feddpa fisher_data={fisher_data!r} is unknown; use 'train' or 'public'.")
        if fisher_data == "train" and patient_dp:
            raise ConfigError(
                "feddpa with sample_level_dp and fisher_data='train' would compute its Fisher masks on "
                "the site's raw training patients, and the zeros of its update would release them outside "
                "the DP-SGD ledger (docs/DESIGN.md 4.5). Use fisher_data='public' (the default with "
                "sample_level_dp: the Fisher of the DP-trained model on the server's public set)."
            )
        if patient_dp and (lambda_1 or lambda_2):
            raise ConfigError(
                f"feddpa with sample_level_dp needs lambda_1=0 and lambda_2=0 (got {lambda_1!r}, {lambda_2!r}): "
                "the kit's DP-SGD takes no local regulariser yet (R1/R2 would need per-sample clipping)."
            )
        self.fisher_data = fisher_data
        self._public: CohortDataset | None = None
        if not 0 <= fisher_threshold <= 1:
            raise ConfigError(
                f"feddpa fisher_threshold={fisher_threshold!r} must lie in [0, 1] (it thresholds a "
                "min-max normalised Fisher; the authors use 0.4)."
            )
        if not (lambda_1 >= 0 and lambda_2 >= 0):
            raise ConfigError(f"feddpa lambda_1={lambda_1!r} and lambda_2={lambda_2!r} must be >= 0.")
        if int(fisher_batch_size) < 1 or int(fisher_max_batches) < 1:
            raise ConfigError(
                f"feddpa fisher_batch_size={fisher_batch_size!r} and fisher_max_batches="
                f"{fisher_max_batches!r} must be integers >= 1."
            )
        self.fisher_threshold, self.lambda_1, self.lambda_2 = float(fisher_threshold), float(lambda_1), float(lambda_2)
        self.fisher_batch_size, self.fisher_max_batches = int(fisher_batch_size), int(fisher_max_batches)
        self.masks: dict[int, dict[str, torch.Tensor]] = {}  # site-private: never transmitted
        self.train_sets: dict[int, CohortDataset] = {}
        self._round_global: State | None = None

    def configure(
        self, *, config: FederatedConfig, federation: Federation, client_ids: Sequence[int], model: nn.Module
    ) -> None:
        if self.fisher_data == "public":
            if federation.public is None or len(federation.public) == 0:
                raise ConfigError(
                    "feddpa with fisher_data='public' needs the server's public set; set federation.public_size > 0."
                )
            self._public = CohortDataset(federation.public)  # public by construction: no site's subjects
        super().configure(config=config, federation=federation, client_ids=client_ids, model=model)
        self._scratch = copy.deepcopy(model)  # the site's Fisher pass runs on a copy, never on the loop's model

    def client_datasets(self, federation: Federation) -> dict[int, CohortDataset]:
        self.train_sets = super().client_datasets(federation)
        return dict(self.train_sets)

    # ---- site side: Fisher, mask, start state, constrained objective
    def fisher_scoring_data(self, site_id: int) -> CohortDataset:
        """The samples site ``site_id``'s Fisher is computed on: the server's PUBLIC set (``fisher_data=
        "public"``, forced under patient-level DP) or the site's own training split (``"train"``, private)."""
        if self.fisher_data == "public":
            assert self._public is not None, "configure() sets the public set"
            return self._public
        return self.train_sets[site_id]

    def _site_fisher(self, site_id: int, state: State) -> dict[str, torch.Tensor]:
        """Empirical diagonal Fisher of ``state`` (the site's previous model or the global one) on
        :meth:`fisher_scoring_data`: its training split (private) or the public set."""
        self._scratch.load_state_dict(state, strict=False)
        batches = self.fisher_scoring_data(site_id).input_batches(
            self.fisher_batch_size, next(self._scratch.parameters()).device
        )
        return diagonal_fisher(self._scratch, batches, labels="true", max_batches=self.fisher_max_batches)

    def client_start_state(self, site_id: int, global_state: State) -> State:
        super().client_start_state(site_id, global_state)  # the round's noise scales (public)
        self._round_global = global_state
        own = self.personal.get(site_id)
        fisher = self._site_fisher(site_id, own if own is not None else global_state)
        self.masks[site_id] = fisher_personal_masks(fisher, self.fisher_threshold)
        if own is None:
            return global_state
        return {n: torch.where(self.masks[site_id][n], own[n], g) if n in own else g for n, g in global_state.items()}

    def regulariser(self, site_id: int, global_state: State) -> LossRegulariser | None:
        if self.lambda_1 == 0 and self.lambda_2 == 0:
            return None
        anchor = {n: t.detach() for n, t in global_state.items()}
        personal = {n: m.to(anchor[n].dtype) for n, m in self.masks[site_id].items()}
        clip = self.clip_norm if self.clip_norm < float("inf") else 0.0

        def constraint(model: nn.Module) -> torch.Tensor:
            r1, shared_norm = [], []
            for n, p in model.named_parameters():
                if n not in anchor:
                    continue
                diff, m = p - anchor[n].to(p.device), personal[n].to(p.device)
                r1.append(torch.linalg.vector_norm(diff * m))
                shared_norm.append(torch.linalg.vector_norm(diff * (1 - m)))
            return (
                0.5 * self.lambda_1 * torch.stack(r1).sum()
                + 0.5 * self.lambda_2 * (torch.stack(shared_norm).sum() - clip).abs()
            )

        return constraint

    def after_local(self, site_id: int, model: nn.Module) -> None:
        self.personal[site_id] = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}

    def transmit(self, update: ClientUpdate, round_index: int) -> State:
        """Only the shared coordinates: personal ones are zero (within the clip bound), then DP-FedAvg's
        clip and, for distributed/local placement, noise on every coordinate (placeholders)."""
        mask = self.masks[update.site_id]
        shared = {
            n: (torch.where(mask[n], torch.zeros_like(d), d) if n in mask else d) for n, d in update.delta.items()
        }
        return super().transmit(
            ClientUpdate(
                site_id=update.site_id,
                num_examples=update.num_examples,
                num_steps=update.num_steps,
                train_loss=update.train_loss,
                metrics=update.metrics,
                delta=shared,
            ),
            round_index,
        )

    def personal_state(self, site_id: int, global_state: State) -> State | None:
        """m * own + (1 - m) * current global: what site k deploys (outside the client-level guarantee)."""
        own, mask = self.personal.get(site_id), self.masks.get(site_id)
        if own is None or mask is None:
            return None
        return {n: torch.where(mask[n], own[n], g) if n in own else g for n, g in global_state.items()}

    # ---- reports and state
    def round_report(self, round_index: int) -> dict[str, float]:
        total = sum(int(m.numel()) for masks in self.masks.values() for m in masks.values())
        kept = sum(int(m.sum()) for masks in self.masks.values() for m in masks.values())
        return {**super().round_report(round_index), "personal_fraction": kept / total if total else 0.0}

    def summary_report(self) -> dict[str, Any]:
        out = super().summary_report()
        if self.fisher_data == "public":
            out["privacy"]["mask_privacy"] = (
                "per-coordinate masks from the Fisher of each site's DP-SGD-trained model "
                "on the server's public set: post-processing, no raw patient used"
            )
        else:
            out["privacy"]["mask_privacy"] = (
                "per-coordinate masks from each site's private Fisher; zeros seen only by the trusted server"
                if self.placement.value == "server"
                else "masks hidden: every coordinate carries noise (placeholders)"
            )
        out["feddpa"] = {
            "fisher_threshold": self.fisher_threshold,
            "lambda_1": self.lambda_1,
            "lambda_2": self.lambda_2,
            "simplification": "personal and shared parts trained jointly in one local pass",
        }
        return out

    def state_dict(self) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        tensors, state = super().state_dict()
        masks = {f"{site}/{n}": m.to(torch.uint8) for site, ms in self.masks.items() for n, m in ms.items()}
        return {**tensors, **{f"mask:{k}": v for k, v in masks.items()}}, state

    def load_state_dict(self, tensors: dict[str, torch.Tensor], state: dict[str, Any]) -> None:
        masks = {k[len("mask:") :]: v for k, v in tensors.items() if k.startswith("mask:")}
        super().load_state_dict({k: v for k, v in tensors.items() if not k.startswith("mask:")}, state)
        self.masks = {}
        for key, m in masks.items():
            site, name = key.split("/", 1)
            self.masks.setdefault(int(site), {})[name] = m.bool()
