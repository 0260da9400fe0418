"""Write a comparison report: ``<out>/REPORT.md`` with the table, figures and the cohort summary.

What lands where (docs/DESIGN.md 6). Beside ``REPORT.md`` (released): the comparison table without byte
counts, pooled-accuracy figures, and a cohort preview drawn from the server's PUBLIC set only (no site's
patient is ever drawn). Under ``<out>/private/`` (operator only, never linked as released): per-site tables
and figures (``cohort_summary.csv``, ``site_accuracy.png``) and everything computed from byte counters
(``communication.csv``, ``communication_vs_accuracy.png``), since bytes depend on the sites' private masks
and on who took part. Each run keeps its own scoped run directory (``<out>/<label>/``).
It must never write a site's test patients, per-site metrics, masks or byte counts outside ``private/``.

Every row names the privacy unit(s) its method protects, with epsilon and delta per unit read from the run's
ledgers (:func:`mmpfl_core.experiment.run_privacy`): ``epsilon_client`` (what leaves a site) and
``epsilon_patient_max`` (the patients in the deployed models: the max over the sites' DP-SGD ledgers; the
per-site epsilons stay in each run's ``private/summary.json``), and d, the number of parameters trained on
site data. With public pretraining the public model's cache is ``private/public_pretraining/`` (it depends on
the public cohort only, but nothing needs it released).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import matplotlib

import pandas as pd

from .experiment import ExperimentConfig, compare_methods, split_comparison_table
from .federated.simulation import CROSS_SITE_ROWS, RunResult
from .tables import markdown_table


#: Said under the released table: how to read the privacy columns (docs/DESIGN.md 4.6-4.7).
_PRIVACY_NOTE = (
    "*privacy unit*: what each method protects, with the accountants' epsilon and delta per unit. *epsilon_client*: "
    "what leaves a site (client-level DP, add/remove one site; 0 where nothing leaves). *epsilon_patient_max*: the "
    "patients inside the deployed models (DP-SGD at each site, add/remove one patient; the max over the sites). "
    "`inf` with a blank delta: that unit is not protected. *d*: parameters trained on site data (the dimension of "
    "every DP noise vector). A deployed personal model is covered only by the patient unit. *global acc* of a "
    "method without a global model (local-only): the mean over the site models, each on at most "
    f"{CROSS_SITE_ROWS:,} evenly spaced pooled test subjects."
)

#: Said under the released table: what was left out of it, and where it is.
_PRIVATE_NOTE = (
    "Per-site figures (`private/site_accuracy.png`, `private/cohort_summary.csv`) and communication "
    "(`private/communication.csv`, `private/communication_vs_accuracy.png`: byte counts depend on the sites' "
    "private masks and on who took part) are under `private/`, for the operator only; each method's run "
    "directory scopes its own files the same way (`MANIFEST.json`)."
)


def _cohort_totals(federation) -> str:
    """Pooled counts only (no per-site row): the subjects held by all sites together, and the public set."""
    sites = federation.sites
    split = {name: sum(len(getattr(s, name)) for s in sites) for name in ("train", "val", "test")}
    public = 0 if federation.public is None else len(federation.public)
    return (
        f"{len(sites)} sites hold {split['train']} training, {split['val']} validation and {split['test']} test "
        f"subjects in all; the server's public set has {public}. The per-site table is in `private/cohort_summary.csv`."
    )


@dataclass
class Report:
    path: Path
    table: pd.DataFrame
    runs: dict[str, RunResult]


def _own_settings(config: ExperimentConfig) -> str:
    """``" (methods with their own: centralized 40 rounds, batch 128; ...)"`` for the methods that set their own
    rounds, local epochs or batch size, or "" where none does."""
    own = [
        f"{m.label} "
        + ", ".join(
            ([f"{m.num_rounds} rounds"] if m.num_rounds is not None else [])
            + ([f"{m.local_epochs} local epochs"] if m.local_epochs is not None else [])
            + ([f"batch {m.batch_size}"] if m.batch_size is not None else [])
        )
        for m in config.methods
        if m.num_rounds is not None or m.local_epochs is not None or m.batch_size is not None
    ]
    return f" (methods with their own: {'; '.join(own)})" if own else ""


def write_comparison_report(config: ExperimentConfig, out: Path, *, progress: bool = True, workers: int = 1) -> Report:
    """Run every method of ``config`` and write table, figures and cohort summary under ``out``
    (``workers`` methods at a time: :func:`~mmpfl_core.experiment.compare_methods`)."""
    matplotlib.use("Agg", force=False)

    from .data.summary import cohort_summary_table
    from .reproduction.report import not_private_lines
    from .plots.cohort import plot_cohort_preview
    from .plots.training import plot_accuracy_vs_round, plot_communication_vs_accuracy, plot_site_accuracy, save_axes

    from .experiment_checks import describe_data

    out = Path(out)
    # Trained (and checked) first: a bad input fails before the results folder exists.
    table, runs, federation = compare_methods(config, results_dir=out, progress=progress, workers=workers)
    private = out / "private"
    private.mkdir(parents=True, exist_ok=True)
    released_table, communication = split_comparison_table(table)
    released_table.to_csv(out / "comparison.csv", index=False)
    communication.to_csv(private / "communication.csv", index=False)
    summary = cohort_summary_table(federation)  # one row per site: operator only
    summary.to_csv(private / "cohort_summary.csv", index=False)
    figures = {"accuracy_vs_round.png": lambda: plot_accuracy_vs_round(runs)}  # pooled accuracy only
    private_figures = {
        "site_accuracy.png": lambda: plot_site_accuracy(runs),
        "communication_vs_accuracy.png": lambda: plot_communication_vs_accuracy(runs),
    }
    for folder, drawings in ((out, figures), (private, private_figures)):
        for name, draw in drawings.items():
            save_axes(draw(), folder / name)
    shown = list(figures)
    if federation.public is not None and len(federation.public):
        plot_cohort_preview(federation.public, out / "cohort_preview.png")  # saves itself; PUBLIC subjects only
        shown.insert(0, "cohort_preview.png")
    cfg = config.federated
    pre = config.pretraining
    pretraining_lines = (
        [
            f"Public pretraining: every method starts from a model pretrained centrally on {pre.num_subjects} public "
            f"synthetic subjects (their own seed, the public reference scanner; no site's data), {pre.epochs} epoch(s); "
            f"only the private part `{pre.private_part}` is trained on site data (d below). `public-model-only` is "
            "that model with no site data.",
        ]
        if pre.enabled
        else []
    )
    text = [
        f"# {config.name}: method comparison",
        "",
        f"{describe_data(config, federation)} Model preset "
        f"`{config.model.preset}`; {cfg.num_rounds} rounds, {cfg.local.local_epochs} local epoch(s), seed {cfg.seed}"
        + _own_settings(config)
        + ".",
        f"Accuracy intervals are 95% bootstrap CIs over test subjects ({cfg.bootstrap_resamples} resamples). "
        f"Rounds to target: first round at which the {cfg.smoothing_window}-round moving average of validation "
        f"accuracy of the deployed models (personal where a method has them, else global) reaches {cfg.target_accuracy}.",
        *pretraining_lines,
        "",
        markdown_table(released_table),
        "",
        _PRIVACY_NOTE,
        *not_private_lines(config),
        "",
        _PRIVATE_NOTE,
        "",
        "## Figures",
        *[f"![{name}]({name})" for name in shown],
        *(
            []
            if "cohort_preview.png" in shown
            else ["No public server set: no cohort preview is drawn (the sites' scans are private)."]
        ),
        "",
        "## Cohort",
        _cohort_totals(federation),
        "",
    ]
    path = out / "REPORT.md"
    path.write_text("\n".join(text))
    return Report(path=path, table=table, runs=runs)
