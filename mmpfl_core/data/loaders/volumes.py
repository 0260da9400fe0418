"""3D volumes a user brings, one folder per subject, reduced to 2D axial slices in a :class:`Cohort`.

What it is for: the part of the NIfTI and DICOM loaders that does not depend on the file format.
A format module supplies two functions, ``find(subject_dir, modalities) -> {modality: path}`` and
``read(path) -> nibabel image`` (data in RAS+ orientation, see below), and this module does the rest:

1. read the labels table (``subject,label`` plus optional site and clinical columns);
2. per subject, read every sequence, and check that all sit on ONE voxel grid (same shape, same
   affine to 0.01 mm). Sequences on different grids are refused with a message naming both grids,
   or, with ``resample=True``, resampled onto the grid of the first sequence present
   (``nibabel.processing.resample_from_to``, trilinear; voxels outside the source become 0);
3. normalise each volume per subject and sequence (:func:`normalise_intensity`), take K axial
   slices, pad to square and resize.

Orientation: every reader returns the volume reoriented with ``nibabel.as_closest_canonical``, so
the third axis runs inferior -> superior whatever the storage order, and an axial slice is
``volume[:, :, z]``. We keep nibabel (already a dependency) instead of MONAI's ``LoadImage`` +
``Orientation`` + ``ScaleIntensityRangePercentiles`` + ``Resize``. Measured with
``bench/volume_loading.py`` (MONAI 1.6.1, nibabel's ``anatomical.nii``, 2 shared CPU cores under
load): MONAI's import took 27-36 s and its pipeline 1.9-2.1x our time per volume (24 vs 12 ms); it
calls the same nibabel reader underneath and adds a 1.7 MB wheel, 16 MB installed. Its ``Resize``
also lacks the antialiased, range-preserving resize of :func:`resize_images`.

What it must never do: guess. Unreadable files, NaN voxels, 4D volumes, mismatched grids, unknown
labels, a labels row without a folder, and a named site column absent from the table are each a
:class:`~mmpfl_core.errors.DataError` naming the file or subject and the fix.
"""

from __future__ import annotations

from pathlib import Path
from collections.abc import Callable, Sequence

import nibabel as nib
import numpy as np

from ...errors import DataError
from ..contract import CLINICAL_FEATURES, Cohort, normalise_intensity
from .common import (
    canonical_modalities,
    check_image_size,
    clinical_from_table,
    read_subject_table,
    resize_images,
    resolve_class_names,
    sites_from_table,
)

FindFiles = Callable[[Path, tuple[str, ...]], dict[str, Path]]
ReadImage = Callable[[Path], nib.Nifti1Image]

#: Two sequences share a grid when their affines agree to this many millimetres.
AFFINE_TOLERANCE_MM = 1e-2


def one_line(exc: BaseException) -> str:
    """A library's exception text on one line (nibabel's messages span several), for a one-line error."""
    return " ".join(str(exc).split())


def same_grid(a: nib.Nifti1Image, b: nib.Nifti1Image) -> bool:
    """True when ``a`` and ``b`` have the same shape and affine (to :data:`AFFINE_TOLERANCE_MM`)."""
    return a.shape == b.shape and bool(np.allclose(a.affine, b.affine, atol=AFFINE_TOLERANCE_MM))


def _grid_text(img: nib.Nifti1Image) -> str:
    zooms = tuple(round(float(z), 3) for z in img.header.get_zooms()[:3])
    origin = tuple(round(float(v), 2) for v in img.affine[:3, 3])
    return f"shape {tuple(img.shape)}, voxel {zooms} mm, origin {origin}, axes {''.join(nib.aff2axcodes(img.affine))}"


def align_sequences(
    subject: str, images: dict[str, nib.Nifti1Image], files: dict[str, Path], resample: bool
) -> dict[str, np.ndarray]:
    """The subject's volumes on one grid (the first sequence's), as float32 arrays.

    Raises:
        DataError: if the grids differ and ``resample`` is False (the message names both grids).
    """
    names = list(images)
    reference = images[names[0]]
    out = {names[0]: np.asarray(reference.dataobj, dtype=np.float32)}
    for name in names[1:]:
        img = images[name]
        if same_grid(img, reference):
            out[name] = np.asarray(img.dataobj, dtype=np.float32)
            continue
        if not resample:
            kind = "different shapes" if img.shape != reference.shape else "different affines (position or voxel size)"
            raise DataError(
                f"subject {subject!r} has sequences on {kind}: {names[0]} ({files[names[0]].name}) {_grid_text(reference)}; "
                f"{name} ({files[name].name}) {_grid_text(img)}. Co-register them (e.g. ANTs, FSL flirt), or pass "
                f"resample=True (--resample) to resample every sequence onto the {names[0]} grid."
            )
        from nibabel.processing import resample_from_to  # needs scipy; imported only when used

        moved = resample_from_to(img, reference, order=1, mode="constant", cval=0.0)
        out[name] = np.asarray(moved.dataobj, dtype=np.float32)
    return out


def slice_indices(depth: int, slice_index: int | str | None, slices_per_subject: int, where: str) -> list[int]:
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
        raise DataError(
            f"{where}: axial slices {indices[0]}..{indices[-1]} fall outside the volume's "
            f"{depth} slices; choose slice_index/slices_per_subject within 0..{depth - 1}."
        )
    return indices


def _subject_slices(
    subject: str,
    volumes: dict[str, np.ndarray],
    modalities: tuple[str, ...],
    image_size: int,
    slice_index: int | str | None,
    slices_per_subject: int,
) -> tuple[np.ndarray, np.ndarray, list[int]]:
    """One subject's (K, M, S, S) slices, (M,) presence mask and the K axial indices taken."""
    depth = next(iter(volumes.values())).shape[2]
    indices = slice_indices(depth, slice_index, slices_per_subject, where=f"subject {subject!r}")
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


def _check_site_column(table: dict[str, dict[str, str]], labels_csv: Path, site_column: str | None) -> str | None:
    """The column holding site ids: ``site_column`` if named (must exist), else ``site`` if present."""
    header = set(next(iter(table.values()))) if table else set()
    if site_column is None:
        return "site" if "site" in header else None
    if site_column.strip().lower() not in header:
        raise DataError(
            f"site column {site_column!r} is not in {labels_csv}; its columns are {sorted(header)}. "
            "Name an existing column (integer site ids, -1 for public subjects) or omit the option."
        )
    return site_column.strip().lower()


def load_volume_subjects(
    root: str | Path,
    labels_csv: str | Path,
    *,
    find: FindFiles,
    read: ReadImage,
    source: str,
    image_size: int,
    modalities: Sequence[str],
    class_names: Sequence[str] | None,
    slice_index: int | str | None,
    slices_per_subject: int,
    site: int,
    require_all: bool,
    resample: bool,
    site_column: str | None,
    example: str,
) -> Cohort:
    """The shared pipeline of the module docstring; see :func:`load_nifti_subjects` for the arguments.

    ``example`` is a file name shown when a subject folder holds no sequence (``t1.nii.gz``).
    """
    root, labels_csv = Path(root), Path(labels_csv)
    check_image_size(image_size)
    modalities = canonical_modalities(modalities)
    if not isinstance(slices_per_subject, int) or slices_per_subject < 1:
        raise DataError(f"slices_per_subject={slices_per_subject!r} must be a positive integer.")
    if not root.is_dir():
        raise DataError(
            f"{source} root {root} does not exist or is not a folder; pass the folder that holds "
            "one sub-folder per subject."
        )
    table = read_subject_table(labels_csv, required=("subject", "label"))
    if not table:
        raise DataError(f"labels table {labels_csv} has no rows; add one row per subject.")
    column = _check_site_column(table, labels_csv, site_column)
    if column not in (None, "site"):
        table = {s: {**row, "site": row[column]} for s, row in table.items()}
    unlabelled = [s for s, row in table.items() if not row["label"]]
    if unlabelled:
        raise DataError(
            f"labels table {labels_csv} has an empty 'label' for subject(s) {unlabelled[:5]}; "
            "fill the label or delete the row."
        )
    class_names = resolve_class_names(
        (row["label"] for row in table.values()), class_names, where=f"column 'label' of {labels_csv}"
    )
    subjects = sorted(table)

    rows, masks, groups, row_ids = [], [], [], []
    for subject in subjects:
        files = subject_files(root, subject, modalities, require_all, find, example)
        images = {name: read(files[name]) for name in modalities if name in files}
        volumes = align_sequences(subject, images, files, resample)
        slices, mask, indices = _subject_slices(
            subject, volumes, modalities, image_size, slice_index, slices_per_subject
        )
        rows.append(slices)
        masks.extend([mask] * slices_per_subject)
        groups.extend([subject] * slices_per_subject)
        row_ids.extend([subject] if slices_per_subject == 1 else [f"{subject}:z{z}" for z in indices])

    clinical, clinical_mask = clinical_from_table(subjects, table, labels_csv)
    sites = sites_from_table(subjects, table if column else None, labels_csv, site)
    labels = np.array([class_names.index(table[s]["label"]) for s in subjects], dtype=np.int64)
    repeat = slices_per_subject  # per-subject values repeat for each of its slices
    on_disk = {p.name for p in root.iterdir() if p.is_dir()}
    return Cohort(
        images=np.concatenate(rows),
        modality_mask=np.stack(masks),
        clinical=np.repeat(clinical, repeat, axis=0),
        clinical_mask=np.repeat(clinical_mask, repeat, axis=0),
        labels=np.repeat(labels, repeat),
        sites=np.repeat(sites, repeat),
        subject_ids=np.array(row_ids, dtype=str),
        modality_names=modalities,
        class_names=class_names,
        clinical_names=CLINICAL_FEATURES,
        # groups: the patient of each row (a plain list: the meta dict is written as JSON).
        meta={
            "source": source,
            "root": str(root),
            "groups": groups,
            "resampled": bool(resample),
            "unlabelled_subjects": sorted(on_disk - set(subjects)),
        },
    )


def subject_files(
    root: Path, subject: str, modalities: tuple[str, ...], require_all: bool, find: FindFiles, example: str
) -> dict[str, Path]:
    """The subject's sequence files, checking the folder exists and (optionally) holds every sequence."""
    subject_dir = root / subject
    if not subject_dir.is_dir():
        raise DataError(
            f"subject {subject!r} is listed in the labels table but folder {subject_dir} does not "
            "exist; add the folder or delete the row."
        )
    files = find(subject_dir, modalities)
    missing = [m for m in modalities if m not in files]
    if not files or (require_all and missing):
        raise DataError(
            f"subject folder {subject_dir} lacks sequence(s) {missing}; expected entries like "
            f"{example.format(m=modalities[0].lower(), s=subject)}" + (" (require_all=True)." if files else ".")
        )
    return files


def assign_sequence(
    found: dict[str, Path], modalities: Sequence[str], stem: str, path: Path, subject_dir: Path, kind: str
) -> None:
    """Record ``path`` under the modality its lower-cased ``stem`` names (``t1`` or ``*_t1``; ``_t1`` does not
    match ``_t1ce``), refusing a second file or folder for the same modality (``kind`` names which)."""
    for modality in modalities:
        key = modality.lower()
        if stem == key or stem.endswith("_" + key):
            if modality in found:
                raise DataError(
                    f"subject folder {subject_dir} has two {modality} {kind}: "
                    f"{found[modality].name} and {path.name}; keep one."
                )
            found[modality] = path
