"""Benchmark: rounds and megabytes to a target accuracy, FedAvg vs MM-PFL-ADP, from a reproduction run.

The paper reports 47 rounds for MM-PFL-ADP vs 85 for FedAvg. This script reads the main table of a
finished reproduction (``main.csv`` beside its ``REPORT.md``: the per-round histories were scored
against the config's ``target_accuracy`` by :mod:`mmpfl_core.metrics.convergence`) and prints, for
each method, rounds and MB to the target and the ratio to FedAvg. With no reproduction at hand it
runs the smoke one first (about a minute).

``--run PRESET --methods ...`` trains just those methods of ``configs/reproduce_<PRESET>.yaml`` at
its main alpha (optionally for ``--rounds`` rounds, evaluated every ``--eval-every``) with the
current code, and scores their histories the same way: the quick way to the paper's comparison
without a whole reproduction.

Writes ``bench/results/rounds_to_target{_<preset>}.{csv,md}``. Plain script, no asserts.

    python bench/rounds_to_target.py                      # results/reproduce-teaching, else smoke
    python bench/rounds_to_target.py --report results/reproduce-paper
    python bench/rounds_to_target.py --run teaching --methods fedavg mm-pfl-adp mm-pfl-adp-no-dp --rounds 40
"""
from __future__ import annotations

import argparse
import math
import subprocess
import sys
from pathlib import Path

import pandas as pd

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import write_results  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
PAPER = {"fedavg": 85, "mm-pfl-adp": 47}  # by method label (lower case)


def _numeric(value) -> float | None:
    try:
        number = float(value)
    except (TypeError, ValueError):
        return None  # "never": the target was not reached
    return None if math.isnan(number) else number


def _from_runs(preset: str, labels: list[str], rounds: int | None, eval_every: int | None) -> tuple[pd.DataFrame, str]:
    """Train ``labels`` of the reproduction preset (main alpha, first seed) and tabulate their summaries."""
    from mmpfl_core.experiment import make_federation, run_method
    from mmpfl_core.reproduction import load_reproduction

    plan = load_reproduction(preset)
    overrides = {k: v for k, v in (("num_rounds", rounds), ("eval_every", eval_every)) if v is not None}
    config = plan.experiment.replace(federated=overrides) if overrides else plan.experiment
    methods = {m.label: m for m in config.methods}
    unknown = sorted(set(labels) - set(methods))
    if unknown:
        raise SystemExit(f"methods {unknown} are not in configs/reproduce_{preset}.yaml; choose from {sorted(methods)}")
    federation = make_federation(config)
    out = REPO / "results" / f"rounds-to-target-{preset}"
    rows = []
    for label in labels:
        summary = run_method(config, methods[label], federation, results_dir=out, progress=False).summary
        rows.append({"method": label, "rounds to target": summary["rounds_to_target"] or "never",
                     "MB to target": summary.get("megabytes_to_target"),
                     "MB total": summary["megabytes_up"] + summary["megabytes_down"],
                     "final personal val acc": summary["final"].get("personal_val_accuracy"),
                     "epsilon (site)": summary["final"].get("epsilon")})
    f = config.federated
    source = (f"runs of configs/reproduce_{preset}.yaml at alpha {config.federation.alpha:g}, seed {f.seed}, "
              f"{f.num_rounds} rounds evaluated every {f.eval_every}; target {f.target_accuracy} on the "
              f"{f.smoothing_window}-round moving average of the deployed models' validation accuracy (personal where a "
              f"method has them, else global); run directories in `results/rounds-to-target-{preset}/`")
    return pd.DataFrame(rows), source


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--report", type=Path, help="folder of a finished `mmpfl reproduce` run")
    parser.add_argument("--run", metavar="PRESET", help="train --methods of configs/reproduce_PRESET.yaml instead")
    parser.add_argument("--methods", nargs="+", default=["fedavg", "mm-pfl-adp"], help="method labels, with --run")
    parser.add_argument("--rounds", type=int, help="rounds per run, with --run (default: the config's)")
    parser.add_argument("--eval-every", type=int, help="evaluation interval, with --run (default: the config's)")
    args = parser.parse_args(argv)
    if args.run:
        main_table, source = _from_runs(args.run, args.methods, args.rounds, args.eval_every)
        name = f"rounds_to_target_{args.run}"
    else:
        main_table, source = _from_report(args.report)
        name = "rounds_to_target"
    fedavg = main_table[main_table["method"].str.fullmatch("FedAvg", case=False)]
    base_rounds = _numeric(fedavg["rounds to target"].iloc[0]) if len(fedavg) else None
    rows = []
    for _, row in main_table.iterrows():
        rounds, mb = _numeric(row["rounds to target"]), _numeric(row["MB to target"])
        rows.append({"method": row["method"], "rounds_to_target": "never" if rounds is None else rounds,
                     "mb_to_target": "n/a" if mb is None else round(mb, 2), "mb_total": round(float(row["MB total"]), 2),
                     "rounds_vs_fedavg": (round(rounds / base_rounds, 2) if rounds is not None and base_rounds else "n/a"),
                     "paper_rounds": PAPER.get(str(row["method"]).lower(), ""),
                     **{k: row[k] for k in ("final personal val acc", "epsilon (site)") if k in row}})
    frame = pd.DataFrame(rows)
    notes = (f"From {source} ('never': not reached within the rounds). The paper's figures (47 vs 85 rounds) are "
             "for its own data and model; see the reproduction's REPORT.md for the verdict.")
    print(frame.to_string(index=False))
    print("wrote", write_results(name, frame, notes))


def _from_report(folder: Path | None) -> tuple[pd.DataFrame, str]:
    """The main table of a finished reproduction (running the smoke one when there is none)."""
    if folder is None:
        teaching = REPO / "results" / "reproduce-teaching"
        folder = teaching if (teaching / "main.csv").exists() else REPO / "results" / "reproduce-smoke"
    if not (folder / "main.csv").exists():
        print(f"no reproduction in {folder}; running `mmpfl reproduce --preset smoke` there", flush=True)
        subprocess.run([sys.executable, "-m", "mmpfl_core.cli", "reproduce", "--preset", "smoke", "--out", str(folder),
                        "--no-progress"], check=True, cwd=REPO)
    shown = folder.relative_to(REPO) if folder.is_relative_to(REPO) else folder
    main = pd.read_csv(folder / "main.csv")
    traffic = folder / "private" / "communication.csv"  # byte counts are operator-only (issue 21)
    if traffic.exists() and "MB total" not in main.columns:
        main = main.merge(pd.read_csv(traffic), on="method", how="left")
    return main, f"`{shown}/main.csv` + `private/communication.csv` (target accuracy as set in that run's config)"


if __name__ == "__main__":
    main()
