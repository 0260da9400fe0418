"""The synthetic MS cohort: determinism, MRI contrasts, class structure, scanners, config checks."""
from __future__ import annotations

import numpy as np
import pytest

from mmpfl_core.data.contract import MODALITIES
from mmpfl_core.data.scanners import ScannerProfile, apply_scanner, default_site_profiles, reference_profile
from mmpfl_core.data.synthetic import TISSUE_LABELS, SyntheticCohortConfig, generate_subjects
from mmpfl_core.errors import ConfigError
from mmpfl_core.seeding import numpy_generator

T1, T2, FLAIR = (MODALITIES.index(m) for m in ("T1", "T2", "FLAIR"))
SMALL = SyntheticCohortConfig(num_subjects=300, image_size=32, seed=0)


@pytest.fixture(scope="module")
def cohort_and_tissue():
    return generate_subjects(SMALL, return_tissue_maps=True)


@pytest.fixture(scope="module")
def cohort64():
    # 64 px resolves lesions and ventricles well enough for per-class shape statistics.
    return generate_subjects(SyntheticCohortConfig(num_subjects=300, image_size=64, seed=1), return_tissue_maps=True)


def test_same_seed_same_arrays_different_seed_different(cohort_and_tissue):
    a, _ = cohort_and_tissue
    b = generate_subjects(SMALL)
    for name in ("images", "clinical", "clinical_mask", "labels", "lesion_masks"):
        np.testing.assert_array_equal(getattr(a, name), getattr(b, name))
    c = generate_subjects(SyntheticCohortConfig(num_subjects=300, image_size=32, seed=1))
    assert not np.array_equal(a.images, c.images)
    assert not np.array_equal(a.labels, c.labels)


def test_contract_fields(cohort_and_tissue):
    c, tissue = cohort_and_tissue
    assert c.images.shape == (300, 3, 32, 32) and c.images.dtype == np.float32
    assert c.images.min() >= 0.0 and c.images.max() <= 1.0
    assert np.all(c.sites == -1) and c.modality_mask.all()
    assert c.subject_ids[0] == "syn-000000" and len(set(c.subject_ids)) == 300
    assert tissue.shape == (300, 32, 32)
    # A few missing clinical values, all in symptom_score/edss, flagged by the mask.
    missing = ~c.clinical_mask
    assert 0 < missing.sum() < 0.05 * missing.size
    assert not missing[:, :2].any()
    assert np.all(c.clinical[missing] == 0)
    assert c.meta["cohort_config"]["num_subjects"] == 300


def _tissue_mean(c, tissue, modality, label):
    return float(c.images[:, modality][tissue == TISSUE_LABELS[label]].mean())


def test_mri_contrasts_per_sequence(cohort_and_tissue):
    c, tissue = cohort_and_tissue
    m = lambda mod, lab: _tissue_mean(c, tissue, mod, lab)  # noqa: E731
    # T1: WM > GM > CSF; lesions darker than WM (black holes).
    assert m(T1, "wm") > m(T1, "gm") > m(T1, "ventricle")
    assert m(T1, "lesion") < m(T1, "wm")
    # T2: CSF > lesion > GM > WM.
    assert m(T2, "ventricle") > m(T2, "lesion") > m(T2, "gm") > m(T2, "wm")
    # FLAIR: CSF suppressed; lesion brightest; GM > WM.
    assert m(FLAIR, "lesion") > m(FLAIR, "gm") > m(FLAIR, "wm") > m(FLAIR, "ventricle")
    # Lesions are most conspicuous on FLAIR relative to white matter.
    assert m(FLAIR, "lesion") - m(FLAIR, "wm") > m(T2, "lesion") - m(T2, "wm") - 0.05
    # Lesion masks and lesion tissue agree.
    np.testing.assert_array_equal(c.lesion_masks, tissue == TISSUE_LABELS["lesion"])


def test_lesion_load_and_atrophy_order_by_class(cohort64):
    c, tissue = cohort64
    load = c.lesion_masks.sum(axis=(1, 2))
    vent = (tissue == TISSUE_LABELS["ventricle"]).sum(axis=(1, 2))
    mean_load = [load[c.labels == k].mean() for k in range(3)]
    mean_vent = [vent[c.labels == k].mean() for k in range(3)]
    assert mean_load[0] < mean_load[1] < mean_load[2]
    assert mean_load[0] > 0  # healthy controls have a few non-specific hyperintensities
    assert mean_vent[2] > mean_vent[1] and mean_vent[2] > mean_vent[0] * 1.2


def test_clinical_carries_class_information(cohort_and_tissue):
    c, _ = cohort_and_tissue
    female = c.clinical[:, 1] * 0.5 + 0.5
    edss = np.where(c.clinical_mask[:, 2], c.clinical[:, 2], np.nan)
    assert female[c.labels == 1].mean() > female[c.labels == 0].mean() + 0.1  # RRMS ~3:1 female
    e = [np.nanmean(edss[c.labels == k]) for k in range(3)]
    assert e[0] < e[1] < e[2]


def test_difficulty_increases_overlap():
    easy = generate_subjects(SyntheticCohortConfig(num_subjects=400, image_size=16, difficulty=0.0, seed=3))
    hard = generate_subjects(SyntheticCohortConfig(num_subjects=400, image_size=16, difficulty=1.0, seed=3))

    def edss_gap(c):  # separation of healthy vs progressive EDSS in pooled std units
        e = c.clinical[:, 2]
        return (e[c.labels == 2].mean() - e[c.labels == 0].mean()) / e.std()

    assert edss_gap(easy) > edss_gap(hard)


@pytest.mark.parametrize("kwargs, field", [
    ({"image_size": 8}, "image_size"),
    ({"image_size": 512}, "image_size"),
    ({"num_subjects": -5}, "num_subjects"),
    ({"difficulty": 1.5}, "difficulty"),
    ({"class_proportions": (0.5, 0.5, 0.5)}, "class_proportions"),
    ({"class_proportions": (0.5, 0.5)}, "class_proportions"),
])
def test_config_validation_names_field(kwargs, field):
    with pytest.raises(ConfigError, match=field):
        SyntheticCohortConfig(**kwargs)


def test_scanner_changes_intensity_statistics(cohort_and_tissue):
    c, _ = cohort_and_tissue
    p = default_site_profiles(5, seed=0)
    a, mask_a = apply_scanner(c.images, p[0], numpy_generator(0, 1))
    b, mask_b = apply_scanner(c.images, p[1], numpy_generator(0, 1))
    assert a.dtype == np.float32 and a.min() >= 0 and a.max() <= 1
    assert mask_a.all() and mask_b.all()
    # Same subjects, different scanners: different brightness and noise statistics.
    assert abs(a.mean() - b.mean()) > 0.005 or abs(a.std() - b.std()) > 0.005
    brain = c.images[:, FLAIR] > 0.2
    assert abs(a[:, FLAIR][brain].std() - b[:, FLAIR][brain].std()) > 0.005
    # The 1.5 T, noisier site has more background noise.
    bg = c.images[:, T1] == 0
    assert b[:, T1][bg].mean() > a[:, T1][bg].mean()
    # Deterministic given the generator.
    a2, _ = apply_scanner(c.images, p[0], numpy_generator(0, 1))
    np.testing.assert_array_equal(a, a2)


def test_missing_sequence_is_zero_and_masked(cohort_and_tissue):
    c, _ = cohort_and_tissue
    profile = default_site_profiles(5, seed=0, missing_modalities=((4, "T2"), (9, "T1")))[4]
    assert profile.missing_modalities == ("T2",)
    out, mask = apply_scanner(c.images, profile, numpy_generator(0, 2))
    assert not mask[:, T2].any() and mask[:, T1].all() and mask[:, FLAIR].all()
    assert np.all(out[:, T2] == 0) and out[:, T1].max() > 0


def test_site_profiles_are_diverse_and_deterministic():
    a, b = default_site_profiles(8, seed=0), default_site_profiles(8, seed=0)
    assert a == b
    assert len({p.name for p in a}) == 8
    assert {p.field_strength_t for p in a} == {1.5, 3.0}
    assert reference_profile().bias_field_strength == 0
    with pytest.raises(ConfigError, match="field_strength_t"):
        ScannerProfile(field_strength_t=7.0)
    with pytest.raises(ConfigError, match="missing_modalities"):
        ScannerProfile(missing_modalities=("DWI",))


def test_images_are_learnable_but_not_trivial_at_64_px():
    """Cohort realism (issue 16): after the site scanners, a linear model on 16 x 16 average-pooled
    slices finds the lesion signal (FLAIR alone above chance), does not solve the task, and images
    fused with the clinical variables beat either source alone. Deterministic (fixed seeds, lbfgs)."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import balanced_accuracy_score
    from sklearn.model_selection import StratifiedKFold, cross_val_predict
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    from mmpfl_core.data.contract import concatenate
    from mmpfl_core.data.federation import FederationConfig, build_federation

    fed = build_federation(SyntheticCohortConfig(num_subjects=600, image_size=64, seed=1),
                           FederationConfig(num_sites=3, seed=1))
    c = concatenate([s.train for s in fed.sites] + [s.test for s in fed.sites])
    pooled = c.images.reshape(len(c), 3, 16, 4, 16, 4).mean(axis=(3, 5))  # (N, M, 16, 16)
    clinical = np.where(c.clinical_mask, c.clinical, 0.0)
    sources = {"FLAIR": pooled[:, FLAIR].reshape(len(c), -1), "images": pooled.reshape(len(c), -1),
               "clinical": clinical}
    sources["fused"] = np.hstack([sources["images"], clinical])
    score = {}
    for name, x in sources.items():
        model = make_pipeline(StandardScaler(), LogisticRegression(C=0.05, max_iter=300))
        pred = cross_val_predict(model, x, c.labels, cv=StratifiedKFold(3, shuffle=True, random_state=0))
        score[name] = balanced_accuracy_score(c.labels, pred)
    # measured: FLAIR 0.58, images 0.62, clinical 0.65, fused 0.68 (chance 0.33)
    assert score["FLAIR"] > 0.45
    assert score["images"] < 0.95 and score["fused"] < 0.95
    assert score["fused"] > max(score["images"], score["clinical"])
