"""Helpers shared by the teaching notebooks: environment printout, smoke parameters, recorded results."""

from .config import NotebookConfig, load_notebook_config
from .environment import describe_environment, resolve_device
from .parameters import SMOKE_PARAMETERS, TEACHING_DEFAULTS
from .results import load_results, record_results
from .takeaways import MissingResultError, takeaways

__all__ = [
    "NotebookConfig",
    "describe_environment",
    "load_notebook_config",
    "resolve_device",
    "SMOKE_PARAMETERS",
    "TEACHING_DEFAULTS",
    "load_results",
    "record_results",
    "MissingResultError",
    "takeaways",
]
