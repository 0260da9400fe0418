"""What a reproduction runs: the experiment, heterogeneity levels, seeds, the site sweep and the attacks,
read from ``configs/reproduce_<preset>.yaml`` and validated."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any
from collections.abc import Mapping

import yaml

from .membership import MembershipPlan
from ..errors import ConfigError
from ..experiment import CONFIG_DIR, ExperimentConfig
from .regime import RegimeMap


@dataclass(frozen=True)
class SiteSweep:
    """Client-level DP as the federation grows: ``num_sites`` federations of ``subjects_per_site``
    each, sites Poisson-sampled at ``client_fraction`` (amplification by subsampling)."""

    num_sites: tuple[int, ...] = (10, 50, 200)
    subjects_per_site: int = 30
    client_fraction: float = 0.2
    methods: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if not self.num_sites or min(self.num_sites) < 2:
            raise ConfigError(f"site_sweep.num_sites={self.num_sites!r} needs federations of >= 2 sites.")
        if self.subjects_per_site < 10:
            raise ConfigError(
                f"site_sweep.subjects_per_site={self.subjects_per_site} must be >= 10 "
                "(every site needs train, validation and test subjects)."
            )
        if not 0 < self.client_fraction <= 1:
            raise ConfigError(f"site_sweep.client_fraction={self.client_fraction} must lie in (0, 1].")


@dataclass(frozen=True)
class ReproductionPlan:
    """One reproduction: the experiment (methods included) run at every alpha and seed, plus the
    optional sweep and membership-inference section; the claims compare ``proposed_method`` with
    ``reference_method``."""

    experiment: ExperimentConfig
    alphas: tuple[float, ...] = (0.1, 0.5, 1.0)
    seeds: tuple[int, ...] = (0,)
    site_sweep: SiteSweep | None = None
    reference_method: str = "fedavg"  # the paper's baseline in the claims table
    proposed_method: str = "mm-pfl-adp"
    membership_inference: MembershipPlan | None = None
    #: When set, the reproduction is the regime map (sites x epsilon) instead of the alpha comparison.
    regime_map: RegimeMap | None = None

    def __post_init__(self) -> None:
        labels = {m.label for m in self.experiment.methods}
        for name in (self.reference_method, self.proposed_method):
            if name not in labels:
                raise ConfigError(
                    f"reproduction method {name!r} is not among the experiment's methods {sorted(labels)}."
                )
        if self.site_sweep is not None:
            missing = set(self.site_sweep.methods) - labels
            if missing:
                raise ConfigError(f"site_sweep.methods {sorted(missing)} are not among the experiment's methods.")
        if self.membership_inference is not None:
            missing = set(self.membership_inference.methods) - labels
            if missing:
                raise ConfigError(
                    f"membership_inference.methods {sorted(missing)} are not among the experiment's methods."
                )
        if self.regime_map is not None:
            missing = set(self.regime_map.methods) - labels
            if missing:
                raise ConfigError(f"regime_map.methods {sorted(missing)} are not among the experiment's methods.")
        if not self.alphas or not self.seeds:
            raise ConfigError("reproduction needs at least one alpha and one seed.")


def load_reproduction(preset: str | Path) -> ReproductionPlan:
    """``configs/reproduce_<preset>.yaml`` (or a YAML path) as a validated plan."""
    path = Path(preset)
    if not path.suffix:
        path = CONFIG_DIR / f"reproduce_{preset}.yaml"
    if not path.is_file():
        known = sorted(p.stem.removeprefix("reproduce_") for p in CONFIG_DIR.glob("reproduce_*.yaml"))
        raise ConfigError(f"reproduction preset {str(preset)!r} not found; presets: {known}, or pass a YAML path.")
    values = yaml.safe_load(path.read_text()) or {}
    section = dict(values.pop("reproduction", {}) or {})
    sweep = section.pop("site_sweep", None)
    membership = section.pop("membership_inference", None)
    regime = section.pop("regime_map", None)
    allowed = {"alphas", "seeds", "reference_method", "proposed_method"}
    if set(section) - allowed:
        raise ConfigError(f"unknown reproduction key(s) {sorted(set(section) - allowed)}; allowed: {sorted(allowed)}.")
    return ReproductionPlan(
        experiment=ExperimentConfig.from_dict(values),
        site_sweep=None
        if sweep is None
        else SiteSweep(**{k: tuple(v) if isinstance(v, list) else v for k, v in sweep.items()}),
        membership_inference=None if membership is None else _membership_plan(membership),
        regime_map=None if regime is None else _regime_map(regime),
        **{k: tuple(v) if isinstance(v, list) else v for k, v in section.items()},
    )


def _membership_plan(values: Mapping[str, Any]) -> MembershipPlan:
    allowed = {"methods", "personal_site", "num_shadows", "num_resamples"}
    if set(values) - allowed:
        raise ConfigError(
            f"unknown membership_inference key(s) {sorted(set(values) - allowed)}; allowed: {sorted(allowed)}."
        )
    return MembershipPlan(**values)


def _regime_map(values: Mapping[str, Any]) -> RegimeMap:
    allowed = {f for f in RegimeMap.__dataclass_fields__}
    if set(values) - allowed:
        raise ConfigError(f"unknown regime_map key(s) {sorted(set(values) - allowed)}; allowed: {sorted(allowed)}.")
    return RegimeMap(**{k: tuple(v) if isinstance(v, list) else v for k, v in values.items()})
