"""The plain part of the Flower app: config mapping, data, model, strategy, record conversion, checks.

Imports only ``mmpfl_core`` (and torch/numpy/stdlib): the Flower apps (``client_app.py``,
``server_app.py``) are thin and call these functions, which call the same engine functions as the
in-process simulator (:func:`mmpfl_core.federated.simulation.client_round`,
:func:`~mmpfl_core.federated.simulation.select_round`, the strategies' ``aggregate``/``release_sum``).

Config: the flat kebab-case keys of ``[tool.flwr.app.config]`` (this package's ``pyproject.toml``,
read here as the defaults so that ``flwr run`` and an in-process ``run_simulation`` see the same
values) are mapped ONCE by :func:`load_job` onto :class:`~mmpfl_core.experiment.ExperimentConfig`,
a :class:`~mmpfl_core.experiment.MethodSpec` and :class:`FlowerSettings`.

Data: every party builds the synthetic federation from the seed (as the in-process engine does);
a SuperNode then uses ONLY its own site (``partition-id``) and the public server set. With real
data each site would load its own partition instead; nothing else changes.
"""
from __future__ import annotations

import dataclasses
import json
import math
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

import numpy as np
import torch

from mmpfl_core.configuration import to_plain
from mmpfl_core.data.cohort_federation import CohortSource
from mmpfl_core.data.contract import CohortDataset
from mmpfl_core.data.federation import Federation
from mmpfl_core.errors import ConfigError, PrivacyError
from mmpfl_core.experiment import (ExperimentConfig, MethodSpec, load_experiment, make_federation, model_factory,
                                   with_cohort)
from mmpfl_core.federated.client import trainable_state
from mmpfl_core.federated.dp_strategies import CLIP_INDICATOR, DPFedAvg
from mmpfl_core.federated.strategies import State, Strategy, create_strategy
from mmpfl_core.paths import results_root
from mmpfl_core.reproduction import load_reproduction
from mmpfl_core.privacy.release import RoundRelease

APP_DIR = Path(__file__).resolve().parent.parent
#: The defaults of every run-config key: ``[tool.flwr.app.config]`` of this app's pyproject.toml.
DEFAULT_RUN_CONFIG: dict[str, Any] = tomllib.loads((APP_DIR / "pyproject.toml").read_text())["tool"]["flwr"]["app"]["config"]


@dataclass(frozen=True)
class FlowerSettings:
    """What only the Flower engine needs (transport, secure aggregation, waiting); validated.

    SecAgg+ (Bell et al. 2020, Flower's ``SecAggPlusWorkflow``) quantises each value x of a site's
    vector to round((clip(x, -R, R) + R) * Q / 2R) with stochastic rounding, R = ``secagg_clipping_range``,
    Q = ``secagg_quantization_range``. A value beyond R is silently clipped to R, which would break
    the DP argument (the released sum would no longer be sum + Gaussian noise) and bias the model.
    So (1) every site checks max|x| <= R before masking and otherwise refuses to send (a dropout, not
    a clipped value), and (2) :func:`check_secagg_range` refuses, every round, a range R for which
    such a refusal could happen in the run with probability above beta = ``secagg_refusal_probability``:
    a union bound over every coordinate of the whole vector, every participant and all T rounds
    (:func:`secagg_refusal_bound`). A refusal depends on the site's noised update (so on its data):
    it is an event of probability at most beta on which the release differs, so the run is
    (epsilon, delta + beta)-DP; the summary reports delta + beta (``flower.delta_with_secagg_refusal``).
    The quantisation error per value is at most 2R/Q per site (R=8, Q=2^22: 3.8e-6), unbiased.
    """

    secagg: bool = False
    secagg_clipping_range: float = 8.0
    secagg_quantization_range: int = 2**22
    secagg_refusal_probability: float = 1e-9
    round_timeout: float = 120.0
    min_nodes: int = 1
    node_wait: float = 120.0
    results_dir: str = ""
    run_name: str = ""

    def __post_init__(self) -> None:
        if not self.secagg_clipping_range > 0 or not math.isfinite(self.secagg_clipping_range):
            raise ConfigError(f"secagg-clipping-range={self.secagg_clipping_range!r} must be finite and > 0.")
        if self.secagg_quantization_range < 2:
            raise ConfigError(f"secagg-quantization-range={self.secagg_quantization_range!r} must be >= 2 (2^22).")
        if not 0 < self.secagg_refusal_probability < 1:
            raise ConfigError(f"secagg-refusal-probability={self.secagg_refusal_probability!r} must lie in (0, 1) and "
                              "well below delta (1e-9 by default): it is added to the run's delta.")
        if not self.round_timeout > 0 or not self.node_wait > 0:
            raise ConfigError(f"round-timeout={self.round_timeout!r} and node-wait={self.node_wait!r} must be > 0.")
        if self.min_nodes < 1:
            raise ConfigError(f"min-nodes={self.min_nodes!r} must be >= 1.")


@dataclass(frozen=True)
class Job:
    """One Flower run: the experiment, the method it trains, the engine settings."""

    experiment: ExperimentConfig
    method: MethodSpec
    flower: FlowerSettings

    @property
    def num_sites(self) -> int:
        """Sites of the federation: the cohort's own sites when it is partitioned naturally (its site column)."""
        return len(federation_of(self).sites) if _natural_cohort(self.experiment) else self.experiment.federation.num_sites

    def key(self) -> str:
        """A stable JSON key (for per-process caches)."""
        return json.dumps({"e": self.experiment.to_dict(), "m": to_plain(self.method)}, sort_keys=True, default=str)


def _natural_cohort(experiment: ExperimentConfig) -> bool:
    return isinstance(experiment.data, CohortSource) and experiment.data.partition == "natural"


def _site_count(experiment: ExperimentConfig) -> int:
    """How many SuperNodes the experiment needs (a natural cohort: one per site id in its site column)."""
    return len(_federation(experiment).sites) if _natural_cohort(experiment) else experiment.federation.num_sites


def _number(run_config: Mapping[str, Any], key: str, kind: type) -> Any:
    value = run_config[key]
    try:
        return kind(value)
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"run-config {key}={value!r} is not a {kind.__name__}.") from exc


def load_job(run_config: Mapping[str, Any] | None = None, **overrides: Any) -> Job:
    """Map the flat kebab-case run config onto the typed configs (once, at the edge).

    ``run_config`` is ``context.run_config`` (empty under ``flwr.simulation.run_simulation``);
    ``overrides`` use the same keys with ``_`` for ``-`` (``load_job(num_rounds=3)``). Unknown keys
    raise :class:`ConfigError` listing the known ones.
    """
    values = dict(DEFAULT_RUN_CONFIG)
    given = {**dict(run_config or {}), **{k.replace("_", "-"): v for k, v in overrides.items()}}
    unknown = sorted(set(given) - set(values))
    if unknown:
        raise ConfigError(f"unknown Flower run-config key(s) {unknown}; known: {sorted(values)}.")
    values.update(given)
    preset = str(values["preset"])
    if preset.startswith("reproduce_") and "/" not in preset:  # reproduction presets: their experiment part
        experiment = load_reproduction(preset.removeprefix("reproduce_")).experiment
    else:
        experiment = load_experiment(preset)
    cohort = str(values["cohort"])
    if cohort:
        for key in ("num-subjects", "image-size"):
            if _number(values, key, int) > 0:
                raise ConfigError(f"{key}={values[key]!r} sizes the synthetic cohort, but cohort={cohort!r} is given: "
                                  f"a converted cohort has its own subjects and image size; drop {key}.")
        experiment = with_cohort(experiment, cohort)
    labels = [m.label for m in experiment.methods]
    if values["method"] not in labels:
        raise ConfigError(f"method={values['method']!r} is not a method of preset {values['preset']!r}; "
                          f"use one of {labels}.")
    method = next(m for m in experiment.methods if m.label == values["method"])
    try:
        extra = json.loads(values["method-args"]) if isinstance(values["method-args"], str) else dict(values["method-args"])
    except json.JSONDecodeError as exc:
        raise ConfigError(f"method-args={values['method-args']!r} is not a JSON object: {exc}.") from exc
    if not isinstance(extra, dict):
        raise ConfigError(f"method-args={values['method-args']!r} must be a JSON object, e.g. '{{\"clip_norm\": 0.5}}'.")
    if values["placement"]:
        extra["placement"] = str(values["placement"])
    if extra:
        method = dataclasses.replace(method, kwargs={**method.kwargs, **extra})
    if method.strategy in ("centralized", "local"):
        raise ConfigError(f"method {method.label!r} ({method.strategy}) sends nothing over a network; run it with "
                          "the in-process engine (mmpfl_core.experiment.run_method).")
    changes: dict[str, dict[str, Any]] = {"data": {}, "federation": {}, "federated": {}}
    for key, section, field, kind in (("num-subjects", "data", "num_subjects", int),
                                      ("image-size", "data", "image_size", int),
                                      ("num-sites", "federation", "num_sites", int),
                                      ("num-rounds", "federated", "num_rounds", int),
                                      ("eval-every", "federated", "eval_every", int)):
        if _number(values, key, kind) > 0:
            changes[section][field] = _number(values, key, kind)
    seed = _number(values, "seed", int)
    if seed >= 0:
        changes["data"]["seed"] = changes["federation"]["seed"] = changes["federated"]["seed"] = seed
    changes["federated"]["device"] = "cpu"  # SuperNodes here are CPU processes; say so rather than guess
    experiment = experiment.replace(**changes)
    if experiment.pretraining.enabled:
        # Each SuperNode would pretrain its own copy of the public model; only the private part travels, so a
        # copy that differs (another device, another library build) would silently mix models. Refuse for now.
        raise ConfigError("the Flower app does not run a public pretraining stage yet (the config sets "
                          "`pretraining: {enabled: true}`); run this config in-process (`mmpfl compare`/`train`), "
                          "or set `pretraining: {enabled: false}` for the Flower run.")
    placement = method.kwargs.get("placement", "server")
    secagg = str(values["secagg"]).lower()
    if secagg not in ("auto", "on", "off", "true", "false"):
        raise ConfigError(f"secagg={values['secagg']!r} must be auto, on or off.")
    use_secagg = placement == "distributed" if secagg == "auto" else secagg in ("on", "true")
    if placement == "distributed" and not use_secagg:
        raise ConfigError("placement='distributed' without secure aggregation lets the server see every site's "
                          "noised update (no guarantee against the server, docs/DESIGN.md 4.2); set secagg=auto or on.")
    if use_secagg and placement != "distributed":
        raise ConfigError(f"secagg=on needs placement='distributed' (got {placement!r}): with server placement the "
                          "trusted server adds the noise and must see the sum of CLIPPED updates only after it "
                          "could validate them; use placement='distributed'.")
    min_nodes = _number(values, "min-nodes", int) or _site_count(experiment)
    flower = FlowerSettings(secagg=use_secagg, secagg_clipping_range=_number(values, "secagg-clipping-range", float),
                            secagg_quantization_range=_number(values, "secagg-quantization-range", int),
                            secagg_refusal_probability=_number(values, "secagg-refusal-probability", float),
                            round_timeout=_number(values, "round-timeout", float), min_nodes=min_nodes,
                            node_wait=_number(values, "node-wait", float), results_dir=str(values["results-dir"]),
                            run_name=str(values["run-name"]) or f"{method.label}-flower")
    return Job(experiment=experiment, method=method, flower=flower)


def load_jobs(run_config: Mapping[str, Any] | None = None, **overrides: Any) -> list[Job]:
    """One :class:`Job` per method of a comma-separated ``method`` ("fedavg,dp-fedavg"): one Flower
    run (one SuperLink/Ray start-up) trains them one after the other, each into its own run directory."""
    given = {**dict(run_config or {}), **{k.replace("_", "-"): v for k, v in overrides.items()}}
    methods = [m.strip() for m in str(given.get("method", DEFAULT_RUN_CONFIG["method"])).split(",") if m.strip()]
    if not methods:
        raise ConfigError("method is empty; name one of the preset's methods, e.g. method='fedavg'.")
    if len(methods) > 1 and str(given.get("run-name", "")):
        raise ConfigError("run-name names ONE run directory; leave it empty when method lists several methods.")
    return [load_job(run_config, **{**overrides, "method": m}) for m in methods]


def results_dir(job: Job) -> Path:
    """Where the run directory goes: ``results-dir`` or ``results/flower/<experiment name>``."""
    return Path(job.flower.results_dir) if job.flower.results_dir else results_root() / "flower" / job.experiment.name


# ------------------------------------------------------------------ per-process objects
_FEDERATIONS: dict[str, Federation] = {}


def federation_of(job: Job) -> Federation:
    """The (deterministic) federation; cached per process, since a SuperNode's process runs many rounds."""
    return _federation(job.experiment)


def _federation(experiment: ExperimentConfig) -> Federation:
    # Keyed by the experiment alone (the federation does not depend on the method), so counting a natural
    # cohort's sites in load_job and serving the job later build it once.
    key = json.dumps(experiment.to_dict(), sort_keys=True, default=str)
    if key not in _FEDERATIONS:
        _FEDERATIONS.clear()  # one experiment at a time per process
        _FEDERATIONS[key] = make_federation(experiment)
    return _FEDERATIONS[key]


def new_model(job: Job) -> torch.nn.Module:
    """The model every party builds from the seed (the same initial parameters everywhere)."""
    return model_factory(job.experiment, federation_of(job))()


def configured_strategy(job: Job, model: torch.nn.Module) -> Strategy:
    """A fresh strategy, configured exactly as the in-process simulation configures it."""
    federation = federation_of(job)
    strategy = create_strategy(job.method.strategy, **dict(job.method.kwargs))
    client_ids = sorted(strategy.client_datasets(federation))
    strategy.configure(config=job.experiment.federated, federation=federation, client_ids=client_ids, model=model)
    return strategy


def site_data(job: Job, site: int) -> dict[str, CohortDataset]:
    """Site ``site``'s own splits; raises if the site does not exist."""
    federation = federation_of(job)
    ids = [s.site_id for s in federation.sites]
    if site not in ids:
        raise ConfigError(f"partition-id {site} is not a site of this federation (sites {ids}); start one SuperNode "
                          f"per site with --node-config 'partition-id=<0..{len(ids) - 1}>'.")
    s = next(x for x in federation.sites if x.site_id == site)
    return {"train": CohortDataset(s.train), "val": CohortDataset(s.val), "test": CohortDataset(s.test)}


# ------------------------------------------------------------------ state <-> plain arrays
def state_to_numpy(state: Mapping[str, torch.Tensor]) -> dict[str, np.ndarray]:
    return {n: t.detach().cpu().numpy() for n, t in state.items()}


def numpy_to_state(arrays: Mapping[str, np.ndarray]) -> State:
    return {n: torch.from_numpy(np.array(a, copy=True)) for n, a in arrays.items()}


def strategy_state_to_json(strategy: Strategy) -> tuple[State, str]:
    """A site's strategy state (personal groups, masks, local ledgers) as tensors + a JSON string."""
    tensors, state = strategy.state_dict()
    return tensors, json.dumps(to_plain(state))


def restore_strategy_state(strategy: Strategy, tensors: State, text: str) -> None:
    strategy.load_state_dict(tensors, json.loads(text))


# ------------------------------------------------------------------ checks on what arrives
class MalformedReply(ValueError):
    """A site's reply that must not be aggregated (the message says what is wrong)."""


def validate_reply(arrays: Mapping[str, np.ndarray], shapes: Mapping[str, tuple[int, ...]], *, num_examples: Any,
                   site: Any, expected_sites: set[int]) -> None:
    """Reject a reply with unknown/wrong-shaped arrays, NaN/Inf, a bad example count or site id.

    Flower passes all of these through (docs/FACTS.md, "Flower 1.42": NaN survives its DP clipping, negative counts are
    accepted), so the server checks before the strategy sees anything. A rejected reply is treated
    as a dropout of that site (see server_app: the accounting does not depend on who took part).
    """
    if not isinstance(site, (int, np.integer)) or int(site) not in expected_sites:
        raise MalformedReply(f"site id {site!r} was not asked to train this round (expected one of {sorted(expected_sites)}).")
    if isinstance(num_examples, bool) or not isinstance(num_examples, (int, np.integer, float)) \
            or not float(num_examples).is_integer() or num_examples < 1:
        raise MalformedReply(f"num-examples={num_examples!r} must be a positive integer.")
    for name, array in arrays.items():
        if name == CLIP_INDICATOR:
            if array.size != 1 or not np.all(np.isfinite(array)):
                raise MalformedReply(f"{name} must be one finite number, got shape {array.shape}.")
            continue
        if name not in shapes:
            raise MalformedReply(f"unknown parameter {name!r}.")
        if tuple(array.shape) != tuple(shapes[name]):
            raise MalformedReply(f"{name} has shape {tuple(array.shape)}, expected {tuple(shapes[name])}.")
        if not np.issubdtype(array.dtype, np.floating) or not np.all(np.isfinite(array)):
            raise MalformedReply(f"{name} has non-finite values or a non-float dtype {array.dtype}.")


# ------------------------------------------------------------------ secure aggregation ranges
def _two_sided_tail(margin: float, std: float) -> float:
    """P(|N(0, std^2)| > margin) = erfc(margin / (std sqrt 2)); 1 when margin < 0, 0 with no noise."""
    if margin < 0:
        return 1.0
    if std == 0:
        return 0.0
    return math.erfc(margin / (std * math.sqrt(2.0)))


def secagg_refusal_bound(release: RoundRelease, group_sizes: Mapping[str, int], clipping_range: float, *,
                         rounds: int, adaptive: bool = False) -> float:
    """Union bound on the probability that some participant refuses to send (a value beyond R) in the run.

    A participant's coordinate of released group g is c + n with |c| <= C_g (a coordinate of a
    vector of norm <= C_g; personal groups are noise-only placeholders, c = 0) and n ~ N(0, s_g^2),
    s_g = sigma_g / sqrt(m) (this round's share); drowned groups are zeros. So
    P(|c + n| > R) <= P(|n| > R - C_g) and, over the d_g coordinates of every group, the m
    participants and T rounds (each round's release is checked with budget beta / T):
        P(refusal in the run) <= T m [ sum_{g in S} d_g erfc((R - C_g) / (s_g sqrt 2))
                                       + 1[adaptive] erfc((R - 1) / (s_b sqrt 2)) ],
    s_b = z_b / sqrt(m) the clip indicator's share (b in {0, 1}). Returned for the given ``rounds``.
    """
    m = max(1, int(release.participants or 0))
    stds = release.participant_stds() if release.participants else {g: 0.0 for g in release.groups}
    per_participant = sum(group_sizes[g] * _two_sided_tail(clipping_range - release.clip_bounds[g], stds[g])
                          for g in release.released_groups)
    if adaptive:
        per_participant += _two_sided_tail(clipping_range - 1.0, release.count_participant_std())
    return min(1.0, rounds * m * per_participant)


def secagg_min_range(release: RoundRelease, group_sizes: Mapping[str, int], *, rounds: int, refusal_probability: float,
                     adaptive: bool = False) -> float:
    """The smallest R (to 1e-6 relative, by bisection) with :func:`secagg_refusal_bound` <= ``refusal_probability``."""
    low, high = 0.0, max([1.0, *release.clip_bounds.values()])
    while secagg_refusal_bound(release, group_sizes, high, rounds=rounds, adaptive=adaptive) > refusal_probability:
        low, high = high, 2 * high
    while high - low > 1e-6 * high:
        mid = (low + high) / 2
        if secagg_refusal_bound(release, group_sizes, mid, rounds=rounds, adaptive=adaptive) > refusal_probability:
            low = mid
        else:
            high = mid
    return high


def check_secagg_range(strategy: Strategy, instructions: Mapping[str, Any] | RoundRelease,
                       settings: FlowerSettings, *, rounds: int) -> float:
    """Refuse a SecAgg+ range R under which a site could refuse to send (see :class:`FlowerSettings`).

    ``instructions`` is the round's release (or its record, as sent to the sites). The bound is
    :func:`secagg_refusal_bound` over the whole vector, the m announced participants and all
    T = ``rounds`` rounds of the run, against beta = ``settings.secagg_refusal_probability``, which must not exceed
    delta / 10 (it is added to delta). Returns the bound for the run at this round's release.
    """
    if not isinstance(strategy, DPFedAvg):
        raise ConfigError(f"secure aggregation is only wired for the client-level DP strategies; {strategy.name!r} "
                          "sends example-weighted updates (use dp-fedavg / mm-pfl-adp with placement='distributed').")
    release = instructions if isinstance(instructions, RoundRelease) else \
        RoundRelease.from_record(instructions, groups=list(strategy.groups))
    beta = settings.secagg_refusal_probability
    if beta > strategy.delta / 10:
        raise ConfigError(f"secagg-refusal-probability={beta:g} is added to delta={strategy.delta:g}; keep it at most "
                          f"delta / 10 = {strategy.delta / 10:g} (default 1e-9).")
    if int(rounds) != rounds or rounds < 1:
        raise ConfigError(f"rounds={rounds!r} (the run's T) must be an integer >= 1.")
    bound = secagg_refusal_bound(release, strategy.group_sizes, settings.secagg_clipping_range, rounds=rounds,
                                 adaptive=strategy.adaptive)
    if bound > beta:
        need = secagg_min_range(release, strategy.group_sizes, rounds=rounds, refusal_probability=beta,
                                adaptive=strategy.adaptive)
        raise ConfigError(f"secagg-clipping-range={settings.secagg_clipping_range} lets a site's noised value leave "
                          f"[-R, R] with probability up to {bound:.3g} over the run (d={sum(strategy.group_sizes.values())} "
                          f"coordinates, m={release.participants}, T={rounds}), above secagg-refusal-probability="
                          f"{beta:g}: SecAgg+ would silently clip (the site refuses instead, which depends on its "
                          f"data). Raise secagg-clipping-range to >= {math.ceil(need * 100) / 100:g} (the "
                          "quantisation step 2R/Q grows with it; raise secagg-quantization-range too if needed).")
    return bound


def check_secagg_values(arrays: Mapping[str, np.ndarray], settings: FlowerSettings) -> None:
    """Site side, before masking: no value may lie outside [-R, R] (SecAgg+ would clip it silently)."""
    worst = max((float(np.max(np.abs(a))) for a in arrays.values() if a.size), default=0.0)
    if not math.isfinite(worst) or worst > settings.secagg_clipping_range:
        raise PrivacyError(f"a value of magnitude {worst:.4g} exceeds secagg-clipping-range="
                           f"{settings.secagg_clipping_range}; SecAgg+ would clip it silently, so this site does not "
                           "send this round (raise secagg-clipping-range).")


def global_names(model: torch.nn.Module) -> list[str]:
    """The exchanged parameters, in a fixed order (SecAgg+ sends unnamed lists)."""
    return list(trainable_state(model))
