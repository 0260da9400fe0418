"""Shared fixtures and the test tiers.

Fixtures: a tiny federation and model factory that every engine test can afford on 2 cores, and
:func:`tiny_run_config`, the one round-loop config the engine tests start from (import it:
``from conftest import tiny_run_config``; each file states only what it changes), and
:func:`whole_killed_resumed`, the three runs of a resume test.

Tiers (markers, each with a per-test time budget; ``make test-fast`` = unit + integration):

=============  ============================================================  ==============
tier           what                                                          budget a test
=============  ============================================================  ==============
unit           maths, configs, data, single modules (seconds)                60 s
integration    federated runs, the CLI end to end, attacks on real releases  300 s
notebook       a notebook under papermill at the smoke settings              900 s
deploy         Flower: the simulation engine (Ray) and the loopback          660 s
               deployment (SuperLink + SuperNodes), every ``flower`` test
research       a claim checked at full defaults (``make research``)          1800 s
=============  ============================================================  ==============

A test file's tier is set in :data:`INTEGRATION_FILES` / :data:`DEPLOY_FILES` (else unit), or by an explicit
marker on the test (``notebook``, ``research``), which wins; a test marked ``flower`` (it starts Ray or
Flower processes, ~50 s of start-up) is in the deploy tier. An explicit ``@pytest.mark.timeout`` wins over
the tier's budget.
"""
from __future__ import annotations

import dataclasses
from typing import Any

import pytest

from mmpfl_core.data.federation import FederationConfig, build_federation
from mmpfl_core.data.synthetic import SyntheticCohortConfig
from mmpfl_core.federated.config import FederatedConfig, LocalTrainingConfig, OptimizerConfig
from mmpfl_core.models.presets import create_model

TINY_MODEL = dict(image_size=32, patch_size=8, embed_dim=32, depth=1, num_heads=2)
#: Plain SGD (no momentum, no weight decay): the update is a sum of clipped gradients, checkable by hand.
PLAIN_SGD = OptimizerConfig(name="sgd", lr=0.05, momentum=0.0, weight_decay=0.0)

TIERS = ("unit", "integration", "notebook", "deploy", "research")
BUDGET_SECONDS = {"unit": 60, "integration": 300, "notebook": 900, "deploy": 660, "research": 1800}
#: Files whose tests train federations, run the CLI end to end or attack real releases (minutes in all).
INTEGRATION_FILES = {
    "test_attacks_audit.py", "test_attacks_distinguishing.py", "test_attacks_membership.py", "test_bench_scripts.py",
    "test_centralized.py", "test_dp_sgd.py", "test_dp_strategies.py", "test_experiment_cli.py", "test_feddpa.py",
    "test_federated.py", "test_flower_app.py", "test_mm_pfl_adp.py", "test_personalized_strategies.py",
    "test_regime_map.py", "test_reproduction.py", "test_run_scopes.py", "test_secret_randomness.py",
    "test_server_optimizer.py", "test_user_cohort.py",
    # issue 21-23 files: runs through the release, resume, scans of whole comparisons, the vectorised engine
    "test_distinguishing_real_paths.py", "test_patient_dp_masks.py", "test_patient_level.py", "test_release.py",
    "test_release_scan.py", "test_threat_statements.py", "test_vectorized.py", "test_write_ahead_ledger.py",
}
DEPLOY_FILES = {"test_flower_deploy.py"}


def tiny_run_config(*, num_rounds: int = 2, local_steps: int | None = 2, local_epochs: int = 1, batch_size: int = 16,
                    optimizer: OptimizerConfig = OptimizerConfig(lr=3e-3), bootstrap_resamples: int = 20,
                    checkpoint_every: int = 0, **changes: Any) -> FederatedConfig:
    """The round-loop config of the engine tests: 2 rounds of 2 local AdamW steps on batches of 16, on the
    CPU, few bootstrap resamples and no checkpoints; any :class:`FederatedConfig` field can be changed."""
    base = FederatedConfig(num_rounds=num_rounds, optimizer=optimizer, bootstrap_resamples=bootstrap_resamples,
                           checkpoint_every=checkpoint_every, device="cpu",
                           local=LocalTrainingConfig(local_epochs=local_epochs, local_steps=local_steps,
                                                     batch_size=batch_size))
    return dataclasses.replace(base, **changes)


def whole_killed_resumed(federation, model_factory, make_strategy, config: FederatedConfig, root, *,
                         stop_after: int = 2) -> tuple[Any, Any, Any]:
    """A resume test's runs, each with a fresh ``make_strategy()`` and a run directory under ``root``: the
    uninterrupted run (``root/whole``), a run killed after round ``stop_after`` and that run resumed
    (``root/killed``). Returns ``(whole, resumed, run_dir)``; ``run_dir(name, resume)`` opens a run directory
    again (e.g. ``run_dir("whole", True)`` to read the finished run back)."""
    from mmpfl_core.federated.simulation import FederatedSimulation, run_federated
    from mmpfl_core.io.run_directory import RunDirectory

    def run_dir(name: str, resume: bool) -> RunDirectory:
        return RunDirectory.create(root, name, {"seed": 0}, exist_ok_resume=resume)

    def run(name: str, resume: bool):
        return run_federated(federation, model_factory=model_factory, strategy=make_strategy(), config=config,
                             progress=False, run_dir=run_dir(name, resume))

    whole = run("whole", False)
    FederatedSimulation(federation, model_factory=model_factory, strategy=make_strategy(), config=config,
                        run_dir=run_dir("killed", False), progress=False).run(stop_after=stop_after)
    return whole, run("killed", True), run_dir


def _tier(item: pytest.Item) -> str:
    explicit = [t for t in TIERS if item.get_closest_marker(t) is not None]
    if len(explicit) > 1:
        raise pytest.UsageError(f"{item.nodeid} is marked with several tiers {explicit}; keep one.")
    if explicit:
        return explicit[0]
    if item.get_closest_marker("flower") is not None:
        return "deploy"
    name = item.path.name
    return "deploy" if name in DEPLOY_FILES else "integration" if name in INTEGRATION_FILES else "unit"


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        tier = _tier(item)
        if item.get_closest_marker(tier) is None:
            item.add_marker(getattr(pytest.mark, tier))
        if item.get_closest_marker("timeout") is None:
            item.add_marker(pytest.mark.timeout(BUDGET_SECONDS[tier]))


@pytest.fixture(scope="session")
def tiny_federation():
    return build_federation(SyntheticCohortConfig(num_subjects=240, image_size=32, seed=1),
                            FederationConfig(num_sites=3, alpha=1.0, public_size=30, seed=1))


@pytest.fixture
def tiny_model_factory():
    return lambda: create_model("tiny", seed=0, **TINY_MODEL)
