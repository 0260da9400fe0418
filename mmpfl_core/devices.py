"""Device choice: the one place a device name from a config, the CLI or a notebook becomes a ``torch.device``.

The round loop (:mod:`mmpfl_core.federated.simulation`) and the notebooks both call it; it lives at the
bottom of the package so that neither the core nor the notebook tools import upwards to reach it.
"""

from __future__ import annotations

import torch

__all__ = ["resolve_device"]


def resolve_device(name: str = "auto") -> torch.device:
    """``"auto"`` picks CUDA when present, else CPU; any other string is passed to ``torch.device``.

    Asking for CUDA on a machine without it raises a ``RuntimeError`` that says so, rather than
    failing later inside a kernel.
    """
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError(f"DEVICE={name!r} but CUDA is not available here; set DEVICE='auto' or 'cpu'.")
    return device
