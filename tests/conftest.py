"""Shared fixtures: a tiny federation and model factory that every engine test can afford on 2 cores."""
from __future__ import annotations

import pytest

from mmpfl_core.data.federation import FederationConfig, build_federation
from mmpfl_core.data.synthetic import SyntheticCohortConfig
from mmpfl_core.models.presets import create_model

TINY_MODEL = dict(image_size=32, patch_size=8, embed_dim=32, depth=1, num_heads=2)


@pytest.fixture(scope="session")
def tiny_federation():
    return build_federation(SyntheticCohortConfig(num_subjects=240, image_size=32, seed=1),
                            FederationConfig(num_sites=3, alpha=1.0, public_size=30, seed=1))


@pytest.fixture
def tiny_model_factory():
    return lambda: create_model("tiny", seed=0, **TINY_MODEL)
