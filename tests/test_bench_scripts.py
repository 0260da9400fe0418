"""The benchmark scripts' plumbing (no timings): the GPU suite's steps are valid command lines, its
budget skips what no longer fits, and a step that overruns is stopped with its worker processes.

The GPU suite runs only where a GPU is lent (rarely), so a wrong flag or a leaked worker would
otherwise surface only then.
"""
from __future__ import annotations

import argparse
import importlib
import sys
import time
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parent.parent / "bench"
_PARSE_ARGS = argparse.ArgumentParser.parse_args  # the real one, whatever a test has patched


@pytest.fixture
def gpu_suite(monkeypatch, tmp_path):
    monkeypatch.setenv("MMPFL_BENCH_RESULTS", str(tmp_path))  # children write here, not to bench/results
    monkeypatch.syspath_prepend(str(BENCH))
    return importlib.import_module("gpu_suite")


def _parses(script: str, argv: list[str], monkeypatch) -> argparse.Namespace:
    """The namespace the script's own parser makes of ``argv`` (the script is stopped right after parsing)."""
    parsed = {}

    def parse_then_stop(self, args=None, namespace=None):
        parsed["namespace"] = _PARSE_ARGS(self, args, namespace)
        raise SystemExit(0)

    monkeypatch.setattr(argparse.ArgumentParser, "parse_args", parse_then_stop)
    with pytest.raises(SystemExit) as stopped:
        importlib.import_module(script.removesuffix(".py")).main(argv)
    assert stopped.value.code == 0 and "namespace" in parsed, f"{script} refused {argv}"
    return parsed["namespace"]


def test_every_gpu_suite_step_is_a_valid_command_line(gpu_suite, monkeypatch):
    for name, argv, limit in gpu_suite.CUDA_STEPS + gpu_suite.CPU2_STEPS:
        assert (BENCH / argv[0]).is_file(), name
        namespace = _parses(argv[0], argv[1:], monkeypatch)
        assert limit >= gpu_suite.MIN_STEP_SECONDS
        if "--device" in argv:
            assert namespace.device == "cuda"
    # the CUDA steps fit the default budget, so each can get its own limit when run alone
    assert max(limit for _, _, limit in gpu_suite.CUDA_STEPS) <= 450


def test_a_step_with_too_little_budget_left_is_skipped(gpu_suite):
    started = time.perf_counter()
    result = gpu_suite._run("late step", ["dp_sgd_modes.py"], gpu_suite.MIN_STEP_SECONDS - 1, pin_two_cores=False)
    assert result["status"] == "skipped (budget spent)" and time.perf_counter() - started < 1.0


@pytest.mark.skipif(not Path("/proc/self/cmdline").exists(), reason="reads the process table from /proc")
def test_an_overrunning_step_is_stopped_with_its_workers(gpu_suite, monkeypatch):
    monkeypatch.setattr(gpu_suite, "MIN_STEP_SECONDS", 0)
    # dp_sgd_modes runs each mode in a worker process; 10^5 repeats keep the worker busy past the limit
    argv = ["dp_sgd_modes.py", "--presets", "tiny", "--modes", "non-private", "--repeats", "100000", "--threads", "1"]
    result = gpu_suite._run("long step", argv, 12, pin_two_cores=False)
    assert result["status"] == "stopped after 12 s"
    time.sleep(0.5)
    assert not _processes_running("dp_sgd_modes.py")


def _processes_running(fragment: str) -> list[str]:
    found = []
    for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
        try:
            text = cmdline.read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:  # the process ended while we looked
            continue
        if fragment in text and sys.executable in text:
            found.append(text)
    return found
