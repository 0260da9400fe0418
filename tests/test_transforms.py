"""Cohort transforms for ablations: hidden sequences are zeros with mask 0, and models ignore them."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from mmpfl_core.data import FederationConfig, SyntheticCohortConfig, build_federation, generate_subjects
from mmpfl_core.data.transforms import clinical_only, drop_clinical, images_only, map_federation, select_modalities
from mmpfl_core.errors import DataError
from mmpfl_core.models.presets import create_model


@pytest.fixture(scope="module")
def cohort():
    return generate_subjects(SyntheticCohortConfig(num_subjects=12, image_size=32, seed=3))


def test_select_modalities_zeroes_and_masks_the_others(cohort):
    out = select_modalities(cohort, ["flair"])  # case-insensitive
    assert out.modality_mask[:, :2].sum() == 0 and np.array_equal(out.modality_mask[:, 2], cohort.modality_mask[:, 2])
    assert np.all(out.images[:, :2] == 0)
    assert np.array_equal(out.images[:, 2], cohort.images[:, 2])
    assert np.array_equal(out.labels, cohort.labels) and out.images.dtype == np.float32
    assert cohort.images[:, 0].any(), "the input must not be modified"


def test_select_modalities_keeps_a_missing_sequence_missing(cohort):
    from dataclasses import replace
    mask = cohort.modality_mask.copy()
    mask[0, 1] = False
    images = cohort.images.copy()
    images[0, 1] = 0
    gappy = replace(cohort, modality_mask=mask, images=images)
    out = select_modalities(gappy, ["T2"])
    assert not out.modality_mask[0, 1] and out.modality_mask[1:, 1].all()


def test_select_modalities_rejects_unknown_names_and_bare_strings(cohort):
    with pytest.raises(DataError, match="unknown sequence"):
        select_modalities(cohort, ["DWI"])
    with pytest.raises(DataError, match="is a string"):
        select_modalities(cohort, "FLAIR")


def test_clinical_transforms(cohort):
    out = drop_clinical(cohort)
    assert np.all(out.clinical == 0) and not out.clinical_mask.any()
    assert np.array_equal(images_only(cohort).clinical, out.clinical)
    only = clinical_only(cohort)
    assert not only.modality_mask.any() and np.all(only.images == 0)
    assert np.array_equal(only.clinical, cohort.clinical)


def test_map_federation_transforms_every_split():
    fed = build_federation(SyntheticCohortConfig(num_subjects=120, image_size=32, seed=0),
                           FederationConfig(num_sites=2, public_size=10, seed=0))
    out = map_federation(fed, clinical_only)
    for site in out.sites:
        for split in (site.train, site.val, site.test):
            assert not split.modality_mask.any()
    assert not out.global_test.modality_mask.any() and not out.public.modality_mask.any()
    assert fed.sites[0].train.modality_mask.any(), "the input federation is unchanged"


@pytest.mark.parametrize("fusion", ["early", "token", "late"])
def test_models_ignore_pixels_of_masked_sequences_and_accept_no_images(cohort, fusion):
    model = create_model("tiny", seed=0, fusion=fusion).eval()
    hidden = select_modalities(cohort, ["T1", "FLAIR"])
    noisy = hidden.images.copy()
    noisy[:, 1] = np.random.default_rng(0).random(noisy[:, 1].shape, dtype=np.float32)
    mask, clinical = torch.from_numpy(hidden.modality_mask), torch.from_numpy(hidden.clinical)
    with torch.no_grad():
        a = model(torch.from_numpy(hidden.images), mask, clinical)
        b = model(torch.from_numpy(noisy), mask, clinical)
        none = clinical_only(cohort)
        c = model(torch.from_numpy(none.images), torch.from_numpy(none.modality_mask), clinical)
    assert torch.allclose(a, b, atol=1e-6)
    assert torch.isfinite(c).all()


def test_accuracy_ci_frame_and_overlay():
    import matplotlib
    matplotlib.use("Agg")
    from mmpfl_core.plots.attention import plot_attention_overlay, upsample_grid
    from mmpfl_core.plots.fusion import accuracy_ci_frame, plot_accuracy_with_ci

    class _Run:  # the only attribute accuracy_ci_frame reads
        def __init__(self, p):
            self.summary = {"global_test": {"accuracy": {"point": p, "low": p - 0.1, "high": p + 0.1}}}
    frame = accuracy_ci_frame({"a": _Run(0.5), "b": _Run(0.7)})
    assert frame["point"].tolist() == [0.5, 0.7] and frame["low"].tolist() == pytest.approx([0.4, 0.6])
    plot_accuracy_with_ci(frame, chance=0.4)
    up = upsample_grid(np.arange(4, dtype=np.float32).reshape(2, 2), 8)
    assert up.shape == (8, 8) and up[0, 0] == 0 and up[7, 7] == 3
    with pytest.raises(ValueError):
        upsample_grid(np.zeros((3, 3)), 8)
    axes = plot_attention_overlay(np.zeros((3, 8, 8)), np.ones((3, 2, 2)), ["T1", "T2", "FLAIR"],
                                  lesion_mask=np.eye(8, dtype=bool))
    assert len(axes) == 3
