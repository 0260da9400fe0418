"""Write a comparison report: ``<out>/REPORT.md`` with the table, figures and the cohort summary."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import matplotlib

import pandas as pd

from .experiment import ExperimentConfig, compare_methods
from .federated.simulation import RunResult
from .tables import markdown_table


@dataclass
class Report:
    path: Path
    table: pd.DataFrame
    runs: dict[str, RunResult]


def write_comparison_report(config: ExperimentConfig, out: Path, *, progress: bool = True) -> Report:
    """Run every method of ``config`` and write table, figures and cohort summary under ``out``."""
    matplotlib.use("Agg", force=False)

    from .data.summary import cohort_summary_table
    from .reproduction.report import not_private_lines
    from .plots.cohort import plot_cohort_preview
    from .plots.training import (plot_accuracy_vs_round, plot_communication_vs_accuracy, plot_site_accuracy,
                                 save_axes)

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    table, runs, federation = compare_methods(config, results_dir=out, progress=progress)
    table.to_csv(out / "comparison.csv", index=False)
    summary = cohort_summary_table(federation)
    summary.to_csv(out / "cohort_summary.csv", index=False)
    plot_cohort_preview(federation.global_test, out / "cohort_preview.png")  # saves itself
    figures = {
        "accuracy_vs_round.png": lambda: plot_accuracy_vs_round(runs),
        "site_accuracy.png": lambda: plot_site_accuracy(runs),
        "communication_vs_accuracy.png": lambda: plot_communication_vs_accuracy(runs),
    }
    for name, draw in figures.items():
        save_axes(draw(), out / name)
    cfg = config.federated
    text = [
        f"# {config.name}: method comparison",
        "",
        f"Synthetic MS cohort: {config.data.num_subjects} subjects at {config.data.image_size}x{config.data.image_size}, "
        f"{config.federation.num_sites} sites, Dirichlet alpha {config.federation.alpha}. Model preset "
        f"`{config.model.preset}`; {cfg.num_rounds} rounds, {cfg.local.local_epochs} local epoch(s), seed {cfg.seed}.",
        f"Accuracy intervals are 95% bootstrap CIs over test subjects ({cfg.bootstrap_resamples} resamples). "
        f"Rounds to target: first round at which the {cfg.smoothing_window}-round moving average of validation "
        f"accuracy of the deployed models (personal where a method has them, else global) reaches {cfg.target_accuracy}.",
        "",
        markdown_table(table),
        *not_private_lines(config),
        "",
        "## Figures",
        *[f"![{name}]({name})" for name in ["cohort_preview.png", *figures]],
        "",
        "## Cohort",
        markdown_table(summary),
        "",
    ]
    path = out / "REPORT.md"
    path.write_text("\n".join(text))
    return Report(path=path, table=table, runs=runs)
