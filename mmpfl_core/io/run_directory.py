"""A run directory: everything needed to read, reproduce or resume one experiment, scoped by who may see it.

Layout of ``<root>/<name>/`` (``MANIFEST.json`` tags every file with its scope)::

    MANIFEST.json          scope of every file: released / private-to-site / operator-only
    config.json            released: the resolved config (with the seed) and package versions
    metrics.csv            released: per round, only RELEASED columns (:func:`column_scope`)
    summary.json           released: final numbers, only released keys (:func:`split_summary`)
    private/               never shared, never read by reports or notebook outputs
      round_metrics.csv    operator-only: the other columns (participant counts, exact training
                           losses, bytes, timing, per-site accuracies, mask statistics)
      summary.json         operator-only: the other summary keys (bytes, per-site epsilons, ...)
      ledger.jsonl         operator-only: the client-level privacy ledger's write-ahead file
      site_<k>/masks.json  private-to-site: site k's personalisation mask (parameter groups)
      site_<k>/dp_sgd_ledger.jsonl  private-to-site: site k's DP-SGD (per-patient) ledger file
      checkpoints/         operator-only: round_NNNN.safetensors + .json (mmpfl_core.io.checkpoint)

Scopes. *released*: what may be published beside the model: quantities covered by the DP
guarantee or computed from public data only (epsilon from the ledger, the adaptive clip bound,
settings), plus pooled evaluation metrics of the global and deployed models on the sites'
held-out splits, which are NOT covered by the guarantee (docs/DESIGN.md 4.6): the simulation shows them for
teaching, a deployment must noise them or state so. *private-to-site*: derived from one site's
data (its mask, personal model). *operator-only*: what the simulation operator, who plays every
site, holds: participant lists and counts (secret for amplification by sampling), exact losses,
byte counters, checkpoints.

A checkpoint holds the global model, the strategy's state (per-site personal models and masks,
the ledger, the adaptive clip bound), the communication counters (per site) and the per-round
history with its private columns; it holds no state of the secret random sources (there is none
to hold: :mod:`mmpfl_core.privacy.randomness`). It is as secret as the sites' data. Resuming a
private run from it does not repeat the same bits, and its ledger files (below) charge every
release made, those after the checkpoint included; with
``noise="reproducible-insecure"`` resuming is bit-identical and nothing is private.

Ledger files (docs/DESIGN.md 4.8, :mod:`mmpfl_core.privacy.ledger`): every release is appended to its
ledger's file and fsynced before it leaves, and a resumed run adopts the files, not only the
checkpoint, so a release made after the last checkpoint is never forgotten (a round run again is
charged again). The client-level file holds only public mechanism parameters (z, q, round), whose
composition (epsilon) is released in ``metrics.csv`` / ``summary.json``; it is kept operator-only
all the same, beside the checkpoints it completes. A site's DP-SGD file lists the rounds it took
part in and its step counts (functions of its sample and size): private to that site. Never delete
a ledger file of a run that released anything: its releases stay spent.

Resuming checks that the stored config equals the requested one (environment info is ignored,
so a resumed run may use a newer library), and :meth:`RunDirectory.truncate_after` drops metric
rows written after the checkpoint being resumed from, so no round is logged twice.
This module never deletes a run directory and never writes outside it.
"""

from __future__ import annotations

import csv
import dataclasses
import io
import json
import os
import platform
from collections.abc import Mapping
from importlib import metadata
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from mmpfl_core.errors import MMPFLError
from mmpfl_core.io.scopes import OPERATOR_ONLY, PRIVATE_TO_SITE, RELEASED, split_row, split_summary

_PACKAGES = ("torch", "timm", "opacus", "numpy")


class RunDirectoryError(MMPFLError, ValueError):
    """A run directory conflicts with the requested run, or a metrics row breaks the CSV schema."""


def environment_info() -> dict[str, str]:
    """Python, platform and package versions (``"not installed"`` for a missing package)."""
    info = {"python": platform.python_version(), "platform": platform.platform()}
    for name in _PACKAGES:
        try:
            info[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            info[name] = "not installed"
    return info


def _plain(obj: Any, where: str = "config") -> Any:
    """Convert a config to plain JSON types (dataclasses, paths, tuples and numpy scalars allowed)."""
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        obj = dataclasses.asdict(obj)
    if isinstance(obj, Mapping):
        return {str(k): _plain(v, f"{where}.{k}") for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_plain(v, f"{where}[{i}]") for i, v in enumerate(obj)]
    if isinstance(obj, Path):
        return str(obj)
    if isinstance(obj, np.generic):
        return obj.item()
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    raise RunDirectoryError(
        f"{where} is a {type(obj).__name__}, which cannot be written to "
        "config.json; use numbers, strings, lists, dicts or dataclasses."
    )


def _diff_keys(a: Any, b: Any, prefix: str = "") -> list[str]:
    """Dotted keys whose values differ between two plain configs."""
    if isinstance(a, dict) and isinstance(b, dict):
        out = []
        for k in sorted(set(a) | set(b)):
            key = f"{prefix}.{k}" if prefix else k
            if k not in a or k not in b:
                out.append(key)
            else:
                out.extend(_diff_keys(a[k], b[k], key))
        return out
    return [] if a == b else [prefix or "<root>"]


def _write_text_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        tmp.write_text(text, encoding="utf-8")
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


class RunDirectory:
    """Handle on ``<root>/<name>/``; create or resume one with :meth:`create`."""

    def __init__(self, path: Path | str) -> None:
        self.path = Path(path)
        if not self.config_path.is_file():
            raise RunDirectoryError(
                f"{self.path} is not a run directory (no config.json); "
                "create one with RunDirectory.create(root, name, config, ...)."
            )

    config_path = property(lambda self: self.path / "config.json")
    metrics_path = property(lambda self: self.path / "metrics.csv")
    summary_path = property(lambda self: self.path / "summary.json")
    manifest_path = property(lambda self: self.path / "MANIFEST.json")
    private_dir = property(lambda self: self.path / "private")
    private_metrics_path = property(lambda self: self.path / "private" / "round_metrics.csv")
    private_summary_path = property(lambda self: self.path / "private" / "summary.json")
    #: Checkpoints are as secret as the data (personal models, masks, per-site counters): private/.
    checkpoint_dir = property(lambda self: self.path / "private" / "checkpoints")
    #: The client-level ledger's write-ahead file (module docstring).
    ledger_path = property(lambda self: self.path / "private" / "ledger.jsonl")

    def site_ledger_path(self, site: int) -> Path:
        """Site ``site``'s DP-SGD ledger file, ``private/site_<k>/dp_sgd_ledger.jsonl`` (private to the site)."""
        return self.private_dir / f"site_{int(site)}" / "dp_sgd_ledger.jsonl"

    def site_ledger_sites(self) -> list[int]:
        """The sites that have a DP-SGD ledger file in this run directory."""
        found = []
        for path in self.private_dir.glob("site_*/dp_sgd_ledger.jsonl"):
            suffix = path.parent.name.removeprefix("site_")
            if suffix.isdigit():
                found.append(int(suffix))
        return sorted(found)

    def has_releases(self) -> bool:
        """True if a ledger file of this run records a release (its directory must then be kept)."""
        from mmpfl_core.privacy.ledger import read_journal  # io does not need privacy otherwise

        files = [self.ledger_path, *(self.site_ledger_path(s) for s in self.site_ledger_sites())]
        return any(p.is_file() and read_journal(p)[1] for p in files)

    @classmethod
    def create(cls, root: Path | str, name: str, config: Mapping[str, Any], *, exist_ok_resume: bool) -> RunDirectory:
        """Create ``<root>/<name>/`` or, with ``exist_ok_resume=True``, reopen it to resume.

        Args:
            root: parent folder, e.g. :func:`mmpfl_core.paths.results_root`.
            name: run name (one path component).
            config: the resolved config; include the seed. Dataclasses and paths are converted.
            exist_ok_resume: if the run exists, reopen it (its config must equal ``config``)
                instead of raising.

        Raises:
            RunDirectoryError: the run exists and resume was not requested, or its stored config
                differs from ``config`` (the message names the differing keys).
        """
        if Path(name).name != name or name in ("", ".", ".."):
            raise RunDirectoryError(f"run name {name!r} must be a single folder name without '/'.")
        path = Path(root) / name
        plain = _plain(config)
        if (path / "config.json").is_file():
            if not exist_ok_resume:
                raise RunDirectoryError(
                    f"run directory {path} already exists. Pass "
                    "exist_ok_resume=True to resume it, or choose another name."
                )
            stored = json.loads((path / "config.json").read_text(encoding="utf-8"))["config"]
            diff = _diff_keys(stored, plain)
            if diff:
                raise RunDirectoryError(
                    f"cannot resume {path}: its config differs in {diff}. Resume "
                    "with the original config, or start a run with a new name."
                )
        else:
            path.mkdir(parents=True, exist_ok=True)
            _write_text_atomic(
                path / "config.json", json.dumps({"config": plain, "environment": environment_info()}, indent=1)
            )
        (path / "private" / "checkpoints").mkdir(parents=True, exist_ok=True)
        run = cls(path)
        run.write_manifest()
        return run

    @property
    def config(self) -> dict[str, Any]:
        """The stored config (without environment info)."""
        return json.loads(self.config_path.read_text(encoding="utf-8"))["config"]

    @property
    def environment(self) -> dict[str, str]:
        """Environment info recorded when the run was created."""
        return json.loads(self.config_path.read_text(encoding="utf-8"))["environment"]

    @staticmethod
    def _columns(path: Path) -> list[str] | None:
        if not path.is_file() or path.stat().st_size == 0:
            return None
        with open(path, newline="", encoding="utf-8") as fh:
            return next(csv.reader(fh), None)

    def log_round(self, row: Mapping[str, Any]) -> None:
        """Append one row: released columns to ``metrics.csv``, the rest to ``private/round_metrics.csv``.

        The first row fixes the columns of each file and must contain ``"round"``. Later rows may
        omit columns (written empty, read back as NaN) but may not add new ones.

        Raises:
            RunDirectoryError: ``"round"`` is missing or the row has keys outside the columns.
        """
        if "round" not in row:
            raise RunDirectoryError(f"metrics row {dict(row)} has no 'round' key; add the round number.")
        released, private = split_row(row)
        self.private_dir.mkdir(exist_ok=True)
        plan = []
        for path, part in ((self.metrics_path, released), (self.private_metrics_path, private)):
            columns = self._columns(path)
            new_file = columns is None
            columns = [str(k) for k in part] if columns is None else columns
            extra = [k for k in part if str(k) not in columns]
            if extra:  # checked for both files before either is written
                raise RunDirectoryError(
                    f"metrics row has new columns {extra}; {path.name} has {columns}. "
                    "Log every column from the first round on (use NaN when unknown)."
                )
            plan.append((path, part, columns, new_file))
        for path, part, columns, new_file in plan:
            with open(path, "a", newline="", encoding="utf-8") as fh:
                writer = csv.DictWriter(fh, fieldnames=columns)
                if new_file:
                    writer.writeheader()
                writer.writerow({str(k): v for k, v in part.items()})
        created = any(new_file for *_, new_file in plan)
        if created:
            self.write_manifest()

    def truncate_after(self, round: int) -> int:
        """Drop metric rows with ``round > round`` (before resuming from that round), in both files.

        Returns:
            The number of rows removed from ``metrics.csv``.
        """
        removed = 0
        for path in (self.metrics_path, self.private_metrics_path):
            columns = self._columns(path)
            if columns is None:
                continue
            with open(path, newline="", encoding="utf-8") as fh:
                rows = list(csv.DictReader(fh))
            keep = [r for r in rows if float(r["round"]) <= round]
            buf = io.StringIO()
            writer = csv.DictWriter(buf, fieldnames=columns)
            writer.writeheader()
            writer.writerows(keep)
            _write_text_atomic(path, buf.getvalue())
            if path == self.metrics_path:
                removed = len(rows) - len(keep)
        return removed

    def read_metrics(self, *, include_private: bool = False) -> pd.DataFrame:
        """``metrics.csv`` as a DataFrame (empty if nothing was logged yet); with
        ``include_private`` joined with ``private/round_metrics.csv`` on ``round`` (operator use)."""
        if self._columns(self.metrics_path) is None:
            return pd.DataFrame()
        frame = pd.read_csv(self.metrics_path)
        if include_private and self._columns(self.private_metrics_path) is not None:
            frame = frame.merge(pd.read_csv(self.private_metrics_path), on="round", how="outer")
        return frame

    def write_summary(self, summary: Mapping[str, Any]) -> None:
        """Write the released part to ``summary.json`` and the rest under ``private/`` (atomically):
        site k's mask to ``private/site_<k>/masks.json``, every other private key to
        ``private/summary.json``; then refresh the manifest."""
        released, private = split_summary(_plain(summary, "summary"))
        masks = private.pop("masks", None)
        _write_text_atomic(self.summary_path, json.dumps(released, indent=1))
        self.private_dir.mkdir(exist_ok=True)
        _write_text_atomic(self.private_summary_path, json.dumps(private, indent=1))
        if isinstance(masks, Mapping):
            for site, groups in masks.items():
                folder = self.private_dir / f"site_{site}"
                folder.mkdir(exist_ok=True)
                _write_text_atomic(
                    folder / "masks.json", json.dumps({"site": site, "personal_groups": groups}, indent=1)
                )
        self.write_manifest()

    def read_summary(self, *, include_private: bool = False) -> dict[str, Any]:
        """The contents of ``summary.json``; with ``include_private`` merged with ``private/`` (the
        operator's full summary, masks under ``"masks"``)."""
        if not self.summary_path.is_file():
            raise RunDirectoryError(f"{self.summary_path} does not exist yet; call write_summary first.")
        out = json.loads(self.summary_path.read_text(encoding="utf-8"))
        if include_private and self.private_summary_path.is_file():
            for key, value in json.loads(self.private_summary_path.read_text(encoding="utf-8")).items():
                out[key] = (
                    {**out[key], **value} if isinstance(out.get(key), dict) and isinstance(value, dict) else value
                )
            masks = {
                json.loads(p.read_text())["site"]: json.loads(p.read_text())["personal_groups"]
                for p in sorted(self.private_dir.glob("site_*/masks.json"))
            }
            if masks:
                out["masks"] = {str(k): v for k, v in masks.items()}
        return out

    def scope_of(self, path: Path | str) -> str:
        """The scope of a file of this run directory (see the module docstring)."""
        rel = Path(path).resolve().relative_to(self.path.resolve()).as_posix()
        if rel.startswith("private/site_"):
            return PRIVATE_TO_SITE
        if rel.startswith("private/"):
            return OPERATOR_ONLY
        if rel in ("MANIFEST.json", "config.json", "metrics.csv", "summary.json"):
            return RELEASED
        return OPERATOR_ONLY  # unknown files are not released until classified

    def write_manifest(self) -> dict[str, str]:
        """Write ``MANIFEST.json``: every file of the run directory with its scope; returns the map."""
        files = sorted(p for p in self.path.rglob("*") if p.is_file() and not p.name.startswith("."))
        scopes = {p.relative_to(self.path).as_posix(): self.scope_of(p) for p in files}
        scopes["MANIFEST.json"] = RELEASED
        manifest = {
            "scopes": dict(sorted(scopes.items())),
            "meaning": {
                RELEASED: "may be shared beside the model: covered by the DP guarantee, public, or "
                "pooled evaluation outside the guarantee (docs/DESIGN.md 4.6)",
                PRIVATE_TO_SITE: "derived from one site's private data: that site only",
                OPERATOR_ONLY: "held by whoever runs the simulation (it plays every site): participant "
                "lists, exact losses, byte counters, checkpoints, the privacy ledger's write-ahead file; as secret as "
                "the data",
            },
        }
        _write_text_atomic(self.manifest_path, json.dumps(manifest, indent=1))
        return manifest["scopes"]
