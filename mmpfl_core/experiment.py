"""Running an experiment: its federation, model factory, one method's run, and the comparison table.

The typed configs (and their YAML/CLI edge) live in :mod:`mmpfl_core.experiment_config` and are
re-exported here. :func:`run_method` trains one method; :func:`compare_methods` trains several on the
same federation and returns a table with 95% confidence intervals.

Before any run directory is created, every method's strategy is built once and checked against the
data (:func:`~mmpfl_core.experiment_checks.build_checked_strategy`: a Fisher method needs a public
set; the model's image size, sequences and classes must match the cohort), so a bad input fails with
one clear error and leaves nothing behind; each run then trains with the strategy built for it. A
run that fails before its first checkpoint or metrics row is removed again.

Public pretraining (``config.pretraining.enabled``, :class:`~mmpfl_core.experiment_config.PretrainingSpec`):
:func:`public_pretrained_state` trains the model once on a public cohort
(:func:`mmpfl_core.pretraining.public_cohort`: its own seed, the public reference scanner, site id -1;
never a site's split), caches the weights under ``<results_dir>/private/public_pretraining/`` (so a resumed
comparison does not pretrain again), and every method's model factory loads them and freezes all but
the private part (:func:`mmpfl_core.pretraining.pretrained_model_factory`). Privacy: the public weights
depend on public data only, so they cost no privacy and every method's release is accounted exactly as
without pretraining, over d = the private part's size. The ``public-model-only`` method evaluates the
public model at every site with no site data.

Every row of :func:`comparison_table` carries the privacy columns (:func:`run_privacy`,
:data:`mmpfl_core.tables.PRIVACY_COLUMNS`): the unit(s) protected, epsilon and delta per unit read from
the run's ledgers (client level: the release ledger; patient level: the max over the sites' DP-SGD
ledgers), and d.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import shutil
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

from .centralized import TrainingRecipe
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
    PretrainingSpec,
    load_experiment,
    method_federated_config,
    with_cohort,
    with_privacy_budget,
)
from .devices import resolve_device
from .errors import ConfigError
from .federated.personalized_strategies import PublicModelOnly
from .federated.simulation import RunResult, run_federated
from .federated.strategies import LocalOnly, Strategy
from .io.checkpoint import load_checkpoint, save_checkpoint
from .io.run_directory import RunDirectory
from .models.presets import create_model
from .pretraining import pretrain_public_model, pretrained_model_factory, private_dimension, public_cohort
from .tables import privacy_columns

__all__ = [
    "CONFIG_DIR",
    "ExperimentConfig",
    "MethodSpec",
    "ModelSpec",
    "PretrainingSpec",
    "load_experiment",
    "with_cohort",
    "with_privacy_budget",
    "make_federation",
    "model_factory",
    "method_model_factory",
    "public_pretrained_state",
    "run_method",
    "run_privacy",
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


#: Folder of a comparison's results directory that caches the public pretrained model. The weights
#: depend on the public cohort only, but they sit under ``private/`` until someone argues them
#: released: the release scanner's rule for anything new (docs/DESIGN.md 6), and nothing needs them outside.
PUBLIC_PRETRAINING_DIR = Path("private") / "public_pretraining"


def public_pretrained_state(
    config: ExperimentConfig, federation: Federation, *, cache_dir: Path | None = None
) -> dict[str, torch.Tensor]:
    """The public stage of ``config``: the model's weights after pretraining on a public cohort.

    Steps: 1) draw :func:`~mmpfl_core.pretraining.public_cohort` (``pretraining.num_subjects`` subjects,
    ``pretraining.seed``, the federation's image size; refused if its seed is the private cohort's);
    2) train a fresh model of ``config`` (initialised from ``pretraining.seed``) on it with the centralized
    recipe (AdamW ``lr``, ``epochs``, warm-up + cosine); 3) return its ``state_dict`` (CPU). With ``cache_dir`` the weights are kept
    in ``<cache_dir>/private/public_pretraining/public_model-<key>`` (safetensors + JSON; the key hashes the
    settings that determine them) and read back instead of retrained.

    Privacy: only the public cohort (site id -1, its own seed) is touched; no site's split is passed
    (:func:`~mmpfl_core.pretraining.pretrain_public_model` refuses cohorts with site ids >= 0).
    """
    spec = config.pretraining
    if not spec.enabled:
        raise ConfigError("public_pretrained_state needs pretraining.enabled: true in the config.")
    shape = data_shape(federation)
    identity = json.loads(
        json.dumps(
            {
                "pretraining": to_plain(spec),
                "model": to_plain(config.model),
                "data_shape": shape,
            },
            sort_keys=True,
        )
    )
    key = hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:12]
    path = None if cache_dir is None else Path(cache_dir) / PUBLIC_PRETRAINING_DIR / f"public_model-{key}"
    if path is not None and path.with_suffix(".json").is_file():
        tensors, state = load_checkpoint(path)
        if state.get("identity") == identity:
            return dict(tensors["model"])
    cohort = public_cohort(
        spec.num_subjects,
        image_size=shape["image_size"],
        seed=spec.seed,
        difficulty=spec.difficulty,
        forbidden_seeds=[config.data.seed],
    )
    reference = federation.sites[0].train
    names = ("modality_names", "clinical_names", "class_names")
    mismatch = {
        n: (getattr(cohort, n), getattr(reference, n)) for n in names if getattr(cohort, n) != getattr(reference, n)
    }
    if mismatch:
        raise ConfigError(
            f"the public cohort (synthetic generator) does not fit the federation's data: {mismatch} "
            "(public, private). Public pretraining needs data with the synthetic cohort's sequences, clinical "
            "variables and classes; set pretraining.enabled: false for this cohort."
        )
    check_model_matches_data(config, federation)
    # initialised from the public seed, not the run's: one public model serves every seed of a study
    model = create_model(config.model.preset, seed=spec.seed, **{**shape, **dict(config.model.overrides)})
    recipe = TrainingRecipe(
        epochs=spec.epochs,
        batch_size=spec.batch_size,
        lr=float(spec.lr),
        warmup_epochs=min(2.0, 0.2 * spec.epochs),  # short runs: warm up over a fifth of the budget
    )
    trained = pretrain_public_model(
        model, cohort, recipe, seed=spec.seed, device=resolve_device(config.federated.device)
    )
    state = {n: t.detach().cpu().clone() for n, t in model.state_dict().items()}
    if path is not None:
        save_checkpoint(
            path,
            tensors={"model": state},
            state={"identity": identity, "public_subjects": len(cohort), "epoch_losses": trained.losses},
        )
    return state


def method_model_factory(
    config: ExperimentConfig,
    federation: Federation,
    *,
    public_state: Mapping[str, torch.Tensor] | None = None,
    cache_dir: Path | None = None,
) -> Callable[[], Any]:
    """The model factory a method's runs use: :func:`model_factory`, and with ``config.pretraining`` on,
    its models hold the public weights (``public_state``, else :func:`public_pretrained_state` with
    ``cache_dir``) with only the private part trainable. Whatever rebuilds a run's model from its
    trained state (which holds the private part only) must use this factory."""
    factory = model_factory(config, federation)
    if not config.pretraining.enabled:
        return factory
    if public_state is None:
        public_state = public_pretrained_state(config, federation, cache_dir=cache_dir)
    return pretrained_model_factory(factory, dict(public_state), config.pretraining.private_part)


def _check_pretraining(config: ExperimentConfig, method: MethodSpec, strategy: Strategy) -> None:
    if isinstance(strategy, PublicModelOnly) and not config.pretraining.enabled:
        raise ConfigError(
            f"method {method.label!r} (public-model-only) evaluates the public pretrained model, but the config "
            "has no pretraining stage: add `pretraining: {enabled: true}` to the config, or drop the method."
        )


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
    public_state: Mapping[str, torch.Tensor] | None = None,
) -> RunResult:
    """Train one method. With ``results_dir``, the run lives in ``<results_dir>/<label>/`` and resumes.

    ``strategy``: the method's strategy when the caller already built and checked it
    (:func:`compare_methods` does, for every method before the first trains), so it is built once per run.
    ``public_state``: the public pretrained weights when ``config.pretraining`` is on and the caller
    has them (else :func:`public_pretrained_state` computes or reads them, cached in ``results_dir``).
    The result's summary gets ``private_dimension`` (d: parameters trained on site data).
    """
    federation = federation if federation is not None else make_federation(config)
    if method.modalities is not None:
        keep = method.modalities
        federation = map_federation(federation, lambda cohort: select_modalities(cohort, keep))
    if strategy is None:
        strategy = build_checked_strategy(method, federation)
    _check_pretraining(config, method, strategy)
    factory = method_model_factory(config, federation, public_state=public_state, cache_dir=results_dir)
    federated = method_federated_config(config, method)  # the method's own rounds / batch size where it sets them
    run_config = {**config.to_dict(), "federated": to_plain(federated), "method": to_plain(method)}
    run_config.pop("methods")
    dimension = private_dimension(factory()) if getattr(strategy, "trains_on_site_data", True) else 0
    if results_dir is None:
        return _with_dimension(
            run_federated(
                federation,
                model_factory=factory,
                strategy=strategy,
                config=federated,
                progress=progress,
            ),
            dimension,
        )
    path = Path(results_dir) / method.label
    created, root_created = not path.exists(), not Path(results_dir).exists()
    try:
        run_dir = RunDirectory.create(results_dir, method.label, run_config, exist_ok_resume=resume)
        result = run_federated(
            federation,
            model_factory=factory,
            strategy=strategy,
            config=federated,
            run_dir=run_dir,
            progress=progress,
        )
        return _with_dimension(result, dimension)
    except BaseException:
        if created:
            _remove_unused_run(path)
        if root_created and Path(results_dir).is_dir() and not any(Path(results_dir).iterdir()):
            Path(results_dir).rmdir()
        raise


def _with_dimension(result: RunResult, dimension: int) -> RunResult:
    if result.summary:
        result.summary["private_dimension"] = int(dimension)
    return result


def run_privacy(run: RunResult) -> dict[str, Any]:
    """The privacy columns of one run (:func:`mmpfl_core.tables.privacy_columns`), read from its ledgers.

    * client level (what leaves a site): the release ledger's epsilon and delta (``summary["privacy"]``,
      written by the DP strategies from their accountant). A method that sends nothing from any site
      (local-only training, ``local-dp-sgd``, ``public-model-only``) releases nothing: (0, 0). Pooling
      the raw data (``centralized``) and plain federated methods have no client-level guarantee.
    * patient level (the patients in the deployed models): the max over the sites' DP-SGD ledgers
      (``summary["sample_level_privacy"]``). ``public-model-only`` uses no site's patient: (0, 0).
    * d: ``summary["private_dimension"]`` (:func:`run_method`), else the global model's size.
    """
    summary, strategy = run.summary, run.strategy
    client: tuple[float, float] | None = None
    patient: tuple[float, float] | None = None
    ledger = summary.get("privacy")
    if isinstance(ledger, Mapping) and "epsilon" in ledger:
        client = (float(ledger["epsilon"]), float(ledger["delta"]))
    elif isinstance(strategy, (LocalOnly, PublicModelOnly)):
        client = (0.0, 0.0)  # nothing leaves any site: the empty release
    sample = summary.get("sample_level_privacy")
    if isinstance(sample, Mapping) and "max_epsilon" in sample:
        patient = (float(sample["max_epsilon"]), float(sample["delta"]))
    elif isinstance(strategy, PublicModelOnly):
        patient = (0.0, 0.0)  # no site's patient is used
    dimension = summary.get("private_dimension")
    if dimension is None:
        dimension = sum(int(t.numel()) for t in run.global_state.values())
    return privacy_columns(client=client, patient=patient, dimension=int(dimension))


def _ci_text(entry: Mapping[str, float] | None) -> str:
    if not entry:
        return "n/a"
    return f"{entry['point']:.3f} [{entry['low']:.3f}, {entry['high']:.3f}]"


#: Strategies every other method is compared with, patient by patient, when a comparison has them: training alone,
#: without and with DP-SGD (the rival a private federated method must beat).
PAIRED_REFERENCES = ("local", "local-dp-sgd")


def paired_differences(runs: Mapping[str, RunResult], *, num_resamples: int = 1000) -> dict[str, dict[str, str]]:
    """``{column: {method: text}}``: each method's personal accuracy minus that of every reference method present
    (:data:`PAIRED_REFERENCES`, the first run of each such strategy), with a paired 95% bootstrap interval over the
    same test subjects (:func:`~mmpfl_core.metrics.classification.paired_accuracy_difference`; seeded from the
    reference run's seed, stream ``(seed, EVAL_BOOTSTRAP, 1)``). "n/a" where a run kept no test scores (an
    unfinished run) or was scored on other subjects. Released like the accuracy intervals it is computed from."""
    from .metrics.classification import paired_accuracy_difference
    from .seeding import Stream, numpy_generator

    out: dict[str, dict[str, str]] = {}
    for strategy in PAIRED_REFERENCES:
        ref_label = next((label for label, r in runs.items() if r.summary.get("strategy") == strategy), None)
        if ref_label is None:
            continue
        ref = runs[ref_label].final_predictions
        column: dict[str, str] = {}
        for label, run in runs.items():
            own = run.final_predictions
            if label == ref_label:
                column[label] = "0 (reference)"
            elif not ref or not own or not np.array_equal(own["labels"], ref["labels"]):
                column[label] = "n/a"
            else:
                rng = numpy_generator(int(runs[ref_label].summary.get("seed", 0)), Stream.EVAL_BOOTSTRAP, 1)
                ci = paired_accuracy_difference(
                    own["labels"], own["personal"], ref["personal"], rng=rng, num_resamples=num_resamples
                )
                column[label] = f"{ci.point:+.3f} [{ci.low:+.3f}, {ci.high:+.3f}]"
        out[f"personal acc - {ref_label} [paired 95% CI]"] = column
    return out


def comparison_table(runs: Mapping[str, RunResult]) -> pd.DataFrame:
    """One row per method: accuracy with 95% CI (global and personalised), other metrics, the privacy
    columns (:func:`run_privacy`: unit, epsilon and delta per unit, d), communication, and the paired
    difference to training alone (:func:`paired_differences`) where the comparison has a local method."""
    paired = paired_differences(runs)
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
                **{column: values[label] for column, values in paired.items()},
                **run_privacy(run),
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


@dataclasses.dataclass(frozen=True)
class _MethodJobs:
    """What every method's run of one comparison shares: handed to each worker process once, by ``fork``."""

    config: ExperimentConfig
    federation: Federation
    strategies: Mapping[str, Strategy]
    public_state: Mapping[str, torch.Tensor] | None
    results_dir: Path | None


#: The jobs a method worker process serves (set once per worker by :func:`_start_method_worker`, in that process only).
_WORKER: dict[str, _MethodJobs] = {}


def _start_method_worker(jobs: _MethodJobs) -> None:
    # one intra-op thread a worker: the workers share the cores, and a forked child must not enter the
    # parent's OpenMP pool (with one thread torch runs its parallel loops inline)
    torch.set_num_threads(1)
    _WORKER["jobs"] = jobs


def _run_method_in_worker(label: str) -> RunResult:
    jobs = _WORKER["jobs"]
    return run_method(
        jobs.config,
        next(m for m in jobs.config.methods if m.label == label),
        jobs.federation,
        results_dir=jobs.results_dir,
        progress=False,
        strategy=jobs.strategies[label],
        public_state=jobs.public_state,
    )


def _run_methods_in_processes(jobs: _MethodJobs, workers: int, progress: bool) -> dict[str, RunResult]:
    """Every method in its own task on ``workers`` forked processes of one thread each.

    Why: a method's run is a sequence of small steps that two intra-op threads use poorly (``make demo`` kept 1.7
    of 2 cores busy); two methods at once, one thread each, keep both busy. The federation, the strategies and the
    public weights reach the workers by ``fork`` (inherited, not copied through a pipe); each run writes its own
    ``<results_dir>/<label>/`` (so each resumes on its own) and comes back as its :class:`RunResult`. Nothing is
    shared between runs that the sequential loop would not share: each strategy object is used by its own run only,
    and secure noise is drawn from the OS in whichever process runs it."""
    import multiprocessing
    import time
    from concurrent.futures import ProcessPoolExecutor, as_completed

    labels = [m.label for m in jobs.config.methods]
    started = time.perf_counter()
    runs: dict[str, RunResult] = {}
    with ProcessPoolExecutor(
        max_workers=workers,
        mp_context=multiprocessing.get_context("fork"),
        initializer=_start_method_worker,
        initargs=(jobs,),
    ) as pool:
        futures = {pool.submit(_run_method_in_worker, label): label for label in labels}
        for future in as_completed(futures):
            runs[futures[future]] = future.result()
            if progress:
                print(f"{futures[future]}: done ({time.perf_counter() - started:.0f} s)", flush=True)
    return {label: runs[label] for label in labels}  # the config's order


def compare_methods(
    config: ExperimentConfig, *, results_dir: Path | None = None, progress: bool = True, workers: int = 1
) -> tuple[pd.DataFrame, dict[str, RunResult], Federation]:
    """Train every method of ``config`` on one shared federation; return the table and the runs.

    ``workers`` > 1 trains that many methods at a time, each in a forked process of one thread
    (:func:`_run_methods_in_processes`; where ``fork`` is unavailable, e.g. on Windows, one after another). The runs
    are the same runs; only floating-point summation order may differ from the two-thread sequential loop."""
    import multiprocessing

    if isinstance(workers, bool) or not isinstance(workers, int) or workers < 1:
        raise ConfigError(f"workers={workers!r} must be an integer >= 1 (1: the methods one after another).")
    federation = make_federation(config)
    check_model_matches_data(config, federation)
    # every method built and checked before the first one trains; each run then uses its strategy
    strategies = {m.label: build_checked_strategy(m, federation) for m in config.methods}
    for m in config.methods:
        _check_pretraining(config, m, strategies[m.label])
    # the public stage once for all methods (read back from results_dir on a resume)
    public = public_pretrained_state(config, federation, cache_dir=results_dir) if config.pretraining.enabled else None
    if workers > 1 and len(config.methods) > 1 and "fork" in multiprocessing.get_all_start_methods():
        runs = _run_methods_in_processes(
            _MethodJobs(config, federation, strategies, public, results_dir), workers, progress
        )
    else:
        runs = {
            m.label: run_method(
                config,
                m,
                federation,
                results_dir=results_dir,
                progress=progress,
                strategy=strategies[m.label],
                public_state=public,
            )
            for m in config.methods
        }
    return comparison_table(runs), runs, federation
