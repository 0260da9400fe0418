"""Server optimisers: FedAvgM and FedAdam steps on the aggregated update (an option of every strategy
that forms its global model from an average: ``fedavg`` and the DP strategies).

Algorithm (Hsu et al. 2019, "Measuring the effects of non-identical data distribution", FedAvgM;
Reddi et al. 2021, "Adaptive federated optimization", FedAdam). The strategy aggregates as before
into theta_agg; with Delta_t = theta_agg - theta_t (for DP strategies: the clipped, noised average
over qN, i.e. exactly what is released) the server treats g_t = -Delta_t as a pseudo-gradient:

    sgd:       theta_{t+1} = theta_t + lr Delta_t                        (lr = 1: the plain average)
    momentum:  m_t = beta m_{t-1} + Delta_t;  theta_{t+1} = theta_t + lr m_t        (FedAvgM)
    adam:      torch's Adam on g_t with eps = tau (bias-corrected moments)          (FedAdam)

The step is ``torch.optim.SGD`` / ``torch.optim.Adam`` applied to a persistent copy of the global
tensors whose ``.grad`` is set to g_t, so the maths is torch's, not ours.

Privacy: the input is the released aggregate (and the previous global model, itself a release);
everything here is post-processing of releases and costs no privacy. It must never be fed a site's
individual or un-noised update.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Literal
from collections.abc import Mapping

import torch

from ..errors import ConfigError, check_range

__all__ = [
    "SERVER_OPTIMIZER_PREFIX",
    "ServerOptimizer",
    "ServerOptimizerConfig",
    "make_server_optimizer",
    "split_server_optimizer_tensors",
]

State = dict[str, torch.Tensor]
#: Prefix of the optimiser's tensors in a strategy's checkpoint (kept apart from personal states).
SERVER_OPTIMIZER_PREFIX = "server_optimizer:"


@dataclass(frozen=True)
class ServerOptimizerConfig:
    """How the server steps from the aggregate. ``name``: sgd | momentum | adam."""

    name: Literal["sgd", "momentum", "adam"] = "momentum"
    lr: float = 1.0  # server learning rate (Reddi et al.: eta)
    momentum: float = 0.9  # beta of FedAvgM
    beta1: float = 0.9  # Adam's first moment
    beta2: float = 0.99  # Adam's second moment
    tau: float = 1e-3  # Adam's eps: the adaptivity floor of FedAdam

    def __post_init__(self) -> None:
        if self.name not in ("sgd", "momentum", "adam"):
            raise ConfigError(f"server_optimizer.name={self.name!r} is unknown; use 'sgd', 'momentum' or 'adam'.")
        check_range("server_optimizer.lr", self.lr, low=0.0, low_inclusive=False)
        check_range("server_optimizer.momentum", self.momentum, low=0.0, high=1.0, high_inclusive=False)
        check_range("server_optimizer.beta1", self.beta1, low=0.0, high=1.0, high_inclusive=False)
        check_range("server_optimizer.beta2", self.beta2, low=0.0, high=1.0, high_inclusive=False)
        check_range("server_optimizer.tau", self.tau, low=0.0, low_inclusive=False)
        if not math.isfinite(self.lr):
            raise ConfigError(f"server_optimizer.lr={self.lr!r} must be finite.")


class ServerOptimizer:
    """Persistent server-side optimiser state; :meth:`step` maps (theta_t, theta_agg) to theta_{t+1}."""

    def __init__(self, config: ServerOptimizerConfig) -> None:
        self.config = config
        self._params: dict[str, torch.Tensor] = {}
        self._optimizer: torch.optim.Optimizer | None = None
        self._pending: dict[str, torch.Tensor] = {}

    def _build(self, global_state: Mapping[str, torch.Tensor]) -> None:
        names = sorted(n for n, t in global_state.items() if t.is_floating_point())
        self._params = {n: global_state[n].detach().clone().requires_grad_(True) for n in names}
        params = [self._params[n] for n in names]
        cfg = self.config
        if cfg.name == "adam":
            self._optimizer = torch.optim.Adam(params, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), eps=cfg.tau)
        else:
            self._optimizer = torch.optim.SGD(
                params, lr=cfg.lr, momentum=cfg.momentum if cfg.name == "momentum" else 0.0
            )

    @torch.no_grad()
    def step(self, global_state: Mapping[str, torch.Tensor], aggregated: Mapping[str, torch.Tensor]) -> State:
        """theta_{t+1} from theta_t = ``global_state`` and the strategy's aggregate ``aggregated``."""
        if self._optimizer is None:
            self._build(global_state)
            self._install_pending()
        for name, p in self._params.items():
            p.copy_(global_state[name])
            p.grad = (global_state[name] - aggregated[name]).to(p.dtype)  # g_t = -Delta_t
        assert self._optimizer is not None  # built above
        self._optimizer.step()
        out = dict(aggregated)
        out.update({n: p.detach().clone().to(global_state[n].dtype) for n, p in self._params.items()})
        return out

    def state_dict(self) -> dict[str, torch.Tensor]:
        """Flat tensors (safetensors-friendly): ``<prefix><param>/<buffer>``; empty before the first step."""
        if self._optimizer is None:
            return dict(self._pending)  # restored but not yet stepped: keep it
        names = sorted(self._params)
        state = self._optimizer.state_dict()["state"]
        return {
            f"{SERVER_OPTIMIZER_PREFIX}{names[i]}/{key}": (v if torch.is_tensor(v) else torch.tensor(v)).clone()
            for i, buffers in state.items()
            for key, v in buffers.items()
        }

    def load_state_dict(self, tensors: Mapping[str, torch.Tensor]) -> None:
        """Restore buffers written by :meth:`state_dict`; they are installed at the next :meth:`step`
        (the parameters' shapes come from the global state it is given)."""
        self._optimizer, self._params = None, {}
        self._pending = dict(tensors)

    def _install_pending(self) -> None:
        pending, self._pending = self._pending, {}
        if not pending:
            return
        index = {n: i for i, n in enumerate(sorted(self._params))}
        state: dict[int, dict[str, Any]] = {}
        for key, value in pending.items():
            name, buffer = key[len(SERVER_OPTIMIZER_PREFIX) :].rsplit("/", 1)
            if name not in index:
                raise ConfigError(f"server optimizer state names parameter {name!r}, which the model lacks.")
            state.setdefault(index[name], {})[buffer] = value.to(self._params[name].device)
        assert self._optimizer is not None  # _install_pending runs after _build
        self._optimizer.load_state_dict({"state": state, "param_groups": self._optimizer.state_dict()["param_groups"]})


def make_server_optimizer(spec: Mapping[str, Any] | ServerOptimizerConfig | None) -> ServerOptimizer | None:
    """``None`` (plain averaging) or a :class:`ServerOptimizer` from a config or its keyword arguments."""
    if spec is None:
        return None
    if isinstance(spec, ServerOptimizerConfig):
        return ServerOptimizer(spec)
    if not isinstance(spec, Mapping):
        raise ConfigError(
            f"server_optimizer={spec!r} must be a mapping such as {{name: momentum, lr: 1.0, "
            "momentum: 0.9}}, or omitted."
        )
    try:
        return ServerOptimizer(ServerOptimizerConfig(**spec))
    except TypeError as exc:
        raise ConfigError(f"bad server_optimizer {dict(spec)}: {exc}") from exc


def split_server_optimizer_tensors(tensors: Mapping[str, torch.Tensor]) -> tuple[State, State]:
    """(the optimiser's tensors, the rest) of a strategy checkpoint."""
    own = {k: v for k, v in tensors.items() if k.startswith(SERVER_OPTIMIZER_PREFIX)}
    return own, {k: v for k, v in tensors.items() if k not in own}
