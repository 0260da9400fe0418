"""Benchmark: rounds and megabytes to a target accuracy, FedAvg vs MM-PFL-ADP, from a reproduction run.

The paper reports 47 rounds for MM-PFL-ADP vs 85 for FedAvg. This script reads the main table of a
finished reproduction (``main.csv`` beside its ``REPORT.md``: the per-round histories were scored
against the config's ``target_accuracy`` by :mod:`mmpfl_core.metrics.convergence`) and prints, for
each method, rounds and MB to the target and the ratio to FedAvg. With no reproduction at hand it
runs the smoke one first (about a minute).

Writes ``bench/results/rounds_to_target.{csv,md}``. Plain script, no asserts.

    python bench/rounds_to_target.py                      # results/reproduce-teaching, else smoke
    python bench/rounds_to_target.py --report results/reproduce-paper
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


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--report", type=Path, help="folder of a finished `mmpfl reproduce` run")
    args = parser.parse_args(argv)
    folder = args.report
    if folder is None:
        teaching = REPO / "results" / "reproduce-teaching"
        folder = teaching if (teaching / "main.csv").exists() else REPO / "results" / "reproduce-smoke"
    if not (folder / "main.csv").exists():
        print(f"no reproduction in {folder}; running `mmpfl reproduce --preset smoke` there", flush=True)
        subprocess.run([sys.executable, "-m", "mmpfl_core.cli", "reproduce", "--preset", "smoke", "--out", str(folder),
                        "--no-progress"], check=True, cwd=REPO)
    main_table = pd.read_csv(folder / "main.csv")
    fedavg = main_table[main_table["method"].str.fullmatch("FedAvg", case=False)]
    base_rounds = _numeric(fedavg["rounds to target"].iloc[0]) if len(fedavg) else None
    rows = []
    for _, row in main_table.iterrows():
        rounds, mb = _numeric(row["rounds to target"]), _numeric(row["MB to target"])
        rows.append({"method": row["method"], "rounds_to_target": "never" if rounds is None else rounds,
                     "mb_to_target": "n/a" if mb is None else round(mb, 2), "mb_total": round(float(row["MB total"]), 2),
                     "rounds_vs_fedavg": (round(rounds / base_rounds, 2) if rounds is not None and base_rounds else "n/a"),
                     "paper_rounds": PAPER.get(str(row["method"]).lower(), "")})
    frame = pd.DataFrame(rows)
    notes = (f"From `{folder.relative_to(REPO) if folder.is_relative_to(REPO) else folder}/main.csv` (target accuracy "
             "as set in that run's config; 'never': not reached within the run's rounds). The paper's figures "
             "(47 vs 85 rounds) are for its own data and model; see the reproduction's REPORT.md for the verdict.")
    print(frame.to_string(index=False))
    print("wrote", write_results("rounds_to_target", frame, notes))


if __name__ == "__main__":
    main()
