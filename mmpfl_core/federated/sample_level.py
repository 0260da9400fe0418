"""Sample-level (per-patient) DP-SGD inside each site: the hooks any strategy can mix in, and
"dp-sgd-fedavg", FedAvg with DP-SGD at every site and no client-level noise (docs/DESIGN.md 4.5).

Unit of privacy: one patient of one site (add/remove-one-patient adjacency); each site's guarantee
comes from its own ledger over the DP-SGD steps it took (:mod:`mmpfl_core.privacy.dp_sgd`).

Per-group DP-SGD (``sample_level_dp={..., "group_allocation": "fisher" | "uniform"}``, MM-PFL-ADP only,
:mod:`mmpfl_core.privacy.group_dp_sgd`). Once per round the server half plans, from public inputs
only (the model's groups and sizes, C, the Fisher of the released global model on the PUBLIC set),
the per-group clip bounds C_g and the split of the noise; every site then clips each group of each
per-sample gradient to C_g and adds N(0, sigma_g^2) per group with sigma_g the allocation at its own
multiplier z_k, so z_eff = z_k (checked) and its ledger is charged with z_eff. The noise gate under
patient-level DP (:meth:`SampleLevelHooks.plan_group_dp_sgd`) reads the same plan:

    snr_g = sqrt(T) A C_g / (s_g sqrt(d_g)),  A = sqrt(m) mean_k(S_k) / sqrt(mean_k(S_k z_k^2 / B_k^2)),

with s_g the allocation at z = 1, m = qN sites a round averages, S_k DP-SGD steps and B_k expected
batch of site k, T rounds (:func:`~mmpfl_core.privacy.group_dp_sgd.patients_per_noise`; with equal
sites A = B sqrt(m S) / z: a round aggregates m S B patients' gradients under m S noise draws). Groups
with snr_g < ``min_snr`` stay personal at every site. Inputs: the DP-SGD settings and the public plan,
no patient's data. Caveat: S_k, B_k and z_k follow from the site sizes n_k (as q_k = B / n_k does), which
the kit's DP-SGD treats as public, as Opacus does (the size caveat of :mod:`mmpfl_core.privacy.dp_sgd`);
with ``local_steps`` and ``noise_multiplier`` set and n_k >= B they do not depend on n_k at all
(``tests/test_group_dp_sgd.py`` removes a patient and gets the same drowned set).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any
from collections.abc import Callable, Iterable, Sequence

import torch
from torch import nn

import dataclasses
import math
from collections.abc import Mapping

from ..data.federation import Federation
from ..errors import ConfigError, PrivacyError
from ..personalization.noise_gate import NoiseGate, release_snr
from ..privacy.dp_sgd import PrivateTraining, SampleLevelDP
from ..privacy.group_dp_sgd import GroupDPSGDPlan, patients_per_noise, plan_group_dp_sgd
from ..privacy.mechanisms import NOT_PRIVATE_WARNING
from .client import ClientUpdate, steps_per_round
from .config import FederatedConfig
from .strategies import State, Strategy, register_strategy, weighted_average_update

__all__ = ["DPSGDFedAvg", "SampleLevelHooks"]


class SampleLevelHooks(Strategy):
    """Optional sample-level DP-SGD inside each site (:mod:`mmpfl_core.privacy.dp_sgd`), per-site ledgers.

    ``self.sample_dp`` is a :class:`SampleLevelDP` or None. A site is charged for the DP-SGD steps
    it actually took in every round it took part in; ``sample_epsilon_max`` is the max over sites.
    """

    sample_dp: SampleLevelDP | None = None
    #: True on strategies that plan per-group DP-SGD each round (:meth:`plan_group_dp_sgd`): MM-PFL-ADP.
    supports_group_allocation = False
    #: this round's public per-group plan (None: not planned yet, or flat DP-SGD)
    group_dp_plan: GroupDPSGDPlan | None = None

    @property
    def group_dp_sgd(self) -> bool:
        """Per-group DP-SGD is on (``sample_level_dp`` with a ``group_allocation``)."""
        return self.sample_dp is not None and self.sample_dp.group_allocation is not None

    def _configure_sample_level(self, config: FederatedConfig) -> None:
        self._local, self._num_rounds = config.local, config.num_rounds
        self._site_training: dict[int, Any] = {}
        self._site_sizes: dict[int, int] = {}
        self.group_dp_snr: dict[str, float] = {}
        self._patients_per_noise = math.nan
        if self.group_dp_sgd and not self.supports_group_allocation:
            raise ConfigError(
                f"{self.name}: sample_level_dp group_allocation needs a strategy that plans the parameter groups "
                "from public data each round (mm-pfl-adp); leave group_allocation out here."
            )

    def _configure_group_dp_sgd(self, federation: Federation) -> None:
        """Remember the sites' training-set sizes n_k: they set each site's DP-SGD steps, batch and z_k
        (as q_k = B / n_k does), which the patient-level gate reads (module docstring)."""
        self._site_sizes = {s.site_id: len(s.train) for s in federation.sites if len(s.train) > 0}

    def _training(self, site_id: int, num_examples: int) -> PrivateTraining:
        assert self.sample_dp is not None  # callers check
        return self.sample_dp.training_for(
            site_id,
            num_examples=num_examples,
            batch_size=self._local.batch_size,
            steps_per_round=steps_per_round(num_examples, self._local),
            num_rounds=self._num_rounds,
        )

    def private_training(self, site_id: int, num_examples: int) -> PrivateTraining | None:
        if self.sample_dp is None:
            return None
        training = self._training(site_id, num_examples)
        if self.group_dp_sgd:
            if self.group_dp_plan is None:
                raise PrivacyError(
                    f"site {site_id}: per-group DP-SGD has no plan for this round; the server half plans it "
                    "(plan_group_dp_sgd) before any site trains (in-process engine)."
                )
            training = dataclasses.replace(
                training, group_noise=self.group_dp_plan.noise_for(training.noise_multiplier)
            )
        self._site_training[site_id] = training
        return training

    def plan_group_dp_sgd(
        self,
        *,
        groups: Mapping[str, Sequence[str]],
        group_sizes: Mapping[str, int],
        fisher: Mapping[str, float] | None,
        max_noise_ratio: float | None,
        gate: NoiseGate | None = None,
        expected_sites: float = 1.0,
        rounds: int = 1,
    ) -> frozenset[str]:
        """Server side, once per round, from public inputs only: the per-group DP-SGD plan (C_g from C and
        d_g; the noise split from ``fisher``, the released model's Fisher on the PUBLIC set, or uniform) and,
        with a ``gate``, the groups it drowns under patient-level DP (module docstring's snr_g; m =
        ``expected_sites``, T = ``rounds``). Returns the drowned groups (empty without a gate)."""
        assert self.sample_dp is not None and self.sample_dp.group_allocation is not None  # group_dp_sgd
        plan = plan_group_dp_sgd(
            allocation=self.sample_dp.group_allocation,
            groups=groups,
            group_sizes=group_sizes,
            max_grad_norm=self.sample_dp.max_grad_norm,
            fisher=fisher,
            max_noise_ratio=max_noise_ratio,
        )
        self.group_dp_plan = plan
        if gate is None:
            return frozenset()
        if not self._site_sizes:
            raise ConfigError("the patient-level noise gate needs the sites' sizes (_configure_group_dp_sgd).")
        settings = []
        for site, n in sorted(self._site_sizes.items()):
            training = self._training(site, n)
            settings.append((steps_per_round(n, self._local), training.expected_batch_size, training.noise_multiplier))
        self._patients_per_noise = patients_per_noise(settings, expected_sites)
        self.group_dp_snr = release_snr(
            clip_bounds=plan.clip_bounds,
            sigmas=plan.unit.sigmas,
            group_sizes=plan.group_sizes,
            expected_participants=self._patients_per_noise,
            rounds=rounds,
        )
        return gate.drowned(self.group_dp_snr)

    def _record_sample_level(self, update: ClientUpdate, round_index: int) -> None:
        if self.sample_dp is not None:
            self.sample_dp.record(update.site_id, self._site_training[update.site_id], update.num_steps, round_index)

    def attach_ledger_journals(self, *, server: Path, site: Callable[[int], Path], sites: Iterable[int]) -> None:
        """Give the run's ledgers their write-ahead files (:mod:`mmpfl_core.privacy.ledger`) and adopt
        what the files already hold (a resumed run): the per-site DP-SGD ledgers here, ``site(k)``
        for site k; ``sites`` are the sites that already have a file. Subclasses with a client-level
        ledger add ``server``. Called by the round loop after a checkpoint is restored."""
        if self.sample_dp is not None:
            self.sample_dp.attach_journals(site, sites)

    def _sample_report(self) -> dict[str, float]:
        return {} if self.sample_dp is None else {"sample_epsilon_max": self.sample_dp.max_epsilon()}

    def _sample_summary(self) -> dict[str, Any]:
        if self.sample_dp is None:
            return {}
        out = {
            "per_site_epsilon": self.sample_dp.epsilons(),
            "max_epsilon": self.sample_dp.max_epsilon(),
            "delta": self.sample_dp.delta,
            "accountant": self.sample_dp.accountant,
            "max_grad_norm": self.sample_dp.max_grad_norm,
            "noise": self.sample_dp.noise,
        }
        plan = self.group_dp_plan
        if plan is not None:
            out["per_group"] = {
                "allocation": plan.allocation,
                "clip_bounds": dict(plan.clip_bounds),
                "sigma_over_z_last_round": dict(plan.unit.sigmas),  # sigma_g / z_k at every site
                "gate_patients_per_noise": self._patients_per_noise
                if math.isfinite(self._patients_per_noise)
                else None,
                "gate_snr_last_round": {g: (v if math.isfinite(v) else None) for g, v in self.group_dp_snr.items()},
            }
        if self.sample_dp.noise != "secure":
            out["not_private"] = NOT_PRIVATE_WARNING
        return {"sample_level_privacy": out}


@register_strategy("dp-sgd-fedavg")
class DPSGDFedAvg(SampleLevelHooks):
    """FedAvg with sample-level (per-patient) DP-SGD inside each site, no client-level noise.

    Each site trains with DP-SGD (Poisson batches, per-sample clipping C, noise z C; Opacus), so
    everything it releases is (eps_k, delta)-DP for its patients, eps_k from its own ledger over the
    steps of all rounds it took part in (docs/DESIGN.md 4.5). The server takes the UNIFORM mean of the
    participants' updates (post-processing): weighting by example counts would release n_k, which
    changes under add/remove-one-patient. Keyword-only arguments as :class:`SampleLevelDP`
    (``noise="secure"`` by default; ``"reproducible-insecure"`` is for teaching and tests only).
    """

    def __init__(self, **sample_level_dp: Any) -> None:
        super().__init__()
        self.sample_dp = SampleLevelDP(**sample_level_dp)
        # noise="secure" (default): sites, batches and noise from the OS CSPRNG, never from the seed.
        self.secret_randomness = self.sample_dp.noise == "secure"

    def configure(
        self, *, config: FederatedConfig, federation: Federation, client_ids: Sequence[int], model: nn.Module
    ) -> None:
        self._configure_sample_level(config)

    def transmit(self, update: ClientUpdate, round_index: int) -> State:
        self._record_sample_level(update, round_index)
        return update.delta

    def aggregate(
        self, global_state: State, updates: Sequence[ClientUpdate], sent: Sequence[State], round_index: int
    ) -> State:
        return weighted_average_update(global_state, sent, [1.0] * len(sent))

    def round_report(self, round_index: int) -> dict[str, float]:
        return self._sample_report()

    def summary_report(self) -> dict[str, Any]:
        return self._sample_summary()

    def state_dict(self) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        tensors, _ = super().state_dict()
        assert self.sample_dp is not None  # set in configure()
        return tensors, {"sample_dp": self.sample_dp.state_dict()}

    def load_state_dict(self, tensors: dict[str, torch.Tensor], state: dict[str, Any]) -> None:
        super().load_state_dict(tensors, state)
        assert self.sample_dp is not None  # set in configure()
        self.sample_dp.load_state_dict(state["sample_dp"])
