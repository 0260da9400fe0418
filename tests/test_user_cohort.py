"""A user's own MRI data end to end, on real files nobody here wrote (issue 17).

NIfTI: nibabel's bundled test images (``nibabel.testing.data_path``: ``anatomical.nii`` 33x41x25,
``reoriented_anat_moved.nii`` on another grid, ``functional.nii`` 4D). DICOM: pydicom's bundled MR
slice in three transfer syntaxes (``MR_small*.dcm``, 64x64) stacked into series, and its
``MR_truncated.dcm``. Subject folders are converted with the ``data_scripts`` converters into
cohort files, then trained on through the ``mmpfl`` CLI for one round.
"""
from __future__ import annotations

import json
import runpy
import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
import pytest
from nibabel.testing import data_path
from pydicom.data import get_testdata_file
from pydicom.uid import generate_uid

from mmpfl_core.cli import main as mmpfl
from mmpfl_core.data.cohort_federation import CohortSource, federation_from_cohort, patient_groups
from mmpfl_core.data.federation import FederationConfig
from mmpfl_core.data.cohort_files import load_cohort
from mmpfl_core.data.loaders import load_nifti_subjects, read_dicom_series
from mmpfl_core.errors import ConfigError, DataError

REPO = Path(__file__).resolve().parents[1]
NIFTI = Path(data_path)
ANATOMICAL = NIFTI / "anatomical.nii"
DICOM_SLICES = ("MR_small.dcm", "MR_small_implicit.dcm", "MR_small_bigendian.dcm")  # one image, 3 encodings
MODALITIES = ["--modalities", "T1", "FLAIR"]


def _labels(root: Path, prefix: str, n: int = 10) -> Path:
    """A non-MS label set, a 'hospital' site column (two sites of 4, two public subjects) and ages."""
    rows = ["subject,label,hospital,age"]
    rows += [f"{prefix}{i:02d},{'patient' if i % 2 else 'control'},{-1 if i >= 8 else i // 4},{30 + i}"
             for i in range(n)]
    path = root / "labels.csv"
    path.write_text("\n".join(rows) + "\n")
    return path


def _nifti_root(root: Path) -> Path:
    """10 subjects: T1 in every folder, FLAIR (a second file) in two of three, no T2 anywhere."""
    for i in range(10):
        folder = root / f"s{i:02d}"
        folder.mkdir(parents=True)
        shutil.copy(ANATOMICAL, folder / "t1.nii")
        if i % 3:
            shutil.copy(ANATOMICAL, folder / f"s{i:02d}_flair.nii")
    _labels(root, "s")
    return root


def _dicom_series(folder: Path, names=DICOM_SLICES, step_mm: float = 0.8) -> Path:
    """One series from pydicom's MR slice: positions step_mm apart, files named in reverse order."""
    folder.mkdir(parents=True)
    uid = generate_uid()
    for k, name in enumerate(names):
        ds = pydicom.dcmread(get_testdata_file(name))
        x, y, z = (float(v) for v in ds.ImagePositionPatient)
        ds.SeriesInstanceUID, ds.SOPInstanceUID, ds.InstanceNumber = uid, generate_uid(), k + 1
        ds.ImagePositionPatient = [x, y, z + step_mm * k]
        ds.save_as(folder / f"IM{len(names) - k:04d}")
    return folder


def _dicom_root(root: Path) -> Path:
    for i in range(10):
        _dicom_series(root / f"d{i:02d}" / "t1")
    _labels(root, "d")
    return root


def _convert(kind: str, argv: list[str]) -> int:
    return runpy.run_path(str(REPO / "data_scripts" / f"convert_{kind}_subjects.py"), run_name=kind)["main"](argv)


@pytest.fixture(scope="module")
def cohorts(tmp_path_factory) -> dict[str, Path]:
    """Both raw folders converted (through the scripts, real save) into cohort files."""
    base = tmp_path_factory.mktemp("own")
    out = {}
    for kind, make in (("nifti", _nifti_root), ("dicom", _dicom_root)):
        root = make(base / kind)
        path = base / f"{kind}.npz"
        assert _convert(kind, [str(root), str(root / "labels.csv"), str(path), "--image-size", "16", *MODALITIES,
                               "--site-column", "hospital"]) == 0
        out[kind], out[f"{kind}_root"] = path, root
    return out


def test_nifti_subject_folders_round_trip(cohorts):
    cohort = load_cohort(cohorts["nifti"])
    root = cohorts["nifti_root"]
    direct = load_nifti_subjects(root, root / "labels.csv", image_size=16, modalities=("T1", "FLAIR"),
                                 site_column="hospital")
    np.testing.assert_array_equal(cohort.images, direct.images)
    assert cohort.images.shape == (10, 2, 16, 16) and 0 <= cohort.images.min() and cohort.images.max() <= 1
    assert cohort.class_names == ("control", "patient")  # any label set, not only the MS classes
    assert cohort.labels.tolist() == [i % 2 for i in range(10)]
    assert cohort.sites.tolist() == [0, 0, 0, 0, 1, 1, 1, 1, -1, -1]
    # FLAIR missing in every third folder: zeros and mask False, never imputed.
    assert cohort.modality_mask[:, 1].tolist() == [bool(i % 3) for i in range(10)]
    assert not cohort.images[0, 1].any() and cohort.images[1, 1].any()
    np.testing.assert_array_equal(cohort.images[1, 0], cohort.images[1, 1])  # same file as T1 and FLAIR
    age = list(cohort.clinical_names).index("age")
    assert cohort.clinical_mask[:, age].all() and cohort.clinical[0, age] == pytest.approx((30 - 45) / 15)
    assert json.loads(cohorts["nifti"].with_suffix(".json").read_text())["meta"]["groups"][0] == "s00"


def test_dicom_series_geometry_and_values(tmp_path):
    folder = _dicom_series(tmp_path / "t1")
    img = read_dicom_series(folder)
    reference = pydicom.dcmread(get_testdata_file("MR_small.dcm"))
    assert img.shape == (64, 64, 3)
    assert np.allclose(img.header.get_zooms(), (0.3125, 0.3125, 0.8))
    assert "".join(nib.aff2axcodes(img.affine)) == "RAS"
    # Every slice decodes to the same rescaled pixels whatever its transfer syntax (the files are the same image).
    expected = np.rot90(np.asarray(img.dataobj)[:, :, 0])
    for z in range(3):
        np.testing.assert_array_equal(np.rot90(np.asarray(img.dataobj)[:, :, z]), expected)
    # RAS reorientation of an axial LPS slice flips both in-plane axes: the pixel values are all there.
    assert sorted(np.asarray(img.dataobj)[:, :, 0].ravel()) == sorted(reference.pixel_array.astype(np.float32).ravel())


@pytest.mark.parametrize("defect, message", [("two series", "mixes 2 series"), ("missing slice", "a slice is missing"),
                                             ("empty", "holds no image files")])
def test_dicom_series_defects_name_the_folder(defect, message, tmp_path):
    folder = _dicom_series(tmp_path / "t1")
    if defect == "two series":
        other = _dicom_series(tmp_path / "other", names=DICOM_SLICES[:1])
        shutil.copy(other / "IM0001", folder / "IM9999")
    elif defect == "missing slice":
        ds = pydicom.dcmread(folder / "IM0001")  # the last slice (k = 2): moved one step further out
        ds.ImagePositionPatient = [*ds.ImagePositionPatient[:2], float(ds.ImagePositionPatient[2]) + 0.8]
        ds.save_as(folder / "IM0001")
    else:
        shutil.rmtree(folder)
        folder.mkdir()
        (folder / "notes.txt").write_text("not DICOM")
    with pytest.raises(DataError, match=message) as info:
        read_dicom_series(folder)
    assert str(folder) in str(info.value)


def test_dicom_subject_folders_round_trip(cohorts):
    cohort = load_cohort(cohorts["dicom"])
    assert cohort.images.shape == (10, 2, 16, 16) and cohort.meta["source"] == "dicom_subjects"
    assert cohort.modality_mask[:, 0].all() and not cohort.modality_mask[:, 1].any()  # no FLAIR series
    assert cohort.sites.tolist() == [0, 0, 0, 0, 1, 1, 1, 1, -1, -1]
    from mmpfl_core.data.summary import cohort_summary_table
    summary = cohort_summary_table(federation_from_cohort(cohort, CohortSource(cohort=str(cohorts["dicom"])),
                                                          FederationConfig()))
    assert summary["name"].tolist() == ["site 0", "site 1", "public"]
    assert summary["missing_sequences"].tolist()[:2] == ["FLAIR", "FLAIR"] and summary["field_strength_t"].isna().all()


def test_mismatched_grids_refused_or_resampled(tmp_path):
    root = tmp_path / "grid"
    (root / "p1").mkdir(parents=True)
    shutil.copy(ANATOMICAL, root / "p1" / "t1.nii")
    shutil.copy(NIFTI / "reoriented_anat_moved.nii", root / "p1" / "flair.nii")
    (root / "labels.csv").write_text("subject,label\np1,a\n")
    with pytest.raises(DataError, match="different shapes") as info:
        load_nifti_subjects(root, root / "labels.csv", image_size=16, modalities=("T1", "FLAIR"))
    assert "t1.nii" in str(info.value) and "flair.nii" in str(info.value) and "resample" in str(info.value)
    cohort = load_nifti_subjects(root, root / "labels.csv", image_size=16, modalities=("T1", "FLAIR"), resample=True)
    assert cohort.modality_mask.all() and cohort.images[0, 1].any() and cohort.meta["resampled"]


def test_slices_of_one_patient_stay_in_one_split(tmp_path, cohorts):
    root = cohorts["nifti_root"]
    path = tmp_path / "slices.npz"
    assert _convert("nifti", [str(root), str(root / "labels.csv"), str(path), "--image-size", "16", *MODALITIES,
                              "--site-column", "hospital", "--slices-per-subject", "3"]) == 0
    cohort = load_cohort(path)
    assert len(cohort) == 30 and patient_groups(cohort).tolist()[:3] == ["s00"] * 3
    fed = federation_from_cohort(cohort, CohortSource(cohort=str(path)), FederationConfig())
    seen: dict[str, str] = {}
    for site in fed.sites:
        for split in ("train", "val", "test"):
            for patient in set(patient_groups(getattr(site, split)).tolist()):
                assert patient not in seen, f"{patient} in {seen.get(patient)} and site {site.site_id} {split}"
                seen[patient] = f"site {site.site_id} {split}"
    assert set(patient_groups(fed.public).tolist()) == {"s08", "s09"} and not set(seen) & {"s08", "s09"}


def test_cli_trains_on_converted_nifti_and_dicom(cohorts, tmp_path):
    out = tmp_path / "runs"
    assert mmpfl(["train", "--data", str(cohorts["nifti"]), "--method", "fedavg", "--rounds", "1",
                  "--out", str(out / "nifti"), "--no-progress"]) == 0
    assert mmpfl(["train", "--data", str(cohorts["dicom"]), "--method", "dp-fedavg", "--epsilon", "8",
                  "--rounds", "1", "--out", str(out / "dicom"), "--no-progress"]) == 0
    for name, label in (("nifti", "fedavg"), ("dicom", "dp-fedavg-eps8")):
        report = (out / name / "REPORT.md").read_text()
        assert f"| {label} |" in report and str(cohorts[name]) in report and "2 sites" in report
        summary = json.loads((out / name / label / "summary.json").read_text())
        assert summary["num_rounds"] == 1
        stored = json.loads((out / name / label / "config.json").read_text())["config"]
        assert stored["data"]["cohort"] == str(cohorts[name])
    epsilon = json.loads((out / "dicom" / "dp-fedavg-eps8" / "summary.json").read_text())["final"]["epsilon"]
    assert 0 < epsilon <= 8.0


def _bad_nifti(tmp_path: Path, kind: str) -> tuple[list[str], str]:
    """A raw folder with one defect; returns the converter's arguments and the text its error must contain."""
    root = tmp_path / kind
    (root / "p1").mkdir(parents=True)
    t1 = root / "p1" / "t1.nii"
    shutil.copy(ANATOMICAL, t1)
    (root / "labels.csv").write_text("subject,label,site\np1,a,0\n")
    labels, extra, expect = root / "labels.csv", [], ""
    if kind == "4d":
        shutil.copy(NIFTI / "functional.nii", t1)
        expect = "expected a 3D volume"
    elif kind == "truncated":
        t1.write_bytes(ANATOMICAL.read_bytes()[:20000])
        expect = "truncated"
    elif kind == "mismatched-shape":
        shutil.copy(NIFTI / "reoriented_anat_moved.nii", root / "p1" / "flair.nii")
        expect = "different shapes"
    elif kind == "missing-labels":
        labels, expect = root / "no_such_labels.csv", "does not exist"
    elif kind == "unknown-site-column":
        extra, expect = ["--site-column", "hospital"], "site column 'hospital'"
    elif kind == "truncated-dicom":
        shutil.rmtree(root / "p1")
        series = _dicom_series(root / "p1" / "t1", names=DICOM_SLICES[:2])
        # pydicom's truncated MR slice (its pixel data 62 bytes short), made part of the same series.
        truncated = pydicom.dcmread(get_testdata_file("MR_truncated.dcm"))
        truncated.SeriesInstanceUID = pydicom.dcmread(series / "IM0001").SeriesInstanceUID
        truncated.ImagePositionPatient = [*truncated.ImagePositionPatient[:2], float(truncated.ImagePositionPatient[2]) + 1.6]
        truncated.save_as(series / "IM0003")
        return [str(root), str(labels), *MODALITIES], "cannot decode the pixels"
    return [str(root), str(labels), *MODALITIES, *extra], expect


@pytest.mark.parametrize("kind", ["4d", "truncated", "mismatched-shape", "missing-labels", "unknown-site-column",
                                  "truncated-dicom"])
def test_bad_inputs_give_one_clear_error_and_no_output(kind, tmp_path, capsys):
    args, expect = _bad_nifti(tmp_path, kind)
    out = tmp_path / "cohort.npz"
    converter = "dicom" if kind == "truncated-dicom" else "nifti"
    assert _convert(converter, [args[0], args[1], str(out), *args[2:], "--image-size", "16"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and expect in err[0], err
    assert not out.exists() and not out.with_suffix(".json").exists()


def test_fisher_method_without_public_set_fails_before_any_run_directory(cohorts, tmp_path, capsys):
    cohort = load_cohort(cohorts["nifti"])
    no_public = tmp_path / "no_public.npz"
    from dataclasses import replace

    from mmpfl_core.data.cohort_files import save_cohort
    save_cohort(replace(cohort, sites=np.where(cohort.sites < 0, 1, cohort.sites)), no_public)
    out = tmp_path / "results"
    assert mmpfl(["train", "--data", str(no_public), "--method", "mm-pfl-adp", "--epsilon", "8", "--rounds", "1",
                  "--out", str(out), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "public server set" in err and "site -1" in err and not out.exists()
    # A damaged cohort file: one error naming it, no results folder either.
    broken = tmp_path / "broken.npz"
    broken.write_bytes(cohorts["nifti"].read_bytes()[:200])
    shutil.copy(cohorts["nifti"].with_suffix(".json"), broken.with_suffix(".json"))
    assert mmpfl(["train", "--data", str(broken), "--method", "fedavg", "--rounds", "1", "--out", str(out)]) == 2
    assert "broken.npz" in capsys.readouterr().err and not out.exists()


def test_flower_app_reads_a_converted_cohort(cohorts):
    """Notebook 08's COHORT_PATH: the Flower run config's ``cohort`` key, one SuperNode per site id."""
    import sys
    sys.path.insert(0, str(REPO / "flower_app"))
    import mmpfl_flower.task as task
    from mmpfl_flower.task import load_job, site_data
    builds = []
    original = task.make_federation
    task.make_federation = lambda experiment: builds.append(1) or original(experiment)
    try:
        job = load_job(preset="reproduce_smoke", method="fedavg", cohort=str(cohorts["nifti"]), num_rounds=1)
        assert job.num_sites == 2 and sum(len(site_data(job, k)["train"]) for k in range(2)) > 0
    finally:
        task.make_federation = original
    assert len(builds) == 1  # counting the sites and serving them share one build of the federation
    assert isinstance(job.experiment.data, CohortSource) and job.experiment.data.cohort == str(cohorts["nifti"])
    assert job.num_sites == 2 and job.flower.min_nodes == 2  # sites 0 and 1; site -1 is the public set
    assert sum(len(site_data(job, k)["train"]) for k in range(2)) > 0
    with pytest.raises(ConfigError, match="num-subjects.*drop num-subjects"):
        load_job(preset="reproduce_smoke", method="fedavg", cohort=str(cohorts["nifti"]), num_subjects=100)
