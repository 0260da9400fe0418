"""Splitting the cohort into sites: disjointness, label skew, missing sequences, config checks."""
from __future__ import annotations

import numpy as np
import pytest

from mmpfl_core.data.contract import MODALITIES
from mmpfl_core.data.federation import (FederationConfig, build_federation, dirichlet_label_partition,
                                        label_divergence, label_divergence_from_counts)
from mmpfl_core.data.summary import cohort_summary_table
from mmpfl_core.data.synthetic import SyntheticCohortConfig
from mmpfl_core.errors import ConfigError
from mmpfl_core.seeding import numpy_generator

COHORT = SyntheticCohortConfig(num_subjects=400, image_size=32, seed=0)
FED = FederationConfig(num_sites=5, alpha=0.5, public_size=40, seed=0)


@pytest.fixture(scope="module")
def fed():
    return build_federation(COHORT, FED)


def test_partition_is_disjoint_and_covers_the_cohort(fed):
    ids = [cohort.subject_ids for s in fed.sites for cohort in (s.train, s.val, s.test)]
    site_ids = np.concatenate(ids)
    assert len(site_ids) == len(set(site_ids))  # no subject in two sites or two splits
    public = set(fed.public.subject_ids)
    assert public.isdisjoint(site_ids)
    assert set(site_ids) | public == {f"syn-{i:06d}" for i in range(COHORT.num_subjects)}
    assert set(fed.global_test.subject_ids) == set(np.concatenate([s.test.subject_ids for s in fed.sites]))


def test_site_sizes_splits_and_site_ids(fed):
    assert fed.num_sites == 5
    assert fed.site_sizes().sum() == COHORT.num_subjects - FED.public_size
    for s in fed.sites:
        assert len(s) >= FED.min_subjects_per_site
        for split in (s.train, s.val, s.test):
            assert len(split) >= 1 and np.all(split.sites == s.site_id)
        assert len(s.train) > len(s.test)
    assert np.all(fed.public.sites == -1)
    counts = fed.public.class_counts()
    assert counts.max() - counts.min() <= 1  # class-balanced public set
    assert fed.label_distribution().shape == (5, 3)


def test_missing_modality_site_has_zeros_and_mask_false(fed):
    t2 = MODALITIES.index("T2")
    gap = fed.sites[1]  # the default config drops T2 at site 1
    assert gap.profile.missing_modalities == ("T2",)
    for split in (gap.train, gap.val, gap.test):
        assert not split.modality_mask[:, t2].any()
        assert np.all(split.images[:, t2] == 0)
    for s in fed.sites[:1] + fed.sites[2:]:
        assert s.train.modality_mask.all()
    assert fed.public.modality_mask.all()


def test_sites_carry_their_scanner(fed):
    # Background intensity (noise floor) differs between the 3 T and the noisy 1.5 T site.
    bg = [s.train.images[:, 0, :3, :3].mean() for s in fed.sites[:2]]  # corner: air, noise only
    assert bg[1] > bg[0]


def test_build_is_deterministic():
    small = SyntheticCohortConfig(num_subjects=120, image_size=16, seed=2)
    cfg = FederationConfig(num_sites=3, public_size=10, seed=2)
    a, b = build_federation(small, cfg), build_federation(small, cfg)
    for sa, sb in zip(a.sites, b.sites):
        np.testing.assert_array_equal(sa.train.images, sb.train.images)
        np.testing.assert_array_equal(sa.test.subject_ids, sb.test.subject_ids)


def _partition_divergence(alpha: float, seed: int) -> float:
    labels = numpy_generator(seed, 99).choice(3, size=600, p=(0.4, 0.35, 0.25))
    parts = dirichlet_label_partition(labels, 8, alpha, 0.0, numpy_generator(seed), min_per_site=10)
    counts = np.stack([np.bincount(labels[p], minlength=3) for p in parts])
    return label_divergence_from_counts(counts)


def test_lower_alpha_gives_larger_label_divergence():
    skewed = np.mean([_partition_divergence(0.1, s) for s in range(5)])
    iid = np.mean([_partition_divergence(100.0, s) for s in range(5)])
    assert skewed > 5 * iid and skewed > 0.05
    assert _partition_divergence(float("inf"), 0) < 0.01


def test_label_divergence_of_federations():
    small = SyntheticCohortConfig(num_subjects=300, image_size=16, seed=0)
    div = [label_divergence(build_federation(small, FederationConfig(alpha=a, public_size=0, seed=0)))
           for a in (0.1, float("inf"))]
    assert div[0] > div[1]


@pytest.mark.parametrize("alpha", [0.01, 1.0, float("inf")])
def test_partition_properties(alpha):
    labels = numpy_generator(5).integers(0, 3, size=257)
    parts = dirichlet_label_partition(labels, 7, alpha, 1.0, numpy_generator(1), min_per_site=12)
    joined = np.concatenate(parts)
    assert len(joined) == len(labels) and len(np.unique(joined)) == len(labels)
    assert min(len(p) for p in parts) >= 12
    again = dirichlet_label_partition(labels, 7, alpha, 1.0, numpy_generator(1), min_per_site=12)
    assert all(np.array_equal(p, q) for p, q in zip(parts, again))


def test_no_skew_gives_equal_sites():
    labels = np.repeat(np.arange(3), 100)
    parts = dirichlet_label_partition(labels, 5, float("inf"), 0.0, numpy_generator(0), min_per_site=1)
    for p in parts:
        np.testing.assert_array_equal(np.bincount(labels[p], minlength=3), [20, 20, 20])


@pytest.mark.parametrize("kwargs, field", [
    ({"alpha": 0.0}, "alpha"),
    ({"alpha": -1.0}, "alpha"),
    ({"num_sites": 0}, "num_sites"),
    ({"quantity_skew": -0.1}, "quantity_skew"),
    ({"val_fraction": 0.5, "test_fraction": 0.5}, "test_fraction"),
    ({"min_subjects_per_site": 2}, "min_subjects_per_site"),
    ({"public_size": -1}, "public_size"),
    ({"missing_modality_sites": ((0, "DWI"),)}, "missing_modality_sites"),
])
def test_config_validation_names_field(kwargs, field):
    with pytest.raises(ConfigError, match=field):
        FederationConfig(**kwargs)


def test_too_few_subjects_is_a_config_error():
    with pytest.raises(ConfigError, match="num_subjects"):
        build_federation(SyntheticCohortConfig(num_subjects=50, image_size=16),
                         FederationConfig(num_sites=5, public_size=20))


def test_summary_table(fed):
    table = cohort_summary_table(fed)
    assert list(table["site"]) == [0, 1, 2, 3, 4, -1]
    class_cols = ["n_healthy", "n_rrms", "n_progressive_ms"]
    sites = table[table["site"] >= 0]
    assert (sites[class_cols].sum(axis=1) == sites[["n_train", "n_val", "n_test"]].sum(axis=1)).all()
    assert table.loc[1, "missing_sequences"] == "T2"
    assert table[class_cols].to_numpy().sum() == COHORT.num_subjects


def test_input_batches_cover_the_dataset_in_order(fed):
    # The one batching of the Fisher passes (public set in dp-fedavg-fisher, scoring data in feddpa).
    from mmpfl_core.data.contract import CohortDataset

    data = CohortDataset(fed.public)
    batches = list(data.input_batches(7))
    assert [len(y) for _, y in batches] == [7] * (len(data) // 7) + ([len(data) % 7] if len(data) % 7 else [])
    images, mask, clinical = (np.concatenate([x[i].numpy() for x, _ in batches]) for i in range(3))
    np.testing.assert_array_equal(images, fed.public.images)
    np.testing.assert_array_equal(mask, fed.public.modality_mask)
    np.testing.assert_array_equal(clinical, fed.public.clinical)
    np.testing.assert_array_equal(np.concatenate([y.numpy() for _, y in batches]), fed.public.labels)
