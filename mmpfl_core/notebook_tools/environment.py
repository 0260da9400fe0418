"""The environment printout every notebook ends its imports cell with (device choice: :mod:`mmpfl_core.devices`)."""

from __future__ import annotations

import platform
import sys
from importlib import metadata

import torch

from ..devices import resolve_device

_REPORTED_PACKAGES = ("torch", "timm", "opacus", "numpy", "flwr")


def _version(package: str) -> str:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return "not installed"


def describe_environment(*, seed: int | None = None, device: torch.device | str = "auto") -> str:
    """One line per fact: Python, key package versions, device (with GPU name) and, if given, the seed.

    Notebooks call it at the end of their imports cell (versions, default device) and again once the
    parameters are known (device and seed actually used).
    """
    device = resolve_device(device) if isinstance(device, str) else device
    lines = [f"python   {sys.version.split()[0]} ({platform.machine()})"]
    lines += [f"{p:<8} {_version(p)}" for p in _REPORTED_PACKAGES]
    gpu = f" ({torch.cuda.get_device_name(device)})" if device.type == "cuda" else ""
    lines.append(f"device   {device}{gpu}; CPU threads {torch.get_num_threads()}")
    if seed is not None:
        lines.append(f"seed     {seed}")
    return "\n".join(lines)
