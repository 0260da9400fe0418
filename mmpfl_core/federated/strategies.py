"""Federated strategies as hooks on one round loop, created through a registry.

A strategy answers six questions the round loop (:mod:`mmpfl_core.federated.simulation`) asks:

1. ``client_datasets``: who the clients are (the sites; or one pooled client for centralized).
2. ``select``: which clients take part in round t.
3. ``broadcast`` / ``client_start_state``: what the server sends, and which parameters a client
   starts from (global, or global merged with its personal state).
4. ``regulariser``: extra terms of the local objective (FedProx's proximal term).
5. ``transmit``: what a client sends (all parameters by default; privacy and masks change this).
6. ``aggregate``: how the server forms the next global model; ``after_local`` keeps personal state.

FedAvg, FedProx, centralized and local-only training are small subclasses. Register new ones with
``@register_strategy("name")`` and build them with ``create_strategy("name", **kwargs)``.
"""

from __future__ import annotations

from typing import Any, ClassVar
from collections.abc import Callable, Sequence

import numpy as np
import torch
from torch import nn

from ..data.contract import CohortDataset, concatenate
from ..data.federation import Federation
from ..errors import ConfigError
from .client import ClientUpdate, LossRegulariser, local_update
from .config import FederatedConfig
from .server_optimizer import make_server_optimizer, split_server_optimizer_tensors

State = dict[str, torch.Tensor]
_REGISTRY: dict[str, type[Strategy]] = {}


class StopTraining(Exception):
    """Raised by ``Strategy.before_round`` to end a run early; the message says why (kept in the summary)."""


def register_strategy(name: str) -> Callable[[type[Strategy]], type[Strategy]]:
    """Class decorator that makes a strategy available to :func:`create_strategy` under ``name``."""

    def decorator(cls: type[Strategy]) -> type[Strategy]:
        if name in _REGISTRY:
            raise ValueError(f"strategy {name!r} is registered twice")
        cls.name = name
        _REGISTRY[name] = cls
        return cls

    return decorator


def available_strategies() -> list[str]:
    return sorted(_REGISTRY)


def create_strategy(name: str, **kwargs: Any) -> Strategy:
    """Build a registered strategy; unknown names and bad arguments raise :class:`ConfigError`."""
    if name not in _REGISTRY:
        raise ConfigError(f"unknown strategy {name!r}; available: {available_strategies()}.")
    try:
        return _REGISTRY[name](**kwargs)
    except TypeError as exc:
        raise ConfigError(f"bad arguments {kwargs} for strategy {name!r}: {exc}") from exc


def select_clients(client_ids: Sequence[int], config: FederatedConfig, rng: np.random.Generator) -> list[int]:
    """Fixed-size uniform sampling ("fraction") or independent Poisson sampling ("poisson")."""
    ids = np.asarray(client_ids)
    if config.sampling == "poisson":
        return sorted(ids[rng.random(len(ids)) < config.client_fraction].tolist())
    k = max(1, int(round(config.client_fraction * len(ids))))
    return sorted(rng.choice(ids, size=k, replace=False).tolist())


class Strategy:
    """FedAvg-shaped defaults for every hook; subclasses override what differs."""

    name: ClassVar[str] = "base"
    #: False for local-only training: there is no global model to evaluate or transmit.
    has_global_model: ClassVar[bool] = True
    #: False where nothing crosses the network (centralized, local-only): bytes stay zero.
    communicates: ClassVar[bool] = True

    def __init__(self) -> None:
        self.personal: dict[int, State] = {}

    # 0. set-up, once per run
    def configure(
        self, *, config: FederatedConfig, federation: Federation, client_ids: Sequence[int], model: nn.Module
    ) -> None:
        """Called once by the simulation before round 1 (and before a resume restores state).

        Gives the strategy what it cannot know at construction: the round-loop config (rounds,
        sampling rate, seed), the federation (e.g. its PUBLIC server set), the client ids and the
        model (for parameter groups). A strategy must not keep references to private site data.
        """

    # 1. clients
    def client_datasets(self, federation: Federation) -> dict[int, CohortDataset]:
        return {site.site_id: CohortDataset(site.train) for site in federation.sites}

    # 2. selection
    def select(self, client_ids: Sequence[int], config: FederatedConfig, rng: np.random.Generator) -> list[int]:
        return select_clients(client_ids, config, rng)

    # 3. what the server sends, and the starting point of a client
    def broadcast(self, site_id: int, global_state: State) -> State:
        """What the server sends to a selected client (counted as download traffic)."""
        return global_state

    def client_start_state(self, site_id: int, global_state: State) -> State:
        return global_state

    # 4. local objective
    def regulariser(self, site_id: int, global_state: State) -> LossRegulariser | None:
        return None

    def private_training(self, site_id: int, num_examples: int) -> Any:
        """Sample-level DP-SGD settings (:class:`~mmpfl_core.privacy.dp_sgd.PrivateTraining`) for this
        client's local training; None (default) trains without DP-SGD."""
        return None

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
        """The site's computation of the round (step 2): :func:`~.client.local_update` with this strategy's
        regulariser and DP-SGD settings. A strategy whose sites compute something else than local training
        (``cross-silo-dp-sgd``: one clipped, noised per-patient gradient sum) overrides it."""
        return local_update(
            model,
            dataset,
            site_id=site_id,
            training=config.local,
            optimizer=config.optimizer,
            generator=generator,
            device=device,
            regulariser=self.regulariser(site_id, global_state),
            private_training=self.private_training(site_id, len(dataset)),
        )

    # 5. what a client sends
    def transmit(self, update: ClientUpdate, round_index: int) -> State:
        return update.delta

    # 6. server aggregation and personal state
    def aggregate(
        self, global_state: State, updates: Sequence[ClientUpdate], sent: Sequence[State], round_index: int
    ) -> State:
        return weighted_average_update(global_state, sent, [u.num_examples for u in updates])

    def after_local(self, site_id: int, model: nn.Module) -> None:
        """Called after a client's local training with its trained working model."""

    def personal_state(self, site_id: int, global_state: State) -> State | None:
        """The parameters a site deploys; ``None`` means the global model."""
        return None

    # reporting
    def before_round(self, round_index: int) -> None:
        """Called before round ``round_index`` starts. Raise :class:`StopTraining` to end the run
        (e.g. the next release would exceed the privacy budget)."""

    def round_report(self, round_index: int) -> dict[str, float]:
        """Extra columns of the round's metrics row (e.g. epsilon so far); same keys every round."""
        return {}

    # engines where the server and each site run in different processes (the Flower app)
    def round_instructions(self, round_index: int, global_state: State) -> dict[str, float]:
        """Server side, after :meth:`before_round`: the PUBLIC per-round values a site needs besides
        the model (e.g. clip bounds and noise scales). Must not depend on any site's private data."""
        return {}

    def apply_round_instructions(self, round_index: int, instructions: dict[str, float]) -> None:
        """Site side, in its own process, before :func:`~mmpfl_core.federated.simulation.client_round`:
        install what the server's :meth:`round_instructions` sent. The default runs the round's
        bookkeeping (:meth:`before_round`), as the in-process loop does before its clients train."""
        self.before_round(round_index)

    def summary_report(self) -> dict[str, Any]:
        """Extra entries of the run summary (e.g. the privacy ledger's summary)."""
        return {}

    # checkpointing
    def state_dict(self) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        tensors = {f"{site}/{name}": t for site, state in self.personal.items() for name, t in state.items()}
        return tensors, {}

    def load_state_dict(self, tensors: dict[str, torch.Tensor], state: dict[str, Any]) -> None:
        self.personal = {}
        for key, tensor in tensors.items():
            site, name = key.split("/", 1)
            self.personal.setdefault(int(site), {})[name] = tensor


def weighted_average_update(global_state: State, sent: Sequence[State], weights: Sequence[float]) -> State:
    """theta + sum_k w_k delta_k / sum_k w_k, per parameter over the clients that sent it.

    A parameter no client sent keeps its global value. Weights are the clients' example counts
    (McMahan et al. 2017), so the global model follows the pooled-data objective.
    """
    new_state = {}
    for name, value in global_state.items():
        contributions = [(w, s[name]) for w, s in zip(weights, sent, strict=True) if name in s]
        total = float(sum(w for w, _ in contributions))
        if total <= 0:
            new_state[name] = value
            continue
        # one stacked weighted sum, not a Python sum of per-site tensors: with a thousand sites a round
        # (engine: vectorized) the Python sum cost more than the sites' training
        deltas = torch.stack([d for _, d in contributions])  # (K, *shape)
        coefficients = torch.tensor([float(w) for w, _ in contributions], dtype=deltas.dtype, device=deltas.device)
        step = torch.tensordot(coefficients, deltas, dims=1) / total
        new_state[name] = value + step.to(value.dtype)
    return new_state


@register_strategy("fedavg")
class FedAvg(Strategy):
    """Federated averaging (McMahan et al. 2017): sample-weighted mean of the clients' updates.

    ``server_optimizer`` (kwargs of :class:`~.server_optimizer.ServerOptimizerConfig`, e.g.
    ``{"name": "momentum"}``) turns it into FedAvgM / FedAdam: the server steps from the average.
    """

    def __init__(self, server_optimizer: dict[str, Any] | None = None) -> None:
        super().__init__()
        self.server_optimizer = make_server_optimizer(server_optimizer)

    def aggregate(
        self, global_state: State, updates: Sequence[ClientUpdate], sent: Sequence[State], round_index: int
    ) -> State:
        averaged = super().aggregate(global_state, updates, sent, round_index)
        return averaged if self.server_optimizer is None else self.server_optimizer.step(global_state, averaged)

    def state_dict(self) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        tensors, state = super().state_dict()
        return ({**tensors, **self.server_optimizer.state_dict()} if self.server_optimizer else tensors), state

    def load_state_dict(self, tensors: dict[str, torch.Tensor], state: dict[str, Any]) -> None:
        own, rest = split_server_optimizer_tensors(tensors)
        if self.server_optimizer is not None:
            self.server_optimizer.load_state_dict(own)
        super().load_state_dict(rest, state)


@register_strategy("fedprox")
class FedProx(Strategy):
    """FedProx (Li et al. 2020): FedAvg plus (mu/2)||theta - theta_global||^2 in the local objective."""

    def __init__(self, mu: float = 0.01) -> None:
        super().__init__()
        if not mu >= 0:
            raise ConfigError(f"fedprox mu={mu!r} must be >= 0 (0 recovers FedAvg).")
        self.mu = mu

    def regulariser(self, site_id: int, global_state: State) -> LossRegulariser | None:
        return proximal_term(global_state, self.mu) if self.mu > 0 else None


def proximal_term(anchor_state: State, weight: float) -> LossRegulariser:
    """``(weight / 2) * ||theta - anchor||^2`` over the parameters named in ``anchor_state`` (detached):
    FedProx's term toward the global model and Ditto's toward it for the personal model."""
    anchor = {n: t.detach() for n, t in anchor_state.items()}

    def proximal(model: nn.Module) -> torch.Tensor:
        terms = [((p - anchor[n].to(p.device)) ** 2).sum() for n, p in model.named_parameters() if n in anchor]
        return 0.5 * weight * torch.stack(terms).sum()

    return proximal


@register_strategy("centralized")
class Centralized(Strategy):
    """The upper bound: all sites' training data pooled at one place, no federation, no privacy."""

    communicates = False

    def client_datasets(self, federation: Federation) -> dict[int, CohortDataset]:
        return {0: CohortDataset(concatenate([site.train for site in federation.sites]))}

    def select(self, client_ids: Sequence[int], config: FederatedConfig, rng: np.random.Generator) -> list[int]:
        return list(client_ids)


@register_strategy("local")
class LocalOnly(Strategy):
    """The lower bound: every site trains alone on its own data and deploys its own model."""

    has_global_model = False
    communicates = False

    def select(self, client_ids: Sequence[int], config: FederatedConfig, rng: np.random.Generator) -> list[int]:
        return list(client_ids)

    def client_start_state(self, site_id: int, global_state: State) -> State:
        return self.personal.get(site_id, global_state)

    def aggregate(
        self, global_state: State, updates: Sequence[ClientUpdate], sent: Sequence[State], round_index: int
    ) -> State:
        return global_state

    def after_local(self, site_id: int, model: nn.Module) -> None:
        self.personal[site_id] = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}

    def personal_state(self, site_id: int, global_state: State) -> State | None:
        return self.personal.get(site_id, global_state)
