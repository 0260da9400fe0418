"""Running a reproduction plan: every method at every alpha and seed, the site sweep, the attacks,
then the tables, figures and ``REPORT.md``. Each run keeps its own run directory, so an interrupted
reproduction resumes where it stopped.

Scopes (docs/DESIGN.md 6): byte counts depend on the sites' private masks and on who took part, and
per-site accuracies are per-site metrics, so ``MB total`` / ``MB to target`` (``private/communication.csv``),
the communication claim's figures (``private/claims.csv``), ``site_accuracy.png`` and
``communication_vs_accuracy.png`` are written under ``<out>/private/``; the released tables leave them out."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import matplotlib
import numpy as np
import pandas as pd

from .membership import attack_method, membership_frame
from ..experiment import ExperimentConfig, make_federation, run_method, run_privacy, split_comparison_table
from ..federated.simulation import RunResult
from ..metrics.classification import seed_ci
from ..tables import worst_privacy
from .claims import claims_table, release_claims
from .plan import ReproductionPlan
from .regime_report import run_regime_map
from .report import plot_epsilon, report_markdown


def _for(config: ExperimentConfig, *, alpha: float, seed: int) -> ExperimentConfig:
    return config.replace(federation={"alpha": alpha, "seed": seed}, data={"seed": seed}, federated={"seed": seed})


def _row(label: str, runs: list[RunResult]) -> dict[str, Any]:
    """One method's numbers over seeds: the point estimate with a bootstrap CI (one seed) or a t-CI (several)."""

    def stat(section: str, metric: str) -> tuple[float, float, float]:
        entries = [r.summary.get(section, {}).get(metric) for r in runs]
        if any(e is None for e in entries):
            return (float("nan"),) * 3
        if len(entries) == 1:
            return entries[0]["point"], entries[0]["low"], entries[0]["high"]
        return seed_ci([e["point"] for e in entries])

    def text(ci: tuple[float, float, float]) -> str:
        return "n/a" if np.isnan(ci[0]) else f"{ci[0]:.3f} [{ci[1]:.3f}, {ci[2]:.3f}]"

    rounds = [r.summary.get("rounds_to_target") for r in runs]
    mb_target = [r.summary.get("megabytes_to_target") for r in runs]
    eps = [r.summary.get("final", {}).get("epsilon") for r in runs]
    # epsilon against the server and participants, who know who took part (no amplification, q = 1)
    insider_eps = [r.summary.get("privacy", {}).get("epsilon_participants") for r in runs]
    # per-patient DP-SGD: released once, at the end (max over the sites' ledgers)
    patient_eps = [r.summary.get("sample_level_privacy", {}).get("max_epsilon") for r in runs]
    return {
        "method": label,
        "personal acc [95% CI]": text(stat("personal_test", "accuracy")),
        "global acc [95% CI]": text(stat("global_test", "accuracy")),
        "balanced acc (personal)": stat("personal_test", "balanced_accuracy")[0],
        "AUROC (personal)": stat("personal_test", "auroc")[0],
        "rounds to target": "never" if any(r is None for r in rounds) else float(np.mean(rounds)),
        "MB to target": None if any(m is None for m in mb_target) else float(np.mean(mb_target)),
        "MB total": float(np.mean([r.summary["megabytes_up"] + r.summary["megabytes_down"] for r in runs])),
        "epsilon (site)": "none" if any(e is None for e in eps) else float(np.mean(eps)),
        "epsilon (site, insiders)": "none" if any(e is None for e in insider_eps) else float(np.mean(insider_eps)),
        "epsilon (patient)": "none" if any(e is None for e in patient_eps) else float(np.mean(patient_eps)),
        # the unit(s), epsilon and delta per unit from the ledgers and d, as in every comparison table (worst seed)
        **worst_privacy([run_privacy(r) for r in runs]),
    }


@dataclass
class ReproductionReport:
    path: Path
    main_table: pd.DataFrame
    alpha_table: pd.DataFrame
    sweep_table: pd.DataFrame | None
    claims: pd.DataFrame
    runs: dict[tuple[float, int, str], RunResult] = field(default_factory=dict)
    membership_table: pd.DataFrame | None = None
    #: The regime map's per-cell table (mean, interval, eligibility, winner) when the plan has one.
    regime_cells: pd.DataFrame | None = None


def _main_alpha(plan: ReproductionPlan) -> float:
    alpha = plan.experiment.federation.alpha
    return alpha if alpha in plan.alphas else plan.alphas[len(plan.alphas) // 2]


def _sweep(plan: ReproductionPlan, out: Path, progress: bool) -> pd.DataFrame:
    sweep, base, rows = plan.site_sweep, plan.experiment, []
    methods = [m for m in base.methods if m.label in sweep.methods]
    for n in sweep.num_sites:
        config = base.replace(
            data={"num_subjects": n * sweep.subjects_per_site},
            federation={"num_sites": n, "public_size": base.federation.public_size},
            federated={"client_fraction": sweep.client_fraction, "sampling": "poisson"},
        )
        federation = make_federation(config)
        for method in methods:
            run = run_method(config, method, federation, results_dir=out / "runs" / f"sites{n}", progress=progress)
            final = run.summary.get("final", {})
            rows.append(
                {
                    "sites": n,
                    "sampled per round (expected)": sweep.client_fraction * n,
                    "method": method.label,
                    "noise multiplier": run.summary.get("privacy", {}).get("noise_multiplier"),
                    "epsilon (site)": final.get("epsilon"),
                    "epsilon (patient)": run.summary.get("sample_level_privacy", {}).get("max_epsilon"),
                    "personal acc": run.summary["personal_test"]["accuracy"]["point"],
                    "global acc": run.summary.get("global_test", {}).get("accuracy", {}).get("point"),
                    **run_privacy(run),
                }
            )
    return pd.DataFrame(rows)


def _membership(plan: ReproductionPlan, alpha: float, runs, federation, out: Path, progress: bool) -> pd.DataFrame:
    mia, seed = plan.membership_inference, plan.seeds[0]
    config = _for(plan.experiment, alpha=alpha, seed=seed)
    methods = {m.label: m for m in plan.experiment.methods}
    results = {
        label: (
            runs[alpha, seed, label],
            attack_method(
                runs[alpha, seed, label],
                config,
                methods[label],
                federation,
                plan=mia,
                seed=seed,
                shadow_dir=out / "runs" / f"shadows-alpha{alpha:g}-seed{seed}" / label,
                progress=progress,
            ),
        )
        for label in mia.methods
    }
    return membership_frame(results, personal_site=mia.personal_site)


def run_reproduction(plan: ReproductionPlan, out: Path, *, progress: bool = True) -> ReproductionReport:
    """Run the whole plan (resuming finished runs) and write ``<out>/REPORT.md`` with tables and figures."""
    matplotlib.use("Agg", force=False)

    from ..plots.training import plot_accuracy_vs_round, plot_communication_vs_accuracy, plot_site_accuracy, save_axes

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    if plan.regime_map is not None:  # the sites x epsilon map replaces the alpha comparison
        path, winners, verdict, cells, _ = run_regime_map(plan, out, progress=progress)
        return ReproductionReport(
            path=path,
            main_table=winners,
            alpha_table=pd.DataFrame(),
            sweep_table=None,
            claims=verdict,
            regime_cells=cells,
        )
    base = plan.experiment
    runs: dict[tuple[float, int, str], RunResult] = {}
    federations = {}
    for alpha in plan.alphas:
        for seed in plan.seeds:
            config = _for(base, alpha=alpha, seed=seed)
            federation = federations[alpha, seed] = make_federation(config)
            for method in base.methods:
                runs[alpha, seed, method.label] = run_method(
                    config,
                    method,
                    federation,
                    results_dir=out / "runs" / f"alpha{alpha:g}-seed{seed}",
                    progress=progress,
                )
    main_alpha = _main_alpha(plan)
    main = pd.DataFrame([_row(m.label, [runs[main_alpha, s, m.label] for s in plan.seeds]) for m in base.methods])
    alpha_table = pd.DataFrame(
        [
            {
                "method": m.label,
                **{
                    f"alpha={a:g}": float(
                        np.mean([runs[a, s, m.label].summary["personal_test"]["accuracy"]["point"] for s in plan.seeds])
                    )
                    for a in plan.alphas
                },
            }
            for m in base.methods
        ]
    )
    sweep = _sweep(plan, out, progress) if plan.site_sweep is not None else None
    membership = (
        None
        if plan.membership_inference is None
        else _membership(plan, main_alpha, runs, federations[main_alpha, plan.seeds[0]], out, progress)
    )
    claims = claims_table(plan, main, alpha_table, membership)

    first = {m.label: runs[main_alpha, plan.seeds[0], m.label] for m in base.methods}
    figures = {"accuracy_vs_round.png": lambda: plot_accuracy_vs_round(first)}
    private_figures = {
        "communication_vs_accuracy.png": lambda: plot_communication_vs_accuracy(first),
        "site_accuracy.png": lambda: plot_site_accuracy(first),
    }
    dp_runs = {k: v for k, v in first.items() if "epsilon" in v.history[-1]}
    if dp_runs:
        figures["epsilon_vs_round.png"] = lambda: plot_epsilon(dp_runs)
    private = out / "private"
    private.mkdir(exist_ok=True)
    for folder, drawings in ((out, figures), (private, private_figures)):
        for name, draw in drawings.items():
            save_axes(draw(), folder / name)
    released_main, communication = split_comparison_table(main)
    released_claims = release_claims(claims)
    for folder, name, frame in (
        (out, "main", released_main),
        (out, "alpha", alpha_table),
        (out, "claims", released_claims),
        (out, "sweep", sweep),
        (out, "membership", membership),
        (private, "communication", communication),
        (private, "claims", claims),
    ):
        if frame is not None:
            frame.to_csv(folder / f"{name}.csv", index=False)
    path = out / "REPORT.md"
    path.write_text(
        report_markdown(plan, main_alpha, released_main, alpha_table, sweep, released_claims, list(figures), membership)
    )
    return ReproductionReport(
        path=path,
        main_table=main,
        alpha_table=alpha_table,
        sweep_table=sweep,
        claims=claims,
        runs=runs,
        membership_table=membership,
    )
