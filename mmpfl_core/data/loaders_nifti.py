"""Loader for 3D NIfTI volumes a user brings (BraTS-like folders), reduced to 2D axial slices.

Layout read (file names case-insensitive, ``.nii.gz`` or ``.nii``)::

    root/
    ├── p001/
    │   ├── t1.nii.gz          # <modality>.nii.gz ...
    │   ├── t2.nii.gz
    │   └── flair.nii.gz
    └── p002/
        ├── p002_t1.nii        # ... or <anything>_<modality>.nii[.gz] (BraTS: BraTS20_Training_002_flair.nii.gz)
        └── p002_flair.nii.gz  # no T2 here: zeros + modality_mask False (unless require_all=True)

    labels.csv                 # subject,label[,site][,age,sex_female,edss,symptom_score]
    p001,rrms,0,34,1,2.0,
    p002,healthy,1,51,0,,

The subjects are the rows of ``labels.csv``; folders without a row are ignored (listed in
``cohort.meta["unlabelled_subjects"]``), a row without a folder is an error.

nibabel reads lazily: a truncated ``.nii.gz`` loads without complaint and fails only when the voxels
are read, and NaN voxels load silently (see FACTS.md). This loader therefore reads every volume in
full at load time, inside one try/except, and checks for NaN, so that the error names the file.
"""
from __future__ import annotations

import zlib
from pathlib import Path
from typing import Sequence

import nibabel as nib
import numpy as np
from nibabel.filebasedimages import ImageFileError

from ..errors import DataError
from .contract import CLINICAL_FEATURES, MODALITIES, Cohort, normalise_intensity
from .loaders_common import (canonical_modalities, check_image_size, clinical_from_table, read_subject_table,
                             resize_images, resolve_class_names, sites_from_table)

_NIFTI_SUFFIXES: tuple[str, ...] = (".nii.gz", ".nii")


def load_nifti_volume(path: str | Path) -> np.ndarray:
    """Read a NIfTI file in full as a float32 (X, Y, Z) array in RAS+ orientation (Z = inferior->superior).

    ``nib.as_closest_canonical`` reorders the voxel axes so that the third axis is axial whatever
    the scanner's storage order; scaling (``scl_slope``) is applied by ``get_fdata``.

    Raises:
        DataError: if the file is unreadable, truncated or corrupt, is not 3D (a trailing singleton
            axis is dropped), or contains NaN/Inf voxels.
    """
    path = Path(path)
    try:
        img = nib.as_closest_canonical(nib.load(str(path)))
        volume = np.asarray(img.get_fdata(dtype=np.float32))  # forces the (lazy) read: truncation fails here
    except (EOFError, zlib.error, OSError, ValueError, ImageFileError) as exc:
        raise DataError(f"cannot read NIfTI file {path}: {type(exc).__name__}: {exc}. The file is truncated or "
                        "corrupt; copy or export it again (check its size against the source).") from exc
    while volume.ndim > 3 and volume.shape[-1] == 1:
        volume = volume[..., 0]  # (X, Y, Z, 1) -> (X, Y, Z): some tools write a singleton time axis
    if volume.ndim != 3:
        raise DataError(f"NIfTI file {path} has shape {volume.shape}; expected a 3D volume (X, Y, Z). "
                        "Split 4D series into one volume per file.")
    if not np.all(np.isfinite(volume)):
        bad = int(np.size(volume) - np.count_nonzero(np.isfinite(volume)))
        raise DataError(f"NIfTI file {path} contains {bad} NaN/Inf voxels; nibabel loads them silently. "
                        "Fix the volume (e.g. replace NaN by 0 where outside the head) or remove the file.")
    return volume


def _find_sequence_files(subject_dir: Path, modalities: tuple[str, ...]) -> dict[str, Path]:
    """Map each modality to its file in ``subject_dir`` (``t1.nii.gz`` or ``*_t1.nii[.gz]``), if any."""
    found: dict[str, Path] = {}
    for path in sorted(subject_dir.iterdir()):
        name = path.name.lower()
        suffix = next((s for s in _NIFTI_SUFFIXES if name.endswith(s)), None)
        if suffix is None or not path.is_file():
            continue
        stem = name[: -len(suffix)]
        for modality in modalities:
            key = modality.lower()
            if stem == key or stem.endswith("_" + key):  # '_t1' does not match '_t1ce', which is wanted
                if modality in found:
                    raise DataError(f"subject folder {subject_dir} has two {modality} files: "
                                    f"{found[modality].name} and {path.name}; keep one.")
                found[modality] = path
    return found


def _slice_indices(depth: int, slice_index: int | str | None, slices_per_subject: int, where: str) -> list[int]:
    """The ``slices_per_subject`` consecutive axial indices centred on ``slice_index`` (default: middle)."""
    if slice_index is None or slice_index == "middle":
        centre = depth // 2
    elif isinstance(slice_index, int) and not isinstance(slice_index, bool):
        centre = slice_index
    else:
        raise DataError(f"slice_index={slice_index!r} must be None, 'middle' or an integer axial index.")
    first = centre - slices_per_subject // 2
    indices = list(range(first, first + slices_per_subject))
    if indices[0] < 0 or indices[-1] >= depth:
        raise DataError(f"{where}: axial slices {indices[0]}..{indices[-1]} fall outside the volume's "
                        f"{depth} slices; choose slice_index/slices_per_subject within 0..{depth - 1}.")
    return indices


def _load_subject(subject: str, files: dict[str, Path], modalities: tuple[str, ...], image_size: int,
                  slice_index: int | str | None, slices_per_subject: int) -> tuple[np.ndarray, np.ndarray, list[int]]:
    """One subject's (K, M, S, S) slices, (M,) presence mask and the K axial indices taken."""
    volumes = {name: load_nifti_volume(path) for name, path in files.items()}
    shapes = {name: v.shape for name, v in volumes.items()}
    if len(set(shapes.values())) > 1:
        raise DataError(f"subject {subject!r} has sequences of different shapes {shapes}; they must be "
                        "co-registered on one voxel grid (resample them, e.g. with ANTs or FSL flirt).")
    depth = next(iter(shapes.values()))[2]
    indices = _slice_indices(depth, slice_index, slices_per_subject, where=f"subject {subject!r}")
    out = np.zeros((slices_per_subject, len(modalities), image_size, image_size), dtype=np.float32)
    mask = np.array([name in volumes for name in modalities])
    for m, name in enumerate(modalities):
        if name not in volumes:
            continue  # missing sequence: zeros, mask False
        # Normalise the whole volume (per subject and sequence) so that its K slices share one scale.
        volume = normalise_intensity(volumes[name])
        # rot90 turns RAS (x, y) into a display slice with anterior at the top (radiology viewers' habit).
        slices = np.stack([np.rot90(volume[:, :, z]) for z in indices])  # (K, Y, X)
        out[:, m] = resize_images(slices, image_size)
    return out, mask, indices


def load_nifti_subjects(root: str | Path, labels_csv: str | Path, *, image_size: int = 64,
                        modalities: Sequence[str] = MODALITIES, class_names: Sequence[str] | None = None,
                        slice_index: int | str | None = None, slices_per_subject: int = 1,
                        site: int = 0, require_all: bool = False) -> Cohort:
    """Load BraTS-like ``root/<subject>/<modality>.nii.gz`` volumes as axial 2D slices in a :class:`Cohort`.

    Steps:
        1. Read ``labels_csv`` (``subject,label`` plus optional ``site`` and clinical columns).
        2. For each subject row, find its sequence files, read them in full (see
           :func:`load_nifti_volume`), and check they share one shape.
        3. Normalise each volume with :func:`normalise_intensity`, take ``slices_per_subject``
           axial slices centred on ``slice_index`` (middle by default), pad to square and resize to
           ``image_size`` (bilinear with antialiasing).

    With ``slices_per_subject`` K > 1 each slice is its own row with subject id ``"<subject>:z<index>"``;
    ``cohort.meta["groups"]`` holds the plain subject id per row. Split by those groups, never by row,
    or slices of one patient leak between train and test.

    Args:
        root: folder holding one sub-folder per subject.
        labels_csv: per-subject table with columns ``subject`` and ``label`` (class names).
        image_size: output side length H = W.
        modalities: sequence names, matched case-insensitively to file names; order kept.
        class_names: fixed class list (label = index); None uses the sorted labels of the table.
        slice_index: None or ``"middle"`` for the middle axial slice, or an axial index.
        slices_per_subject: number K of consecutive slices per subject.
        site: site id for subjects without a ``site`` value in the table.
        require_all: raise instead of masking when a subject lacks a sequence.

    Raises:
        DataError: naming the file or subject on unreadable/truncated volumes, NaN voxels,
            mismatched shapes, unknown labels, a subject row without a folder or without any
            sequence, or (with ``require_all``) a missing sequence.
    """
    root, labels_csv = Path(root), Path(labels_csv)
    check_image_size(image_size)
    modalities = canonical_modalities(modalities)
    if not isinstance(slices_per_subject, int) or slices_per_subject < 1:
        raise DataError(f"slices_per_subject={slices_per_subject!r} must be a positive integer.")
    if not root.is_dir():
        raise DataError(f"NIfTI root {root} does not exist or is not a folder; pass root/<subject>/<modality>.nii.gz.")
    table = read_subject_table(labels_csv, required=("subject", "label"))
    if not table:
        raise DataError(f"labels table {labels_csv} has no rows; add one row per subject.")
    unlabelled = [s for s, row in table.items() if not row["label"]]
    if unlabelled:
        raise DataError(f"labels table {labels_csv} has an empty 'label' for subject(s) {unlabelled[:5]}; "
                        "fill the label or delete the row.")
    class_names = resolve_class_names((row["label"] for row in table.values()), class_names,
                                      where=f"column 'label' of {labels_csv}")
    subjects = sorted(table)

    rows, masks, groups, row_ids = [], [], [], []
    for subject in subjects:
        files = _subject_files(root, subject, modalities, require_all)
        slices, mask, indices = _load_subject(subject, files, modalities, image_size, slice_index,
                                              slices_per_subject)
        rows.append(slices)
        masks.extend([mask] * slices_per_subject)
        groups.extend([subject] * slices_per_subject)
        row_ids.extend([subject] if slices_per_subject == 1 else [f"{subject}:z{z}" for z in indices])

    clinical, clinical_mask = clinical_from_table(subjects, table, labels_csv)
    sites = sites_from_table(subjects, table, labels_csv, site)
    labels = np.array([class_names.index(table[s]["label"]) for s in subjects], dtype=np.int64)
    repeat = slices_per_subject  # per-subject values repeat for each of its slices
    on_disk = {p.name for p in root.iterdir() if p.is_dir()}
    return Cohort(
        images=np.concatenate(rows), modality_mask=np.stack(masks),
        clinical=np.repeat(clinical, repeat, axis=0), clinical_mask=np.repeat(clinical_mask, repeat, axis=0),
        labels=np.repeat(labels, repeat), sites=np.repeat(sites, repeat), subject_ids=np.array(row_ids, dtype=str),
        modality_names=modalities, class_names=class_names, clinical_names=CLINICAL_FEATURES,
        meta={"source": "nifti_subjects", "root": str(root), "groups": np.array(groups, dtype=str),
              "unlabelled_subjects": sorted(on_disk - set(subjects))},
    )


def _subject_files(root: Path, subject: str, modalities: tuple[str, ...], require_all: bool) -> dict[str, Path]:
    """The subject's sequence files, checking the folder exists and (optionally) holds every sequence."""
    subject_dir = root / subject
    if not subject_dir.is_dir():
        raise DataError(f"subject {subject!r} is listed in the labels table but folder {subject_dir} does not "
                        "exist; add the folder or delete the row.")
    files = _find_sequence_files(subject_dir, modalities)
    missing = [m for m in modalities if m not in files]
    if not files or (require_all and missing):
        raise DataError(f"subject folder {subject_dir} lacks sequence(s) {missing}; expected files like "
                        f"{modalities[0].lower()}.nii.gz or {subject}_{modalities[0].lower()}.nii.gz"
                        + (" (require_all=True)." if files else "."))
    return files
