"""Where private collaboration pays: data-starved hospitals, public pretraining, patients as the privacy unit.

The question of issue 23: with a handful of hospitals, client-level DP cannot carry a model (z/m is
0.2-3), so what DOES make private collaboration beat training alone? This bench measures the recipe
the field uses (docs/FACTS.md, "Where DP federated learning pays"): pretrain the encoders on a PUBLIC cohort
(no privacy cost), train only a small private part (head + norms) at the sites, and protect each
hospital's PATIENTS with DP-SGD inside the site at epsilon e; compare with the fair rival, local
training with DP-SGD at the same e, and with what public data alone gives.

Arms (``ARMS``): from scratch (every parameter private): centralized, local, FedAvg; on the public
model (``private_part``): public-model-only, centralized, local, FedAvg, local + DP-SGD, FedAvg +
DP-SGD (``dp-sgd-fedavg``), MR-MTL, MR-MTL + DP-SGD. Personal accuracy: each site's deployed model
on its own test subjects, pooled over sites AND seeds, with a bootstrap 95% interval; the per-seed
means with a Student-t interval beside it.

MM-PFL-ADP with patients as the unit (no client-level noise, DP-SGD inside each site, masks scored on the
public set): ``public/mm-pfl-adp`` (default KL threshold), ``-t0.002`` (threshold sized for public-set
scores), ``-head`` (head always personal, KL masks for the rest), ``-head+group-dp-sgd-fisher`` and
``-head+group-dp-sgd-uniform`` (the same with per-group DP-SGD: Fisher or uniform noise allocation, and the noise
gate on), their ``-nogate`` twins (the KL masks alone decide what is shared), ``-nomask`` (ablation). On cross-silo
DP-SGD with secure aggregation (one step over the union a round): ``public/mm-pfl-adp+secagg-dp-sgd`` and its
``-uniform`` / ``-nomask`` ablations. The
``shared_d`` column is the mean over sites of the private part's scalars a site shares at the end (its release; the
ledger is the per-site DP-SGD ledger, ``patient_epsilon_max``). ``--preset headline`` is :data:`HEADLINE`.

Run: ``python bench/where_collaboration_pays.py --seeds 0 1 2 --workers 14`` (one process per
(arm, seed), one torch thread each). ``--quick`` shrinks everything for a smoke run.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

RESULTS = Path(os.environ.get("MMPFL_BENCH_RESULTS") or Path(__file__).resolve().parent / "results")


@dataclass(frozen=True)
class Setting:
    num_subjects: int = 1100  # 100 public server subjects + ~1,000 patients over the hospitals
    num_sites: int = 20
    alpha: float = 1.0
    image_size: int = 32
    preset: str = "hybrid-tiny"
    rounds: int = 30
    local_epochs: int = 1
    batch_size: int = 16
    public_subjects: int = 2000
    public_epochs: int = 10
    private_part: str = "head+norm"
    epsilon: float = 8.0
    max_grad_norm: float = 1.0
    lr_private: float = 5e-3
    lr_scratch: float = 2e-3
    # the hospitals' lesion conspicuity (SyntheticCohortConfig.lesion_contrast); the public cohort keeps 1
    lesion_contrast: float = 1.0
    # cross-silo DP-SGD arms (``secagg``): each round is ONE DP-SGD step over the union of the hospitals' patients,
    # so they run their own number of rounds, expected batch over the union and server (Adam) learning rate
    secagg_rounds: int = 200
    secagg_batch: int = 128
    secagg_lr: float = 5e-3
    # per-site splits (FederationConfig); a larger test share tightens the pooled intervals at a fixed cohort size
    # rounds of the centralized arm (one epoch over the pooled patients each) and of the arms with DP-SGD inside
    # the sites; 0 = ``rounds``. Centralized takes ~40 steps a round where a FedAvg round is one averaged step.
    centralized_rounds: int = 0
    # 0 = batch_size; the pooled set takes a larger batch as FedAvg's round averages 40 sites
    centralized_batch: int = 0
    dp_sgd_rounds: int = 0
    val_fraction: float = 0.15
    test_fraction: float = 0.2
    # arm label -> (rounds, local epochs): a method's own recipe, as ``MethodSpec.num_rounds``/``local_epochs`` in
    # an experiment config; it overrides ``rounds``, ``centralized_rounds`` and ``dp_sgd_rounds`` for that arm
    recipes: dict[str, tuple[int, int]] = field(default_factory=dict)
    extra: dict[str, Any] = field(default_factory=dict)


#: The headline cohort of issue 23 (``--preset headline``; ``bench/results/wcp_headline_*.md``): 40 data-starved
#: hospitals (~1,000 patients, ~16 training subjects each, Dirichlet alpha 1 label skew, five scanner templates
#: with jitter, none of them the public reference scanner), hybrid-tiny at 32 px pretrained on 2,000 public
#: subjects, and a private part of d = 50,307 (last transformer block + final norm + head), 20 rounds of one
#: local epoch. Intended YAML once the experiment config has a ``pretraining:`` section (not expressible today):
#: ``federation: {num_sites: 40, alpha: 1.0}``, ``data: {num_subjects: 1100, image_size: 32}``,
#: ``pretraining: {num_subjects: 2000, recipe: {epochs: 10, lr: 1e-3}, private_part: head+norm+block}``,
#: ``federated: {num_rounds: 20, local_epochs: 1, batch_size: 16, optimizer: {name: adamw, lr: 5e-3}}``.
HEADLINE = Setting(num_sites=40, rounds=20, private_part="head+norm+block")
#: The cohort and recipes of ``configs/headline.yaml`` (``make demo``; ``--preset demo``; ``docs/results/headline/``):
#: 40 hospitals of ~18 training patients, lesions at 30 % of the public contrast, Dirichlet alpha 10, head + every
#: bias and norm (d = 2,915), 91.7 % of each hospital's patients held out for testing (~10,900 test patients a
#: seed, so that one seed's pooled intervals are about +-0.0085). As the config: FedAvg and FedAvg + DP-SGD 100
#: rounds of one epoch; centralized ONE run of 40 epochs of batch 128, local-only ONE run of 10 epochs and local +
#: DP-SGD of 20 (``recipes``: the strongest of 5, 10, 20, 40 over 3 seeds); the cross-silo arms 200 one-step rounds.
DEMO = Setting(
    num_subjects=12000,
    num_sites=40,
    alpha=10.0,
    lesion_contrast=0.3,
    private_part="head+bias",
    val_fraction=0.0216,
    test_fraction=0.917,
    rounds=100,
    centralized_batch=128,
    dp_sgd_rounds=100,
    recipes={"public/centralized": (1, 40), "public/local": (1, 10), "public/local+dp-sgd": (1, 20)},
)
PRESETS: dict[str, Setting] = {"default": Setting(), "headline": HEADLINE, "demo": DEMO}

DP = "_patient_dp"  # marker: add DP-SGD inside the sites (not a strategy argument)
SECAGG = "_secagg"  # marker: cross-silo DP-SGD over the union with secure aggregation (its own rounds, batch, lr)
GROUP_ALLOCATION = "_group_allocation"  # with DP: per-group DP-SGD, this noise allocation (MM-PFL-ADP only)
#: label -> (strategy, kwargs, pretrained?)
#: MM-PFL-ADP over cross-silo DP-SGD: the head always personal; masks rescored every 5 rounds on 128 public subjects
#: (the KL pass runs at every site while it still keeps a candidate group: its cost, not its privacy, sets these).
_MM_SECAGG: dict[str, Any] = {"mask": {"always_personal": ["head"], "update_every": 5}, "score_subjects": 128}

ARMS: dict[str, tuple[str, dict[str, Any], bool]] = {
    "scratch/centralized": ("centralized", {}, False),
    "scratch/local": ("local", {}, False),
    "scratch/fedavg": ("fedavg", {}, False),
    "public-model-only": ("public", {}, True),
    "public/centralized": ("centralized", {}, True),
    "public/local": ("local", {}, True),
    "public/fedavg": ("fedavg", {}, True),
    "public/mr-mtl": ("mr-mtl", {"lam": 1.0}, True),
    "public/local+dp-sgd": ("local-dp-sgd", {DP: True}, True),
    "public/fedavg+dp-sgd": ("dp-sgd-fedavg", {DP: True}, True),
    "public/mr-mtl+dp-sgd": ("mr-mtl", {"lam": 1.0, DP: True}, True),
    "public/mr-mtl-0.1+dp-sgd": ("mr-mtl", {"lam": 0.1, DP: True}, True),
    # MM-PFL-ADP with patients as the unit: no client-level noise (dp=False), DP-SGD inside each site, KL masks
    # scored on the PUBLIC set with the DP-trained model (mask_data='public', the default under sample_level_dp).
    "public/mm-pfl-adp+dp-sgd": ("mm-pfl-adp", {"dp": False, DP: True}, True),
    "public/mm-pfl-adp": ("mm-pfl-adp", {"dp": False}, True),
    # The same with the KL threshold sized for PUBLIC-set scores: on the class-balanced public set a site's
    # trained head moves the KL by only 0.004-0.026 nats (40 sites, head+norm, seed 0), below the default
    # 0.05 (sized for validation-set scores), so 36 of 40 sites kept nothing personal and the method was
    # FedAvg with uniform weights; at 0.002 the label-skewed head turns personal and the rest is shared.
    "public/mm-pfl-adp-t0.002+dp-sgd": ("mm-pfl-adp", {"dp": False, "mask": {"threshold": 0.002}, DP: True}, True),
    "public/mm-pfl-adp-t0.002": ("mm-pfl-adp", {"dp": False, "mask": {"threshold": 0.002}}, True),
    # The head (the label prior of a skewed site) always personal (MaskSchedule.always_personal, FedPer-like);
    # the KL masks decide the other groups (norm, block), which stay shared at the default threshold.
    "public/mm-pfl-adp-head+dp-sgd": (
        "mm-pfl-adp",
        {"dp": False, "mask": {"always_personal": ["head"]}, DP: True},
        True,
    ),
    "public/mm-pfl-adp-head": ("mm-pfl-adp", {"dp": False, "mask": {"always_personal": ["head"]}}, True),
    # The same with per-group DP-SGD (group_dp_sgd.py): per-sample per-group clipping C_g = C sqrt(d_g / d) and
    # the noise split across the groups by public-data Fisher information or uniformly (one calibrated z_eff).
    "public/mm-pfl-adp-head+group-dp-sgd-fisher": (
        "mm-pfl-adp",
        {"dp": False, "mask": {"always_personal": ["head"]}, DP: True, GROUP_ALLOCATION: "fisher"},
        True,
    ),
    "public/mm-pfl-adp-head+group-dp-sgd-uniform": (
        "mm-pfl-adp",
        {"dp": False, "mask": {"always_personal": ["head"]}, DP: True, GROUP_ALLOCATION: "uniform"},
        True,
    ),
    # Per-group DP-SGD turns MM-PFL-ADP's public noise gate on (flat DP-SGD does not): a group whose best-case
    # release SNR under the sites' DP-SGD noise is below min_snr stays personal everywhere. Without the gate the
    # KL masks alone decide, as in the flat-clipped arm, so these two isolate the allocation under sharing. On the
    # headline cohort (seed 0, Fisher) the gate drowned the block (SNR 0.56) and the norm (0.81): the gated arms
    # share nothing (shared_d 0) and are local training with per-group DP-SGD.
    "public/mm-pfl-adp-head+group-dp-sgd-fisher-nogate": (
        "mm-pfl-adp",
        {"dp": False, "mask": {"always_personal": ["head"]}, "noise_gate": False, DP: True, GROUP_ALLOCATION: "fisher"},
        True,
    ),
    "public/mm-pfl-adp-head+group-dp-sgd-uniform-nogate": (
        "mm-pfl-adp",
        {
            "dp": False,
            "mask": {"always_personal": ["head"]},
            "noise_gate": False,
            DP: True,
            GROUP_ALLOCATION: "uniform",
        },
        True,
    ),
    # ablation: no masks (every group shared: FedAvg with uniform weights and DP-SGD in the sites)
    "public/mm-pfl-adp-nomask+dp-sgd": ("mm-pfl-adp", {"dp": False, "masks": False, DP: True}, True),
    # Cross-silo DP-SGD (federated/cross_silo_dp_sgd.py): one DP-SGD step over the UNION of the hospitals' patients
    # per round, per-patient clipped sums through secure aggregation, ONE Gaussian noise z C on the aggregate (shares
    # z C / sqrt(m)); the same patient epsilon, one ledger for every patient. Everything shared (FedSGD), or the head
    # personal at each site (its coordinates never leave the site and carry the full noise z C locally): the
    # building block of MM-PFL-ADP with secure aggregation.
    "public/fedsgd+secagg-dp-sgd": ("cross-silo-dp-sgd", {SECAGG: True}, True),
    "public/cross-silo-head+secagg-dp-sgd": ("cross-silo-dp-sgd", {SECAGG: True, "personal_groups": ["head"]}, True),
    # MM-PFL-ADP on that mechanism (federated/mm_pfl_adp_cross_silo.py): per-group clipping, the Fisher allocation
    # of the aggregate noise (public set), per-site KL masks (public set, noise-only placeholder shares; the head
    # always personal) and the noise gate; ablations: uniform allocation, no KL masks (the head personal only).
    "public/mm-pfl-adp+secagg-dp-sgd": ("mm-pfl-adp-cross-silo", {SECAGG: True, **_MM_SECAGG}, True),
    "public/mm-pfl-adp+secagg-dp-sgd-uniform": (
        "mm-pfl-adp-cross-silo",
        {SECAGG: True, **_MM_SECAGG, "fisher": False},
        True,
    ),
    "public/mm-pfl-adp+secagg-dp-sgd-nomask": (
        "mm-pfl-adp-cross-silo",
        {SECAGG: True, **_MM_SECAGG, "masks": False},
        True,
    ),
}


def _federation(s: Setting, seed: int):
    from mmpfl_core.data import FederationConfig, SyntheticCohortConfig, build_federation

    cohort = SyntheticCohortConfig(
        num_subjects=s.num_subjects, image_size=s.image_size, seed=seed, lesion_contrast=s.lesion_contrast
    )
    return build_federation(
        cohort,
        FederationConfig(
            num_sites=s.num_sites,
            alpha=s.alpha,
            val_fraction=s.val_fraction,
            test_fraction=s.test_fraction,
            public_size=100,
            min_subjects_per_site=10,
            seed=seed,
        ),
    )


def _experiment(s: Setting, seed: int):
    """The kit's experiment config for ``s`` (data, model and public stage; the arms are built here)."""
    from mmpfl_core.experiment_config import ExperimentConfig

    return ExperimentConfig.from_dict(
        {
            "name": "where-collaboration-pays",
            "data": {
                "num_subjects": s.num_subjects,
                "image_size": s.image_size,
                "seed": seed,
                "lesion_contrast": s.lesion_contrast,
            },
            "model": {"preset": s.preset},
            "federated": {"device": "cpu"},
            "pretraining": {
                "enabled": True,
                "num_subjects": s.public_subjects,
                "epochs": s.public_epochs,
                "lr": 1e-3,
                "private_part": s.private_part,
            },
        }
    )


def _public_state(s: Setting, seed: int, cache: Path, federation):
    """The public stage of ``make demo``: :func:`mmpfl_core.experiment.public_pretrained_state`, the kit's own
    (same public cohort, initialisation and recipe; one public model serves every seed, as in the kit), cached
    on disk under ``cache`` so that every arm reuses it. ``federation`` (seed ``seed``) gives the data's shape."""
    from mmpfl_core.experiment import public_pretrained_state

    return public_pretrained_state(_experiment(s, seed), federation, cache_dir=cache)


def _pretrain_job(seed: int, s: Setting, cache: str) -> None:
    import torch

    torch.set_num_threads(1)
    _public_state(s, seed, Path(cache), _federation(s, seed))


def _personal_predictions(strategy, model, federation, global_state) -> tuple[np.ndarray, np.ndarray]:
    import torch

    from mmpfl_core.data.contract import CohortDataset
    from mmpfl_core.federated.evaluation import predict_proba

    labels, probas = [], []
    for site in federation.sites:
        state = strategy.personal_state(site.site_id, global_state) if strategy is not None else None
        model.load_state_dict(state if state is not None else global_state, strict=False)
        probas.append(predict_proba(model, CohortDataset(site.test), batch_size=256, device=torch.device("cpu")))
        labels.append(site.test.labels)
    return np.concatenate(labels), np.concatenate(probas)


def run_arm(label: str, seed: int, s: Setting, cache: str) -> dict[str, Any]:
    import torch

    torch.set_num_threads(1)
    from mmpfl_core.federated.client import trainable_state
    from mmpfl_core.federated.config import FederatedConfig, LocalTrainingConfig, OptimizerConfig
    from mmpfl_core.federated.simulation import run_federated
    from mmpfl_core.federated.strategies import create_strategy
    from mmpfl_core.models.presets import create_model
    from mmpfl_core.pretraining import pretrained_model_factory, private_dimension

    started = time.perf_counter()
    name, kwargs, pretrained = ARMS[label]
    federation = _federation(s, seed)

    def base():
        return create_model(s.preset, seed=seed, image_size=s.image_size)

    factory = (
        pretrained_model_factory(base, _public_state(s, seed, Path(cache), federation), s.private_part)
        if pretrained
        else base
    )
    model = factory()
    out: dict[str, Any] = {"arm": label, "seed": seed, "d": private_dimension(model)}
    if name == "public":
        labels, proba = _personal_predictions(None, model, federation, trainable_state(model))
        out.update(labels=labels.tolist(), proba=proba.tolist(), epsilon=0.0, seconds=0.0)
        return out
    kwargs = dict(kwargs)
    rounds = s.rounds
    secagg = kwargs.pop(SECAGG, False)
    if secagg:
        kwargs.update(
            target_epsilon=s.epsilon,
            max_grad_norm=s.max_grad_norm,
            delta=1e-5,
            accountant="rdp",
            expected_batch_size=s.secagg_batch,
            server_optimizer={"name": "adam", "lr": s.secagg_lr},
        )
        rounds = s.secagg_rounds
        curve_every = max(1, rounds // 4)  # one step a round: show how far it has converged (personal test accuracy)
    else:
        curve_every = rounds
    if name == "centralized" and s.centralized_rounds:
        rounds = curve_every = s.centralized_rounds
    allocation = kwargs.pop(GROUP_ALLOCATION, None)
    if kwargs.pop(DP, False):
        if s.dp_sgd_rounds:
            rounds = curve_every = s.dp_sgd_rounds
        # RDP: an upper bound on epsilon (8-18 % above PLD/PRV at these settings) that calibrates 20 sites'
        # different sample rates in seconds, where PRV took about a minute for 4 sites on 2 cores.
        dp = dict(target_epsilon=s.epsilon, max_grad_norm=s.max_grad_norm, delta=1e-5, accountant="rdp")
        if allocation is not None:
            dp["group_allocation"] = allocation
        # dp-sgd-fedavg takes SampleLevelDP's arguments directly; the others take them as sample_level_dp
        kwargs.update(dp if name == "dp-sgd-fedavg" else {"sample_level_dp": dp})
    local_epochs = s.local_epochs
    if label in s.recipes:
        rounds, local_epochs = s.recipes[label]
        curve_every = rounds
    config = FederatedConfig(
        num_rounds=rounds,
        client_fraction=1.0,
        local=LocalTrainingConfig(
            local_epochs=local_epochs,
            batch_size=s.centralized_batch if name == "centralized" and s.centralized_batch else s.batch_size,
        ),
        optimizer=OptimizerConfig(
            name="adamw", lr=s.lr_private if pretrained else s.lr_scratch, weight_decay=0.0 if pretrained else 0.05
        ),
        eval_every=curve_every,
        bootstrap_resamples=0,
        checkpoint_every=0,
        device="cpu",
        seed=seed,
    )
    strategy = create_strategy(name, **kwargs)
    run = run_federated(federation, model_factory=factory, strategy=strategy, config=config, progress=False)
    labels, proba = _personal_predictions(strategy, model, federation, run.global_state)
    privacy = run.summary.get("sample_level_privacy", {})
    out.update(
        labels=labels.tolist(),
        proba=proba.tolist(),
        epsilon=privacy.get("max_epsilon", 0.0),
        seconds=round(time.perf_counter() - started, 1),
        rounds=rounds,
        epochs=local_epochs,
        batch=s.secagg_batch if secagg else config.local.batch_size,  # secagg: expected batch over the union
        shared_d=_shared_dimension(strategy, model, out["d"]),
        curve={
            int(r["round"]): float(r["personal_test_accuracy"]) for r in run.history if "personal_test_accuracy" in r
        },
    )
    return out


def _shared_dimension(strategy, model, d: int) -> float:
    """Mean over sites of the private part's scalars a site SHARES at the end (d for FedAvg-like arms, 0 for
    local ones, the groups outside its mask for MM-PFL-ADP): what its release carries besides its ledger."""
    if not strategy.communicates or not strategy.has_global_model:
        return 0.0
    site_masks = getattr(strategy, "site_masks", None)  # MM-PFL-ADP over cross-silo DP-SGD: per-site masks
    if site_masks is not None:
        sizes = strategy.group_sizes
        return float(
            np.mean([sum(n for g, n in sizes.items() if g not in strategy.personal_groups_of(k)) for k in site_masks])
        )
    personal_names = getattr(strategy, "personal_names", None)  # cross-silo DP-SGD: the same groups at every site
    if personal_names is not None:
        return float(sum(p.numel() for n, p in model.named_parameters() if p.requires_grad and n not in personal_names))
    personal_groups = getattr(strategy, "_personal_groups", None)
    if personal_groups is None or not getattr(strategy, "use_masks", False):
        return float(d)
    sizes = strategy.group_sizes
    return float(np.mean([sum(n for g, n in sizes.items() if g not in personal_groups(k)) for k in strategy.site_ids]))


#: paired references: each arm's accuracy minus theirs, on the same test patients of the same seeds
PAIRED_REFERENCES = ("public/local", "public/local+dp-sgd")


def _runs_of(results: list[dict[str, Any]], label: str) -> list[dict[str, Any]]:
    """``label``'s runs in seed order."""
    return sorted((r for r in results if r["arm"] == label), key=lambda r: r["seed"])


def _pooled(runs: list[dict[str, Any]]) -> tuple[np.ndarray, np.ndarray, list[int]]:
    """Labels and probabilities of ``runs`` pooled over seeds (in their order), and those seeds."""
    if not runs:
        return np.empty(0, dtype=np.int64), np.empty((0, 0)), []
    return (
        np.concatenate([r["labels"] for r in runs]),
        np.concatenate([np.asarray(r["proba"]) for r in runs]),
        [r["seed"] for r in runs],
    )


def summarise(results: list[dict[str, Any]]) -> list[dict[str, Any]]:
    from mmpfl_core.metrics.classification import bootstrap_ci, paired_accuracy_difference, seed_ci

    references = {ref: _pooled(_runs_of(results, ref)) for ref in PAIRED_REFERENCES}
    rows = []
    for label in ARMS:
        mine = _runs_of(results, label)
        if not mine:
            continue
        y, proba, seeds = _pooled(mine)
        paired = {}
        for ref, (y_ref, proba_ref, ref_seeds) in references.items():
            # the same seeds give the same federation, so the same test patients in the same order
            if ref_seeds == seeds and ref != label and np.array_equal(y_ref, y):
                d = paired_accuracy_difference(y, proba, proba_ref, rng=np.random.default_rng(0))
                paired[f"minus_{ref.split('/')[-1]}"] = f"{d.point:+.3f} [{d.low:+.3f}, {d.high:+.3f}]"
            else:
                paired[f"minus_{ref.split('/')[-1]}"] = ""
        ci = bootstrap_ci(y, proba, metric="accuracy", rng=np.random.default_rng(0))
        per_seed = [float(np.mean(np.asarray(r["proba"]).argmax(1) == np.asarray(r["labels"]))) for r in mine]
        mean, lo, hi = seed_ci(per_seed)
        rows.append(
            {
                "arm": label,
                "d": mine[0]["d"],
                "seeds": len(mine),
                "rounds": mine[0].get("rounds", 0),  # one step over the union a round for the secagg arms
                "epochs": mine[0].get("epochs", 0),  # local epochs a round
                "batch": mine[0].get("batch", 0),
                "test_subjects": int(y.size),
                "personal_accuracy": round(ci.point, 3),
                "low": round(ci.low, 3),
                "high": round(ci.high, 3),
                "seed_mean": round(mean, 3),
                "seed_low": round(lo, 3),
                "seed_high": round(hi, 3),
                **paired,
                "patient_epsilon_max": round(max(r["epsilon"] for r in mine), 2),
                "shared_d": round(float(np.mean([r.get("shared_d", 0.0) for r in mine])), 1),
                "seconds": round(float(np.mean([r["seconds"] for r in mine])), 1),
                # personal test accuracy at the evaluated rounds, mean over seeds (cross-silo arms: four points)
                "curve": " ".join(
                    f"{t}:{np.mean([r['curve'][t] for r in mine if t in r.get('curve', {})]):.3f}"
                    for t in sorted({t for r in mine for t in r.get("curve", {})})
                ),
            }
        )
    return rows


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--arms", nargs="+", default=list(ARMS))
    parser.add_argument("--quick", action="store_true", help="tiny sizes: a smoke run of the script")
    parser.add_argument("--preset", choices=sorted(PRESETS), default="default", help="the Setting --set starts from")
    parser.add_argument("--out", default="where_collaboration_pays")
    parser.add_argument("--set", nargs="*", default=[], help="Setting overrides, key=value (JSON values)")
    args = parser.parse_args(argv)
    overrides = {k: json.loads(v) for k, v in (item.split("=", 1) for item in args.set)}
    if args.quick:
        overrides = {
            "num_subjects": 300,
            "num_sites": 4,
            "rounds": 2,
            "public_subjects": 60,
            "public_epochs": 1,
            "image_size": 32,
            **overrides,
        }
    s = replace(PRESETS[args.preset], **overrides)
    cache = Path(os.environ.get("MMPFL_BENCH_CACHE") or RESULTS / ".cache")
    cache.mkdir(parents=True, exist_ok=True)
    jobs = [(a, seed) for seed in args.seeds for a in args.arms]
    started = time.perf_counter()
    with ProcessPoolExecutor(max_workers=args.workers) as pool:
        if any(ARMS[a][2] for a in args.arms):  # pretrain once (one public model serves every seed) before the fan-out
            list(pool.map(_pretrain_job, args.seeds[:1], [s], [str(cache)]))
        results = list(pool.map(run_arm, *zip(*jobs, strict=True), [s] * len(jobs), [str(cache)] * len(jobs)))
    rows = summarise(results)
    import pandas as pd

    frame = pd.DataFrame(rows)
    RESULTS.mkdir(parents=True, exist_ok=True)
    frame.to_csv(RESULTS / f"{args.out}.csv", index=False)
    with open(RESULTS / f"{args.out}.md", "w") as fh:
        fh.write(
            f"# {__doc__.splitlines()[0]}\n\nSetting: `{s}`\n\nCommand: `python bench/where_collaboration_pays.py "
            f"{' '.join(argv if argv is not None else sys.argv[1:])}`; wall {time.perf_counter() - started:.0f} s.\n\n"
        )
        fh.write("| " + " | ".join(frame.columns) + " |\n|" + "---|" * len(frame.columns) + "\n")
        for row in frame.itertuples(index=False):
            fh.write("| " + " | ".join(str(v) for v in row) + " |\n")
    for r in rows:
        print(
            f"{r['arm']:24s} d={r['d']:6d} acc={r['personal_accuracy']:.3f} [{r['low']:.3f}, {r['high']:.3f}] "
            f"seeds {r['seed_mean']:.3f} [{r['seed_low']:.3f}, {r['seed_high']:.3f}] eps={r['patient_epsilon_max']} "
            f"{r['seconds']}s {r['curve']}"
        )


if __name__ == "__main__":
    main()
