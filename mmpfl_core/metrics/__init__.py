"""Evaluation metrics: classification quality with uncertainty, convergence speed, communication cost."""

from mmpfl_core.metrics.classification import (
    METRIC_NAMES,
    BootstrapCI,
    auroc_ovr,
    bootstrap_ci,
    classification_metrics,
    metrics_with_ci,
    missing_classes,
    per_group_accuracy,
    seed_ci,
)
from mmpfl_core.metrics.communication import CommunicationCounter, tensor_bytes
from mmpfl_core.metrics.convergence import rounds_to_target, smooth

__all__ = [
    "METRIC_NAMES",
    "BootstrapCI",
    "CommunicationCounter",
    "auroc_ovr",
    "bootstrap_ci",
    "classification_metrics",
    "metrics_with_ci",
    "missing_classes",
    "per_group_accuracy",
    "rounds_to_target",
    "seed_ci",
    "smooth",
    "tensor_bytes",
]
