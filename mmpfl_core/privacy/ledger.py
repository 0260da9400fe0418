"""The privacy ledger: a per-run record of every differentially private release.

What it is for: every noisy release of a run (the clipped, noised model update of a round, the
noisy count of adaptive clipping (Andrew et al. 2021), released mask scores, ...) is recorded here as
a (noise multiplier, sample rate, steps) entry; the ledger composes them with the configured
accountant (see :mod:`mmpfl_core.privacy.accounting`) and enforces an optional (epsilon, delta)
budget before a release happens. It is saved with checkpoints as a plain JSON-serialisable dict.

It must never hold or release data, updates, norms or anything computed from private data: only the
public mechanism parameters, which are fixed by the configuration and by public randomness.

Same participant, same round: when a sampled site releases both its update (multiplier z_u) and
its mask scores (z_m) in one round, the two Gaussian mechanisms share ONE Poisson sample. Jointly
they are one subsampled Gaussian mechanism with multiplier ``combine_noise_multipliers(z_u, z_m)``
= (z_u^-2 + z_m^-2)^(-1/2) (DESIGN 4.4): use :meth:`PrivacyLedger.record_joint`, which records
exactly that. Recording them as two separate entries with the same sample rate q < 1 is NOT a
valid shortcut: composing two subsampled entries models two independent samples and under-reports
epsilon (z = 3 and 4, q = 0.1, 50 rounds: 1.213 composed vs 1.301 for the true joint mechanism;
see tests/test_accounting.py). Separate entries are valid when the releases use independent
samples (e.g. adaptive-clipping counts in their own sampled step) or when q = 1 (then both agree).
The ledger never merges entries on its own: only the caller knows whether two releases share a
sample.
"""
from __future__ import annotations

from typing import Any
from collections.abc import Sequence

from mmpfl_core.errors import PrivacyError
from mmpfl_core.privacy.accounting import (ACCOUNTANTS, _check_delta, _check_release,
                                           combine_noise_multipliers, compose_epsilon)

__all__ = ["PrivacyLedger"]

_STATE_VERSION = 1


class PrivacyLedger:
    """Records releases of one run and composes them (epsilon at ``delta``).

    Args:
        delta: delta at which epsilon is reported, in (0, 1).
        accountant: "prv" (default), "rdp" or "pld".
        target_epsilon: optional budget; :meth:`check_release` refuses releases that exceed it.

    Example:
        >>> ledger = PrivacyLedger(delta=1e-5, accountant="rdp", target_epsilon=8.0)
        >>> ledger.check_release(noise_multiplier=1.0, sample_rate=0.1)
        >>> ledger.record(name="update", noise_multiplier=1.0, sample_rate=0.1, round=0)
        >>> 0 < ledger.epsilon() < 8
        True
    """

    def __init__(self, *, delta: float, accountant: str = "prv",
                 target_epsilon: float | None = None) -> None:
        if accountant not in ACCOUNTANTS:
            raise PrivacyError(f"accountant={accountant!r} is unknown; use one of "
                               f"{sorted(ACCOUNTANTS)}.")
        _check_delta(delta)
        if target_epsilon is not None and not target_epsilon > 0.0:
            raise PrivacyError(f"target_epsilon={target_epsilon!r} must be > 0 or None (no "
                               "budget).")
        self.delta = float(delta)
        self.accountant = accountant
        self.target_epsilon = None if target_epsilon is None else float(target_epsilon)
        self._entries: list[dict[str, Any]] = []

    # ------------------------------------------------------------------ recording
    def record(self, *, name: str, noise_multiplier: float, sample_rate: float, steps: int = 1,
               round: int | None = None) -> None:  # noqa: A002 - "round" is the domain word
        """Append one release (or ``steps`` identical releases) to the ledger.

        Raises:
            PrivacyError: invalid multiplier / rate / steps, or an empty name.
        """
        if not name:
            raise PrivacyError("name must be a non-empty string such as 'update' or "
                               "'adaptive_clip_count'.")
        _check_release(noise_multiplier, sample_rate, steps)
        self._entries.append({"name": str(name), "noise_multiplier": float(noise_multiplier),
                              "sample_rate": float(sample_rate), "steps": int(steps),
                              "round": None if round is None else int(round)})

    def record_joint(self, *, name: str, noise_multipliers: Sequence[float], sample_rate: float,
                     steps: int = 1, round: int | None = None) -> None:  # noqa: A002
        """Record several Gaussian releases on the same sampled participants as one entry.

        The joint mechanism is one subsampled Gaussian with multiplier
        (sum_i z_i^-2)^(-1/2) (:func:`combine_noise_multipliers`), e.g.
        ``record_joint(name="update+mask_scores", noise_multipliers=[z_eff, z_mask], ...)``.
        """
        self.record(name=name, noise_multiplier=combine_noise_multipliers(*noise_multipliers),
                    sample_rate=sample_rate, steps=steps, round=round)

    @property
    def entries(self) -> list[dict[str, Any]]:
        """A copy of the recorded releases, in recording order."""
        return [dict(e) for e in self._entries]

    def __len__(self) -> int:
        return len(self._entries)

    # ------------------------------------------------------------------ epsilon
    def _epsilon_of(self, entries: list[dict[str, Any]], delta: float) -> float:
        releases = [(e["noise_multiplier"], e["sample_rate"], e["steps"]) for e in entries]
        return compose_epsilon(releases=releases, delta=delta, accountant=self.accountant)

    def epsilon(self, delta: float | None = None) -> float:
        """Epsilon of everything recorded so far, at ``delta`` (default: the ledger's delta).

        Identical (z, q) entries are merged into one accountant history item with summed steps.
        An empty ledger has epsilon 0.
        """
        # compose_epsilon caches by history, so asking again after record() is free
        return self._epsilon_of(self._entries, self.delta if delta is None else float(delta))

    def epsilon_curve(self) -> list[tuple[int, float]]:
        """(round, epsilon after that round) for each round that has entries, in round order.

        Entries without a round are counted from the start (they happened before round 0, e.g. a
        released public-set statistic). One accountant call per round: PRV takes ~0.1 s each.
        """
        rounds = sorted({e["round"] for e in self._entries if e["round"] is not None})
        curve = []
        for r in rounds:
            upto = [e for e in self._entries if e["round"] is None or e["round"] <= r]
            curve.append((r, self._epsilon_of(upto, self.delta)))
        return curve

    # ------------------------------------------------------------------ budget
    @property
    def budget(self) -> tuple[float, float] | None:
        """(target_epsilon, delta), or None when the ledger has no budget."""
        return None if self.target_epsilon is None else (self.target_epsilon, self.delta)

    def _epsilon_after(self, noise_multiplier: float, sample_rate: float, steps: int) -> float:
        _check_release(noise_multiplier, sample_rate, steps)
        extra = {"noise_multiplier": float(noise_multiplier), "sample_rate": float(sample_rate),
                 "steps": int(steps)}
        return self._epsilon_of([*self._entries, extra], self.delta)

    def would_exceed(self, noise_multiplier: float, sample_rate: float, steps: int = 1) -> bool:
        """True if recording this release would take epsilon above the budget (False if none)."""
        if self.target_epsilon is None:
            return False
        return self._epsilon_after(noise_multiplier, sample_rate, steps) > self.target_epsilon

    def check_release(self, noise_multiplier: float, sample_rate: float, steps: int = 1) -> None:
        """Raise PrivacyError if this release would take epsilon above the budget.

        Call it before the release is made (before noise is added and anything leaves the site or
        server), then :meth:`record` it once it has been made.
        """
        if self.target_epsilon is None:
            return
        after = self._epsilon_after(noise_multiplier, sample_rate, steps)
        if after > self.target_epsilon:
            raise PrivacyError(
                f"next release would raise epsilon from {self.epsilon():.4g} to {after:.4g} above "
                f"the budget {self.target_epsilon:.4g}; stop the run or increase the budget "
                f"(epsilon at delta={self.delta:g}, {self.accountant} accountant).")

    # ------------------------------------------------------------------ persistence
    def state_dict(self) -> dict[str, Any]:
        """A JSON-serialisable plain dict: configuration and all entries."""
        return {"version": _STATE_VERSION, "delta": self.delta, "accountant": self.accountant,
                "target_epsilon": self.target_epsilon, "entries": self.entries}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore a ledger saved by :meth:`state_dict` (replaces all entries and settings)."""
        if state.get("version") != _STATE_VERSION:
            raise PrivacyError(f"ledger state version {state.get('version')!r} is not "
                               f"{_STATE_VERSION}; re-create the ledger from the run config.")
        fresh = PrivacyLedger(delta=state["delta"], accountant=state["accountant"],
                              target_epsilon=state["target_epsilon"])
        for e in state["entries"]:
            fresh.record(name=e["name"], noise_multiplier=e["noise_multiplier"],
                         sample_rate=e["sample_rate"], steps=e["steps"], round=e["round"])
        self.__dict__.update(fresh.__dict__)

    @classmethod
    def from_state_dict(cls, state: dict[str, Any]) -> PrivacyLedger:
        """Create a ledger from :meth:`state_dict` output."""
        ledger = cls(delta=state["delta"], accountant=state["accountant"])
        ledger.load_state_dict(state)
        return ledger

    def summary(self) -> dict[str, Any]:
        """Plain dict for run reports: settings, epsilon, and release counts per name."""
        per_name: dict[str, int] = {}
        for e in self._entries:
            per_name[e["name"]] = per_name.get(e["name"], 0) + e["steps"]
        eps = self.epsilon()
        rounds = [e["round"] for e in self._entries if e["round"] is not None]
        return {"accountant": self.accountant, "delta": self.delta,
                "target_epsilon": self.target_epsilon,
                "epsilon": eps,  # inf if some release had no noise
                "num_entries": len(self._entries), "releases_by_name": per_name,
                "last_round": max(rounds) if rounds else None}
