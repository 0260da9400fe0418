"""A run directory: everything needed to read, reproduce or resume one experiment.

Layout of ``<root>/<name>/``::

    config.json     {"config": resolved config (with the seed), "environment": package versions}
    metrics.csv     one row per round; columns fixed by the first row
    summary.json    final numbers, written by write_summary
    checkpoints/    round_NNNN.safetensors + round_NNNN.json (see mmpfl_core.io.checkpoint)

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
    raise RunDirectoryError(f"{where} is a {type(obj).__name__}, which cannot be written to "
                            "config.json; use numbers, strings, lists, dicts or dataclasses.")


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
            raise RunDirectoryError(f"{self.path} is not a run directory (no config.json); "
                                    "create one with RunDirectory.create(root, name, config, ...).")

    config_path = property(lambda self: self.path / "config.json")
    metrics_path = property(lambda self: self.path / "metrics.csv")
    summary_path = property(lambda self: self.path / "summary.json")
    checkpoint_dir = property(lambda self: self.path / "checkpoints")

    @classmethod
    def create(cls, root: Path | str, name: str, config: Mapping[str, Any], *,
               exist_ok_resume: bool) -> "RunDirectory":
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
                raise RunDirectoryError(f"run directory {path} already exists. Pass "
                                        "exist_ok_resume=True to resume it, or choose another name.")
            stored = json.loads((path / "config.json").read_text(encoding="utf-8"))["config"]
            diff = _diff_keys(stored, plain)
            if diff:
                raise RunDirectoryError(f"cannot resume {path}: its config differs in {diff}. Resume "
                                        "with the original config, or start a run with a new name.")
        else:
            path.mkdir(parents=True, exist_ok=True)
            _write_text_atomic(path / "config.json", json.dumps(
                {"config": plain, "environment": environment_info()}, indent=1))
        (path / "checkpoints").mkdir(exist_ok=True)
        return cls(path)

    @property
    def config(self) -> dict[str, Any]:
        """The stored config (without environment info)."""
        return json.loads(self.config_path.read_text(encoding="utf-8"))["config"]

    @property
    def environment(self) -> dict[str, str]:
        """Environment info recorded when the run was created."""
        return json.loads(self.config_path.read_text(encoding="utf-8"))["environment"]

    def _columns(self) -> list[str] | None:
        if not self.metrics_path.is_file() or self.metrics_path.stat().st_size == 0:
            return None
        with open(self.metrics_path, newline="", encoding="utf-8") as fh:
            return next(csv.reader(fh), None)

    def log_round(self, row: Mapping[str, Any]) -> None:
        """Append one row to ``metrics.csv``.

        The first row fixes the columns and must contain ``"round"``. Later rows may omit
        columns (written empty, read back as NaN) but may not add new ones.

        Raises:
            RunDirectoryError: ``"round"`` is missing or the row has keys outside the columns.
        """
        if "round" not in row:
            raise RunDirectoryError(f"metrics row {dict(row)} has no 'round' key; add the round number.")
        columns = self._columns()
        new_file = columns is None
        if new_file:
            columns = [str(k) for k in row]
        extra = [k for k in row if str(k) not in columns]
        if extra:
            raise RunDirectoryError(f"metrics row has new columns {extra}; metrics.csv has {columns}. "
                                    "Log every column from the first round on (use NaN when unknown).")
        with open(self.metrics_path, "a", newline="", encoding="utf-8") as fh:
            writer = csv.DictWriter(fh, fieldnames=columns)
            if new_file:
                writer.writeheader()
            writer.writerow({str(k): v for k, v in row.items()})

    def truncate_after(self, round: int) -> int:
        """Drop metric rows with ``round > round`` (before resuming from that round).

        Returns:
            The number of rows removed.
        """
        columns = self._columns()
        if columns is None:
            return 0
        with open(self.metrics_path, newline="", encoding="utf-8") as fh:
            rows = list(csv.DictReader(fh))
        keep = [r for r in rows if float(r["round"]) <= round]
        buf = io.StringIO()
        writer = csv.DictWriter(buf, fieldnames=columns)
        writer.writeheader()
        writer.writerows(keep)
        _write_text_atomic(self.metrics_path, buf.getvalue())
        return len(rows) - len(keep)

    def read_metrics(self) -> pd.DataFrame:
        """``metrics.csv`` as a DataFrame (empty if nothing was logged yet)."""
        if self._columns() is None:
            return pd.DataFrame()
        return pd.read_csv(self.metrics_path)

    def write_summary(self, summary: Mapping[str, Any]) -> None:
        """Write ``summary.json`` atomically (replacing any earlier summary)."""
        _write_text_atomic(self.summary_path, json.dumps(_plain(summary, "summary"), indent=1))

    def read_summary(self) -> dict[str, Any]:
        """The contents of ``summary.json``."""
        if not self.summary_path.is_file():
            raise RunDirectoryError(f"{self.summary_path} does not exist yet; call write_summary first.")
        return json.loads(self.summary_path.read_text(encoding="utf-8"))
