"""Helpers shared by the real-data loaders: resizing, subject tables (CSV), clinical columns, labels.

Nothing here reads image files; :mod:`images` and :mod:`nifti` do. What these helpers
must never do is guess: a value that cannot be parsed, a duplicated subject or an unknown label is a
:class:`~mmpfl_core.errors.DataError` naming the file and the fix, never a silently dropped row.

Subject tables are plain CSV files with a header row and one row per subject::

    subject,label,site,age,sex_female,edss,symptom_score
    p001,rrms,0,34,1,2.0,
    p002,healthy,1,51,0,,1.5

Only ``subject`` is required; every other column is optional. Empty cells and ``NA``/``NaN``/``None``
mean "not recorded". Columns that are not clinical features, ``label`` or ``site`` are ignored.
"""

from __future__ import annotations

import csv
from pathlib import Path
from collections.abc import Iterable, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from ...errors import DataError
from ..contract import CLINICAL_FEATURES, standardise_clinical

#: Cell values that mean "not recorded" (compared after strip() and lower()).
MISSING_TOKENS: frozenset[str] = frozenset({"", "na", "n/a", "nan", "none", "null"})


def check_image_size(image_size: int | None, *, allow_none: bool = False) -> None:
    """Raise :class:`DataError` unless ``image_size`` is a positive int (or None when allowed)."""
    if image_size is None and allow_none:
        return
    if not isinstance(image_size, int) or isinstance(image_size, bool) or image_size < 1:
        raise DataError(f"image_size={image_size!r} must be a positive integer (e.g. 64).")


def pad_to_square(image: np.ndarray) -> np.ndarray:
    """Zero-pad the last two axes of ``image`` (..., H, W) symmetrically to (..., S, S), S = max(H, W).

    Padding (rather than stretching) keeps the anatomy's aspect ratio; zero is the background of a
    normalised MRI slice, so the padding adds no signal.
    """
    h, w = image.shape[-2:]
    s = max(h, w)
    if h == w:
        return image
    top, left = (s - h) // 2, (s - w) // 2
    pad = [(0, 0)] * (image.ndim - 2) + [(top, s - h - top), (left, s - w - left)]
    return np.pad(image, pad)


def resize_images(images: np.ndarray, image_size: int | None) -> np.ndarray:
    """Pad (B, H, W) images to square, then resize to (B, image_size, image_size); None keeps the size.

    Resizing uses ``torch.nn.functional.interpolate`` (bilinear, ``antialias=True``,
    ``align_corners=False``): antialiasing low-pass filters before downsampling so that thin
    structures such as lesions are averaged rather than aliased. Bilinear weights are non-negative
    and sum to one, so values in [0, 1] stay in [0, 1] (we still clip against rounding).
    """
    images = pad_to_square(np.asarray(images, dtype=np.float32))
    if image_size is None or images.shape[-1] == image_size:
        return np.ascontiguousarray(images, dtype=np.float32)
    x = torch.from_numpy(np.ascontiguousarray(images))[:, None]  # (B, 1, S, S)
    y = F.interpolate(x, size=(image_size, image_size), mode="bilinear", align_corners=False, antialias=True)
    return y[:, 0].clamp_(0.0, 1.0).numpy().astype(np.float32, copy=False)  # (B, image_size, image_size)


def read_subject_table(path: str | Path, *, required: Sequence[str] = ("subject",)) -> dict[str, dict[str, str]]:
    """Read a per-subject CSV into ``{subject: {column: raw string}}`` (column names lower-cased).

    Raises:
        DataError: if the file is missing or unreadable, lacks a ``required`` column, or lists a
            subject twice.
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(
            f"table {path} does not exist; pass the path of a CSV with a header row "
            f"containing at least the columns {list(required)}."
        )
    try:
        with path.open(newline="", encoding="utf-8-sig") as fh:  # utf-8-sig: Excel writes a BOM
            reader = csv.DictReader(fh)
            header = [(h or "").strip().lower() for h in (reader.fieldnames or [])]
            rows = [[(v or "").strip() for v in row.values()] for row in reader]
    except (OSError, UnicodeDecodeError, csv.Error) as exc:
        raise DataError(f"cannot read table {path}: {exc}. Save it as a UTF-8 CSV with a header row.") from exc
    missing = [c for c in required if c not in header]
    if missing:
        raise DataError(f"table {path} lacks column(s) {missing}; found {header}. Rename the header to include them.")
    table: dict[str, dict[str, str]] = {}
    for line, values in enumerate(rows, start=2):  # line 1 is the header
        row = dict(zip(header, values, strict=True))
        subject = row.get("subject", "")
        if not subject:
            raise DataError(f"table {path} line {line} has an empty 'subject' cell; fill it or delete the row.")
        if subject in table:
            raise DataError(f"table {path} lists subject {subject!r} twice (line {line}); keep one row per subject.")
        table[subject] = row
    return table


def _parse_float(value: str, *, path: Path, subject: str, column: str) -> float:
    """A cell as float; missing tokens become NaN, anything else unparsable is an error."""
    if value.strip().lower() in MISSING_TOKENS:
        return float("nan")
    try:
        number = float(value)
    except ValueError:
        raise DataError(
            f"table {path}: subject {subject!r} has {column}={value!r}, which is not a number. "
            "Write a number, or leave the cell empty for 'not recorded'."
        ) from None
    if not np.isfinite(number):
        raise DataError(
            f"table {path}: subject {subject!r} has {column}={value!r}; write a finite number or leave the cell empty."
        )
    return number


def clinical_from_table(
    subject_ids: Sequence[str],
    table: dict[str, dict[str, str]] | None,
    path: Path | None,
    names: Sequence[str] = CLINICAL_FEATURES,
) -> tuple[np.ndarray, np.ndarray]:
    """Standardised clinical matrix (N, K) and mask for ``subject_ids`` from a subject table.

    A subject absent from the table, a column absent from the table, and an empty cell all become
    "not recorded" (0 with mask False), as the contract requires. No table -> everything missing.
    """
    raw = np.full((len(subject_ids), len(names)), np.nan)
    if table is not None and path is not None:
        for i, subject in enumerate(subject_ids):
            row = table.get(subject, {})
            for k, name in enumerate(names):
                if name in row:
                    raw[i, k] = _parse_float(row[name], path=path, subject=subject, column=name)
    clinical, mask = standardise_clinical(raw, names)
    return clinical.astype(np.float32), mask.astype(bool)


def sites_from_table(
    subject_ids: Sequence[str], table: dict[str, dict[str, str]] | None, path: Path | None, default: int
) -> np.ndarray:
    """Site id per subject: the table's ``site`` column where filled, else ``default``; (N,) int64."""
    sites = np.full(len(subject_ids), int(default), dtype=np.int64)
    if table is None or path is None:
        return sites
    for i, subject in enumerate(subject_ids):
        value = table.get(subject, {}).get("site", "")
        if value.strip().lower() in MISSING_TOKENS:
            continue
        try:
            sites[i] = int(value)
        except ValueError:
            raise DataError(
                f"table {path}: subject {subject!r} has site={value!r}; site must be an integer "
                "institution id (use -1 for data that belongs to no site)."
            ) from None
    return sites


def resolve_class_names(found: Iterable[str], class_names: Sequence[str] | None, *, where: str) -> tuple[str, ...]:
    """The class list: ``class_names`` if given (every found label must be in it), else sorted ``found``.

    Args:
        found: labels seen in the data (folder names or label cells).
        class_names: the caller's fixed class list, or None to derive it.
        where: the file or folder the labels came from, for the error message.
    """
    found = set(found)
    if class_names is None:
        if not found:
            raise DataError(f"no labels found in {where}; check the path and the layout in the loader's docstring.")
        return tuple(sorted(found))
    class_names = tuple(class_names)
    unknown = sorted(found - set(class_names))
    if unknown:
        raise DataError(
            f"unknown label(s) {unknown} in {where}; expected one of {list(class_names)}. "
            "Fix the label, or pass class_names that include it."
        )
    return class_names


def canonical_modalities(modalities: Sequence[str]) -> tuple[str, ...]:
    """Validate the requested sequence names (non-empty, unique ignoring case) and return them as a tuple."""
    modalities = tuple(modalities)
    lowered = [m.lower() for m in modalities]
    if not modalities or len(set(lowered)) != len(lowered) or not all(isinstance(m, str) and m for m in modalities):
        raise DataError(
            f"modalities={modalities!r} must be a non-empty list of distinct names, e.g. ('T1', 'T2', 'FLAIR')."
        )
    return modalities
