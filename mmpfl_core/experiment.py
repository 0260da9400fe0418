"""An experiment: data, federation, model and round-loop configs, plus the methods to compare.

This is the edge where YAML (``configs/*.yaml``), the CLI and notebook parameters become typed
configs. :func:`run_method` trains one method; :func:`compare_methods` trains several on the same
federation and returns a table with 95% confidence intervals.

``data`` is either the synthetic cohort (:class:`SyntheticCohortConfig`, the default) or a cohort
file a user converted from their own NIfTI/DICOM/PNG files (:class:`CohortSource`, YAML
``data: {cohort: PATH}``, CLI ``--data PATH``), split into sites by its site column. Before any run
directory is created, every method is built and checked against the data (a Fisher method needs a
public set; the model's image size, sequences and classes must match the cohort), so a bad input
fails with one clear error and leaves nothing behind; a run that fails before its first checkpoint
or metrics row is removed again.
"""
from __future__ import annotations

import dataclasses
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from collections.abc import Callable, Mapping

import pandas as pd
import yaml

from .configuration import dataclass_from_dict, to_plain
from .data.cohort_federation import CohortSource, federation_from_cohort
from .data.federation import Federation, FederationConfig, build_federation
from .data.synthetic import SyntheticCohortConfig
from .data.transforms import map_federation, select_modalities
from .errors import ConfigError
from .experiment_checks import build_checked_strategy, check_model_matches_data, data_shape
from .federated.config import FederatedConfig
from .federated.simulation import RunResult, run_federated
from .federated.strategies import available_strategies
from .io.run_directory import RunDirectory
from .models.presets import create_model, list_presets

CONFIG_DIR = Path(__file__).resolve().parent.parent / "configs"


@dataclass(frozen=True)
class ModelSpec:
    """A model preset plus :class:`~mmpfl_core.models.vit.ViTConfig` overrides (e.g. ``fusion``)."""

    preset: str = "tiny"
    overrides: Mapping[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.preset not in list_presets():
            raise ConfigError(f"model.preset={self.preset!r} is unknown; available: {list_presets()}.")


@dataclass(frozen=True)
class MethodSpec:
    """One row of a comparison: a registered strategy, its arguments and a display label."""

    strategy: str
    label: str = ""
    kwargs: Mapping[str, Any] = field(default_factory=dict)
    #: Train and evaluate with only these sequences (e.g. ("FLAIR",)): the single-modality ablation.
    modalities: tuple[str, ...] | None = None

    def __post_init__(self) -> None:
        if self.strategy not in available_strategies():
            raise ConfigError(f"method strategy={self.strategy!r} is unknown; available: {available_strategies()}.")
        if self.modalities is not None:
            object.__setattr__(self, "modalities", tuple(self.modalities))
        if not self.label:
            object.__setattr__(self, "label", self.strategy)


@dataclass(frozen=True)
class ExperimentConfig:
    name: str = "quickstart"
    data: SyntheticCohortConfig | CohortSource = field(default_factory=SyntheticCohortConfig)
    federation: FederationConfig = field(default_factory=FederationConfig)
    model: ModelSpec = field(default_factory=ModelSpec)
    federated: FederatedConfig = field(default_factory=FederatedConfig)
    methods: tuple[MethodSpec, ...] = (MethodSpec("fedavg"),)

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> ExperimentConfig:
        values = dict(values)
        allowed = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - allowed)
        if unknown:
            raise ConfigError(f"unknown top-level key(s) {unknown}; allowed: {sorted(allowed)}.")
        methods = tuple(_method_from_dict(m) for m in values.get("methods", [{"strategy": "fedavg"}]))
        return cls(
            name=str(values.get("name", "experiment")),
            data=_data_from_dict(values.get("data")),
            federation=dataclass_from_dict(FederationConfig, values.get("federation"), "federation"),
            model=dataclass_from_dict(ModelSpec, values.get("model"), "model"),
            federated=FederatedConfig.from_dict(values.get("federated") or {}),
            methods=methods,
        )

    def to_dict(self) -> dict[str, Any]:
        return to_plain(self)

    def replace(self, **sections: Mapping[str, Any]) -> ExperimentConfig:
        """A copy with some fields of some sections changed, e.g. ``replace(federated={"num_rounds": 3})``."""
        values = self.to_dict()
        for section, changes in sections.items():
            if isinstance(values.get(section), dict):
                values[section] = _deep_update(values[section], changes)
            else:
                values[section] = changes
        return ExperimentConfig.from_dict(values)


def _data_from_dict(values: Mapping[str, Any] | None) -> SyntheticCohortConfig | CohortSource:
    """``data:`` is a user's cohort when it names one (``cohort: PATH``), else the synthetic cohort."""
    if values is not None and not isinstance(values, Mapping):
        raise ConfigError(f"data={values!r} must be a mapping: {{cohort: PATH}} or synthetic cohort fields.")
    if values and "cohort" in values:
        return dataclass_from_dict(CohortSource, values, "data (a cohort file)")
    return dataclass_from_dict(SyntheticCohortConfig, values, "data")


def with_cohort(config: ExperimentConfig, cohort_path: str | Path | None) -> ExperimentConfig:
    """``config`` reading its data from ``cohort_path`` (a converted cohort .npz); None keeps ``config``.

    This is what ``--data PATH`` and the notebooks' ``COHORT_PATH`` parameter do. The seed carries over.
    """
    if cohort_path is None:
        return config
    values = config.to_dict()
    values["data"] = {"cohort": str(cohort_path), "seed": config.data.seed}
    return ExperimentConfig.from_dict(values)


def _deep_update(base: dict[str, Any], changes: Mapping[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in changes.items():
        out[key] = _deep_update(out[key], value) if isinstance(value, Mapping) and isinstance(out.get(key), dict) else value
    return out


def _method_from_dict(values: Mapping[str, Any] | str) -> MethodSpec:
    if isinstance(values, str):
        return MethodSpec(values)
    values = dict(values)
    strategy = values.pop("strategy", None)
    if strategy is None:
        raise ConfigError(f"method entry {values} needs a 'strategy' key; available: {available_strategies()}.")
    label = values.pop("label", "")
    modalities = values.pop("modalities", None)
    # Strategy arguments may sit beside "strategy" (YAML) or under "kwargs" (a saved config).
    kwargs = {**dict(values.pop("kwargs", None) or {}), **values}
    return MethodSpec(strategy=strategy, label=label, kwargs=kwargs, modalities=modalities)


def load_experiment(path_or_name: str | Path) -> ExperimentConfig:
    """Read a YAML experiment: a file path, or the name of a preset in ``configs/`` (``quickstart``)."""
    path = Path(path_or_name)
    if not path.suffix:
        path = CONFIG_DIR / f"{path_or_name}.yaml"
    if not path.is_file():
        known = sorted(p.stem for p in CONFIG_DIR.glob("*.yaml")) if CONFIG_DIR.is_dir() else []
        raise ConfigError(f"experiment config {str(path_or_name)!r} not found; presets: {known}, or pass a YAML path.")
    return ExperimentConfig.from_dict(yaml.safe_load(path.read_text()) or {})


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
    """Delete a run directory this call created if it holds no metrics and no checkpoint (nothing to resume)."""
    checkpoints = path / "checkpoints"
    if (path / "metrics.csv").exists() or (checkpoints.is_dir() and any(checkpoints.iterdir())):
        return
    shutil.rmtree(path, ignore_errors=True)


def run_method(config: ExperimentConfig, method: MethodSpec, federation: Federation | None = None, *,
               results_dir: Path | None = None, progress: bool = True, resume: bool = True) -> RunResult:
    """Train one method. With ``results_dir``, the run lives in ``<results_dir>/<label>/`` and resumes."""
    federation = federation if federation is not None else make_federation(config)
    if method.modalities is not None:
        keep = method.modalities
        federation = map_federation(federation, lambda cohort: select_modalities(cohort, keep))
    factory = model_factory(config, federation)
    strategy = build_checked_strategy(method, federation)
    if results_dir is None:
        return run_federated(federation, model_factory=factory, strategy=strategy, config=config.federated,
                             progress=progress)
    run_config = {**config.to_dict(), "method": to_plain(method)}
    run_config.pop("methods")
    path = Path(results_dir) / method.label
    created, root_created = not path.exists(), not Path(results_dir).exists()
    try:
        run_dir = RunDirectory.create(results_dir, method.label, run_config, exist_ok_resume=resume)
        return run_federated(federation, model_factory=factory, strategy=strategy, config=config.federated,
                             run_dir=run_dir, progress=progress)
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
        rows.append({
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
        })
    return pd.DataFrame(rows)


def compare_methods(config: ExperimentConfig, *, results_dir: Path | None = None, progress: bool = True
                    ) -> tuple[pd.DataFrame, dict[str, RunResult], Federation]:
    """Train every method of ``config`` on one shared federation; return the table and the runs."""
    federation = make_federation(config)
    check_model_matches_data(config, federation)
    for method in config.methods:  # every method checked before the first one trains
        build_checked_strategy(method, federation)
    runs = {m.label: run_method(config, m, federation, results_dir=results_dir, progress=progress)
            for m in config.methods}
    return comparison_table(runs), runs, federation


def with_privacy_budget(config: ExperimentConfig, target_epsilon: float) -> ExperimentConfig:
    """The same experiment with every method that has a ``target_epsilon`` set to ``target_epsilon``."""
    methods = tuple(dataclasses.replace(m, kwargs={**m.kwargs, "target_epsilon": target_epsilon})
                    if "target_epsilon" in m.kwargs else m for m in config.methods)
    return dataclasses.replace(config, methods=methods)
