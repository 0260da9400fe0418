"""Saving and loading cohorts and federations: exact round trips, no pickle, clear errors."""
from __future__ import annotations

import runpy
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from mmpfl_core.data.federation import FederationConfig, build_federation
from mmpfl_core.data.cohort_files import load_cohort, load_federation, save_cohort, save_federation
from mmpfl_core.data.synthetic import SyntheticCohortConfig, generate_subjects
from mmpfl_core.errors import DataError

ARRAYS = ("images", "modality_mask", "clinical", "clinical_mask", "labels", "sites", "subject_ids", "lesion_masks")
SCRIPT = Path(__file__).resolve().parent.parent / "data_scripts" / "generate_cohort.py"


@pytest.fixture(scope="module")
def cohort():
    return generate_subjects(SyntheticCohortConfig(num_subjects=60, image_size=16, seed=4))


@pytest.fixture(scope="module")
def fed():
    return build_federation(SyntheticCohortConfig(num_subjects=150, image_size=16, seed=1),
                            FederationConfig(num_sites=3, alpha=float("inf"), public_size=12, seed=1,
                                             missing_modality_sites=((2, "T2"),)))


def assert_same_cohort(a, b):
    for name in ARRAYS:
        x, y = getattr(a, name), getattr(b, name)
        assert (x is None) == (y is None), name
        if x is not None:
            assert x.dtype == y.dtype, name
            np.testing.assert_array_equal(x, y, err_msg=name)
    assert (a.modality_names, a.class_names, a.clinical_names) == (b.modality_names, b.class_names, b.clinical_names)


def test_cohort_round_trip_is_exact(cohort, tmp_path):
    path = save_cohort(cohort, tmp_path / "c.npz")
    loaded = load_cohort(path)
    assert_same_cohort(cohort, loaded)
    assert loaded.meta["cohort_config"]["seed"] == 4
    with np.load(path, allow_pickle=False) as data:  # no object arrays anywhere
        assert all(data[k].dtype != object for k in data.files)


def test_cohort_without_lesion_masks_round_trips(cohort, tmp_path):
    plain = replace(cohort, lesion_masks=None, meta={})
    assert_same_cohort(plain, load_cohort(save_cohort(plain, tmp_path / "plain.npz")))


def test_federation_round_trip_is_exact(fed, tmp_path):
    loaded = load_federation(save_federation(fed, tmp_path / "fed"))
    assert loaded.federation_config == fed.federation_config
    assert loaded.cohort_config == fed.cohort_config
    assert loaded.num_sites == fed.num_sites
    for a, b in zip(fed.sites, loaded.sites):
        assert (a.site_id, a.name, a.profile) == (b.site_id, b.name, b.profile)
        for split in ("train", "val", "test"):
            assert_same_cohort(getattr(a, split), getattr(b, split))
    assert_same_cohort(fed.public, loaded.public)
    assert_same_cohort(fed.global_test, loaded.global_test)


def test_truncated_npz_raises_data_error(cohort, tmp_path):
    path = save_cohort(cohort, tmp_path / "t.npz")
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(DataError, match="t.npz"):
        load_cohort(path)


def test_garbage_and_missing_files_raise_data_error(fed, tmp_path):
    directory = save_federation(fed, tmp_path / "fed")
    (directory / "federation.npz").write_bytes(b"not a zip file")
    with pytest.raises(DataError, match="federation.npz"):
        load_federation(directory)
    with pytest.raises(DataError, match="does not exist"):
        load_cohort(tmp_path / "nope.npz")


def test_generate_cohort_script(tmp_path, capsys):
    main = runpy.run_path(str(SCRIPT), run_name="generate_cohort")["main"]
    out = main(["--num-subjects", "150", "--image-size", "16", "--num-sites", "3", "--out", str(tmp_path / "o")])
    for name in ("federation.npz", "federation.json", "preview.png", "cohort_summary.csv"):
        assert (out / name).stat().st_size > 0
    assert "wrote" in capsys.readouterr().out
    assert load_federation(out).num_sites == 3


def test_cohort_meta_with_numpy_arrays_saves_as_json_lists(cohort, tmp_path):
    """Loaders put per-row arrays into meta (the patient of each slice); saving used to fail on them."""
    groups = np.array([f"p{i // 2}" for i in range(len(cohort))])
    with_groups = replace(cohort, meta={"groups": groups, "count": np.int64(3), "root": Path("/x")})
    loaded = load_cohort(save_cohort(with_groups, tmp_path / "g.npz"))
    assert loaded.meta == {"groups": groups.tolist(), "count": 3, "root": "/x"}
    # Subsets and concatenations keep the per-row groups aligned with their rows.
    part = loaded.subset([5, 0])
    assert part.meta["groups"] == [groups[5], groups[0]]
    from mmpfl_core.data.contract import concatenate
    assert concatenate([part, part]).meta["groups"] == [groups[5], groups[0]] * 2
