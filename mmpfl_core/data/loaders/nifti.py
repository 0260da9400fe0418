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
are read, and NaN voxels load silently (see docs/FACTS.md). This loader therefore reads every volume in
full at load time, inside one try/except, and checks for NaN, so that the error names the file.
"""

from __future__ import annotations

import zlib
from pathlib import Path
from collections.abc import Sequence

import nibabel as nib
import numpy as np
from nibabel.filebasedimages import ImageFileError

from ...errors import DataError
from ..contract import MODALITIES, Cohort
from .volumes import assign_sequence, load_volume_subjects, one_line

_NIFTI_SUFFIXES: tuple[str, ...] = (".nii.gz", ".nii")


def load_nifti_image(path: str | Path) -> nib.Nifti1Image:
    """Read a NIfTI file in full, reoriented to RAS+ (third axis inferior -> superior), as float32.

    ``nib.as_closest_canonical`` reorders the voxel axes so that the third axis is axial whatever
    the scanner's storage order; scaling (``scl_slope``) is applied by ``get_fdata``. The returned
    image holds the data in memory (no lazy proxy) and the matching affine.

    Raises:
        DataError: if the file is unreadable, truncated or corrupt, is not 3D (a trailing singleton
            axis is dropped), or contains NaN/Inf voxels.
    """
    path = Path(path)
    try:
        img = nib.as_closest_canonical(nib.load(str(path)))
        volume = np.asarray(img.get_fdata(dtype=np.float32))  # forces the (lazy) read: truncation fails here
    except (EOFError, zlib.error, OSError, ValueError, ImageFileError) as exc:
        raise DataError(
            f"cannot read NIfTI file {path}: {type(exc).__name__}: {one_line(exc)}. The file is truncated or "
            "corrupt; copy or export it again (check its size against the source)."
        ) from exc
    while volume.ndim > 3 and volume.shape[-1] == 1:
        volume = volume[..., 0]  # (X, Y, Z, 1) -> (X, Y, Z): some tools write a singleton time axis
    if volume.ndim != 3:
        raise DataError(
            f"NIfTI file {path} has shape {volume.shape}; expected a 3D volume (X, Y, Z). "
            "Split 4D series into one volume per file (e.g. fslsplit) and keep one."
        )
    if not np.all(np.isfinite(volume)):
        bad = int(np.size(volume) - np.count_nonzero(np.isfinite(volume)))
        raise DataError(
            f"NIfTI file {path} contains {bad} NaN/Inf voxels; nibabel loads them silently. "
            "Fix the volume (e.g. replace NaN by 0 where outside the head) or remove the file."
        )
    return nib.Nifti1Image(volume, img.affine)


def load_nifti_volume(path: str | Path) -> np.ndarray:
    """:func:`load_nifti_image`'s voxels: a float32 (X, Y, Z) array in RAS+ orientation."""
    return np.asarray(load_nifti_image(path).dataobj, dtype=np.float32)


def _find_sequence_files(subject_dir: Path, modalities: tuple[str, ...]) -> dict[str, Path]:
    """Map each modality to its file in ``subject_dir`` (``t1.nii.gz`` or ``*_t1.nii[.gz]``), if any."""
    found: dict[str, Path] = {}
    for path in sorted(subject_dir.iterdir()):
        name = path.name.lower()
        suffix = next((s for s in _NIFTI_SUFFIXES if name.endswith(s)), None)
        if suffix is None or not path.is_file():
            continue
        assign_sequence(found, modalities, name[: -len(suffix)], path, subject_dir, "files")
    return found


def load_nifti_subjects(
    root: str | Path,
    labels_csv: str | Path,
    *,
    image_size: int = 64,
    modalities: Sequence[str] = MODALITIES,
    class_names: Sequence[str] | None = None,
    slice_index: int | str | None = None,
    slices_per_subject: int = 1,
    site: int = 0,
    require_all: bool = False,
    resample: bool = False,
    site_column: str | None = None,
) -> Cohort:
    """Load BraTS-like ``root/<subject>/<modality>.nii.gz`` volumes as axial 2D slices in a :class:`Cohort`.

    Steps:
        1. Read ``labels_csv`` (``subject,label`` plus optional ``site`` and clinical columns).
        2. For each subject row, find its sequence files, read them in full (see
           :func:`load_nifti_image`), and check they share one voxel grid (shape and affine); with
           ``resample`` the other sequences are resampled onto the first one's grid instead.
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
        resample: resample sequences on another grid onto the first sequence's grid (trilinear)
            instead of refusing them.
        site_column: the table column holding integer site ids (-1 = public); None uses ``site``
            when the table has it. A named column absent from the table is an error.

    Raises:
        DataError: naming the file or subject on unreadable/truncated volumes, NaN voxels,
            4D volumes, mismatched shapes or affines (without ``resample``), an unknown site column, unknown labels, a subject row without a folder or without any
            sequence, or (with ``require_all``) a missing sequence.
    """
    return load_volume_subjects(
        root,
        labels_csv,
        find=_find_sequence_files,
        read=load_nifti_image,
        source="nifti_subjects",
        image_size=image_size,
        modalities=modalities,
        class_names=class_names,
        slice_index=slice_index,
        slices_per_subject=slices_per_subject,
        site=site,
        require_all=require_all,
        resample=resample,
        site_column=site_column,
        example="{m}.nii.gz or {s}_{m}.nii.gz",
    )
