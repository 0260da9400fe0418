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
    for name in ("quickstart", "teaching", "paper", "headline"):
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
    for name in ("comparison.csv", "accuracy_vs_round.png", "private/cohort_summary.csv", "private/site_accuracy.png",
                 "private/communication.csv"):
        assert (out / name).is_file(), name
    # Per-site tables, byte counts and (without a public set) any scan of a patient stay out of the released folder.
    assert not (out / "cohort_summary.csv").exists() and not (out / "cohort_preview.png").exists()
    assert "MB total" not in (out / "comparison.csv").read_text()
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


def test_each_strategy_is_built_once_per_run(tiny_yaml: Path, tmp_path: Path, monkeypatch):
    """compare/train build every method's strategy exactly once (checked, then trained), not again per stage."""
    import mmpfl_core.experiment_checks as checks
    from mmpfl_core.federated import strategies

    built = []
    real = strategies.create_strategy
    monkeypatch.setattr(checks, "create_strategy", lambda name, **kw: built.append(name) or real(name, **kw))
    monkeypatch.setattr(strategies, "create_strategy", lambda name, **kw: built.append(name) or real(name, **kw))
    assert main(["compare", "--config", str(tiny_yaml), "--rounds", "1", "--out", str(tmp_path / "c"),
                 "--no-progress"]) == 0
    assert sorted(built) == ["centralized", "fedavg", "fedprox"]
    built.clear()
    assert main(["train", "--config", str(tiny_yaml), "--method", "dp-fedavg", "--epsilon", "8", "--rounds", "1",
                 "--out", str(tmp_path / "t"), "--no-progress"]) == 0
    assert built == ["dp-fedavg"]


def test_a_method_runs_its_own_rounds_and_cli_rounds_override_them(tmp_path: Path):
    """``num_rounds`` on a method (cross-silo DP-SGD takes one step a round) sets its run's rounds; the others keep
    ``federated.num_rounds``; so for ``batch_size`` and ``local_epochs``; ``--rounds`` sets every method's (a smoke
    run); bad values are named."""
    values = {**TINY, "methods": [{"strategy": "fedavg"}, {"strategy": "fedprox", "mu": 0.1, "label": "prox",
                                                           "num_rounds": 3, "batch_size": 8, "local_epochs": 2}]}
    path = tmp_path / "own.yaml"
    path.write_text(yaml.safe_dump(values))
    out = tmp_path / "results"
    assert main(["compare", "--config", str(path), "--out", str(out), "--no-progress"]) == 0
    rounds = {label: json.loads((out / label / "summary.json").read_text())["num_rounds"] for label in ("fedavg", "prox")}
    assert rounds == {"fedavg": 2, "prox": 3}
    # the run directory's resolved config is the one the method ran with (its own batch size, the shared one else)
    batch = {label: json.loads((out / label / "config.json").read_text())["config"]["federated"]["local"]["batch_size"]
             for label in ("fedavg", "prox")}
    assert batch == {"fedavg": 32, "prox": 8}
    epochs = {label: json.loads((out / label / "config.json").read_text())["config"]["federated"]["local"]["local_epochs"]
              for label in ("fedavg", "prox")}
    assert epochs == {"fedavg": 1, "prox": 2}  # TINY leaves federated.local.local_epochs at its default, 1
    assert "(methods with their own: prox 3 rounds, 2 local epochs, batch 8)" in (out / "REPORT.md").read_text()
    assert main(["compare", "--config", str(path), "--rounds", "1", "--out", str(tmp_path / "smoke"),
                 "--no-progress"]) == 0
    assert json.loads((tmp_path / "smoke" / "prox" / "summary.json").read_text())["num_rounds"] == 1
    for key in ("num_rounds", "batch_size", "local_epochs"):
        for bad in (0, -2, 1.5, True, "10"):
            with pytest.raises(ConfigError, match=key):
                ExperimentConfig.from_dict({**TINY, "methods": [{"strategy": "fedavg", key: bad}]})


def test_overrides_edit_the_typed_config():
    """--rounds/--seed/--sites edit the typed sections (validated again), without a dict round trip."""
    config = ExperimentConfig.from_dict(TINY)
    changed = config.replace(federated={"num_rounds": 5, "local": {"batch_size": 8}}, data={"seed": 9},
                             model={"overrides": {"depth": 2}})
    assert changed.federated.num_rounds == 5 and changed.federated.local.batch_size == 8
    assert changed.federated.local.local_epochs == config.federated.local.local_epochs  # untouched fields kept
    assert changed.data.seed == 9 and dict(changed.model.overrides) == {"embed_dim": 32, "depth": 2}
    assert changed.methods == config.methods and config.federated.num_rounds == 2  # the original is unchanged
    with pytest.raises(ConfigError, match="unknown field"):
        config.replace(federated={"num_round": 3})
    with pytest.raises(ConfigError):  # each section validates itself again
        config.replace(federated={"num_rounds": 0})


def test_methods_and_help_list_the_registries(capsys):
    from mmpfl_core.federated.strategies import available_strategies
    from mmpfl_core.models.presets import list_presets
    assert main(["methods"]) == 0
    listed = capsys.readouterr().out
    for name in [*available_strategies(), *list_presets(), "quickstart"]:
        assert name in listed, name
    with pytest.raises(SystemExit) as info:
        main(["--help"])
    assert info.value.code == 0
    helped = capsys.readouterr().out
    assert all(name in helped for name in available_strategies()), helped[-600:]


@pytest.mark.parametrize("argv, message", [
    (["--method", "dp-fedavg"], "target_epsilon"),  # a DP method needs its budget
    (["--method", "fedavg", "--epsilon", "8"], "takes no privacy budget"),
    (["--method", "nope"], "mmpfl methods"),
    (["--method", "mm-pfl-adp", "--epsilon", "8"], "public server set"),  # TINY has public_size 0
])
def test_failed_train_leaves_no_results_folder(argv, message, tiny_yaml: Path, tmp_path: Path, capsys):
    out = tmp_path / "never"
    assert main(["train", "--config", str(tiny_yaml), "--rounds", "1", "--out", str(out), *argv]) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("mmpfl: error:") == 1
    assert not out.exists()


def test_cohort_data_in_yaml_and_model_checks(tmp_path: Path):
    from mmpfl_core.data.cohort_federation import CohortSource
    from mmpfl_core.data.cohort_files import save_cohort
    from mmpfl_core.data.synthetic import SyntheticCohortConfig, generate_subjects
    from mmpfl_core.experiment import make_federation, with_cohort
    from mmpfl_core.experiment_checks import check_model_matches_data
    import dataclasses
    import numpy as np

    cohort = generate_subjects(SyntheticCohortConfig(num_subjects=40, image_size=16, seed=1))
    cohort = dataclasses.replace(cohort, sites=np.arange(40, dtype=np.int64) % 3 - 1)  # sites -1, 0, 1
    path = save_cohort(cohort, tmp_path / "c.npz")
    config = ExperimentConfig.from_dict({**TINY, "data": {"cohort": str(path), "seed": 2}})
    assert isinstance(config.data, CohortSource) and config.data.seed == 2
    fed = make_federation(config)
    assert fed.num_sites == 2 and len(fed.public) == 14 and (fed.public.sites == -1).all()
    assert sum(len(s) for s in fed.sites) == 26
    assert with_cohort(ExperimentConfig.from_dict(TINY), path).data == CohortSource(cohort=str(path), seed=3)
    # A re-split by Dirichlet label skew instead of the site column (what --sites does with --data).
    resplit = make_federation(config.replace(data={"partition": "dirichlet"}, federation={"num_sites": 4}))
    assert resplit.num_sites == 4 and len(resplit.public) == 14
    with pytest.raises(ConfigError, match="unknown key"):
        ExperimentConfig.from_dict({**TINY, "data": {"cohort": str(path), "num_subjects": 3}})
    # The .json sidecar names the same cohort (it used to fail as "corrupt ... allow_pickle").
    sidecar = make_federation(with_cohort(config, path.with_suffix(".json")))
    assert [len(s) for s in sidecar.sites] == [len(s) for s in fed.sites]
    assert (sidecar.public.labels == fed.public.labels).all()
    # A saved federation's folder (what `mmpfl generate` writes) is read with its sites and splits as written.
    from mmpfl_core.data.cohort_files import save_federation
    saved = make_federation(with_cohort(config, save_federation(fed, tmp_path / "fed")))
    assert [len(s.train) for s in saved.sites] == [len(s.train) for s in fed.sites]
    with pytest.raises(ConfigError, match="number of classes 3"):
        check_model_matches_data(config.replace(model={"overrides": {"num_classes": 2}}), fed)
    with pytest.raises(ConfigError, match="not a multiple"):
        check_model_matches_data(config.replace(model={"overrides": {"patch_size": 6}}), fed)


def test_cohort_sidecar_without_its_npz_says_to_pass_the_npz(tmp_path: Path, capsys):
    """A lone ``cohort.json`` (its .npz moved away) fails naming the sidecar and the fix, not pickling."""
    from mmpfl_core.data.cohort_files import load_cohort, save_cohort
    from mmpfl_core.data.synthetic import SyntheticCohortConfig, generate_subjects
    from mmpfl_core.errors import DataError

    path = save_cohort(generate_subjects(SyntheticCohortConfig(num_subjects=12, image_size=16, seed=1)),
                       tmp_path / "cohort.npz")
    assert len(load_cohort(path.with_suffix(".json"))) == 12  # either file names the cohort
    path.rename(tmp_path / "elsewhere.npz")
    with pytest.raises(DataError, match=r"JSON sidecar.*Pass the cohort's \.npz") as info:
        load_cohort(tmp_path / "cohort.json")
    assert "pickle" not in str(info.value)
    assert main(["train", "--config", "quickstart", "--data", str(tmp_path / "cohort.json"), "--method", "fedavg",
                 "--out", str(tmp_path / "out"), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "JSON sidecar" in err and "allow_pickle" not in err and not (tmp_path / "out").exists()


def test_privacy_budget_reaches_every_dp_method_of_the_headline():
    """--epsilon/--delta set the budget of every private method, patient-level DP-SGD nested in sample_level_dp
    included (else `mmpfl demo --epsilon 4` would compare methods at different budgets); others unchanged."""
    from mmpfl_core.experiment_config import with_privacy_budget

    config = load_experiment("headline")
    changed = with_privacy_budget(config, 4.0, delta=1e-6)
    private = 0
    for before, after in zip(config.methods, changed.methods):
        top = ({k: v for k, v in before.kwargs.items() if k != "sample_level_dp"},
               {k: v for k, v in after.kwargs.items() if k != "sample_level_dp"})
        nested = (before.kwargs.get("sample_level_dp") or {}, after.kwargs.get("sample_level_dp") or {})
        for old, new in (top, nested):
            if "target_epsilon" in old:
                private += 1
                assert new["target_epsilon"] == 4.0 and new["delta"] == 1e-6, before.label
            else:
                assert new == old, before.label
    assert private == 6  # local+dp-sgd (nested), fedavg+dp-sgd, cross-silo DP-SGD, MM-PFL-ADP and its 2 ablations


def test_the_comparison_reports_each_method_against_local_training_patient_by_patient(tmp_path: Path):
    """The paired column is acc(method) - acc(local-only) on the same test subjects, from the runs' kept scores
    (recomputed here by hand from them), "0 (reference)" on local-only, and "n/a" for a run without scores."""
    import dataclasses

    import numpy as np

    from mmpfl_core.experiment import compare_methods, comparison_table

    config = ExperimentConfig.from_dict(
        {**TINY, "federated": {**TINY["federated"], "num_rounds": 1},
         "methods": [{"strategy": "local", "label": "alone"}, {"strategy": "fedavg"}]}
    )
    table, runs, _ = compare_methods(config, progress=False)
    column = "personal acc - alone [paired 95% CI]"
    rows = table.set_index("method")[column]
    assert rows["alone"] == "0 (reference)"
    own, ref = runs["fedavg"].final_predictions, runs["alone"].final_predictions
    assert np.array_equal(own["labels"], ref["labels"]) and len(own["labels"]) == len(ref["personal"])
    by_hand = ((own["personal"].argmax(1) == own["labels"]).mean() - (ref["personal"].argmax(1) == ref["labels"]).mean())
    assert rows["fedavg"].startswith(f"{by_hand:+.3f} [")
    assert float(rows["fedavg"].split()[0]) == pytest.approx(
        runs["fedavg"].summary["personal_test"]["accuracy"]["point"] - runs["alone"].summary["personal_test"]["accuracy"]["point"],
        abs=1e-3,
    )
    runs["fedavg"] = dataclasses.replace(runs["fedavg"], final_predictions={})
    assert comparison_table(runs).set_index("method").loc["fedavg", column] == "n/a"


def test_methods_in_worker_processes_give_the_sequential_runs(tmp_path: Path):
    """compare_methods(workers=2) trains each method in a forked one-thread process: the same runs as one after
    another (same table, same released models up to float summation order), each in its own resumable folder,
    back in the config's order; a bad worker count is refused with the fix."""
    import numpy as np
    import torch

    from mmpfl_core.experiment import compare_methods

    config = ExperimentConfig.from_dict(
        {**TINY, "federated": {**TINY["federated"], "num_rounds": 2},
         "methods": [{"strategy": "fedavg"}, {"strategy": "local", "label": "alone"}, {"strategy": "centralized"}]}
    )  # fmt: skip
    table_seq, runs_seq, _ = compare_methods(config, results_dir=tmp_path / "seq", progress=False)
    table_par, runs_par, _ = compare_methods(config, results_dir=tmp_path / "par", progress=False, workers=2)
    assert list(runs_par) == ["fedavg", "alone", "centralized"]
    assert all((tmp_path / "par" / label / "summary.json").is_file() for label in runs_par)
    for label in runs_seq:
        seq, par = runs_seq[label].global_state, runs_par[label].global_state
        assert seq.keys() == par.keys()
        assert all(torch.allclose(seq[k].float(), par[k].float(), atol=1e-4) for k in seq)
        a, b = runs_seq[label].final_predictions, runs_par[label].final_predictions
        assert np.array_equal(a["labels"], b["labels"]) and np.allclose(a["personal"], b["personal"], atol=1e-4)
    assert list(table_seq["method"]) == list(table_par["method"])
    with pytest.raises(ConfigError, match="workers=0 must be an integer >= 1"):
        compare_methods(config, progress=False, workers=0)
