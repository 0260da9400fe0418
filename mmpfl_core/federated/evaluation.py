"""Evaluation of global and personalised models: batched inference, metrics, per-site accuracy.

Evaluation here is a simulation-side teaching aid: the simulator can see every site's test split.
In a real deployment per-site metrics are releases too (docs/DESIGN.md 4.6); the Flower app reports them
as such.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from ..data.contract import CohortDataset
from ..metrics.classification import classification_metrics
from .client import forward_batch


@torch.no_grad()
def predict_proba(model: nn.Module, dataset: CohortDataset, *, batch_size: int, device: torch.device) -> np.ndarray:
    """Class probabilities (N, C) for the whole dataset, in dataset order."""
    model.to(device).eval()
    chunks = []
    for start in range(0, len(dataset), batch_size):
        batch = dataset.batch(torch.arange(start, min(start + batch_size, len(dataset))))
        chunks.append(torch.softmax(forward_batch(model, batch, device).float(), dim=-1).cpu())
    if not chunks:
        return np.zeros((0, 0), dtype=np.float32)
    return torch.cat(chunks).numpy()


def site_accuracies(labels: np.ndarray, proba: np.ndarray, sites: np.ndarray) -> dict[int, float]:
    """Accuracy per site id from one set of predictions (no extra forward passes)."""
    correct = proba.argmax(axis=1) == labels
    return {int(s): float(correct[sites == s].mean()) for s in np.unique(sites)}


def evaluate_predictions(labels: np.ndarray, proba: np.ndarray, num_classes: int, prefix: str) -> dict[str, float]:
    """Point metrics (accuracy, balanced accuracy, macro-F1, AUROC) with keys ``<prefix>_<metric>``."""
    metrics = classification_metrics(labels, proba, num_classes=num_classes)
    return {f"{prefix}_{k}": float(v) for k, v in metrics.items()}
