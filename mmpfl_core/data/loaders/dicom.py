"""Loader for DICOM MRI series a user brings (one folder per sequence), reduced to 2D axial slices.

Layout read (folder names matched case-insensitively, like the NIfTI loader's file names)::

    root/
    ├── p001/
    │   ├── t1/                # <modality>/ or <anything>_<modality>/ : ONE series per folder
    │   │   ├── IM0001.dcm     # any file names; non-DICOM files (DICOMDIR, .txt) are skipped
    │   │   └── IM0002.dcm
    │   └── flair/
    │       └── ...            # a single multi-frame file is read as a whole volume
    └── p002/
        └── p002_t2/ ...       # no T1/FLAIR here: zeros + modality_mask False

    labels.csv                 # subject,label[,site][,age,sex_female,edss,symptom_score], as for NIfTI

Why pydicom: it is pure Python (a 2.4 MB wheel; 15 MB installed, most of it test files), reads
every transfer syntax we need natively (uncompressed, deflate, RLE), and gives the header fields
the geometry needs. SimpleITK would also sort a series but is a 53 MB compiled wheel
(``pip download simpleitk`` 2.5.7, measured) for that one job; highdicom builds on pydicom to *write*
segmentations and structured reports, which we do not need. JPEG-compressed series need the
optional ``pylibjpeg`` plugins; without them the error says so.

Geometry (DICOM PS3.3 C.7.6.2): ``ImageOrientationPatient`` gives the row and column direction
cosines r and c, ``PixelSpacing`` = (row spacing, column spacing), ``ImagePositionPatient`` the
centre of the first voxel of each slice, all in the patient's LPS frame. Slices are sorted by their
position along the normal n = r x c; the slice step is the spacing of those positions (all steps
must agree to 1%, else a slice is missing). The voxel-to-RAS affine is then
``diag(-1, -1, 1) @ [r * dx, c * dy, n * dz, IPP_0]`` and the volume goes through the same
``as_closest_canonical`` as NIfTI, so a sagittal or coronal acquisition is reformatted to axial
order and the rest of the pipeline (:mod:`volumes`) is shared.

pydicom reads a truncated file without complaint and fails only at ``pixel_array`` (docs/FACTS.md), so
every slice's pixels are decoded here, inside one try/except, and the error names the file.
"""

from __future__ import annotations

from pathlib import Path
from collections.abc import Sequence

import nibabel as nib
import numpy as np

from ...errors import DataError
from ..contract import MODALITIES, Cohort
from .volumes import assign_sequence, load_volume_subjects, one_line

#: Relative tolerance on the spacing between consecutive slices.
_SLICE_STEP_TOLERANCE = 0.01


def _read_headers(folder: Path) -> list:
    """Every DICOM dataset in ``folder`` (pixels not yet decoded), skipping non-DICOM files."""
    import pydicom
    from pydicom.errors import InvalidDicomError

    datasets = []
    for path in sorted(p for p in folder.iterdir() if p.is_file()):
        if path.name.upper() == "DICOMDIR":
            continue  # the media index, not an image
        try:
            ds = pydicom.dcmread(path)
        except InvalidDicomError:
            continue  # not a DICOM file (no preamble / 'DICM' magic): notes, thumbnails
        except Exception as exc:  # pydicom raises many types on damaged headers
            raise DataError(
                f"cannot read DICOM file {path}: {type(exc).__name__}: {one_line(exc)}. The file is damaged; "
                "export the series again."
            ) from exc
        if "PixelData" not in ds:
            continue  # structured reports, presentation states
        ds.filename = str(path)
        datasets.append(ds)
    if not datasets:
        raise DataError(f"DICOM folder {folder} holds no image files; put one series' .dcm files in it.")
    series = {str(ds.get("SeriesInstanceUID", "")) for ds in datasets}
    if len(series) > 1:
        raise DataError(
            f"DICOM folder {folder} mixes {len(series)} series ({sorted(series)[:3]}...); keep one "
            "series (one sequence) per folder."
        )
    return datasets


def _pixels(ds) -> np.ndarray:
    """The slice(s) of one dataset as float32 (F, rows, cols) with the modality LUT (rescale) applied."""
    from pydicom.pixels import apply_rescale

    path = ds.filename
    try:
        array = ds.pixel_array  # decodes now: a truncated file fails here
    except Exception as exc:
        raise DataError(
            f"cannot decode the pixels of DICOM file {path}: {type(exc).__name__}: {one_line(exc)}. The file is "
            "truncated or uses a compression without a decoder (install pylibjpeg for JPEG); "
            "export the series again, uncompressed."
        ) from exc
    frames = int(ds.get("NumberOfFrames", 1) or 1)
    if int(ds.get("SamplesPerPixel", 1)) != 1:
        raise DataError(
            f"DICOM file {path} holds colour images (SamplesPerPixel={ds.SamplesPerPixel}); "
            "MRI sequences are greyscale: export the magnitude series."
        )
    array = array.reshape(frames, *array.shape[-2:]) if array.ndim == 3 or frames > 1 else array[None]
    if array.ndim != 3:
        raise DataError(f"DICOM file {path} has pixel array shape {array.shape}; expected 2D slices.")
    volume = np.asarray(apply_rescale(array, ds), dtype=np.float32)
    if not np.all(np.isfinite(volume)):
        raise DataError(f"DICOM file {path} decodes to NaN/Inf values; export the series again.")
    return volume


def _geometry(ds, where: Path) -> tuple[np.ndarray, np.ndarray, np.ndarray, tuple[float, float]]:
    """Row cosine r, column cosine c, slice normal n (LPS) and (row, column) pixel spacing of ``ds``."""
    try:
        iop = np.asarray([float(v) for v in ds.ImageOrientationPatient], dtype=np.float64)
        spacing = tuple(float(v) for v in ds.PixelSpacing)
        np.asarray([float(v) for v in ds.ImagePositionPatient])
    except (AttributeError, TypeError, ValueError) as exc:
        raise DataError(
            f"DICOM series in {where} lacks the geometry fields ImageOrientationPatient, "
            f"ImagePositionPatient or PixelSpacing ({one_line(exc)}); it cannot be placed in 3D. "
            "Export it as an MR image series (not a secondary capture), or convert it to NIfTI "
            "with dcm2niix."
        ) from None
    r, c = iop[:3], iop[3:]
    return r, c, np.cross(r, c), (spacing[0], spacing[1])


def read_dicom_series(folder: str | Path) -> nib.Nifti1Image:
    """Read the one DICOM series in ``folder`` as a float32 volume in RAS+ orientation with its affine.

    Steps: read every header; check one series; sort slices by position along the slice normal;
    check equal steps (a gap means a missing slice); decode every slice's pixels with the rescale
    slope/intercept applied; build the affine (module docstring) and reorient with
    ``nib.as_closest_canonical``.

    Raises:
        DataError: naming the folder or file on a folder with no or several series, damaged or
            truncated files, colour or 4D data, missing geometry, differing slice sizes or orientations,
            duplicated or missing slices.
    """
    folder = Path(folder)
    datasets = _read_headers(folder)
    r, c, n, spacing = _geometry(datasets[0], folder)
    if len(datasets) > 1 and any(int(ds.get("NumberOfFrames", 1) or 1) > 1 for ds in datasets):
        raise DataError(
            f"DICOM folder {folder} holds several multi-frame files: a 4D series (e.g. diffusion or "
            "dynamic). Keep one 3D volume per folder."
        )
    for ds in datasets[1:]:
        r2, c2, _, spacing2 = _geometry(ds, folder)
        if not (np.allclose(r, r2, atol=1e-4) and np.allclose(c, c2, atol=1e-4) and np.allclose(spacing, spacing2)):
            raise DataError(
                f"DICOM file {ds.filename} has another orientation or pixel spacing than the rest of "
                f"{folder}; a series must be one stack of parallel slices."
            )
        if (ds.Rows, ds.Columns) != (datasets[0].Rows, datasets[0].Columns):
            raise DataError(
                f"DICOM file {ds.filename} is {ds.Rows}x{ds.Columns} pixels but "
                f"{datasets[0].filename} is {datasets[0].Rows}x{datasets[0].Columns}; a series must "
                "have one slice size."
            )
    positions = np.array([[float(v) for v in ds.ImagePositionPatient] for ds in datasets])  # (S, 3) LPS mm
    along = positions @ n  # (S,) position of each slice along the normal
    order = np.argsort(along, kind="stable")
    datasets, along, positions = [datasets[i] for i in order], along[order], positions[order]
    volume = np.concatenate([_pixels(ds) for ds in datasets])  # (Z, rows, cols)
    if len(datasets) > 1:
        steps = np.diff(along)
        if np.any(steps < 1e-3):
            dup = datasets[int(np.argmin(steps)) + 1].filename
            raise DataError(
                f"DICOM folder {folder} has two slices at the same position ({dup}); it holds two "
                "acquisitions or duplicated files: keep one series per folder."
            )
        if np.ptp(steps) > _SLICE_STEP_TOLERANCE * np.median(steps):
            raise DataError(
                f"DICOM folder {folder} has uneven slice steps {np.round(steps, 2).tolist()} mm: a "
                "slice is missing. Export the complete series."
            )
        dz = float(np.median(steps))
    else:  # one slice or one multi-frame file
        dz = float(datasets[0].get("SpacingBetweenSlices", 0) or datasets[0].get("SliceThickness", 1) or 1)
    # Voxel (i = column, j = row, k = slice) -> LPS; pixel_array is indexed [row, column].
    affine = np.eye(4)
    affine[:3, 0] = r * spacing[1]  # along a row: column index i, column spacing
    affine[:3, 1] = c * spacing[0]  # down a column: row index j, row spacing
    affine[:3, 2] = n * dz
    affine[:3, 3] = positions[0]
    affine = np.diag([-1.0, -1.0, 1.0, 1.0]) @ affine  # LPS -> RAS
    data = np.ascontiguousarray(volume.transpose(2, 1, 0))  # (Z, rows, cols) -> (cols, rows, Z) = (i, j, k)
    return nib.as_closest_canonical(nib.Nifti1Image(data, affine))


def load_dicom_volume(folder: str | Path) -> np.ndarray:
    """:func:`read_dicom_series`'s voxels: a float32 (X, Y, Z) array in RAS+ orientation."""
    return np.asarray(read_dicom_series(folder).dataobj, dtype=np.float32)


def _find_series_folders(subject_dir: Path, modalities: tuple[str, ...]) -> dict[str, Path]:
    """Map each modality to its series folder in ``subject_dir`` (``t1/`` or ``*_t1/``), if any."""
    found: dict[str, Path] = {}
    for path in sorted(p for p in subject_dir.iterdir() if p.is_dir()):
        assign_sequence(found, modalities, path.name.lower(), path, subject_dir, "series folders")
    return found


def load_dicom_subjects(
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
    """Load ``root/<subject>/<modality>/*.dcm`` series as axial 2D slices in a :class:`Cohort`.

    The arguments, the labels table and the cohort are exactly those of
    :func:`~mmpfl_core.data.nifti.load_nifti_subjects`; only the reader differs
    (:func:`read_dicom_series`). ``cohort.meta["source"]`` is ``"dicom_subjects"``.
    """
    return load_volume_subjects(
        root,
        labels_csv,
        find=_find_series_folders,
        read=read_dicom_series,
        source="dicom_subjects",
        image_size=image_size,
        modalities=modalities,
        class_names=class_names,
        slice_index=slice_index,
        slices_per_subject=slices_per_subject,
        site=site,
        require_all=require_all,
        resample=resample,
        site_column=site_column,
        example="{m}/ or {s}_{m}/ (a series folder)",
    )
