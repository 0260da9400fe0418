"""Nothing private beside the model: a run directory keeps masks, participant counts, exact losses and
byte counters under private/, and MANIFEST.json tags every file with its scope (issue 14)."""
from __future__ import annotations

import csv
import dataclasses
import json
import re

from mmpfl_core.federated.config import FederatedConfig, LocalTrainingConfig, OptimizerConfig
from mmpfl_core.federated.simulation import run_federated
from mmpfl_core.federated.strategies import create_strategy
from mmpfl_core.io.run_directory import RunDirectory
from mmpfl_core.io.scopes import column_scope, split_summary


def _strings(value):
    """Every list of strings anywhere in a JSON value."""
    if isinstance(value, dict):
        for v in value.values():
            yield from _strings(v)
    elif isinstance(value, list):
        if value and all(isinstance(v, str) for v in value):
            yield value
        for v in value:
            yield from _strings(v)


def _site_maps(value):
    """Every dict keyed by site ids ("0", "1", ...) whose values are lists (a site -> groups map)."""
    if isinstance(value, dict):
        if value and all(re.fullmatch(r"\d+", str(k)) for k in value) and any(isinstance(v, list) for v in value.values()):
            yield value
        for v in value.values():
            yield from _site_maps(v)
    elif isinstance(value, list):
        for v in value:
            yield from _site_maps(v)


def test_no_released_file_maps_sites_to_masks(tiny_federation, tiny_model_factory, tmp_path):
    cfg = dataclasses.replace(FederatedConfig(num_rounds=2, local=LocalTrainingConfig(local_steps=2, batch_size=16),
                                              optimizer=OptimizerConfig(lr=3e-3), bootstrap_resamples=0,
                                              checkpoint_every=1, device="cpu"))
    strategy = create_strategy("mm-pfl-adp", target_epsilon=8.0, clip_norm=0.5, fisher_max_batches=1,
                               fisher_batch_size=8, mask=dict(mode="threshold", threshold=1e-4, update_every=1))
    run_dir = RunDirectory.create(tmp_path, "adp", {"seed": 0}, exist_ok_resume=False)
    run = run_federated(tiny_federation, model_factory=tiny_model_factory, strategy=strategy, config=cfg,
                        progress=False, run_dir=run_dir)
    groups = set(tiny_model_factory().parameter_groups())
    assert any(run.summary["masks"].values()), "the test needs masks to appear (lower the threshold)"
    scopes = json.loads(run_dir.manifest_path.read_text())["scopes"]
    files = {p.relative_to(run_dir.path).as_posix() for p in run_dir.path.rglob("*") if p.is_file()}
    assert set(scopes) == files  # every file is tagged
    released = sorted(f for f in files if not f.startswith("private/"))
    assert released == ["MANIFEST.json", "config.json", "metrics.csv", "summary.json"]
    assert all(scopes[f] == "released" for f in released)
    assert all(scopes[f] in ("operator-only", "private-to-site") for f in files - set(released))
    for name in released:
        path = run_dir.path / name
        if name.endswith(".json"):
            text = json.loads(path.read_text())
            assert not list(_site_maps(text)), name
            for strings in _strings(text):
                assert not set(strings) & groups, (name, strings)  # no parameter-group lists
        else:
            rows = list(csv.reader(path.open()))
            assert not any(re.search(r"site|num_clients|loss|bytes|seconds|mask", c) for c in rows[0]), rows[0]
            assert not any(cell in groups for row in rows for cell in row)
    # The private part holds what the operator and the sites need, tagged by scope.
    for site, groups_of_site in run.summary["masks"].items():
        stored = json.loads((run_dir.private_dir / f"site_{site}" / "masks.json").read_text())
        assert stored["personal_groups"] == groups_of_site and scopes[f"private/site_{site}/masks.json"] == "private-to-site"
    full = run_dir.read_metrics(include_private=True)
    assert {"num_clients", "train_loss", "bytes_up", "personal_fraction"} <= set(full.columns)
    assert run_dir.read_summary(include_private=True)["masks"] == run.summary["masks"]
    assert any(f.startswith("private/checkpoints/") for f in files)


def test_scopes_are_a_whitelist():
    assert column_scope("epsilon") == column_scope("global_test_accuracy") == "released"
    for private in ("num_clients", "train_loss", "bytes_up", "site0_personal_test_accuracy", "new_column", "seconds"):
        assert column_scope(private) == "operator-only"
    released, private = split_summary({"strategy": "x", "masks": {"0": ["head"]}, "megabytes_up": 1.0,
                                       "privacy": {"epsilon": 1.0, "dropped_updates": 2},
                                       "final": {"epsilon": 1.0, "train_loss": 0.3}})
    assert released == {"strategy": "x", "privacy": {"epsilon": 1.0}, "final": {"epsilon": 1.0}}
    assert private == {"masks": {"0": ["head"]}, "megabytes_up": 1.0, "privacy": {"dropped_updates": 2},
                       "final": {"train_loss": 0.3}}


def test_reports_name_the_runs_that_are_not_private():
    from mmpfl_core.experiment import load_experiment
    from mmpfl_core.reproduction import load_reproduction
    from mmpfl_core.reproduction.report import _PERSONAL_NOTE, not_private_lines
    lines = not_private_lines(load_reproduction("smoke").experiment)  # its private methods use reproducible noise
    assert len(lines) == 2 and "Not private" in lines[1] and "dp-fedavg" in lines[1] and "mm-pfl-adp" in lines[1]
    assert not_private_lines(load_experiment("quickstart")) == []  # secure noise: nothing to flag
    assert "NOT covered" in _PERSONAL_NOTE and "never leave" in _PERSONAL_NOTE
