"""Safe checkpoints: tensors in safetensors, everything else in JSON. Never pickle.

A checkpoint is a pair of files, ``round_0005.safetensors`` (tensors) and ``round_0005.json``
(metadata, round, ledger and counter states, RNG states, and the layout of the tensors). Loading a
checkpoint therefore never executes code, unlike ``torch.load`` on a pickle.

Writes are atomic: both files are written to temporary names, flushed to disk, then moved into
place with ``os.replace``. A crash mid-write leaves the previous checkpoint intact. The JSON file
records the SHA-256 of the tensor file, so a truncated or mismatched pair is detected on load and
reported as :class:`CheckpointError` instead of silently resuming from garbage.

What a federated run's checkpoint holds (``FederatedSimulation._save``): the global model, the
strategy's state (per-site personal models and masks, the privacy ledger, the adaptive clip bound),
per-site communication counters and the per-round history with its private columns. It is as
secret as the sites' data: :class:`~mmpfl_core.io.run_directory.RunDirectory` keeps checkpoints
under ``private/``. It holds no state of secret random sources (private noise and sampling keep
none), so a resumed private run does not repeat its bits; its epsilon covers every release made,
because the ledgers write ahead to their own files, which the resume reads (docs/DESIGN.md 4.8).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load as load_safetensors_bytes
from safetensors.torch import save_file

from mmpfl_core.errors import MMPFLError

FORMAT = "mmpfl-checkpoint"
VERSION = 1
_ROUND_RE = re.compile(r"^round_(\d+)\.safetensors$")
_FIX = "Delete it to start fresh or resume from an earlier checkpoint."


class CheckpointError(MMPFLError, ValueError):
    """A checkpoint is missing, truncated, corrupt, or holds something that cannot be stored safely."""


def _paths(path: Path | str) -> tuple[Path, Path]:
    """(tensor file, JSON file) for a path given with or without a suffix."""
    p = Path(path)
    if p.suffix in (".safetensors", ".json"):
        p = p.with_suffix("")
    return p.with_name(p.name + ".safetensors"), p.with_name(p.name + ".json")


def checkpoint_path(directory: Path | str, round: int) -> Path:
    """``<directory>/round_0005.safetensors`` for ``round=5``."""
    return Path(directory) / f"round_{int(round):04d}.safetensors"


def _flatten_tensors(tree: Mapping[str, Any], prefix: str, flat: dict[str, torch.Tensor]) -> dict:
    """Flatten nested mappings of tensors into ``flat`` ("a/b/c" names); return the layout tree."""
    layout: dict[str, Any] = {}
    for key, value in tree.items():
        if not isinstance(key, str):
            raise CheckpointError(
                f"tensor key {key!r} under {prefix or '<root>'!r} is not a string; "
                "give every nested mapping string keys (e.g. str(param_id))."
            )
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            layout[key] = _flatten_tensors(value, name + "/", flat)
        elif isinstance(value, torch.Tensor):
            if name in flat:
                raise CheckpointError(f"two tensors map to the flat name {name!r}; rename one key.")
            # safetensors needs contiguous CPU tensors that do not share storage (tied weights)
            flat[name] = value.detach().to("cpu").contiguous().clone()
            layout[key] = name
        else:
            raise CheckpointError(
                f"tensors[{name!r}] is a {type(value).__name__}, not a tensor; put non-tensor values in state=."
            )
    return layout


def _unflatten_tensors(layout: Mapping[str, Any], flat: Mapping[str, torch.Tensor]) -> dict:
    return {k: _unflatten_tensors(v, flat) if isinstance(v, Mapping) else flat[v] for k, v in layout.items()}


def _json_default(obj: Any) -> Any:
    if isinstance(obj, np.generic):
        return obj.item()
    raise TypeError(f"{type(obj).__name__} is not JSON-serialisable")


def _fsync(path: Path) -> None:
    with open(path, "rb+") as fh:
        os.fsync(fh.fileno())


def _check_keys(obj: Any, where: str) -> None:
    """JSON silently turns int keys into strings; refuse them so that state round-trips exactly."""
    if isinstance(obj, Mapping):
        for k, v in obj.items():
            if not isinstance(k, str):
                raise CheckpointError(
                    f"state key {k!r} at {where} is a {type(k).__name__}; JSON keys "
                    "must be strings (convert it, e.g. str(site_id))."
                )
            _check_keys(v, f"{where}[{k!r}]")
    elif isinstance(obj, (list, tuple)):
        for i, v in enumerate(obj):
            _check_keys(v, f"{where}[{i}]")


def save_checkpoint(path: Path | str, *, tensors: Mapping[str, Any], state: Mapping[str, Any]) -> None:
    """Write a checkpoint pair atomically.

    Algorithm:
        1. Flatten ``tensors`` and write them to a temporary file next to the target; fsync.
        2. Hash that file and write the JSON (state, tensor layout, hash) to a temporary file; fsync.
        3. ``os.replace`` the tensor file, then the JSON file, into place.
        A crash before step 3 leaves any earlier checkpoint untouched; a crash between the two
        moves makes the hash disagree, which :func:`load_checkpoint` reports.

    Args:
        path: ``.../round_0005`` with or without the ``.safetensors``/``.json`` suffix.
        tensors: tensors or nested mappings of tensors, e.g. ``{"model": model.state_dict()}``.
            Nested keys are stored as ``"model/conv.weight"`` and restored as nested dicts by
            :func:`load_checkpoint`. Tensors are detached, copied to the CPU and made contiguous.
        state: JSON-serialisable values (numbers, strings, lists, dicts with string keys; numpy
            scalars are converted). Tuples come back as lists; Python ints of any size survive.

    Raises:
        CheckpointError: a value cannot be stored safely.
    """
    st_path, json_path = _paths(path)
    flat: dict[str, torch.Tensor] = {}
    layout = _flatten_tensors(tensors, "", flat)
    _check_keys(state, "state")
    meta = {
        "format": FORMAT,
        "version": VERSION,
        "safetensors_sha256": "",
        "tensor_layout": layout,
        "state": dict(state),
    }
    try:  # fail before touching the disk
        json.dumps(meta, default=_json_default)
    except (TypeError, ValueError) as exc:
        raise CheckpointError(
            f"checkpoint state for {json_path} is not JSON-serialisable ({exc}). "
            "Store tensors in tensors= and convert arrays to lists."
        ) from exc
    st_path.parent.mkdir(parents=True, exist_ok=True)
    staged_st = st_path.with_name(f".{st_path.name}.tmp-{os.getpid()}")
    staged_json = json_path.with_name(f".{json_path.name}.tmp-{os.getpid()}")
    try:
        save_file(flat, str(staged_st))
        _fsync(staged_st)
        meta["safetensors_sha256"] = hashlib.sha256(staged_st.read_bytes()).hexdigest()
        staged_json.write_text(json.dumps(meta, default=_json_default, indent=1), encoding="utf-8")
        _fsync(staged_json)
        os.replace(staged_st, st_path)
        os.replace(staged_json, json_path)
    finally:
        staged_st.unlink(missing_ok=True)
        staged_json.unlink(missing_ok=True)


def load_checkpoint(path: Path | str) -> tuple[dict[str, Any], dict[str, Any]]:
    """Read a checkpoint pair written by :func:`save_checkpoint`.

    Returns:
        ``(tensors, state)`` with ``tensors`` nested as it was saved (CPU tensors).

    Raises:
        CheckpointError: a file is missing, unreadable, truncated, or the pair does not match.
    """
    st_path, json_path = _paths(path)
    for p in (st_path, json_path):
        if not p.is_file():
            raise CheckpointError(f"checkpoint file {p} is missing. {_FIX}")
    try:
        meta = json.loads(json_path.read_text(encoding="utf-8"))
        if meta.get("format") != FORMAT:
            raise ValueError(f"format is {meta.get('format')!r}, expected {FORMAT!r}")
        layout, state, digest = meta["tensor_layout"], meta["state"], meta["safetensors_sha256"]
    except (ValueError, KeyError, AttributeError, UnicodeDecodeError) as exc:
        raise CheckpointError(f"checkpoint file {json_path} is corrupt ({exc}). {_FIX}") from exc
    data = st_path.read_bytes()
    if hashlib.sha256(data).hexdigest() != digest:
        raise CheckpointError(
            f"checkpoint file {st_path} is truncated, corrupt, or does not belong "
            f"to {json_path.name} (SHA-256 mismatch). {_FIX}"
        )
    try:
        flat = load_safetensors_bytes(data)
        tensors = _unflatten_tensors(layout, flat)
    except Exception as exc:  # safetensors raises its own error types for malformed files
        raise CheckpointError(f"checkpoint file {st_path} cannot be read ({exc}). {_FIX}") from exc
    return tensors, state


def latest_checkpoint(directory: Path | str) -> Path | None:
    """The ``round_NNNN.safetensors`` with the highest round whose JSON partner exists, or None."""
    found = _list_checkpoints(directory)
    return found[-1][1] if found else None


def _list_checkpoints(directory: Path | str) -> list[tuple[int, Path]]:
    d = Path(directory)
    if not d.is_dir():
        return []
    out = [(int(m.group(1)), p) for p in d.iterdir() if (m := _ROUND_RE.match(p.name)) and _paths(p)[1].is_file()]
    return sorted(out)


def prune_checkpoints(directory: Path | str, keep_last: int) -> list[Path]:
    """Delete all but the ``keep_last`` most recent checkpoint pairs; return the deleted tensor files."""
    if int(keep_last) != keep_last or keep_last < 1:
        raise CheckpointError(f"keep_last={keep_last!r} must be an integer >= 1 (keep at least the latest).")
    found = _list_checkpoints(directory)
    removed = []
    for _, p in found[: max(0, len(found) - int(keep_last))]:
        for f in _paths(p):
            f.unlink(missing_ok=True)
        removed.append(p)
    return removed
