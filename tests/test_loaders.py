"""Tests for the real-data loaders: small files of each kind are written to tmp_path and read back.

Good inputs check the contract (shapes, dtypes, [0, 1] range, labels, masks, clinical, resizing);
bad inputs check that a DataError is raised AND that its message names the offending file.
"""
from __future__ import annotations

import importlib.util
import sys
import types
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from PIL import Image

from mmpfl_core.data.contract import CLINICAL_FEATURES, CLINICAL_REFERENCE, Cohort
from mmpfl_core.data.loaders import (load_image_file, load_medmnist_npz, load_nifti_subjects, load_nifti_volume,
                                     load_slice_folders, resize_images)
from mmpfl_core.errors import DataError

REPO = Path(__file__).resolve().parents[1]


# ---------------------------------------------------------------------------------------------- helpers
def _gradient(h: int = 40, w: int = 40, scale: float = 200.0) -> np.ndarray:
    """A uint8 (H, W) horizontal ramp from 0 to ``scale``."""
    return np.tile(np.linspace(0, scale, w), (h, 1)).astype(np.uint8)


def _png(path: Path, array: np.ndarray) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path)
    return path


def _nifti(path: Path, volume: np.ndarray) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.Nifti1Image(volume.astype(np.float32), affine=np.eye(4)).to_filename(str(path))
    return path


def _z_ramp(shape: tuple[int, int, int] = (12, 10, 8)) -> np.ndarray:
    """Volume whose axial slice z holds the value z + 1 everywhere."""
    return np.broadcast_to(np.arange(1, shape[2] + 1, dtype=np.float32), shape).copy()


def _csv(path: Path, text: str) -> Path:
    path.write_text(text.strip() + "\n")
    return path


def _assert_contract(cohort: Cohort, n: int, m: int, size: int) -> None:
    assert isinstance(cohort, Cohort)
    assert cohort.images.shape == (n, m, size, size) and cohort.images.dtype == np.float32
    assert cohort.images.min() >= 0.0 and cohort.images.max() <= 1.0
    assert cohort.modality_mask.shape == (n, m) and cohort.modality_mask.dtype == np.bool_
    assert cohort.labels.dtype == np.int64 and cohort.sites.dtype == np.int64
    assert cohort.clinical.shape == (n, len(CLINICAL_FEATURES)) and cohort.clinical.dtype == np.float32
    assert len(set(cohort.subject_ids.tolist())) == n


# ---------------------------------------------------------------------------------------------- slice folders
@pytest.fixture
def slice_root(tmp_path: Path) -> Path:
    root = tmp_path / "slices"
    for name in ("t1", "t2", "flair"):
        _png(root / "healthy" / f"p001_{name}.png", _gradient())
    _png(root / "ms" / "p002_t1.png", _gradient())
    _png(root / "ms" / "p002_FLAIR.png", _gradient(scale=100))  # upper-case suffix; no T2 for p002
    (root / "ms" / "notes.txt").write_text("not an image, ignored")
    return root


def test_slice_folders_shapes_labels_and_missing_sequence(slice_root: Path) -> None:
    cohort = load_slice_folders(slice_root, image_size=32)
    _assert_contract(cohort, n=2, m=3, size=32)
    assert cohort.class_names == ("healthy", "ms")
    assert cohort.subject_ids.tolist() == ["p001", "p002"]
    assert cohort.labels.tolist() == [0, 1]
    assert cohort.modality_mask.tolist() == [[True, True, True], [True, False, True]]
    assert np.all(cohort.images[1, 1] == 0.0)  # missing T2: zeros, never imputed
    assert cohort.images[0].max() == pytest.approx(1.0, abs=0.02)  # antialiased downsampling softens the edge
    native = load_slice_folders(slice_root, image_size=40)  # no resampling: the normalisation itself
    assert native.images[0].max() == 1.0 and native.images[0, 0, 0, 0] == 0.0
    assert cohort.sites.tolist() == [0, 0]
    assert not cohort.clinical_mask.any() and np.all(cohort.clinical == 0.0)  # no CSV: all missing


def test_slice_folders_clinical_csv_with_missing_values_and_sites(slice_root: Path, tmp_path: Path) -> None:
    csv = _csv(tmp_path / "clinical.csv", "subject,age,edss,site\np001,60,,3\np002,,4.5,\n")
    cohort = load_slice_folders(slice_root, image_size=16, clinical_csv=csv, site=7)
    age, edss = CLINICAL_FEATURES.index("age"), CLINICAL_FEATURES.index("edss")
    mean, std = CLINICAL_REFERENCE["age"]
    assert cohort.clinical[0, age] == pytest.approx((60 - mean) / std)
    assert cohort.clinical[1, edss] == pytest.approx((4.5 - CLINICAL_REFERENCE["edss"][0]) / CLINICAL_REFERENCE["edss"][1])
    assert cohort.clinical_mask[:, age].tolist() == [True, False]
    assert cohort.clinical_mask[:, edss].tolist() == [False, True]
    assert not cohort.clinical_mask[:, CLINICAL_FEATURES.index("sex_female")].any()  # column absent
    assert cohort.clinical[1, age] == 0.0
    assert cohort.sites.tolist() == [3, 7]  # empty site cell -> the default


def test_slice_folders_class_names_fix_label_order(slice_root: Path) -> None:
    cohort = load_slice_folders(slice_root, image_size=16, class_names=("ms", "healthy", "other"))
    assert cohort.class_names == ("ms", "healthy", "other")
    assert dict(zip(cohort.subject_ids.tolist(), cohort.labels.tolist())) == {"p002": 0, "p001": 1}


def test_slice_folders_unknown_class_folder(slice_root: Path) -> None:
    with pytest.raises(DataError, match="unknown label") as info:
        load_slice_folders(slice_root, class_names=("healthy",))
    assert "'ms'" in str(info.value) and str(slice_root) in str(info.value)


def test_slice_folders_without_suffix_needs_single_modality(tmp_path: Path) -> None:
    root = tmp_path / "plain"
    _png(root / "ms" / "img_0001.png", _gradient())
    _png(root / "healthy" / "scan7.jpg", _gradient())
    with pytest.raises(DataError, match="single_modality") as info:
        load_slice_folders(root)
    assert "scan7.jpg" in str(info.value) or "img_0001.png" in str(info.value)
    cohort = load_slice_folders(root, image_size=8, single_modality="FLAIR")
    _assert_contract(cohort, n=2, m=3, size=8)
    assert cohort.modality_mask.tolist() == [[False, False, True]] * 2
    with pytest.raises(DataError, match="single_modality"):
        load_slice_folders(root, single_modality="PD")  # not among the requested modalities


def test_slice_folders_corrupt_png_names_file(slice_root: Path) -> None:
    bad = slice_root / "ms" / "p009_t1.png"
    bad.write_bytes(np.random.default_rng(0).integers(0, 256, 500, dtype=np.uint8).tobytes())
    with pytest.raises(DataError, match="re-export the file or remove it") as info:
        load_slice_folders(slice_root)
    assert "p009_t1.png" in str(info.value)


def test_slice_folders_mismatched_shapes(slice_root: Path) -> None:
    _png(slice_root / "ms" / "p002_t2.png", _gradient(h=20, w=30))
    with pytest.raises(DataError, match="different shapes") as info:
        load_slice_folders(slice_root)
    assert "p002" in str(info.value)


def test_slice_folders_duplicate_subject_across_classes(slice_root: Path) -> None:
    _png(slice_root / "ms" / "p001_t2.png", _gradient())
    with pytest.raises(DataError, match="one label") as info:
        load_slice_folders(slice_root)
    assert "p001_t2.png" in str(info.value)


def test_slice_folders_bad_clinical_value_names_csv(slice_root: Path, tmp_path: Path) -> None:
    csv = _csv(tmp_path / "clin.csv", "subject,age\np001,forty\n")
    with pytest.raises(DataError, match="not a number") as info:
        load_slice_folders(slice_root, clinical_csv=csv)
    assert "clin.csv" in str(info.value)


# ---------------------------------------------------------------------------------------------- single images
def test_load_image_file_rgb_and_16bit(tmp_path: Path) -> None:
    rgb = np.zeros((6, 5, 3), dtype=np.uint8)
    rgb[..., 1] = 100  # pure green -> luma 0.587 * 100
    out = load_image_file(_png(tmp_path / "rgb.png", rgb))
    assert out.shape == (6, 5) and out.dtype == np.float32
    assert out[0, 0] == pytest.approx(58.7, abs=1e-3)
    deep = np.full((4, 4), 4000, dtype=np.uint16)
    assert load_image_file(_png(tmp_path / "deep.png", deep)).max() == 4000.0  # 16-bit range kept


def test_load_image_file_truncated_png(tmp_path: Path) -> None:
    noisy = np.random.default_rng(1).integers(0, 256, (64, 64), dtype=np.uint8)
    path = _png(tmp_path / "cut.png", noisy)
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with pytest.raises(DataError, match="cut.png"):
        load_image_file(path)


def test_resize_pads_to_square_and_keeps_range() -> None:
    image = np.ones((1, 20, 40), dtype=np.float32)  # wide: pad 10 rows top and bottom
    out = resize_images(image, 20)
    assert out.shape == (1, 20, 20) and out.dtype == np.float32
    assert out[0, 10, 10] == pytest.approx(1.0) and out[0, 0, 10] == pytest.approx(0.0)
    assert 0.0 <= out.min() and out.max() <= 1.0
    assert resize_images(np.ones((2, 8, 8), np.float32), None).shape == (2, 8, 8)


# ---------------------------------------------------------------------------------------------- NIfTI
@pytest.fixture
def nifti_root(tmp_path: Path) -> tuple[Path, Path]:
    root = tmp_path / "brats"
    _nifti(root / "p001" / "t1.nii.gz", _z_ramp())
    _nifti(root / "p001" / "T2.nii", _z_ramp())  # upper case and uncompressed
    _nifti(root / "p001" / "flair.nii.gz", _z_ramp())
    _nifti(root / "p002" / "p002_t1.nii.gz", _z_ramp())
    _nifti(root / "p002" / "p002_flair.nii.gz", _z_ramp())
    _nifti(root / "p002" / "p002_t1ce.nii.gz", _z_ramp())  # not requested: must not be taken for T1
    _nifti(root / "p003" / "t1.nii.gz", _z_ramp())  # no row in the labels table: ignored
    labels = _csv(tmp_path / "labels.csv", "subject,label,site,age\np001,rrms,2,30\np002,healthy,,\n")
    return root, labels


def test_nifti_middle_slice_values_and_masks(nifti_root: tuple[Path, Path]) -> None:
    root, labels = nifti_root
    cohort = load_nifti_subjects(root, labels, image_size=12, site=5)
    _assert_contract(cohort, n=2, m=3, size=12)
    assert cohort.subject_ids.tolist() == ["p001", "p002"]
    assert cohort.class_names == ("healthy", "rrms")
    assert cohort.labels.tolist() == [1, 0]
    assert cohort.sites.tolist() == [2, 5]
    assert cohort.modality_mask.tolist() == [[True, True, True], [True, False, True]]
    assert np.all(cohort.images[1, 1] == 0.0)
    # Middle axial slice z = 4 holds 5; the volume's 99.5th percentile is 8 -> 0.625. The 12 x 10
    # slice is zero-padded by one row/column on two sides to 12 x 12 (no resampling at size 12).
    assert cohort.images[0, 0, 6, 6] == pytest.approx(5 / 8)
    assert cohort.images[0, 0].max() == pytest.approx(5 / 8)
    assert cohort.clinical_mask[:, CLINICAL_FEATURES.index("age")].tolist() == [True, False]
    assert cohort.meta["unlabelled_subjects"] == ["p003"]


def test_nifti_several_slices_per_subject(nifti_root: tuple[Path, Path]) -> None:
    root, labels = nifti_root
    cohort = load_nifti_subjects(root, labels, image_size=8, slices_per_subject=3, slice_index=2)
    _assert_contract(cohort, n=6, m=3, size=8)
    assert cohort.subject_ids.tolist()[:3] == ["p001:z1", "p001:z2", "p001:z3"]
    assert cohort.meta["groups"] == ["p001"] * 3 + ["p002"] * 3
    assert cohort.labels.tolist() == [1, 1, 1, 0, 0, 0]
    centre = cohort.images[:3, 0, 4, 4]
    assert np.all(np.diff(centre) > 0)  # slices z = 1, 2, 3 hold increasing values
    with pytest.raises(DataError, match="outside"):
        load_nifti_subjects(root, labels, slice_index=7, slices_per_subject=3)


def test_nifti_resizes(nifti_root: tuple[Path, Path]) -> None:
    root, labels = nifti_root
    cohort = load_nifti_subjects(root, labels, image_size=32)
    _assert_contract(cohort, n=2, m=3, size=32)
    assert cohort.images[0, 0, 16, 16] == pytest.approx(5 / 8, abs=1e-4)


def test_nifti_truncated_file_names_file(nifti_root: tuple[Path, Path]) -> None:
    root, labels = nifti_root
    path = _nifti(root / "p001" / "flair.nii.gz",
                  np.random.default_rng(2).normal(size=(12, 10, 8)).astype(np.float32) + 5.0)
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with pytest.raises(DataError, match="truncated or corrupt") as info:
        load_nifti_subjects(root, labels)
    assert "flair.nii.gz" in str(info.value)


def test_nifti_nan_voxels_name_file(nifti_root: tuple[Path, Path]) -> None:
    root, labels = nifti_root
    volume = _z_ramp()
    volume[3, 3, 3] = np.nan
    _nifti(root / "p002" / "p002_flair.nii.gz", volume)
    with pytest.raises(DataError, match="NaN") as info:
        load_nifti_subjects(root, labels)
    assert "p002_flair.nii.gz" in str(info.value)


def test_nifti_mismatched_shapes_name_subject(nifti_root: tuple[Path, Path]) -> None:
    root, labels = nifti_root
    _nifti(root / "p001" / "T2.nii", _z_ramp((12, 10, 9)))
    with pytest.raises(DataError, match="different shapes") as info:
        load_nifti_subjects(root, labels)
    assert "p001" in str(info.value) and "(12, 10, 9)" in str(info.value)


def test_nifti_unknown_label_names_csv(nifti_root: tuple[Path, Path]) -> None:
    root, labels = nifti_root
    with pytest.raises(DataError, match="unknown label") as info:
        load_nifti_subjects(root, labels, class_names=("healthy", "progressive_ms"))
    assert "labels.csv" in str(info.value) and "rrms" in str(info.value)


def test_nifti_missing_folder_and_require_all(nifti_root: tuple[Path, Path], tmp_path: Path) -> None:
    root, _ = nifti_root
    extra = _csv(tmp_path / "extra.csv", "subject,label\np001,rrms\np404,rrms\n")
    with pytest.raises(DataError, match="p404"):
        load_nifti_subjects(root, extra)
    only_p002 = _csv(tmp_path / "p002.csv", "subject,label\np002,healthy\n")
    with pytest.raises(DataError, match="require_all") as info:
        load_nifti_subjects(root, only_p002, require_all=True)
    assert "p002" in str(info.value) and "T2" in str(info.value)


def test_load_nifti_volume_corrupt_bytes(tmp_path: Path) -> None:
    path = tmp_path / "junk.nii.gz"
    path.write_bytes(b"definitely not a nifti file" * 10)
    with pytest.raises(DataError, match="junk.nii.gz"):
        load_nifti_volume(path)


# ---------------------------------------------------------------------------------------------- MedMNIST
def _medmnist(path: Path, n: int = 6, rgb: bool = False) -> Path:
    rng = np.random.default_rng(3)
    shape = (n, 28, 28, 3) if rgb else (n, 28, 28)
    arrays = {}
    for split in ("train", "val", "test"):
        arrays[f"{split}_images"] = rng.integers(0, 256, shape, dtype=np.uint8)
        arrays[f"{split}_labels"] = (np.arange(n) % 2).reshape(n, 1).astype(np.uint8)
    np.savez(path, **arrays)
    return path


def test_medmnist_grey_native_size(tmp_path: Path) -> None:
    cohort = load_medmnist_npz(_medmnist(tmp_path / "pneumoniamnist.npz"), split="val")
    _assert_contract(cohort, n=6, m=1, size=28)
    assert cohort.modality_names == ("T1",)
    assert cohort.class_names == ("0", "1")
    assert cohort.labels.tolist() == [0, 1, 0, 1, 0, 1]
    assert cohort.modality_mask.all() and not cohort.clinical_mask.any()
    assert cohort.subject_ids[0] == "pneumoniamnist_val_000000"


def test_medmnist_rgb_resized_with_names(tmp_path: Path) -> None:
    path = _medmnist(tmp_path / "dermamnist.npz", rgb=True)
    cohort = load_medmnist_npz(path, split="test", image_size=16, class_names=("a", "b", "c"),
                               modality_name="FLAIR")
    _assert_contract(cohort, n=6, m=1, size=16)
    assert cohort.modality_names == ("FLAIR",) and cohort.class_names == ("a", "b", "c")
    with pytest.raises(DataError, match="unknown label 1") as info:
        load_medmnist_npz(path, class_names=("only",))
    assert "dermamnist.npz" in str(info.value)


def test_medmnist_missing_keys_list_found_keys(tmp_path: Path) -> None:
    path = tmp_path / "broken.npz"
    np.savez(path, images=np.zeros((2, 28, 28), np.uint8))
    with pytest.raises(DataError, match="keys found") as info:
        load_medmnist_npz(path)
    assert "broken.npz" in str(info.value) and "'images'" in str(info.value)


def test_medmnist_corrupt_archive(tmp_path: Path) -> None:
    path = tmp_path / "corrupt.npz"
    path.write_bytes(b"PK\x03\x04 this is not really a zip archive")
    with pytest.raises(DataError, match="corrupt.npz"):
        load_medmnist_npz(path)


# ---------------------------------------------------------------------------------------------- scripts
def _run_script(name: str, argv: list[str], monkeypatch: pytest.MonkeyPatch) -> list[Cohort]:
    """Run data_scripts/<name>.py's main() with save_cohort replaced by a recorder (io is tested elsewhere)."""
    saved: list[Cohort] = []
    fake_io = types.ModuleType("mmpfl_core.data.cohort_files")
    fake_io.save_cohort = lambda cohort, path: saved.append(cohort)  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "mmpfl_core.data.cohort_files", fake_io)
    spec = importlib.util.spec_from_file_location(name, REPO / "data_scripts" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    assert spec.loader is not None
    spec.loader.exec_module(module)
    assert module.main(argv) == 0
    return saved


def test_scripts_convert_each_kind(slice_root: Path, nifti_root: tuple[Path, Path], tmp_path: Path,
                                   monkeypatch: pytest.MonkeyPatch) -> None:
    out = str(tmp_path / "out.npz")
    (cohort,) = _run_script("convert_slice_folders", [str(slice_root), out, "--image-size", "16"], monkeypatch)
    assert cohort.images.shape == (2, 3, 16, 16)
    root, labels = nifti_root
    (cohort,) = _run_script("convert_nifti_subjects", [str(root), str(labels), out, "--image-size", "8",
                                                       "--slices-per-subject", "3"], monkeypatch)
    assert cohort.images.shape == (6, 3, 8, 8)
    npz = _medmnist(tmp_path / "m.npz")
    (cohort,) = _run_script("convert_medmnist", [str(npz), out, "--split", "test"], monkeypatch)
    assert cohort.images.shape == (6, 1, 28, 28)
