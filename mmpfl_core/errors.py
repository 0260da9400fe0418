"""Project errors. Every error names the problem, the offending value, and the fix."""

from __future__ import annotations


class MMPFLError(Exception):
    """Base class of all errors raised on purpose by mmpfl_core."""


class ConfigError(MMPFLError, ValueError):
    """A configuration field holds a value outside its allowed range."""


class DataError(MMPFLError, ValueError):
    """An input file or array breaks the sample contract (corrupt, wrong shape, NaN, unknown label)."""


class PrivacyError(MMPFLError, ValueError):
    """A privacy parameter is invalid, or a release would exceed the configured budget."""


def check_range(
    name: str,
    value: float,
    *,
    low: float | None = None,
    high: float | None = None,
    low_inclusive: bool = True,
    high_inclusive: bool = True,
    fix: str = "",
) -> None:
    """Raise ConfigError unless ``low <= value <= high`` (bounds optional, inclusivity configurable).

    The message names the field, the value, the allowed interval, and (if given) how to fix it.
    """
    ok = value == value  # NaN fails every comparison; reject it explicitly
    if ok and low is not None:
        ok = value >= low if low_inclusive else value > low
    if ok and high is not None:
        ok = value <= high if high_inclusive else value < high
    if not ok:
        lo = "-inf" if low is None else f"{low}"
        hi = "inf" if high is None else f"{high}"
        interval = f"{'[' if low_inclusive and low is not None else '('}{lo}, {hi}{']' if high_inclusive and high is not None else ')'}"
        msg = f"{name}={value!r} is outside the allowed range {interval}."
        if fix:
            msg += f" {fix}"
        raise ConfigError(msg)
