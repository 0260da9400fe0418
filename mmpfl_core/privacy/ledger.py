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
= (z_u^-2 + z_m^-2)^(-1/2) (docs/DESIGN.md 4.4): use :meth:`PrivacyLedger.record_joint`, which records
exactly that. Recording them as two separate entries with the same sample rate q < 1 is NOT a
valid shortcut: composing two subsampled entries models two independent samples and under-reports
epsilon (z = 3 and 4, q = 0.1, 50 rounds: 1.213 composed vs 1.301 for the true joint mechanism;
see tests/test_accounting.py). Separate entries are valid when the releases use independent
samples (e.g. adaptive-clipping counts in their own sampled step) or when q = 1 (then both agree).
The ledger never merges entries on its own: only the caller knows whether two releases share a
sample.

Write-ahead journal (docs/DESIGN.md 4.8). A ledger attached to a file (:meth:`PrivacyLedger.attach_journal`)
appends every entry to it as one JSON line and flushes it to disk (``fsync``) inside
:meth:`~PrivacyLedger.record`, BEFORE ``record`` returns, and its callers record a release before
its result leaves their hands (the server before ``release_sum`` returns the new model, a site
before ``transmit`` returns its update). So a release that left the process is in the file even if
the process dies one instruction later, before the next checkpoint. Attaching to an existing file
reads it back: the file, not the checkpoint, is the ledger of the run, and the entries a checkpoint
holds must be a prefix of it (else the two belong to different runs and attaching refuses). A round
released before a crash and run again after the resume is therefore charged twice: under secret
noise the re-run draws FRESH noise (and a fresh sample), so it is a new release of the same data,
and an adversary who saw both outputs holds two independent noisy views; it must be charged again,
never forgotten. A torn last line (the process died inside ``record``) is dropped: ``record`` had
not returned, so that release never left.

The journal holds what the ledger holds: public mechanism parameters (z, q, steps, round), no data.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any
from collections.abc import Sequence

from mmpfl_core.errors import PrivacyError
from mmpfl_core.privacy.accounting import (
    ACCOUNTANTS,
    _check_delta,
    _check_release,
    combine_noise_multipliers,
    compose_epsilon,
)

__all__ = ["PrivacyLedger", "read_journal"]

_STATE_VERSION = 1
_JOURNAL_FORMAT = "mmpfl-privacy-ledger"
_ENTRY_KEYS = ("name", "noise_multiplier", "sample_rate", "steps", "round")


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

    def __init__(self, *, delta: float, accountant: str = "prv", target_epsilon: float | None = None) -> None:
        if accountant not in ACCOUNTANTS:
            raise PrivacyError(f"accountant={accountant!r} is unknown; use one of {sorted(ACCOUNTANTS)}.")
        _check_delta(delta)
        if target_epsilon is not None and not target_epsilon > 0.0:
            raise PrivacyError(f"target_epsilon={target_epsilon!r} must be > 0 or None (no budget).")
        self.delta = float(delta)
        self.accountant = accountant
        self.target_epsilon = None if target_epsilon is None else float(target_epsilon)
        self._entries: list[dict[str, Any]] = []
        self._journal: Path | None = None  # write-ahead file (attach_journal); None: in memory only

    # ------------------------------------------------------------------ recording
    def record(
        self, *, name: str, noise_multiplier: float, sample_rate: float, steps: int = 1, round: int | None = None
    ) -> None:  # noqa: A002 - "round" is the domain word
        """Append one release (or ``steps`` identical releases) to the ledger.

        Raises:
            PrivacyError: invalid multiplier / rate / steps, or an empty name.
        """
        if not name:
            raise PrivacyError("name must be a non-empty string such as 'update' or 'adaptive_clip_count'.")
        _check_release(noise_multiplier, sample_rate, steps)
        entry = {
            "name": str(name),
            "noise_multiplier": float(noise_multiplier),
            "sample_rate": float(sample_rate),
            "steps": int(steps),
            "round": None if round is None else int(round),
        }
        if self._journal is not None:  # on disk first: if this raises, the caller must not release
            _append_line(self._journal, {"entry": entry})
        self._entries.append(entry)

    def record_joint(
        self,
        *,
        name: str,
        noise_multipliers: Sequence[float],
        sample_rate: float,
        steps: int = 1,
        round: int | None = None,
    ) -> None:  # noqa: A002
        """Record several Gaussian releases on the same sampled participants as one entry.

        The joint mechanism is one subsampled Gaussian with multiplier
        (sum_i z_i^-2)^(-1/2) (:func:`combine_noise_multipliers`), e.g.
        ``record_joint(name="update+mask_scores", noise_multipliers=[z_eff, z_mask], ...)``.
        """
        self.record(
            name=name,
            noise_multiplier=combine_noise_multipliers(*noise_multipliers),
            sample_rate=sample_rate,
            steps=steps,
            round=round,
        )

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

    def epsilon_without_amplification(self, delta: float | None = None) -> float:
        """Epsilon against an observer who knows who took part in every release (the server, and
        participants told the announced count): every entry composed at sample rate q = 1.

        Amplification by sampling (the rate q of each entry) holds only while the sample is secret.
        An observer who sees it faces, in each release, the Gaussian mechanism with the entry's
        multiplier z on the sampled units, with no amplification. Composing every entry at q = 1
        charges a unit also for the releases it did not take part in (which reveal nothing about
        it), so this is an upper bound on that observer's epsilon, from the same accountant.
        """
        releases = [(e["noise_multiplier"], 1.0, e["steps"]) for e in self._entries]
        return compose_epsilon(
            releases=releases, delta=self.delta if delta is None else float(delta), accountant=self.accountant
        )

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
        extra = {"noise_multiplier": float(noise_multiplier), "sample_rate": float(sample_rate), "steps": int(steps)}
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
                f"(epsilon at delta={self.delta:g}, {self.accountant} accountant)."
            )

    # ------------------------------------------------------------------ write-ahead journal
    @property
    def journal_path(self) -> Path | None:
        """The write-ahead file this ledger appends to, or None (in memory only)."""
        return self._journal

    def _settings(self) -> dict[str, Any]:
        return {
            "format": _JOURNAL_FORMAT,
            "version": _STATE_VERSION,
            "delta": self.delta,
            "accountant": self.accountant,
            "target_epsilon": self.target_epsilon,
        }

    def attach_journal(self, path: Path | str) -> None:
        """Make ``path`` this ledger's write-ahead file (module docstring) and adopt what it holds.

        * No file yet: it is created with a header line of the ledger's settings (and fsynced). If
          the ledger already holds entries (restored from a checkpoint) this refuses: a run that
          made releases has its file, so a missing one means they cannot all be accounted for.
        * A file: its settings must equal the ledger's, the ledger's entries must be a prefix of the
          file's, and the ledger then holds ALL the file's entries (releases made after the
          checkpoint it was restored from included).

        Raises:
            PrivacyError: settings differ, the entries disagree, the file is corrupt, or the
                ledger has entries but no file exists.
        """
        path = Path(path)
        if path.is_file():
            settings, entries = read_journal(path)
            mine = self._settings()
            if settings != mine:
                diff = sorted(k for k in mine if settings.get(k) != mine[k])
                raise PrivacyError(
                    f"ledger file {path} was written with other settings ({diff}: "
                    f"{ {k: settings.get(k) for k in diff} } vs { {k: mine[k] for k in diff} }); "
                    "resume with the run's original privacy config, or start a new run."
                )
            if entries[: len(self._entries)] != self._entries:
                raise PrivacyError(
                    f"ledger file {path} ({len(entries)} entries) does not extend the ledger "
                    f"restored from the checkpoint ({len(self._entries)} entries): they belong to "
                    "different runs. Resume from this run's own checkpoints, or start a new run."
                )
            self._entries = [dict(e) for e in entries]
        else:
            if self._entries:
                raise PrivacyError(
                    f"the ledger holds {len(self._entries)} releases (from a checkpoint) but its "
                    f"write-ahead file {path} does not exist, so releases made after that "
                    "checkpoint cannot be accounted for (a run directory from an older version, or "
                    "a deleted file). Start a new run; the old run's releases stay spent."
                )
            path.parent.mkdir(parents=True, exist_ok=True)
            _append_line(path, self._settings())
            _fsync_directory(path.parent)  # the new file's name is durable too
        self._journal = path

    # ------------------------------------------------------------------ persistence
    def state_dict(self) -> dict[str, Any]:
        """A JSON-serialisable plain dict: configuration and all entries."""
        return {
            "version": _STATE_VERSION,
            "delta": self.delta,
            "accountant": self.accountant,
            "target_epsilon": self.target_epsilon,
            "entries": self.entries,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore a ledger saved by :meth:`state_dict` (replaces all entries and settings)."""
        if state.get("version") != _STATE_VERSION:
            raise PrivacyError(
                f"ledger state version {state.get('version')!r} is not "
                f"{_STATE_VERSION}; re-create the ledger from the run config."
            )
        fresh = PrivacyLedger(
            delta=state["delta"], accountant=state["accountant"], target_epsilon=state["target_epsilon"]
        )
        for e in state["entries"]:
            fresh.record(
                name=e["name"],
                noise_multiplier=e["noise_multiplier"],
                sample_rate=e["sample_rate"],
                steps=e["steps"],
                round=e["round"],
            )
        journal = self._journal
        self.__dict__.update(fresh.__dict__)
        if journal is not None:  # an attached file stays the ledger of the run: re-adopt it
            self._journal = None
            self.attach_journal(journal)

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
        return {
            "accountant": self.accountant,
            "delta": self.delta,
            "target_epsilon": self.target_epsilon,
            "epsilon": eps,  # inf if some release had no noise
            "num_entries": len(self._entries),
            "releases_by_name": per_name,
            "last_round": max(rounds) if rounds else None,
        }


def _append_line(path: Path, record: dict[str, Any]) -> None:
    """Append one JSON line and force it to disk before returning (the write-ahead step)."""
    line = json.dumps(record, allow_nan=False) + "\n"
    try:
        with open(path, "a", encoding="utf-8") as fh:
            fh.write(line)
            fh.flush()
            os.fsync(fh.fileno())
    except OSError as exc:
        raise PrivacyError(
            f"could not write the privacy ledger file {path} ({exc}); the release was NOT made. "
            "Free disk space or fix permissions, then resume."
        ) from exc


def _fsync_directory(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # platforms without directory handles (Windows): the file itself was synced
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def read_journal(path: Path | str) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """(settings, entries) of a ledger's write-ahead file (:meth:`PrivacyLedger.attach_journal`).

    A torn last line (the writer died inside ``record``, before the release) is dropped and cut
    from the file, so later appends start on a fresh line; any other unreadable line is an error.
    """
    path = Path(path)
    raw = path.read_bytes()
    lines = raw.split(b"\n")
    tail = lines.pop()  # b"" when the file ends with a newline
    if tail:
        try:
            json.loads(tail)
            whole = True  # a whole record lacking only its newline: keep it (charging it is the safe side)
        except ValueError:
            whole = False
        if whole:
            lines.append(tail)
        with open(path, "r+b") as fh:  # cut the torn tail (or restore the missing newline) and sync
            fh.truncate(len(raw) - len(tail))
            if whole:
                fh.seek(0, os.SEEK_END)
                fh.write(tail + b"\n")
            fh.flush()
            os.fsync(fh.fileno())
    records = []
    for number, line in enumerate(lines, start=1):
        try:
            records.append(json.loads(line))
        except ValueError as exc:
            raise PrivacyError(
                f"ledger file {path} line {number} is not valid JSON ({exc}); the file is damaged. "
                "Restore it from a backup; never delete it (its releases were made)."
            ) from exc
    if not records or records[0].get("format") != _JOURNAL_FORMAT:
        raise PrivacyError(f"{path} is not a privacy ledger file (no '{_JOURNAL_FORMAT}' header line).")
    if records[0].get("version") != _STATE_VERSION:
        raise PrivacyError(f"ledger file {path} has version {records[0].get('version')!r}, not {_STATE_VERSION}.")
    entries = []
    for number, record in enumerate(records[1:], start=2):
        entry = record.get("entry") if isinstance(record, dict) else None
        if not isinstance(entry, dict) or set(entry) != set(_ENTRY_KEYS):
            raise PrivacyError(f"ledger file {path} line {number} is not a ledger entry: {record!r}.")
        _check_release(entry["noise_multiplier"], entry["sample_rate"], entry["steps"])
        entries.append({k: entry[k] for k in _ENTRY_KEYS})
    return records[0], entries
