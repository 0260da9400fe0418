"""Benchmark: wall time of every notebook under papermill, with its teaching defaults and with CI's smoke parameters.

Teaching defaults are what a learner gets on Binder (about 2 CPU cores): each notebook's own
``parameters`` cell, nothing injected. Smoke is what ``make test`` injects
(:data:`mmpfl_core.notebook_tools.SMOKE_PARAMETERS`). Targets (issue 8): every notebook with
teaching defaults <= 5 minutes on 2 cores; the smoke suite <= 15 minutes in total. Data and results
go to a temporary folder; the committed notebooks are never written.

Writes ``bench/results/notebook_timing.{csv,md}``, keeping the rows of notebooks and settings that
were not run this time. Plain script, no asserts.

    python bench/notebook_timing.py                   # both settings, every notebook
    python bench/notebook_timing.py --settings smoke  # the CI suite only
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import pandas as pd
import papermill as pm

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import RESULTS, write_results  # noqa: E402

from mmpfl_core.notebook_tools import SMOKE_PARAMETERS  # noqa: E402

NOTEBOOKS = Path(__file__).resolve().parent.parent / "notebooks"
LIMIT_S = {"teaching": 300.0, "smoke": None}


def run_notebook(path: Path, parameters: dict, workdir: Path) -> tuple[float, str]:
    """Seconds to execute ``path`` and "ok" or the error's last line."""
    os.environ.update(MMPFL_DATA_DIR=str(workdir / "data"), MMPFL_RESULTS_DIR=str(workdir / "results"), MPLBACKEND="Agg")
    started = time.perf_counter()
    try:
        pm.execute_notebook(str(path), str(workdir / path.name), parameters=parameters, kernel_name="python3",
                            cwd=str(NOTEBOOKS), progress_bar=False)
        status = "ok"
    except Exception as exc:  # noqa: BLE001 (a failing notebook is a result to report, not a crash)
        status = f"failed: {str(exc).strip().splitlines()[-1][:120]}"
    return time.perf_counter() - started, status


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--settings", nargs="+", choices=["teaching", "smoke"], default=["teaching", "smoke"])
    parser.add_argument("--notebooks", nargs="*", help="stems to run (default: every numbered notebook)")
    args = parser.parse_args(argv)
    paths = sorted(NOTEBOOKS.glob("[0-9][0-9]*_*.ipynb"))
    if args.notebooks:
        paths = [p for p in paths if p.stem in args.notebooks or p.stem[:2] in args.notebooks]
    rows = []
    for setting in args.settings:
        for path in paths:
            with tempfile.TemporaryDirectory() as tmp:
                parameters = dict(SMOKE_PARAMETERS, OUTPUT_DIR=tmp) if setting == "smoke" else {"OUTPUT_DIR": tmp}
                seconds, status = run_notebook(path, parameters, Path(tmp))
            limit = LIMIT_S[setting]
            rows.append({"notebook": path.stem, "setting": setting, "seconds": round(seconds, 1), "status": status,
                         "within_5_min": "" if limit is None else ("yes" if seconds <= limit else "NO")})
            print(f"{setting:8s} {path.stem:45s} {seconds:7.1f} s  {status}", flush=True)
    frame = pd.DataFrame(rows)
    previous = RESULTS / "notebook_timing.csv"
    if previous.exists():  # keep the rows of notebooks and settings not run now (the teaching run takes long)
        kept = pd.read_csv(previous)
        rerun = kept.set_index(["setting", "notebook"]).index.isin(frame.set_index(["setting", "notebook"]).index)
        frame = pd.concat([kept[~rerun], frame], ignore_index=True).sort_values(["setting", "notebook"], kind="stable")
    totals = frame.groupby("setting")["seconds"].sum().round(1).to_dict()
    notes = (f"papermill, kernel python3, one notebook after another. Totals: {totals} s. Targets: teaching <= 300 s "
             "each on 2 cores; smoke suite <= 900 s in total (the papermill harness in `make test` adds its own "
             "start-up per notebook). Timings on a shared machine are noisy: the 1-minute load average when "
             f"the run ended was {os.getloadavg()[0]:.1f}.")
    print(frame.to_string(index=False))
    print(notes)
    print("wrote", write_results("notebook_timing", frame, notes))


if __name__ == "__main__":
    main()
