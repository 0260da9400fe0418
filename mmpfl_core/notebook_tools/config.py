"""The one notebook configuration (``configs/notebooks.yaml``), typed, with its ``smoke:`` overlay.

Every notebook loads it in its first code cells and fills each knob its ``parameters`` cell leaves at
``None`` from it (:meth:`NotebookConfig.fill`). The file's sections are those of an experiment config, so
they are validated by the same typed loader (:class:`~mmpfl_core.experiment_config.ExperimentConfig`:
unknown keys and bad values are :class:`~mmpfl_core.errors.ConfigError`); ``smoke:`` is a partial copy of
those sections merged over them for CI's papermill runs.

``headline:`` is a second, complete experiment (:attr:`NotebookConfig.headline`): the headline cohort of
``configs/headline.yaml`` sized for a notebook (notebook 05, section 8), with its methods and its own ``smoke:``
overlay (a ``methods`` list in it replaces the list above it). Its keys are validated the same way.

Only the data-independent settings live here (cohort size, image size, sites, skew, seeds, model, training):
nothing in this module reads or releases patient data.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from ..errors import ConfigError
from ..experiment_config import CONFIG_DIR, ExperimentConfig

#: The committed notebook configuration.
NOTEBOOK_CONFIG_PATH = CONFIG_DIR / "notebooks.yaml"

#: The experiment sections a notebook config holds (no ``methods``: each notebook chooses its own).
SECTIONS = ("data", "federation", "model", "federated", "pretraining")

#: The keys of the ``headline:`` experiment: the sections, its ``methods`` and ``name``, and its own ``smoke:``.
HEADLINE_KEYS = (*SECTIONS, "methods", "name", "smoke")

#: Parameter name -> (section, field path) in the experiment config: the vocabulary the notebooks'
#: ``parameters`` cells share (UPPER_CASE, papermill-injectable).
PARAMETER_FIELDS: dict[str, tuple[str, ...]] = {
    "SEED": ("data", "seed"),
    "IMAGE_SIZE": ("data", "image_size"),
    "NUM_SUBJECTS": ("data", "num_subjects"),
    "DIFFICULTY": ("data", "difficulty"),
    "NUM_CLIENTS": ("federation", "num_sites"),
    "ALPHA": ("federation", "alpha"),
    "MODEL_PRESET": ("model", "preset"),
    "NUM_ROUNDS": ("federated", "num_rounds"),
    "LOCAL_EPOCHS": ("federated", "local", "local_epochs"),
    "BATCH_SIZE": ("federated", "local", "batch_size"),
    "LEARNING_RATE": ("federated", "optimizer", "lr"),
    "PRETRAIN": ("pretraining", "enabled"),
}


@dataclass(frozen=True)
class NotebookConfig:
    """The notebooks' shared settings: a typed experiment config plus whether the smoke overlay is on."""

    experiment: ExperimentConfig
    smoke: bool = False
    source: str = str(NOTEBOOK_CONFIG_PATH)
    #: The ``headline:`` experiment (its smoke overlay applied when ``smoke``), None when the file has none.
    headline: ExperimentConfig | None = None

    def parameters(self) -> dict[str, Any]:
        """Every shared knob by its notebook parameter name (:data:`PARAMETER_FIELDS`)."""
        values: dict[str, Any] = {}
        for name, path in PARAMETER_FIELDS.items():
            value: Any = self.experiment
            for part in path:
                value = getattr(value, part)
            values[name] = value
        return values

    def fill(self, **given: Any) -> Any:
        """The given parameters with each ``None`` replaced by this config's value, in the order given.

        ``SEED, NUM_ROUNDS = config.fill(SEED=SEED, NUM_ROUNDS=NUM_ROUNDS)``: a value set in the notebook
        (or injected by papermill) wins; ``None`` means "from configs/notebooks.yaml". One name returns
        its value, several a tuple. An unknown name is a :class:`ConfigError` naming the known ones.
        """
        if not given:
            raise ConfigError("fill() needs at least one parameter, e.g. fill(SEED=SEED).")
        known = self.parameters()
        unknown = sorted(set(given) - set(known))
        if unknown:
            raise ConfigError(
                f"unknown notebook parameter(s) {unknown}; configs/notebooks.yaml provides {sorted(known)}."
            )
        values = tuple(known[name] if value is None else value for name, value in given.items())
        return values[0] if len(values) == 1 else values

    def describe(self) -> str:
        """One line for the notebook's output: which file and overlay, and the shared settings."""
        p = self.parameters()
        overlay = " (smoke overlay)" if self.smoke else ""
        return (
            f"configs/notebooks.yaml{overlay}: {p['NUM_SUBJECTS']} subjects at {p['IMAGE_SIZE']} px, "
            f"{p['NUM_CLIENTS']} sites, alpha {p['ALPHA']:g}, model {p['MODEL_PRESET']}, {p['NUM_ROUNDS']} rounds, "
            f"lr {p['LEARNING_RATE']:g}, seed {p['SEED']}, public pretraining {'on' if p['PRETRAIN'] else 'off'}"
        )


def _merge(base: Mapping[str, Any], overlay: Mapping[str, Any], where: str) -> dict[str, Any]:
    """``base`` with ``overlay`` merged in, mapping by mapping; an overlay key the base lacks at a level the
    base defines is kept (the typed loader then rejects it if no config has such a field)."""
    merged = dict(base)
    for key, value in overlay.items():
        if isinstance(value, Mapping) and isinstance(merged.get(key), Mapping):
            merged[key] = _merge(merged[key], value, f"{where}.{key}")
        else:
            merged[key] = value
    return merged


def load_notebook_config(smoke: bool = False, path: str | Path | None = None) -> NotebookConfig:
    """Read ``configs/notebooks.yaml`` (or ``path``), with its ``smoke:`` overlay when ``smoke`` is true.

    Raises :class:`ConfigError` for a missing file, a non-mapping ``smoke:``, a smoke key that is not a
    section of the config, or any value the typed experiment config rejects.
    """
    path = Path(path) if path is not None else NOTEBOOK_CONFIG_PATH
    if not path.is_file():
        raise ConfigError(f"notebook config {str(path)!r} not found; the kit ships configs/notebooks.yaml.")
    values = yaml.safe_load(path.read_text()) or {}
    if not isinstance(values, Mapping):
        raise ConfigError(f"{path}: the notebook config must be a mapping of sections (data, federation, model, ...).")
    values = dict(values)
    overlay = values.pop("smoke", None) or {}
    headline = values.pop("headline", None)
    if not isinstance(overlay, Mapping):
        raise ConfigError(
            f"{path}: smoke={overlay!r} must be a mapping of sections, e.g. {{federated: {{num_rounds: 3}}}}."
        )
    for where, given in (("", values), ("smoke ", overlay)):
        stray = sorted(set(given) - set(SECTIONS) - ({"name"} if not where else set()))
        if stray:
            raise ConfigError(
                f"{path}: {where}section(s) {stray} are not config sections; use {list(SECTIONS)} "
                "(each notebook chooses its own methods)."
            )
    experiment = ExperimentConfig.from_dict(_merge(values, overlay, "smoke") if smoke else values)
    return NotebookConfig(
        experiment=experiment,
        smoke=bool(smoke),
        source=str(path),
        headline=None if headline is None else _headline(headline, smoke, path),
    )


def _headline(values: Any, smoke: bool, path: Path) -> ExperimentConfig:
    """The ``headline:`` experiment: its keys checked against :data:`HEADLINE_KEYS`, its ``smoke:`` merged in
    when ``smoke``, then the typed experiment config (which rejects unknown fields and bad values)."""
    fix = "e.g. headline: {data: {...}, federation: {...}, methods: [...], smoke: {...}}"
    if not isinstance(values, Mapping):
        raise ConfigError(f"{path}: headline={values!r} must be a mapping of experiment sections; {fix}.")
    values = dict(values)
    overlay = values.pop("smoke", None) or {}
    if not isinstance(overlay, Mapping):
        raise ConfigError(f"{path}: headline.smoke={overlay!r} must be a mapping of sections; {fix}.")
    inner = tuple(k for k in HEADLINE_KEYS if k != "smoke")  # no smoke overlay inside the smoke overlay
    for where, given, allowed in (("headline", values, HEADLINE_KEYS), ("headline.smoke", overlay, inner)):
        stray = sorted(set(given) - set(allowed))
        if stray:
            raise ConfigError(f"{path}: {where} has unknown key(s) {stray}; use {list(allowed)}.")
    return ExperimentConfig.from_dict(_merge(values, overlay, "headline.smoke") if smoke else values)
