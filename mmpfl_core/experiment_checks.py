"""Checks and descriptions of an experiment against its data, run before anything is trained or written.

What it is for: a bad combination (a model whose patch size does not divide the cohort's images, an
override that disagrees with the data's classes or sequences, a Fisher method on data without a
public server set) must fail with one clear error before a run directory exists. These functions
only read configs and the federation; they never train and never write.
"""

from __future__ import annotations

from .data.cohort_federation import CohortSource
from .data.federation import Federation
from .errors import ConfigError
from .experiment_config import ExperimentConfig, MethodSpec
from .federated.strategies import Strategy, create_strategy
from .models.presets import get_config


def describe_data(config: ExperimentConfig, federation: Federation) -> str:
    """One sentence for reports: what the data is and how it was split."""
    ref = federation.sites[0].train
    public = 0 if federation.public is None else len(federation.public)
    size = f"{ref.image_size}x{ref.image_size} px, sequences {', '.join(ref.modality_names)}, classes {', '.join(ref.class_names)}"
    if isinstance(config.data, CohortSource):
        split = (
            "sites from the cohort's site column"
            if config.data.partition == "natural"
            else f"re-split by Dirichlet label skew alpha {config.federation.alpha}"
        )
        n = sum(len(s) for s in federation.sites) + public
        return (
            f"Cohort file `{config.data.cohort}`: {n} rows at {size}; {federation.num_sites} sites ({split}); "
            f"public server set {public}."
        )
    return (
        f"Synthetic MS cohort: {config.data.num_subjects} subjects at {size}; {federation.num_sites} sites, "
        f"Dirichlet alpha {config.federation.alpha}; public server set {public}."
    )


_SHAPE_FIELDS = {
    "image_size": "image size",
    "num_modalities": "number of sequences",
    "num_classes": "number of classes",
    "num_clinical": "number of clinical variables",
}


def data_shape(federation: Federation) -> dict[str, int]:
    """The model fields the data fixes: image size, number of sequences, clinical variables and classes."""
    reference = federation.sites[0].train
    return dict(
        image_size=reference.image_size,
        num_modalities=reference.num_modalities,
        num_clinical=len(reference.clinical_names),
        num_classes=reference.num_classes,
    )


def check_model_matches_data(config: ExperimentConfig, federation: Federation) -> None:
    """Raise :class:`ConfigError` when the model config cannot take the data (named field, both values, fix)."""
    shape = data_shape(federation)
    reference = federation.sites[0].train
    for key, value in shape.items():
        wanted = config.model.overrides.get(key)
        if wanted is not None and wanted != value:
            raise ConfigError(
                f"model.overrides.{key}={wanted!r} but the data has {_SHAPE_FIELDS[key]} {value} "
                f"(sequences {reference.modality_names}, classes {reference.class_names}). Remove the override "
                "(the model takes its shape from the data), or convert the data again to match."
            )
    patch = config.model.overrides.get(
        "patch_size", getattr(get_config(config.model.preset), "patch_size", 1)
    )  # a CNN has none
    if shape["image_size"] % patch:
        raise ConfigError(
            f"the data's images are {shape['image_size']}x{shape['image_size']} px, not a multiple of the model "
            f"preset {config.model.preset!r}'s patch_size {patch}. Convert with --image-size "
            f"{max(patch, shape['image_size'] // patch * patch)} (or another multiple of {patch}), or set "
            "model.overrides.patch_size."
        )
    for method in config.methods:
        unknown = sorted(set(method.modalities or ()) - set(reference.modality_names))
        if unknown:
            raise ConfigError(
                f"method {method.label!r} keeps sequences {unknown}, which the data does not have; "
                f"its sequences are {reference.modality_names}."
            )


def build_checked_strategy(method: MethodSpec, federation: Federation) -> Strategy:
    """The method's strategy, checked against the data before anything is trained or written.

    A strategy that allocates noise with the Fisher information (``dp-fedavg-fisher``,
    ``mm-pfl-adp``) reads the public server set (docs/DESIGN.md 4.3); without one it fails here with the fix.
    """
    from .federated.dp_fisher import DPFedAvgFisher

    try:
        strategy = create_strategy(method.strategy, **dict(method.kwargs))
    except ConfigError as exc:
        budget = sorted({"target_epsilon", "delta"} & set(method.kwargs))
        if budget and "unexpected keyword" in str(exc):
            raise ConfigError(
                f"method {method.label!r}: --epsilon/--delta ({', '.join(budget)}) apply to "
                f"differentially private methods; {method.strategy!r} takes no privacy budget. "
                "Drop them, or pick a DP method (e.g. dp-fedavg, mm-pfl-adp)."
            ) from exc
        raise
    if isinstance(strategy, DPFedAvgFisher) and (federation.public is None or len(federation.public) == 0):
        raise ConfigError(
            f"method {method.label!r} ({method.strategy}) estimates the Fisher information on a public server set, "
            "and this data has none. Mark some subjects public (site -1 in the labels CSV's site column, then "
            "convert again), name them with data.public_subjects, set federation.public_size > 0 for synthetic "
            "data, or choose a method without Fisher allocation (e.g. dp-fedavg)."
        )
    return strategy
