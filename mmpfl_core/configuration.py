"""Building typed config dataclasses from plain mappings (YAML, CLI, notebook parameters).

Only the edges call these; library code takes the dataclasses themselves.
"""

from __future__ import annotations

import dataclasses
from typing import Any, TypeVar
from collections.abc import Mapping

from .errors import ConfigError

T = TypeVar("T")


def dataclass_from_dict(cls: type[T], values: Mapping[str, Any] | None, where: str) -> T:
    """``cls(**values)`` after rejecting unknown keys: a typo must not silently fall back to a default.

    Lists become tuples (frozen dataclasses hold tuples). The dataclass's own ``__post_init__``
    validates the values.
    """
    values = dict(values or {})
    allowed = {f.name for f in dataclasses.fields(cls)}  # type: ignore[arg-type]  # T is a dataclass type
    unknown = sorted(set(values) - allowed)
    if unknown:
        raise ConfigError(f"unknown key(s) {unknown} in {where}; allowed: {sorted(allowed)}.")
    return cls(**{k: _tuples(v) for k, v in values.items()})


def _tuples(value: Any) -> Any:
    if isinstance(value, list):
        return tuple(_tuples(v) for v in value)
    return value


def to_plain(obj: Any) -> Any:
    """Dataclasses, tuples and mappings as JSON/YAML-friendly plain values."""
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return {f.name: to_plain(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, Mapping):
        return {str(k): to_plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [to_plain(v) for v in obj]
    return obj
