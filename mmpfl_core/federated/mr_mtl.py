"""Patient-level private personalisation: MR-MTL and local-only training, each with DP-SGD inside every site.

Unit of privacy: one patient of one site (add/remove-one-patient adjacency, docs/DESIGN.md 4.5 and 4.7).
Each site trains with DP-SGD (Opacus; :mod:`mmpfl_core.privacy.dp_sgd`) and keeps a ledger over
every DP-SGD step it took in every round; everything the site releases (its update) AND the model it
deploys are post-processing of those steps, so one per-site epsilon covers both. These are the fair
rivals of any private federated method whose deployed models protect patients at the same epsilon.

``local-dp-sgd``: each site trains alone with DP-SGD and deploys its own model; nothing leaves it.

``mr-mtl`` (mean-regularised multi-task learning; Evgeniou and Pontil 2004, studied under silo-
specific example-level DP by Liu, Hu, Wu and Smith, NeurIPS 2022, "On Privacy and Personalization in
Cross-Silo Federated Learning"), round t:
    1. the server holds the mean model w (public: the mean of released personal models);
    2. a sampled site k starts from its personal model v_k (w at its first round) and trains on
       cross-entropy + (lam / 2) ||v_k - w||^2 with DP-SGD; the regulariser depends on w and v_k
       only, so its gradient is added after the per-sample clipping and noise (post-processing,
       :func:`~mmpfl_core.federated.client.local_update`);
    3. the site keeps v_k (its deployed model) and sends v_k - w;
    4. the server sets w <- w + (1 / |S_t|) sum_{k in S_t} (v_k - w): the UNIFORM mean over the
       participants (weighting by example counts would release n_k, which changes with one patient).
lam = 0 is local-only training with DP-SGD; lam -> inf pulls every site to one model (FedAvg-like).
Without ``sample_level_dp`` both are the non-private baselines (not private: say so in reports).
"""

from __future__ import annotations

from typing import Any
from collections.abc import Sequence

import torch
from torch import nn

from ..data.federation import Federation
from ..errors import ConfigError
from ..privacy.dp_sgd import SampleLevelDP
from .client import ClientUpdate, LossRegulariser, trainable_state
from .config import FederatedConfig
from .sample_level import SampleLevelHooks
from .strategies import LocalOnly, State, register_strategy, weighted_average_update

__all__ = ["LocalDPSGD", "MRMTL"]


class _PatientLevel(SampleLevelHooks):
    """Shared set-up: optional DP-SGD inside each site with per-site ledgers, personal models kept."""

    def __init__(self, sample_level_dp: dict[str, Any] | None) -> None:
        super().__init__()
        self.sample_dp = None if sample_level_dp is None else SampleLevelDP(**sample_level_dp)
        # secure DP-SGD (default): batches and noise from the OS CSPRNG, never from the run seed
        self.secret_randomness = self.sample_dp is not None and self.sample_dp.noise == "secure"

    def configure(
        self, *, config: FederatedConfig, federation: Federation, client_ids: Sequence[int], model: nn.Module
    ) -> None:
        self._configure_sample_level(config)

    def after_local(self, site_id: int, model: nn.Module) -> None:
        self.personal[site_id] = trainable_state(model)  # the deployed model: DP-SGD output, never sent as is

    def personal_state(self, site_id: int, global_state: State) -> State | None:
        return self.personal.get(site_id)

    def round_report(self, round_index: int) -> dict[str, float]:
        return self._sample_report()

    def summary_report(self) -> dict[str, Any]:
        unit = "patient (DP-SGD inside each site)" if self.sample_dp is not None else "none (not private)"
        return {"privacy_unit": unit, **self._sample_summary()}

    def state_dict(self) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        tensors, _ = super().state_dict()
        return tensors, {"sample_dp": None if self.sample_dp is None else self.sample_dp.state_dict()}

    def load_state_dict(self, tensors: dict[str, torch.Tensor], state: dict[str, Any]) -> None:
        super().load_state_dict(tensors, state)
        if self.sample_dp is not None:
            self.sample_dp.load_state_dict(state["sample_dp"])


@register_strategy("local-dp-sgd")
class LocalDPSGD(_PatientLevel, LocalOnly):
    """Local-only training with DP-SGD at every site (module docstring). Keyword arguments:

    Args:
        sample_level_dp: kwargs of :class:`~mmpfl_core.privacy.dp_sgd.SampleLevelDP` (``target_epsilon``
            or ``noise_multiplier``, ``max_grad_norm``, ``delta``, ``noise``); required.
    """

    def __init__(self, *, sample_level_dp: dict[str, Any] | None = None) -> None:
        if sample_level_dp is None:
            raise ConfigError(
                "local-dp-sgd needs sample_level_dp (e.g. {target_epsilon: 8, max_grad_norm: 1.0}); "
                "for local training without DP use the 'local' method."
            )
        super().__init__(sample_level_dp)

    # selection (every site, every round), start state and aggregation (none) are LocalOnly's
    def transmit(self, update: ClientUpdate, round_index: int) -> State:
        self._record_sample_level(update, round_index)
        return {}  # nothing leaves the site

    def personal_state(self, site_id: int, global_state: State) -> State | None:
        return LocalOnly.personal_state(self, site_id, global_state)  # its own model, even before round 1


@register_strategy("mr-mtl")
class MRMTL(_PatientLevel):
    """Mean-regularised multi-task learning (module docstring). Keyword arguments:

    Args:
        lam: strength of the pull towards the mean model (0: local training; the paper tunes it).
        sample_level_dp: optional kwargs of :class:`~mmpfl_core.privacy.dp_sgd.SampleLevelDP`.
    """

    def __init__(self, *, lam: float = 1.0, sample_level_dp: dict[str, Any] | None = None) -> None:
        if not lam >= 0:
            raise ConfigError(f"mr-mtl lam={lam!r} must be >= 0 (0: local training with the sites' own models).")
        super().__init__(sample_level_dp)
        self.lam = float(lam)
        self._start: dict[int, tuple[State, State]] = {}

    def client_start_state(self, site_id: int, global_state: State) -> State:
        start = self.personal.get(site_id, global_state)
        self._start[site_id] = (start, global_state)  # (v_k at the start, the mean w it is pulled to)
        return start

    def regulariser(self, site_id: int, global_state: State) -> LossRegulariser | None:
        if self.lam == 0:
            return None
        anchor = {n: t.detach() for n, t in global_state.items()}  # the released mean w: public

        def pull_to_mean(model: nn.Module) -> torch.Tensor:
            terms = [((p - anchor[n].to(p.device)) ** 2).sum() for n, p in model.named_parameters() if n in anchor]
            return 0.5 * self.lam * torch.stack(terms).sum()

        return pull_to_mean

    def transmit(self, update: ClientUpdate, round_index: int) -> State:
        """v_k - w: the site's DP-SGD-trained personal model relative to the mean it started from."""
        self._record_sample_level(update, round_index)
        start, mean = self._start.pop(update.site_id)
        return {n: start[n] + d - mean[n] for n, d in update.delta.items()}

    def aggregate(
        self, global_state: State, updates: Sequence[ClientUpdate], sent: Sequence[State], round_index: int
    ) -> State:
        return weighted_average_update(global_state, sent, [1.0] * len(sent))  # uniform: n_k is private

    def summary_report(self) -> dict[str, Any]:
        return {**super().summary_report(), "mr_mtl": {"lam": self.lam}}
