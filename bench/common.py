"""Shared helpers of the benchmark scripts: machine description, timing, result files.

Benchmarks print ratios against a stated limit and write CSV + markdown under ``bench/results``;
they never assert on time (speed targets live here, not in tests).
"""
from __future__ import annotations

import os
import platform
import statistics
import time
from pathlib import Path
from typing import Callable

import pandas as pd
import torch

RESULTS = Path(__file__).resolve().parent / "results"


def machine_description() -> str:
    cpu = platform.processor() or platform.machine()
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "none"
    return (f"{platform.platform()}; CPU {cpu}, {os.cpu_count()} cores, torch threads {torch.get_num_threads()}; "
            f"GPU {gpu}; python {platform.python_version()}, torch {torch.__version__}")


def median_seconds(fn: Callable[[], object], *, repeats: int, warmup: int = 1) -> float:
    """Median wall time of ``fn`` over ``repeats`` calls after ``warmup`` untimed calls."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def write_results(name: str, frame: pd.DataFrame, notes: str = "") -> Path:
    """``bench/results/<name>.csv`` and ``<name>.md`` (table, machine, notes)."""
    RESULTS.mkdir(parents=True, exist_ok=True)
    frame.to_csv(RESULTS / f"{name}.csv", index=False)
    from mmpfl_core.tables import markdown_table
    text = [f"# {name}", "", f"Machine: {machine_description()}", "", markdown_table(frame), ""]
    if notes:
        text += [notes, ""]
    path = RESULTS / f"{name}.md"
    path.write_text("\n".join(text))
    return path
