"""Typed, validated configuration of a federated run (optimiser, local training, rounds, sampling).

The library only takes these dataclasses; YAML files, the CLI and notebook parameters are turned
into them at the edge (:mod:`mmpfl_core.experiment`). Every field is checked on construction and a
bad value raises :class:`~mmpfl_core.errors.ConfigError` naming the field, the value and the range.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

from ..configuration import dataclass_from_dict
from ..errors import ConfigError, check_range

OptimizerName = Literal["sgd", "adamw"]
SamplingName = Literal["fraction", "poisson"]
EngineName = Literal["loop", "vectorized"]


@dataclass(frozen=True)
class OptimizerConfig:
    """The optimiser each client builds afresh at the start of every round (stateless clients)."""

    name: OptimizerName = "adamw"
    lr: float = 1e-3  # AdamW on small ViTs; SGD wants ~0.05
    weight_decay: float = 0.05
    momentum: float = 0.9  # SGD only

    def __post_init__(self) -> None:
        if self.name not in ("sgd", "adamw"):
            raise ConfigError(f"optimizer.name={self.name!r} is unknown; use 'sgd' or 'adamw'.")
        check_range("optimizer.lr", self.lr, low=0.0, low_inclusive=False, high=10.0)
        check_range("optimizer.weight_decay", self.weight_decay, low=0.0, high=1.0)
        check_range("optimizer.momentum", self.momentum, low=0.0, high=1.0, high_inclusive=False)


@dataclass(frozen=True)
class LocalTrainingConfig:
    """How much a site trains per round: ``local_epochs`` passes, or exactly ``local_steps`` batches."""

    local_epochs: int = 1
    local_steps: int | None = None  # overrides local_epochs when set
    batch_size: int = 32
    max_grad_norm: float | None = None  # plain (non-private) gradient clipping for stability

    def __post_init__(self) -> None:
        check_range("training.local_epochs", self.local_epochs, low=1, high=1000)
        if self.local_steps is not None:
            check_range("training.local_steps", self.local_steps, low=1, high=1_000_000)
        check_range("training.batch_size", self.batch_size, low=1, high=65536)
        if self.max_grad_norm is not None:
            check_range("training.max_grad_norm", self.max_grad_norm, low=0.0, low_inclusive=False)


@dataclass(frozen=True)
class FederatedConfig:
    """The round loop: how many rounds, who takes part, how often to evaluate and checkpoint.

    ``sampling="fraction"`` picks ``max(1, round(client_fraction * N))`` sites uniformly without
    replacement; ``"poisson"`` includes each site independently with probability ``client_fraction``
    (the sampling that privacy amplification by subsampling assumes; a round may then be empty).
    """

    num_rounds: int = 20
    client_fraction: float = 1.0
    sampling: SamplingName = "fraction"
    local: LocalTrainingConfig = field(default_factory=LocalTrainingConfig)
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    eval_every: int = 1
    eval_batch_size: int = 256
    target_accuracy: float = 0.7  # rounds-to-target: deployed models' accuracy on the validation split
    smoothing_window: int = 3
    checkpoint_every: int = 5  # 0 disables checkpoints
    keep_checkpoints: int = 2
    bootstrap_resamples: int = 1000
    seed: int = 0
    device: str = "auto"
    engine: EngineName = "loop"  # "vectorized": a round's sites train together (federated/vectorized.py)
    chunk_size: int | None = None  # vectorized engine: sites per batched chunk; None: sized from free memory

    def __post_init__(self) -> None:
        if self.engine not in ("loop", "vectorized"):
            raise ConfigError(
                f"federated.engine={self.engine!r} is unknown; use 'loop' (the reference) or "
                "'vectorized' (sites of a round trained together)."
            )
        if self.chunk_size is not None:
            check_range(
                "federated.chunk_size",
                self.chunk_size,
                low=1,
                fix="It is the number of sites the vectorized engine trains in one batch (null: automatic).",
            )
        check_range("federated.num_rounds", self.num_rounds, low=1, high=100_000)
        check_range(
            "federated.client_fraction",
            self.client_fraction,
            low=0.0,
            low_inclusive=False,
            high=1.0,
            fix="It is the share of sites sampled per round.",
        )
        if self.sampling not in ("fraction", "poisson"):
            raise ConfigError(f"federated.sampling={self.sampling!r} is unknown; use 'fraction' or 'poisson'.")
        check_range("federated.eval_every", self.eval_every, low=1)
        check_range("federated.eval_batch_size", self.eval_batch_size, low=1)
        check_range("federated.target_accuracy", self.target_accuracy, low=0.0, high=1.0)
        check_range("federated.smoothing_window", self.smoothing_window, low=1)
        check_range("federated.checkpoint_every", self.checkpoint_every, low=0)
        check_range("federated.keep_checkpoints", self.keep_checkpoints, low=1)
        check_range("federated.bootstrap_resamples", self.bootstrap_resamples, low=0)
        if not isinstance(self.local, LocalTrainingConfig) or not isinstance(self.optimizer, OptimizerConfig):
            raise ConfigError(
                "federated.local and federated.optimizer must be LocalTrainingConfig / OptimizerConfig; "
                "build them from dicts with FederatedConfig.from_dict()."
            )

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> FederatedConfig:
        """Build from a plain mapping (YAML), nesting ``local`` and ``optimizer``; unknown keys are errors."""
        values = dict(values)
        local = dataclass_from_dict(LocalTrainingConfig, values.pop("local", {}), "federated.local")
        optimizer = dataclass_from_dict(OptimizerConfig, values.pop("optimizer", {}), "federated.optimizer")
        return dataclass_from_dict(cls, {**values, "local": local, "optimizer": optimizer}, "federated")
