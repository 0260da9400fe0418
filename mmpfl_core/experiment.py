"""Running an experiment: its federation, model factory, one method's run, and the comparison table.

The typed configs (and their YAML/CLI edge) live in :mod:`mmpfl_core.experiment_config` and are
re-exported here. :func:`run_method` trains one method; :func:`compare_methods` trains several on the
same federation and returns a table with 95% confidence intervals.

Before any run directory is created, every method's strategy is built once and checked against the
data (:func:`~mmpfl_core.experiment_checks.build_checked_strategy`: a Fisher method needs a public
set; the model's image size, sequences and classes must match the cohort), so a bad input fails with
one clear error and leaves nothing behind; each run then trains with the strategy built for it. A
run that fails before its first checkpoint or metrics row is removed again.
"""

from __future__ import annotations

import shutil
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import pandas as pd

from .configuration import to_plain
from .data.cohort_federation import CohortSource, federation_from_cohort
from .data.federation import Federation, build_federation
from .data.transforms import map_federation, select_modalities
from .experiment_checks import build_checked_strategy, check_model_matches_data, data_shape
from .experiment_config import (
    CONFIG_DIR,
    ExperimentConfig,
    MethodSpec,
    ModelSpec,
    load_experiment,
    with_cohort,
    with_privacy_budget,
)
from .federated.simulation import RunResult, run_federated
from .federated.strategies import Strategy
from .io.run_directory import RunDirectory
from .models.presets import create_model

__all__ = [
    "CONFIG_DIR",
    "ExperimentConfig",
    "MethodSpec",
    "ModelSpec",
    "load_experiment",
    "with_cohort",
    "with_privacy_budget",
    "make_federation",
    "model_factory",
    "run_method",
    "comparison_table",
    "compare_methods",
]


def make_federation(config: ExperimentConfig) -> Federation:
    """The federation of ``config``: generated (synthetic) or read from the user's cohort file."""
    if isinstance(config.data, CohortSource):
        from .data.cohort_files import load_cohort, load_federation

        if Path(config.data.cohort).is_dir():  # a saved federation (`mmpfl generate`): its sites and splits as written
            return load_federation(config.data.cohort)
        return federation_from_cohort(load_cohort(config.data.cohort), config.data, config.federation)
    return build_federation(config.data, config.federation)


def model_factory(config: ExperimentConfig, federation: Federation) -> Callable[[], Any]:
    """A zero-argument constructor whose model matches the data (size, sequences, classes) and seed."""
    check_model_matches_data(config, federation)
    overrides = {**data_shape(federation), **dict(config.model.overrides)}
    return lambda: create_model(config.model.preset, seed=config.federated.seed, **overrides)


def _remove_unused_run(path: Path) -> None:
    """Delete a run directory this call created if it holds no metrics, no checkpoint and no recorded
    release (a ledger file with entries is kept: its releases were made and stay spent, docs/DESIGN.md 4.8)."""
    checkpoints = path / "private" / "checkpoints"
    if (path / "metrics.csv").exists() or (checkpoints.is_dir() and any(checkpoints.iterdir())):
        return
    if (path / "config.json").is_file() and RunDirectory(path).has_releases():
        return
    shutil.rmtree(path, ignore_errors=True)


def run_method(
    config: ExperimentConfig,
    method: MethodSpec,
    federation: Federation | None = None,
    *,
    results_dir: Path | None = None,
    progress: bool = True,
    resume: bool = True,
    strategy: Strategy | None = None,
) -> RunResult:
    """Train one method. With ``results_dir``, the run lives in ``<results_dir>/<label>/`` and resumes.

    ``strategy``: the method's strategy when the caller already built and checked it
    (:func:`compare_methods` does, for every method before the first trains), so it is built once per run.
    """
    federation = federation if federation is not None else make_federation(config)
    if method.modalities is not None:
        keep = method.modalities
        federation = map_federation(federation, lambda cohort: select_modalities(cohort, keep))
    factory = model_factory(config, federation)
    if strategy is None:
        strategy = build_checked_strategy(method, federation)
    if results_dir is None:
        return run_federated(
            federation, model_factory=factory, strategy=strategy, config=config.federated, progress=progress
        )
    run_config = {**config.to_dict(), "method": to_plain(method)}
    run_config.pop("methods")
    path = Path(results_dir) / method.label
    created, root_created = not path.exists(), not Path(results_dir).exists()
    try:
        run_dir = RunDirectory.create(results_dir, method.label, run_config, exist_ok_resume=resume)
        return run_federated(
            federation,
            model_factory=factory,
            strategy=strategy,
            config=config.federated,
            run_dir=run_dir,
            progress=progress,
        )
    except BaseException:
        if created:
            _remove_unused_run(path)
        if root_created and Path(results_dir).is_dir() and not any(Path(results_dir).iterdir()):
            Path(results_dir).rmdir()
        raise


def _ci_text(entry: Mapping[str, float] | None) -> str:
    if not entry:
        return "n/a"
    return f"{entry['point']:.3f} [{entry['low']:.3f}, {entry['high']:.3f}]"


def comparison_table(runs: Mapping[str, RunResult]) -> pd.DataFrame:
    """One row per method: accuracy with 95% CI (global and personalised), other metrics, communication."""
    rows = []
    for label, run in runs.items():
        s = run.summary
        personal, global_ = s.get("personal_test", {}), s.get("global_test")
        if global_:
            global_text = _ci_text(global_["accuracy"])
        elif "global_test_accuracy" in s.get("final", {}):  # local-only: no global model exists
            global_text = f"{s['final']['global_test_accuracy']:.3f} (mean of site models)"
        else:
            global_text = "n/a"
        rows.append(
            {
                "method": label,
                "global acc [95% CI]": global_text,
                "personal acc [95% CI]": _ci_text(personal.get("accuracy")),
                # Every method has deployed (personal) predictions; a global model only some have.
                "balanced acc (personal)": personal["balanced_accuracy"]["point"],
                "macro-F1 (personal)": personal["macro_f1"]["point"],
                "AUROC (personal)": personal["auroc"]["point"],
                "rounds to target": s.get("rounds_to_target"),
                "MB total": s["megabytes_up"] + s["megabytes_down"],
                "MB to target": s.get("megabytes_to_target"),
            }
        )
    return pd.DataFrame(rows)


#: Columns of :func:`comparison_table` computed from byte counters, which depend on the sites' private masks and
#: on who took part (secret under sampling): operator-only, written under ``private/`` (docs/DESIGN.md 6).
COMMUNICATION_COLUMNS = ("MB total", "MB to target")


def split_comparison_table(table: pd.DataFrame) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(released, private) parts of a :func:`comparison_table`: the private part is ``method`` plus the
    byte-count columns (:data:`COMMUNICATION_COLUMNS`); the released part is everything else."""
    private = [c for c in COMMUNICATION_COLUMNS if c in table.columns]
    return table.drop(columns=private), table[["method", *private]]


def compare_methods(
    config: ExperimentConfig, *, results_dir: Path | None = None, progress: bool = True
) -> tuple[pd.DataFrame, dict[str, RunResult], Federation]:
    """Train every method of ``config`` on one shared federation; return the table and the runs."""
    federation = make_federation(config)
    check_model_matches_data(config, federation)
    # every method built and checked before the first one trains; each run then uses its strategy
    strategies = {m.label: build_checked_strategy(m, federation) for m in config.methods}
    runs = {
        m.label: run_method(
            config, m, federation, results_dir=results_dir, progress=progress, strategy=strategies[m.label]
        )
        for m in config.methods
    }
    return comparison_table(runs), runs, federation
