"""Loaders for 2D real data a user brings: slice images in class folders, and MedMNIST ``.npz`` files.

Both return a :class:`~mmpfl_core.data.contract.Cohort` (see the contract for units and ranges).
Nothing is downloaded here: the files must already be on disk.

Slice folders (the layout of public MS MRI slice collections)::

    root/
    ├── healthy/
    │   ├── p001_t1.png        # <subject>_<modality>.<ext>: grouped into one subject
    │   ├── p001_flair.png     # (p001 has no T2: zeros + modality_mask False)
    │   └── p002_t1.png
    └── ms/
        └── p003_t2.tif

    root/                      # or single-sequence files without a modality suffix;
    └── ms/img_0001.jpg        # then pass single_modality="FLAIR" to say which sequence they are

MedMNIST (``np.savez`` archives as distributed by MedMNIST)::

    pneumoniamnist.npz
    ├── train_images  (N, H, W) uint8  or (N, H, W, 3) RGB
    ├── train_labels  (N, 1)
    ├── val_images / val_labels
    └── test_images / test_labels

Every failure (corrupt or truncated image, unknown class, duplicated sequence, missing key) raises
:class:`~mmpfl_core.errors.DataError` naming the file and the fix; a loader never returns partial
data silently.
"""

from __future__ import annotations

import zipfile
from pathlib import Path
from collections.abc import Sequence

import numpy as np
from PIL import Image, UnidentifiedImageError

from ...errors import DataError
from ..contract import CLINICAL_FEATURES, MODALITIES, Cohort, normalise_intensity
from .common import (
    canonical_modalities,
    check_image_size,
    clinical_from_table,
    read_subject_table,
    resize_images,
    resolve_class_names,
    sites_from_table,
)

#: File extensions read as slice images (compared lower-cased).
IMAGE_SUFFIXES: tuple[str, ...] = (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp")

#: ITU-R BT.601 luma weights, the same PIL uses for mode "L"; RGB renders of grey scans are near-equal
#: in R, G and B, so this recovers the grey value.
_LUMA = np.array([0.299, 0.587, 0.114], dtype=np.float32)


def load_image_file(path: str | Path) -> np.ndarray:
    """Read one 2D image as a float32 (H, W) array of raw intensities (not yet normalised).

    PIL opens files lazily, so a truncated file would only fail later (or decode as a partly grey
    image); we force the decode with ``Image.load()`` here so that the error names this file.
    Colour images are converted to grey with BT.601 luma; 16-bit and float images keep their range.

    Raises:
        DataError: if the file is missing, unreadable, truncated or not an image.
    """
    path = Path(path)
    try:
        with Image.open(path) as img:
            img.load()  # force the decode now: PIL is lazy
            if img.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
                array = np.asarray(img, dtype=np.float32)
            else:
                array = np.asarray(img.convert("RGB"), dtype=np.float32) @ _LUMA  # (H, W, 3) -> (H, W)
    except (
        UnidentifiedImageError,
        OSError,
        ValueError,
        SyntaxError,
    ) as exc:  # PIL raises SyntaxError on some bad headers
        raise DataError(
            f"cannot read image {path}: {exc}. The file is corrupt, truncated or not an image; "
            "re-export the file or remove it."
        ) from exc
    if array.ndim != 2:
        raise DataError(
            f"image {path} decoded to shape {array.shape}; expected a 2D slice. "
            "Re-export it as a single-frame greyscale or RGB image."
        )
    return np.ascontiguousarray(array, dtype=np.float32)


def _split_modality(stem: str, modalities: Sequence[str]) -> tuple[str, str | None]:
    """``'p001_FLAIR'`` -> ``('p001', 'FLAIR')`` when the suffix names a requested modality, else ``(stem, None)``."""
    subject, sep, suffix = stem.rpartition("_")
    if sep and subject:
        for name in modalities:
            if suffix.lower() == name.lower():
                return subject, name
    return stem, None


def _scan_slice_folders(
    root: Path, modalities: tuple[str, ...], single_modality: str | None
) -> dict[str, tuple[str, dict[str, Path]]]:
    """Walk ``root/<class>/<file>`` into ``{subject: (class, {modality: path})}``, checking consistency."""
    subjects: dict[str, tuple[str, dict[str, Path]]] = {}
    for class_dir in sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")):
        for path in sorted(class_dir.iterdir()):
            if path.name.startswith(".") or path.suffix.lower() not in IMAGE_SUFFIXES:
                continue  # e.g. .DS_Store, Thumbs.db, README files next to the images
            subject, modality = _split_modality(path.stem, modalities)
            if modality is None:
                if single_modality is None:
                    raise DataError(
                        f"file {path} has no modality suffix among {list(modalities)} (expected names like "
                        f"'{path.stem}_{modalities[0].lower()}{path.suffix}'). Pass single_modality='<name>' if "
                        "every such file is one sequence, or rename the files <subject>_<modality>.<ext>."
                    )
                modality = single_modality
            label, files = subjects.setdefault(subject, (class_dir.name, {}))
            if label != class_dir.name:
                raise DataError(
                    f"subject {subject!r} appears in class folders {label!r} and {class_dir.name!r} "
                    f"(file {path}); a subject has one label. Rename or remove one of them."
                )
            if modality in files:
                raise DataError(
                    f"subject {subject!r} has two {modality} files: {files[modality]} and {path}; keep one."
                )
            files[modality] = path
    return subjects


def load_slice_folders(
    root: str | Path,
    *,
    image_size: int = 64,
    modalities: Sequence[str] = MODALITIES,
    class_names: Sequence[str] | None = None,
    single_modality: str | None = None,
    site: int = 0,
    clinical_csv: str | Path | None = None,
) -> Cohort:
    """Load 2D slices stored as ``root/<class>/<subject>_<modality>.<ext>`` into a :class:`Cohort`.

    Steps:
        1. Scan class folders (sorted); group files by subject using the ``_<modality>`` suffix
           (case-insensitive, among ``modalities``). Files without one are ``single_modality``.
        2. Read each file (forced decode), check that a subject's sequences share one shape, and
           normalise each sequence with :func:`normalise_intensity` (per subject and sequence).
        3. Zero-pad to square and resize to ``image_size`` (bilinear with antialiasing).
        4. Clinical values and sites come from ``clinical_csv`` if given (columns ``subject`` and any
           of ``age, sex_female, edss, symptom_score, site``); otherwise all missing and ``site``.

    Args:
        root: folder holding one sub-folder per class.
        image_size: output side length H = W.
        modalities: sequence names, the cohort's ``modality_names`` (order kept).
        class_names: fixed class list (label = index); None uses the sorted folder names.
        single_modality: which of ``modalities`` files without a modality suffix are.
        site: site id for subjects without a ``site`` value in the CSV.
        clinical_csv: optional per-subject CSV (see :mod:`common`).

    Returns:
        A cohort with one row per subject, ordered by class folder then subject id.

    Raises:
        DataError: on a missing root, unreadable image, unknown class folder, files without a
            modality suffix (and no ``single_modality``), duplicated sequences or mismatched shapes.
    """
    root = Path(root)
    check_image_size(image_size)
    modalities = canonical_modalities(modalities)
    if single_modality is not None and single_modality not in modalities:
        raise DataError(
            f"single_modality={single_modality!r} is not one of modalities={list(modalities)}; "
            "pick one of them or add it to modalities."
        )
    if not root.is_dir():
        raise DataError(f"slice folder root {root} does not exist or is not a folder; pass root/<class>/<files>.")
    subjects = _scan_slice_folders(root, modalities, single_modality)
    if not subjects:
        raise DataError(
            f"no image files ({', '.join(IMAGE_SUFFIXES)}) found under {root}/<class>/; "
            "check the path and the layout in this module's docstring."
        )
    class_names = resolve_class_names(
        (label for label, _ in subjects.values()), class_names, where=f"class folders of {root}"
    )
    order = sorted(subjects, key=lambda s: (class_names.index(subjects[s][0]), s))

    n, m = len(order), len(modalities)
    images = np.zeros((n, m, image_size, image_size), dtype=np.float32)
    present = np.zeros((n, m), dtype=bool)
    for i, subject in enumerate(order):
        images[i], present[i] = _load_subject_slices(subject, subjects[subject][1], modalities, image_size)

    table = read_subject_table(clinical_csv) if clinical_csv is not None else None
    csv_path = Path(clinical_csv) if clinical_csv is not None else None
    clinical, clinical_mask = clinical_from_table(order, table, csv_path)
    return Cohort(
        images=images,
        modality_mask=present,
        clinical=clinical,
        clinical_mask=clinical_mask,
        labels=np.array([class_names.index(subjects[s][0]) for s in order], dtype=np.int64),
        sites=sites_from_table(order, table, csv_path, site),
        subject_ids=np.array(order, dtype=str),
        modality_names=modalities,
        class_names=class_names,
        clinical_names=CLINICAL_FEATURES,
        meta={"source": "slice_folders", "root": str(root)},
    )


def _load_subject_slices(
    subject: str, files: dict[str, Path], modalities: tuple[str, ...], image_size: int
) -> tuple[np.ndarray, np.ndarray]:
    """One subject's (M, S, S) normalised, resized slices and its (M,) presence mask."""
    slices: dict[str, np.ndarray] = {}
    for name, path in files.items():
        try:
            slices[name] = normalise_intensity(load_image_file(path))
        except DataError as exc:
            if str(path) in str(exc):
                raise
            raise DataError(f"image {path}: {exc}") from exc  # normalise_intensity does not know the file
    shapes = {name: a.shape for name, a in slices.items()}
    if len(set(shapes.values())) > 1:
        raise DataError(
            f"subject {subject!r} has sequences of different shapes {shapes} "
            f"({[str(p) for p in files.values()]}); co-register or re-export them at one size."
        )
    out = np.zeros((len(modalities), image_size, image_size), dtype=np.float32)
    mask = np.array([name in slices for name in modalities])
    stacked = resize_images(np.stack([slices[name] for name in modalities if name in slices]), image_size)
    out[mask] = stacked  # missing sequences stay zero with mask False
    return out, mask


def load_medmnist_npz(
    path: str | Path,
    *,
    split: str = "train",
    image_size: int | None = None,
    class_names: Sequence[str] | None = None,
    modality_name: str = "T1",
    site: int = 0,
) -> Cohort:
    """Load one split of a MedMNIST ``.npz`` already on disk as a single-sequence :class:`Cohort`.

    The cohort has M = 1 (``modality_names=(modality_name,)``); the model takes M from its config.
    RGB images are converted to grey (BT.601 luma); every image is normalised on its own with
    :func:`normalise_intensity` and, if ``image_size`` is given, resized (bilinear, antialiased).
    MedMNIST has no clinical variables: all are missing (0 with mask False).

    Args:
        path: the ``.npz`` file (read with ``allow_pickle=False``: an archive cannot run code).
        split: ``"train"``, ``"val"`` or ``"test"``.
        image_size: output side length; None keeps the stored size (MedMNIST images are square).
        class_names: the dataset's class names (label = index); None names them ``"0" .. "C-1"``
            with C = max label + 1 in this split, so pass them to keep splits consistent.
        modality_name: the name of the single sequence.
        site: site id of every image.

    Raises:
        DataError: if the file is missing or corrupt, lacks the split's keys (the message lists the
            keys found), holds multi-label or 3D data, or a label is outside ``class_names``.
    """
    path = Path(path)
    check_image_size(image_size, allow_none=True)
    if split not in ("train", "val", "test"):
        raise DataError(f"split={split!r} must be 'train', 'val' or 'test'.")
    images, labels = _read_medmnist_arrays(path, split)
    if images.ndim == 4 and images.shape[-1] == 3:
        images = images.astype(np.float32) @ _LUMA  # (N, H, W, 3) -> (N, H, W)
    elif images.ndim == 4 and images.shape[-1] == 1:
        images = images[..., 0]  # (N, H, W, 1) -> (N, H, W)
    if images.ndim != 3:
        raise DataError(
            f"{path}: {split}_images has shape {images.shape}; expected (N, H, W) or (N, H, W, 3). "
            "3D MedMNIST volumes are not supported: extract 2D slices first."
        )
    if labels.ndim == 2 and labels.shape[1] == 1:
        labels = labels[:, 0]  # (N, 1) -> (N,)
    if labels.ndim != 1 or labels.shape[0] != images.shape[0]:
        raise DataError(
            f"{path}: {split}_labels has shape {labels.shape}; expected ({images.shape[0]}, 1). "
            "Multi-label datasets (e.g. ChestMNIST) need one label per image: convert them first."
        )
    labels = labels.astype(np.int64)
    n = labels.shape[0]
    if n == 0:
        raise DataError(f"{path}: split {split!r} holds no images; choose another split.")
    if labels.min() < 0:
        raise DataError(f"{path}: {split}_labels contains negative label {labels.min()}; labels must be 0..C-1.")
    if class_names is None:
        class_names = tuple(str(c) for c in range(int(labels.max()) + 1))
    class_names = tuple(class_names)
    if labels.max() >= len(class_names):
        raise DataError(
            f"{path}: unknown label {int(labels.max())} in {split}_labels; class_names has only "
            f"{len(class_names)} entries {list(class_names)}. Pass the dataset's full class list."
        )

    normalised = np.stack([normalise_intensity(img) for img in images.astype(np.float32)])  # (N, H, W)
    resized = resize_images(normalised, image_size)
    return Cohort(
        images=resized[:, None],  # (N, 1, S, S)
        modality_mask=np.ones((n, 1), dtype=bool),
        clinical=np.zeros((n, len(CLINICAL_FEATURES)), dtype=np.float32),
        clinical_mask=np.zeros((n, len(CLINICAL_FEATURES)), dtype=bool),
        labels=labels,
        sites=np.full(n, int(site), dtype=np.int64),
        subject_ids=np.array([f"{path.stem}_{split}_{i:06d}" for i in range(n)], dtype=str),
        modality_names=(modality_name,),
        class_names=class_names,
        clinical_names=CLINICAL_FEATURES,
        meta={"source": "medmnist_npz", "path": str(path), "split": split},
    )


def _read_medmnist_arrays(path: Path, split: str) -> tuple[np.ndarray, np.ndarray]:
    """Read ``<split>_images`` and ``<split>_labels`` from the archive, forcing decompression now."""
    if not path.is_file():
        raise DataError(f"MedMNIST file {path} does not exist; download the dataset's .npz and pass its path.")
    keys = (f"{split}_images", f"{split}_labels")
    try:
        with np.load(path, allow_pickle=False) as archive:
            found = sorted(archive.files)
            if any(k not in found for k in keys):
                raise DataError(
                    f"MedMNIST file {path} lacks key(s) {[k for k in keys if k not in found]}; "
                    f"keys found: {found}. Pass a MedMNIST .npz or another split."
                )
            images, labels = (np.asarray(archive[k]) for k in keys)  # npz members decompress on access
    except DataError:
        raise
    except (OSError, ValueError, EOFError, zipfile.BadZipFile, KeyError) as exc:
        raise DataError(
            f"cannot read MedMNIST file {path}: {exc}. The file is corrupt or not an .npz "
            "(object arrays are refused: allow_pickle=False); download it again."
        ) from exc
    return images, labels
