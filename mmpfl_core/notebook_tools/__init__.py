"""Helpers shared by the teaching notebooks: environment printout, smoke parameters, recorded results."""

from .environment import describe_environment, resolve_device
from .parameters import SMOKE_PARAMETERS, TEACHING_DEFAULTS
from .results import load_results, record_results

__all__ = [
    "describe_environment",
    "resolve_device",
    "SMOKE_PARAMETERS",
    "TEACHING_DEFAULTS",
    "load_results",
    "record_results",
]
