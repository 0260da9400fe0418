"""Tests for mmpfl_core.io: safe checkpoints and run directories."""
from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
import torch

from mmpfl_core.errors import MMPFLError
from mmpfl_core.io import (
    CheckpointError,
    RunDirectory,
    RunDirectoryError,
    checkpoint_path,
    latest_checkpoint,
    load_checkpoint,
    prune_checkpoints,
    save_checkpoint,
)
from mmpfl_core.io import checkpoint as checkpoint_module
from mmpfl_core.seeding import torch_generator


def _model(seed: int = 0) -> torch.nn.Module:
    g = torch_generator(seed)
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 3))
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g))
    return model


def test_round_trip_bit_exact(tmp_path):
    tensors = {"model": _model().state_dict(),
               "extra": {"half": torch.arange(6, dtype=torch.float16).reshape(2, 3).t(),  # non-contiguous
                         "ints": torch.tensor([1, -(2 ** 40)], dtype=torch.int64),
                         "empty": {}}}
    state = {"round": 5, "eps": [0.5, 1.25], "nested": {"name": "fedavg", "big": 2 ** 100},
             "nan": float("nan")}
    save_checkpoint(tmp_path / "round_0005", tensors=tensors, state=state)
    got_t, got_s = load_checkpoint(tmp_path / "round_0005.safetensors")
    assert set(got_t) == {"model", "extra"} and got_t["extra"]["empty"] == {}
    for k, v in tensors["model"].items():
        assert got_t["model"][k].dtype == v.dtype and torch.equal(got_t["model"][k], v)
    assert torch.equal(got_t["extra"]["half"], tensors["extra"]["half"])
    assert torch.equal(got_t["extra"]["ints"], tensors["extra"]["ints"])
    assert got_s["nested"] == state["nested"] and got_s["eps"] == state["eps"]
    assert np.isnan(got_s["nan"]) and got_s["round"] == 5
    assert sorted(p.name for p in tmp_path.iterdir()) == ["round_0005.json", "round_0005.safetensors"]


def test_truncated_file_raises_checkpoint_error_naming_file(tmp_path):
    path = tmp_path / "round_0002.safetensors"
    save_checkpoint(path, tensors={"w": torch.randn(100)}, state={"round": 2})
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="round_0002.safetensors") as info:
        load_checkpoint(path)
    assert isinstance(info.value, MMPFLError) and "delete it" in str(info.value).lower()
    (tmp_path / "round_0002.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="round_0002.json"):
        load_checkpoint(path)
    with pytest.raises(CheckpointError, match="missing"):
        load_checkpoint(tmp_path / "round_0009")


def test_unsafe_state_rejected(tmp_path):
    with pytest.raises(CheckpointError, match="JSON"):
        save_checkpoint(tmp_path / "a", tensors={}, state={"obj": object()})
    with pytest.raises(CheckpointError, match="strings"):
        save_checkpoint(tmp_path / "a", tensors={}, state={"sites": {1: "x"}})
    with pytest.raises(CheckpointError, match="not a tensor"):
        save_checkpoint(tmp_path / "a", tensors={"x": 3}, state={})
    assert list(tmp_path.iterdir()) == []


def test_atomic_write_keeps_last_good_checkpoint(tmp_path, monkeypatch):
    path = tmp_path / "round_0001.safetensors"
    save_checkpoint(path, tensors={"w": torch.ones(4)}, state={"round": 1})

    def crash(tensors, filename, *args, **kwargs):
        with open(filename, "wb") as fh:
            fh.write(b"partial garbage")  # a half-written file, then the process "dies"
        raise KeyboardInterrupt("killed mid-write")

    monkeypatch.setattr(checkpoint_module, "save_file", crash)
    with pytest.raises(KeyboardInterrupt):
        save_checkpoint(path, tensors={"w": torch.zeros(4)}, state={"round": 99})
    tensors, state = load_checkpoint(path)
    assert torch.equal(tensors["w"], torch.ones(4)) and state == {"round": 1}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["round_0001.json", "round_0001.safetensors"]


def test_mismatched_pair_detected(tmp_path):
    save_checkpoint(tmp_path / "round_0001", tensors={"w": torch.ones(4)}, state={})
    old_json = (tmp_path / "round_0001.json").read_text()
    save_checkpoint(tmp_path / "round_0001", tensors={"w": torch.zeros(4)}, state={})
    (tmp_path / "round_0001.json").write_text(old_json)  # as if killed between the two moves
    with pytest.raises(CheckpointError, match="mismatch"):
        load_checkpoint(tmp_path / "round_0001")


def test_latest_and_prune(tmp_path):
    assert latest_checkpoint(tmp_path) is None
    for r in (1, 2, 10, 3):
        save_checkpoint(checkpoint_path(tmp_path, r), tensors={"w": torch.ones(1) * r}, state={"round": r})
    (tmp_path / "round_0011.safetensors").write_bytes(b"")  # no JSON partner: ignored
    assert latest_checkpoint(tmp_path) == tmp_path / "round_0010.safetensors"
    removed = prune_checkpoints(tmp_path, keep_last=2)
    assert [p.name for p in removed] == ["round_0001.safetensors", "round_0002.safetensors"]
    assert not (tmp_path / "round_0001.json").exists()
    assert latest_checkpoint(tmp_path) == tmp_path / "round_0010.safetensors"
    with pytest.raises(CheckpointError):
        prune_checkpoints(tmp_path, keep_last=0)


def test_run_directory_create_log_resume_truncate(tmp_path):
    config = {"seed": 7, "strategy": "fedavg", "optim": {"lr": 0.1, "betas": (0.9, 0.99)}}
    run = RunDirectory.create(tmp_path, "run1", config, exist_ok_resume=False)
    stored = json.loads(run.config_path.read_text())
    assert stored["config"]["seed"] == 7 and stored["config"]["optim"]["betas"] == [0.9, 0.99]
    assert {"python", "torch", "timm", "opacus", "numpy"} <= set(stored["environment"])
    assert run.checkpoint_dir.is_dir()
    for r in range(1, 5):
        run.log_round({"round": r, "accuracy": r / 10, "epsilon": float("nan") if r == 1 else r})
    run.log_round({"round": 5, "accuracy": 0.5})  # a missing column is allowed (NaN)
    with pytest.raises(RunDirectoryError, match="new columns.*bytes_up"):
        run.log_round({"round": 6, "accuracy": 0.6, "bytes_up": 10})
    df = run.read_metrics(include_private=True)
    assert list(df.columns) == ["round", "epsilon", "accuracy"] and len(df) == 5
    assert np.isnan(df["epsilon"][0]) and np.isnan(df["epsilon"][4])
    # Only released columns reach metrics.csv; the rest (here an unclassified "accuracy") stays private.
    assert list(run.read_metrics().columns) == ["round", "epsilon"]
    assert list(pd.read_csv(run.private_metrics_path).columns) == ["round", "accuracy"]

    with pytest.raises(RunDirectoryError, match="already exists"):
        RunDirectory.create(tmp_path, "run1", config, exist_ok_resume=False)
    resumed = RunDirectory.create(tmp_path, "run1", config, exist_ok_resume=True)
    assert resumed.truncate_after(3) == 2
    resumed.log_round({"round": 4, "accuracy": 0.44, "epsilon": 4.0})
    df = resumed.read_metrics(include_private=True)
    assert df["round"].tolist() == [1, 2, 3, 4] and df["accuracy"].tolist()[-1] == 0.44
    resumed.write_summary({"best_accuracy": np.float64(0.44), "strategy": "fedavg"})
    assert resumed.read_summary() == {"strategy": "fedavg"}
    assert resumed.read_summary(include_private=True) == {"strategy": "fedavg", "best_accuracy": 0.44}
    scopes = json.loads(resumed.manifest_path.read_text())["scopes"]
    assert scopes["metrics.csv"] == "released" and scopes["private/round_metrics.csv"] == "operator-only"


def test_run_directory_config_mismatch_names_keys(tmp_path):
    RunDirectory.create(tmp_path, "run", {"seed": 1, "optim": {"lr": 0.1}, "rounds": 5},
                        exist_ok_resume=False)
    with pytest.raises(RunDirectoryError) as info:
        RunDirectory.create(tmp_path, "run", {"seed": 2, "optim": {"lr": 0.1}, "clients": 3},
                            exist_ok_resume=True)
    msg = str(info.value)
    assert "seed" in msg and "rounds" in msg and "clients" in msg and "optim.lr" not in msg
    with pytest.raises(RunDirectoryError, match="log_round|round"):
        RunDirectory(tmp_path / "run").log_round({"accuracy": 1.0})
