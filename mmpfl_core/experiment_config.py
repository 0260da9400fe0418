"""The typed configs of an experiment: data, federation, model, round loop, and the methods to compare.

This is the edge where YAML (``configs/*.yaml``), the CLI and notebook parameters become typed
configs; nothing here trains or reads data. :mod:`mmpfl_core.experiment` runs them and
:mod:`mmpfl_core.experiment_checks` checks them against the data (both import this module, which
imports neither, so the three form no import circle).

``pretraining`` (:class:`PretrainingSpec`, off by default) is the public pretraining stage: when on,
every method starts from a model pretrained on a public cohort and trains only a private part of it
(:mod:`mmpfl_core.pretraining`; run by :mod:`mmpfl_core.experiment`).

``data`` is either the synthetic cohort (:class:`SyntheticCohortConfig`, the default) or a cohort
file a user converted from their own NIfTI/DICOM/PNG files (:class:`CohortSource`, YAML
``data: {cohort: PATH}``, CLI ``--data PATH``), split into sites by its site column.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from .configuration import dataclass_from_dict, to_plain
from .data.cohort_federation import CohortSource
from .data.federation import FederationConfig
from .data.synthetic import SyntheticCohortConfig
from .errors import ConfigError
from .federated.config import FederatedConfig
from .federated.strategies import available_strategies
from .models.presets import list_presets

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
    #: This method's own number of rounds (None: ``federated.num_rounds``). Cross-silo DP-SGD takes ONE
    #: step over the union of the patients a round, where a local-epoch method takes an epoch at every
    #: site, so the two converge at very different round counts; the method's ledger accounts its own rounds.
    num_rounds: int | None = None
    #: This method's own local batch size (None: ``federated.local.batch_size``); e.g. ``centralized`` on the pooled
    #: patients of 40 hospitals takes the larger batch that a FedAvg round averages over its sites.
    batch_size: int | None = None
    #: This method's own local epochs a round (None: ``federated.local.local_epochs``). A hospital training alone
    #: runs ONE round of many epochs (one optimiser): a round restarts the client's optimiser, so 20 rounds of one
    #: epoch train a local-only model worse than one round of 20 epochs (bench/results/wcp_headline6500_3seeds*).
    local_epochs: int | None = None

    def __post_init__(self) -> None:
        if self.strategy not in available_strategies():
            raise ConfigError(f"method strategy={self.strategy!r} is unknown; available: {available_strategies()}.")
        for name, default in (
            ("num_rounds", "federated.num_rounds"),
            ("batch_size", "federated.local.batch_size"),
            ("local_epochs", "federated.local.local_epochs"),
        ):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
                raise ConfigError(
                    f"method {self.label or self.strategy!r}: {name}={value!r} must be a positive integer "
                    f"(or left out to use {default})."
                )
        if self.modalities is not None:
            object.__setattr__(self, "modalities", tuple(self.modalities))
        if not self.label:
            object.__setattr__(self, "label", self.strategy)


@dataclass(frozen=True)
class PretrainingSpec:
    """The public pretraining stage (YAML ``pretraining:``), off by default.

    When ``enabled``, :func:`mmpfl_core.experiment.compare_methods` (and so ``mmpfl compare``, ``train``
    and ``demo``) pretrains the model once, centrally and at no privacy cost, on a PUBLIC cohort
    (:func:`mmpfl_core.pretraining.public_cohort`: ``num_subjects`` fresh synthetic subjects drawn
    with their own ``seed`` on the public reference scanner, never a site's patients), and every
    method, local-only and centralized included, starts from those weights with only the
    ``private_part`` trainable (:func:`mmpfl_core.pretraining.restrict_trainable`): the private
    dimension d that every release clips, noises and accounts is that part's size.
    """

    enabled: bool = False
    num_subjects: int = 2000  # public subjects (the public stand-in for public MRI collections)
    seed: int = 104_729  # the public cohort's own seed: must differ from the private cohort's (data.seed)
    epochs: int = 10  # centralized passes over the public cohort
    lr: float = 1e-3  # AdamW peak learning rate (warm-up + cosine, mmpfl_core.centralized)
    batch_size: int = 32
    private_part: str = "head+norm"  # a name of mmpfl_core.pretraining.PRIVATE_PARTS
    difficulty: float = 0.5  # the public population's difficulty (the synthetic generator's knob)

    def __post_init__(self) -> None:
        from .pretraining import PRIVATE_PARTS  # read when validating: new parts are accepted at once

        def whole(name: str, value: Any, low: int, fix: str) -> None:
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise ConfigError(f"pretraining.{name}={value!r} must be an integer >= {low}; {fix}")

        if not isinstance(self.enabled, bool):
            raise ConfigError(
                f"pretraining.enabled={self.enabled!r} must be true or false (YAML booleans, not a string)."
            )
        whole("num_subjects", self.num_subjects, 30, "a public cohort needs a few dozen subjects (default 2000).")
        whole("epochs", self.epochs, 1, "pretrain for at least one epoch (default 10), or set enabled: false.")
        whole("batch_size", self.batch_size, 1, "use e.g. 32.")
        whole("seed", self.seed, 0, "give the public cohort a seed of its own (default 104729).")
        if isinstance(self.lr, bool) or not isinstance(self.lr, (int, float)) or not 0 < self.lr < math.inf:
            raise ConfigError(f"pretraining.lr={self.lr!r} must be a finite number > 0, e.g. 1e-3.")
        if isinstance(self.difficulty, bool) or not isinstance(self.difficulty, (int, float)):
            raise ConfigError(f"pretraining.difficulty={self.difficulty!r} must be a number, e.g. 0.5.")
        if self.private_part not in PRIVATE_PARTS:
            raise ConfigError(
                f"pretraining.private_part={self.private_part!r} is unknown; use one of {sorted(PRIVATE_PARTS)} "
                "('all' trains every parameter: no reduction of d)."
            )


@dataclass(frozen=True)
class ExperimentConfig:
    name: str = "quickstart"
    data: SyntheticCohortConfig | CohortSource = field(default_factory=SyntheticCohortConfig)
    federation: FederationConfig = field(default_factory=FederationConfig)
    model: ModelSpec = field(default_factory=ModelSpec)
    federated: FederatedConfig = field(default_factory=FederatedConfig)
    methods: tuple[MethodSpec, ...] = (MethodSpec("fedavg"),)
    pretraining: PretrainingSpec = field(default_factory=PretrainingSpec)

    def __post_init__(self) -> None:
        if self.pretraining.enabled and int(self.pretraining.seed) == int(self.data.seed):
            raise ConfigError(
                f"pretraining.seed={self.pretraining.seed} equals data.seed: the 'public' cohort would re-draw "
                "the sites' own patients. Give pretraining a seed of its own (default 104729)."
            )

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
            pretraining=_pretraining_from_dict(values.get("pretraining")),
        )

    def to_dict(self) -> dict[str, Any]:
        """Plain values; the ``pretraining`` section only when it differs from the default (off), so the
        stored config of a run without the stage is what it was before the stage existed (resume compares it)."""
        plain = to_plain(self)
        if self.pretraining == PretrainingSpec():
            plain.pop("pretraining")
        return plain

    def replace(self, **sections: Mapping[str, Any]) -> ExperimentConfig:
        """A copy with some fields of some sections changed, e.g. ``replace(federated={"num_rounds": 3})``.

        Edits the typed sections directly (:func:`dataclasses.replace`, so each section's
        ``__post_init__`` validates again); a nested mapping edits a nested config or merges into a
        mapping field (``model={"overrides": {...}}``). An unknown field is a :class:`ConfigError`.
        """
        changes: dict[str, Any] = {}
        for section, values in sections.items():
            if not hasattr(self, section):
                raise ConfigError(
                    f"unknown section {section!r}; sections: {[f.name for f in dataclasses.fields(self)]}."
                )
            current = getattr(self, section)
            changes[section] = (
                _replace_fields(current, values, section)
                if dataclasses.is_dataclass(current) and isinstance(values, Mapping)
                else values
            )
        return dataclasses.replace(self, **changes)


def _replace_fields(obj: Any, values: Mapping[str, Any], where: str) -> Any:
    """``obj`` (a config dataclass) with ``values`` set, recursing into nested configs and merging mappings."""
    names = {f.name for f in dataclasses.fields(obj)}
    unknown = sorted(set(values) - names)
    if unknown:
        raise ConfigError(f"{where}: unknown field(s) {unknown}; allowed: {sorted(names)}.")
    changes: dict[str, Any] = {}
    for key, value in values.items():
        current = getattr(obj, key)
        if isinstance(value, Mapping) and dataclasses.is_dataclass(current):
            value = _replace_fields(current, value, f"{where}.{key}")
        elif isinstance(value, Mapping) and isinstance(current, Mapping):
            value = {**current, **value}
        elif isinstance(value, list):  # frozen dataclasses hold tuples
            value = tuple(value)
        changes[key] = value
    return dataclasses.replace(obj, **changes)


def _pretraining_from_dict(values: Any) -> PretrainingSpec:
    if values is not None and not isinstance(values, Mapping):
        raise ConfigError(
            f"pretraining={values!r} must be a mapping, e.g. {{enabled: true, private_part: head, epochs: 10}}."
        )
    return dataclass_from_dict(PretrainingSpec, values, "pretraining")


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
    return dataclasses.replace(config, data=CohortSource(cohort=str(cohort_path), seed=config.data.seed))


def _method_from_dict(values: Mapping[str, Any] | str) -> MethodSpec:
    if isinstance(values, str):
        return MethodSpec(values)
    values = dict(values)
    strategy = values.pop("strategy", None)
    if strategy is None:
        raise ConfigError(f"method entry {values} needs a 'strategy' key; available: {available_strategies()}.")
    label = values.pop("label", "")
    modalities = values.pop("modalities", None)
    num_rounds = values.pop("num_rounds", None)
    batch_size = values.pop("batch_size", None)
    local_epochs = values.pop("local_epochs", None)
    # Strategy arguments may sit beside "strategy" (YAML) or under "kwargs" (a saved config).
    kwargs = {**dict(values.pop("kwargs", None) or {}), **values}
    return MethodSpec(
        strategy=strategy,
        label=label,
        kwargs=kwargs,
        modalities=modalities,
        num_rounds=num_rounds,
        batch_size=batch_size,
        local_epochs=local_epochs,
    )


def method_federated_config(config: ExperimentConfig, method: MethodSpec) -> FederatedConfig:
    """The round loop's config for ``method``: ``config.federated`` with the method's own ``num_rounds``,
    ``batch_size`` and ``local_epochs`` where it sets them."""
    federated = config.federated
    if method.num_rounds is not None:
        federated = dataclasses.replace(federated, num_rounds=method.num_rounds)
    local = {
        name: getattr(method, name) for name in ("batch_size", "local_epochs") if getattr(method, name) is not None
    }
    if local:
        federated = dataclasses.replace(federated, local=dataclasses.replace(federated.local, **local))
    return federated


def load_experiment(path_or_name: str | Path) -> ExperimentConfig:
    """Read a YAML experiment: a file path, or the name of a preset in ``configs/`` (``quickstart``)."""
    path = Path(path_or_name)
    if not path.suffix:
        path = CONFIG_DIR / f"{path_or_name}.yaml"
    if not path.is_file():
        known = sorted(p.stem for p in CONFIG_DIR.glob("*.yaml")) if CONFIG_DIR.is_dir() else []
        raise ConfigError(f"experiment config {str(path_or_name)!r} not found; presets: {known}, or pass a YAML path.")
    return ExperimentConfig.from_dict(yaml.safe_load(path.read_text()) or {})


def with_privacy_budget(
    config: ExperimentConfig, target_epsilon: float | None = None, *, delta: float | None = None
) -> ExperimentConfig:
    """The same experiment with every method that has a ``target_epsilon`` given this budget.

    ``target_epsilon`` and ``delta`` (each when not None) replace the arguments of the differentially
    private methods (those configured with a ``target_epsilon``, at the top level or in their
    ``sample_level_dp`` mapping); the others are left as they are.
    """
    budget = {k: v for k, v in (("target_epsilon", target_epsilon), ("delta", delta)) if v is not None}

    def with_budget(kwargs: Mapping[str, Any]) -> dict[str, Any]:
        out = {**kwargs, **budget} if "target_epsilon" in kwargs else dict(kwargs)
        nested = kwargs.get("sample_level_dp")  # patient-level DP-SGD inside the sites (local-dp-sgd, mr-mtl, ...)
        if isinstance(nested, Mapping) and "target_epsilon" in nested:
            out["sample_level_dp"] = {**nested, **budget}
        return out

    methods = tuple(dataclasses.replace(m, kwargs=with_budget(m.kwargs)) for m in config.methods)
    return dataclasses.replace(config, methods=methods)
