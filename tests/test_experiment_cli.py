"""YAML experiments and the ``mmpfl`` command line, end to end on a tiny config."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from mmpfl_core.cli import main
from mmpfl_core.errors import ConfigError
from mmpfl_core.experiment import ExperimentConfig, load_experiment

TINY = {
    "name": "tiny",
    "data": {"num_subjects": 160, "image_size": 32, "seed": 3},
    "federation": {"num_sites": 3, "alpha": 1.0, "public_size": 0, "seed": 3},
    "model": {"preset": "tiny", "overrides": {"embed_dim": 32, "depth": 1}},
    "federated": {"num_rounds": 2, "local": {"batch_size": 32}, "bootstrap_resamples": 20, "checkpoint_every": 1},
    "methods": [{"strategy": "centralized"}, {"strategy": "fedavg"}, {"strategy": "fedprox", "mu": 0.1, "label": "prox"}],
}


@pytest.fixture
def tiny_yaml(tmp_path: Path) -> Path:
    path = tmp_path / "tiny.yaml"
    path.write_text(yaml.safe_dump(TINY))
    return path


def test_presets_in_configs_load():
    for name in ("quickstart", "teaching", "paper"):
        config = load_experiment(name)
        assert config.name == name and config.methods


@pytest.mark.parametrize("section, bad, field", [
    ("federated", {"num_rounds": 0}, "federated.num_rounds"),
    ("federated", {"rounds": 3}, "unknown key"),
    ("data", {"image_size": 8}, "image_size"),
    ("federation", {"alpha": -1.0}, "alpha"),
    ("model", {"preset": "huge"}, "model.preset"),
])
def test_bad_values_are_named(section, bad, field):
    values = {**TINY, section: {**TINY[section], **bad}}
    with pytest.raises(ConfigError, match=field):
        ExperimentConfig.from_dict(values)


def test_unknown_strategy_and_unknown_top_level_key():
    with pytest.raises(ConfigError, match="unknown"):
        ExperimentConfig.from_dict({**TINY, "methods": [{"strategy": "fedsgd"}]})
    with pytest.raises(ConfigError, match="top-level"):
        ExperimentConfig.from_dict({**TINY, "privacy": {}})


def test_missing_config_names_the_presets():
    with pytest.raises(ConfigError, match="quickstart"):
        load_experiment("no-such-preset")


def test_cli_compare_writes_report_and_resumes(tiny_yaml: Path, tmp_path: Path, capsys):
    out = tmp_path / "results"
    assert main(["compare", "--config", str(tiny_yaml), "--out", str(out), "--no-progress"]) == 0
    report = (out / "REPORT.md").read_text()
    assert "| centralized |" in report and "| prox |" in report
    for name in ("comparison.csv", "cohort_summary.csv", "accuracy_vs_round.png", "site_accuracy.png"):
        assert (out / name).is_file(), name
    summary = json.loads((out / "fedavg" / "summary.json").read_text())
    private = json.loads((out / "fedavg" / "private" / "summary.json").read_text())
    assert summary["num_rounds"] == 2 and private["megabytes_up"] > 0  # byte counters are operator-only
    # Running again resumes from the finished checkpoints instead of training anew.
    assert main(["compare", "--config", str(tiny_yaml), "--out", str(out), "--no-progress"]) == 0
    assert json.loads((out / "fedavg" / "summary.json").read_text()) == summary


def test_cli_train_and_error_exit_code(tiny_yaml: Path, tmp_path: Path, capsys):
    assert main(["train", "--config", str(tiny_yaml), "--method", "fedavg", "--rounds", "1",
                 "--out", str(tmp_path / "r"), "--no-progress"]) == 0
    assert (tmp_path / "r" / "fedavg" / "metrics.csv").is_file()
    assert main(["train", "--config", str(tiny_yaml), "--method", "nope", "--out", str(tmp_path / "r2")]) == 2
    assert "unknown" in capsys.readouterr().err
