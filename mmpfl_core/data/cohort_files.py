"""Saving and loading cohorts and federations without pickle.

What it is for: generated data written once (``data_scripts/generate_cohort.py``) and read by
notebooks and runs. Arrays go to a compressed ``.npz`` (subject ids as fixed-width unicode, so
``np.load(..., allow_pickle=False)`` works); names, configs and scanner profiles go to a JSON
sidecar. What it must never do: unpickle anything, or return a partly-read cohort: a corrupt or
truncated file raises :class:`~mmpfl_core.errors.DataError` naming the file and the fix.
"""

from __future__ import annotations

import json
import zipfile
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import DataError
from .contract import Cohort, concatenate
from .federation import Federation, FederationConfig, SiteData
from .scanners import ScannerProfile
from .synthetic import SyntheticCohortConfig

_FIX = (
    "Delete it and write it again: `python data_scripts/generate_cohort.py --out DIR` for the synthetic "
    "cohort, `python data_scripts/convert_*.py` for your own files."
)
_ARRAYS = ("images", "modality_mask", "clinical", "clinical_mask", "labels", "sites")
_SPLITS = ("train", "val", "test", "public")


def _arrays(cohort: Cohort) -> dict[str, np.ndarray]:
    out = {name: getattr(cohort, name) for name in _ARRAYS}
    out["subject_ids"] = np.asarray(cohort.subject_ids).astype(str)  # fixed-width '<U..', no objects
    if cohort.lesion_masks is not None:
        out["lesion_masks"] = cohort.lesion_masks
    return out


def _json_safe(value: Any) -> Any:
    """``value`` with numpy arrays and scalars turned into lists and Python numbers (JSON has neither).

    Loaders put per-row lists (e.g. ``meta["groups"]``, the patient of each slice) into the meta dict;
    an ndarray there made ``save_cohort`` fail (issue 17). Anything else JSON cannot hold still fails
    in :func:`_write` with a message naming the file.
    """
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, dict):
        return {str(k): _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    if isinstance(value, Path):
        return str(value)
    return value


def _names(cohort: Cohort) -> dict[str, Any]:
    return {
        "modality_names": list(cohort.modality_names),
        "class_names": list(cohort.class_names),
        "clinical_names": list(cohort.clinical_names),
        "meta": _json_safe(cohort.meta),
    }


def _cohort(arrays: dict[str, np.ndarray], names: dict[str, Any], index: np.ndarray | slice = slice(None)) -> Cohort:
    lesions = arrays.get("lesion_masks")
    return Cohort(
        **{k: arrays[k][index] for k in _ARRAYS},
        subject_ids=arrays["subject_ids"][index],
        modality_names=tuple(names["modality_names"]),
        class_names=tuple(names["class_names"]),
        clinical_names=tuple(names["clinical_names"]),
        lesion_masks=None if lesions is None else lesions[index],
        meta=names.get("meta", {}),
    )


def _write(npz_path: Path, arrays: dict[str, np.ndarray], json_path: Path, doc: dict[str, Any]) -> None:
    try:
        text = json.dumps(doc, indent=2)
    except TypeError as err:
        raise DataError(
            f"cannot write {json_path}: cohort meta or config is not JSON-serialisable ({err}). "
            "Keep Cohort.meta to numbers, strings, lists and dicts."
        ) from err
    npz_path.parent.mkdir(parents=True, exist_ok=True)
    with open(npz_path, "wb") as fh:  # a handle, so numpy does not append a second ".npz"
        np.savez_compressed(fh, **arrays)  # type: ignore[arg-type]  # numpy's stub types **kwds as allow_pickle
    json_path.write_text(text)


def _read(npz_path: Path, json_path: Path) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    for p in (npz_path, json_path):
        if not p.exists():
            raise DataError(
                f"{p} does not exist; pass the path of a file written by `python data_scripts/convert_*.py` "
                "(your own images) or `python data_scripts/generate_cohort.py` (the synthetic cohort)."
            )
    try:
        doc = json.loads(json_path.read_text())
        with np.load(npz_path, allow_pickle=False) as data:
            arrays = {k: data[k] for k in data.files}  # reads every member: truncation fails here
    except (OSError, ValueError, EOFError, KeyError, zipfile.BadZipFile) as err:
        raise DataError(f"{npz_path} (or {json_path.name}) is corrupt or truncated: {err}. {_FIX}") from err
    missing = [k for k in (*_ARRAYS, "subject_ids") if k not in arrays]
    if missing:
        raise DataError(f"{npz_path} lacks arrays {missing}; it was not written by mmpfl. {_FIX}")
    return arrays, doc


def save_cohort(cohort: Cohort, path: str | Path) -> Path:
    """Write ``cohort`` to ``path`` (.npz) plus a ``.json`` sidecar; returns the .npz path."""
    path = Path(path)
    _write(path, _arrays(cohort), path.with_suffix(".json"), {"format": "mmpfl-cohort-v1", **_names(cohort)})
    return path


def load_cohort(path: str | Path) -> Cohort:
    """Read a cohort written by :func:`save_cohort` (no pickle); DataError if corrupt or missing.

    ``path`` is the ``.npz`` or its ``.json`` sidecar (both are written side by side; either names the cohort).
    """
    path = Path(path)
    if path.suffix == ".json":  # the sidecar: the arrays are in the .npz beside it
        npz = path.with_suffix(".npz")
        if not npz.is_file():
            raise DataError(
                f"{path} is the JSON sidecar of a converted cohort, and {npz.name} is not beside it. "
                "Pass the cohort's .npz file (written by data_scripts/convert_*.py) to --data."
            )
        path = npz
    arrays, doc = _read(path, path.with_suffix(".json"))
    try:
        return _cohort(arrays, doc)
    except KeyError as err:
        raise DataError(f"{path.with_suffix('.json')} lacks field {err}. {_FIX}") from err


def save_federation(federation: Federation, directory: str | Path) -> Path:
    """Write ``federation.npz`` (all subjects, with ``split`` codes) and ``federation.json``.

    Rows are site 0 train, val, test, site 1 train, ..., then the public set; ``split`` holds the
    index into ("train", "val", "test", "public") and ``sites`` the site id (-1 for public).
    """
    directory = Path(directory)
    parts, codes = [], []
    for site in federation.sites:
        for code, cohort in enumerate((site.train, site.val, site.test)):
            parts.append(cohort)
            codes.append(np.full(len(cohort), code, dtype=np.int8))
    if federation.public is not None:
        parts.append(federation.public)
        codes.append(np.full(len(federation.public), 3, dtype=np.int8))
    arrays = _arrays(concatenate(parts))
    arrays["split"] = np.concatenate(codes)
    doc = {
        "format": "mmpfl-federation-v1",
        **_names(parts[0]),
        "cohort_config": None if federation.cohort_config is None else asdict(federation.cohort_config),
        "federation_config": asdict(federation.federation_config),
        "sites": [{"site_id": s.site_id, "name": s.name, "profile": asdict(s.profile)} for s in federation.sites],
    }
    _write(directory / "federation.npz", arrays, directory / "federation.json", doc)
    return directory


def load_federation(directory: str | Path) -> Federation:
    """Read a federation written by :func:`save_federation`; the round trip is exact."""
    directory = Path(directory)
    arrays, doc = _read(directory / "federation.npz", directory / "federation.json")
    if "split" not in arrays:
        raise DataError(f"{directory / 'federation.npz'} has no 'split' column; it is a cohort file. {_FIX}")
    try:
        split, site_col = arrays["split"], arrays["sites"]
        sites = []
        for entry in doc["sites"]:
            k = int(entry["site_id"])
            train, val, test = (_cohort(arrays, doc, np.flatnonzero((site_col == k) & (split == c))) for c in range(3))
            profile = _tuples(ScannerProfile, entry["profile"])
            sites.append(SiteData(site_id=k, name=entry["name"], profile=profile, train=train, val=val, test=test))
        public_idx = np.flatnonzero(split == 3)
        cc = doc["cohort_config"]
        return Federation(
            sites=tuple(sites),
            global_test=concatenate([s.test for s in sites]),
            public=_cohort(arrays, doc, public_idx) if public_idx.size else None,
            cohort_config=None if cc is None else _tuples(SyntheticCohortConfig, cc),
            federation_config=_tuples(FederationConfig, doc["federation_config"]),
        )
    except (KeyError, TypeError) as err:
        raise DataError(f"{directory / 'federation.json'} is incomplete ({err!r}). {_FIX}") from err


def _tuples(cls: type, fields: dict[str, Any]) -> Any:
    """Rebuild a frozen config whose tuple fields JSON turned into lists."""

    def fix(v: Any) -> Any:
        return tuple(fix(x) for x in v) if isinstance(v, list) else v

    return cls(**{k: fix(v) for k, v in fields.items()})
