"""Deliberately broken versions of the kit's client-level DP release, for audits that must catch them.

What it is for: an audit or distinguishing test that cannot fail is a defect, so every audit in
:mod:`mmpfl_core.attacks` is run on the correct release AND on these bugs. Each variant is a patch,
inside a context manager, of a function that the REAL strategies (``dp-fedavg``, ``dp-fedavg-fisher``,
``mm-pfl-adp``; all three release through :class:`~mmpfl_core.federated.dp_strategies.DPFedAvg`)
call from :mod:`mmpfl_core.federated.dp_strategies`: the correct and the broken runs share every
other line of code, nothing is re-implemented.

Variants (the names the tests and notebook 07 use):
    * ``no-clipping``: updates pass unclipped (``clip_per_group`` returns its input).
    * ``noise-x0.5``: every Gaussian draw of the release has half its std (``gaussian_noise_like``).
    * ``noise-divided-by-10``: a tenth of the std (the gross bug the one-run audit catches).
    * ``noise-on-mean-scale``: noise calibrated for the average (divided by qN) but added to the sum.
    * ``per-site-noise-over-m-min``: under distributed placement each site adds sigma_g^2 / m_min
      (m_min = 1, the old default) whatever the number m of participants, so the aggregate's noise
      variance m sigma_g^2 / m_min grows with m and reveals participation (the bug of issue 14; the
      fix shares sigma_g^2 / m over the m announced participants).
    * ``realised-count-denominator``: the server divides the noised sum by the realised number of
      updates in it instead of the fixed qN (``DPFedAvg._denominator``), so the release's scale
      reveals how many sites took part.

It never touches private data and is never used by training code: only audits import it.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import Any

from ..errors import ConfigError
from ..federated import dp_strategies
from ..privacy import clipping, mechanisms

__all__ = ["BROKEN_VARIANTS", "broken_mechanism"]

_ABSENT = object()


@contextlib.contextmanager
def _patched(owner: Any, name: str, value: Any) -> Iterator[None]:
    """``owner.name = value`` for the duration, then exactly what was there before (a module function, or an
    instance attribute shadowing a method). Library code, so not ``unittest.mock``, a test-time tool."""
    before = owner.__dict__.get(name, _ABSENT) if hasattr(owner, "__dict__") else _ABSENT
    setattr(owner, name, value)
    try:
        yield
    finally:
        if before is _ABSENT:
            delattr(owner, name)
        else:
            setattr(owner, name, before)


@contextlib.contextmanager
def _no_clipping(strategy) -> Iterator[None]:
    def passthrough(update, groups, clip_bounds):
        return dict(update), clipping.group_norms(update, groups)

    with _patched(dp_strategies, "clip_per_group", passthrough):
        yield


def _scaled_noise(factor: Callable[[object], float]):
    @contextlib.contextmanager
    def patch(strategy) -> Iterator[None]:
        real = mechanisms.gaussian_noise_like

        def scaled(update, stds, groups, source):
            f = factor(strategy)
            stds = {g: s * f for g, s in stds.items()} if isinstance(stds, dict) else stds * f
            return real(update, stds, groups, source)

        with _patched(dp_strategies, "gaussian_noise_like", scaled):
            yield

    return patch


def _noise_over_min_participants(min_participants: int):
    @contextlib.contextmanager
    def patch(strategy) -> Iterator[None]:
        """Each participant's share is sized for ``min_participants`` instead of the m announced ones.

        Patched at ``participant_noise_stds`` (the one place a site sizes its share) with the real
        split function :func:`~mmpfl_core.privacy.mechanisms.per_participant_noise_std`.
        """

        def over_min() -> dict[str, float]:
            return mechanisms.per_participant_noise_std(
                strategy.placement, strategy._sigmas, min_participants
            ).participant_std

        with _patched(strategy, "participant_noise_stds", over_min):
            yield

    return patch


@contextlib.contextmanager
def _realised_count_denominator(strategy) -> Iterator[None]:
    """The server divides the noised sum by the realised number s of updates in it (at least 1) instead of
    the fixed qN: patched at ``DPFedAvg._denominator``, the one place release_sum picks its divisor.

    Why it leaks: the released average (sum + noise) / s changes scale with one site's presence, so
    with the other sites' updates known (or all zero) the whitened norm of the release reveals s,
    i.e. who took part. Set on the instance and removed afterwards (no other patching machinery).
    """
    strategy._denominator = lambda num_participants: float(max(int(num_participants), 1))
    try:
        yield
    finally:
        del strategy._denominator


#: Deliberate bugs, each a patch of a function the real DP-FedAvg release calls.
BROKEN_VARIANTS: dict[str, Callable] = {
    "no-clipping": _no_clipping,
    "noise-x0.5": _scaled_noise(lambda s: 0.5),
    "noise-divided-by-10": _scaled_noise(lambda s: 0.1),
    "noise-on-mean-scale": _scaled_noise(lambda s: 1.0 / s.expected_participants),
    "per-site-noise-over-m-min": _noise_over_min_participants(1),
    "realised-count-denominator": _realised_count_denominator,
}


@contextlib.contextmanager
def broken_mechanism(variant: str, strategy) -> Iterator[None]:
    """Context manager that breaks the release of ``strategy`` as ``variant`` ("correct": no change)."""
    if variant == "correct":
        yield
        return
    if variant not in BROKEN_VARIANTS:
        raise ConfigError(f"audit variant {variant!r} is unknown; use 'correct' or one of {sorted(BROKEN_VARIANTS)}.")
    with BROKEN_VARIANTS[variant](strategy):
        yield
