"""Sample-level (per-patient) DP-SGD inside each site: the hooks any strategy can mix in, and
"dp-sgd-fedavg", FedAvg with DP-SGD at every site and no client-level noise (docs/DESIGN.md 4.5).

Unit of privacy: one patient of one site (add/remove-one-patient adjacency); each site's guarantee
comes from its own ledger over the DP-SGD steps it took (:mod:`mmpfl_core.privacy.dp_sgd`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any
from collections.abc import Callable, Iterable, Sequence

import torch
from torch import nn

from ..data.federation import Federation
from ..privacy.dp_sgd import PrivateTraining, SampleLevelDP
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

    def _configure_sample_level(self, config: FederatedConfig) -> None:
        self._local, self._num_rounds = config.local, config.num_rounds
        self._site_training: dict[int, Any] = {}

    def private_training(self, site_id: int, num_examples: int) -> PrivateTraining | None:
        if self.sample_dp is None:
            return None
        training = self.sample_dp.training_for(
            site_id,
            num_examples=num_examples,
            batch_size=self._local.batch_size,
            steps_per_round=steps_per_round(num_examples, self._local),
            num_rounds=self._num_rounds,
        )
        self._site_training[site_id] = training
        return training

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
