"""The public pretraining stage of an experiment (issue 23): the typed ``pretraining:`` section, the stage run once
per comparison (cached in the results folder), every method starting from the public model with only the private
part trained, the public-model-only row, and the stage touching no site's data."""
from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
import yaml

import mmpfl_core.experiment as experiment
from mmpfl_core.errors import ConfigError
from mmpfl_core.experiment import ExperimentConfig, PretrainingSpec, compare_methods, load_experiment
from mmpfl_core.models.presets import create_model
from mmpfl_core.pretraining import PRIVATE_PARTS, restrict_trainable

PRETRAINING = {"enabled": True, "num_subjects": 60, "epochs": 1, "private_part": "head+norm", "seed": 77}
CONFIG = {
    "name": "pretraining-smoke",
    "data": {"num_subjects": 150, "image_size": 32, "seed": 3},
    "federation": {"num_sites": 3, "alpha": 1.0, "public_size": 15, "seed": 3},
    "model": {"preset": "tiny", "overrides": {"embed_dim": 32, "depth": 1}},
    "federated": {"num_rounds": 2, "local": {"batch_size": 32, "local_steps": 2}, "bootstrap_resamples": 20,
                  "checkpoint_every": 2},
    "pretraining": PRETRAINING,
    "methods": [
        {"strategy": "public-model-only"},
        {"strategy": "fedavg"},
        {"strategy": "local"},
        {"strategy": "centralized"},
        {"strategy": "dp-fedavg", "noise_multiplier": 1.0, "noise": "reproducible-insecure"},
        {"strategy": "ditto-dp-sgd", "sample_level_dp": {"noise_multiplier": 1.0, "noise": "reproducible-insecure"}},
    ],
}


# ------------------------------------------------------------------ the config section
def test_pretraining_section_round_trips_and_defaults_off():
    config = ExperimentConfig.from_dict(CONFIG)
    assert config.pretraining == PretrainingSpec(**PRETRAINING)
    again = ExperimentConfig.from_dict(yaml.safe_load(yaml.safe_dump(config.to_dict())))
    assert again == config
    assert ExperimentConfig.from_dict({k: v for k, v in CONFIG.items() if k != "pretraining"}).pretraining.enabled is False
    for preset in ("quickstart", "teaching", "paper"):
        assert load_experiment(preset).pretraining.enabled is False  # the presets keep their behaviour
        assert "pretraining" not in load_experiment(preset).to_dict()  # stored run configs are as before
    edited = config.replace(pretraining={"private_part": "head"})
    assert edited.pretraining.private_part == "head" and edited.pretraining.epochs == 1


@pytest.mark.parametrize("change,message", [
    ({"enabled": "yes"}, "true or false"),
    ({"num_subjects": 5}, "num_subjects=5 must be an integer >= 30"),
    ({"epochs": 0}, "at least one epoch"),
    ({"lr": -1.0}, "lr=-1.0 must be a finite number > 0"),
    ({"lr": float("nan")}, "finite number > 0"),
    ({"batch_size": 2.5}, "batch_size"),
    ({"private_part": "everything"}, "use one of"),
    ({"epoch": 3}, "unknown key"),
    ({"seed": 3}, "seed of its own"),  # the private cohort's own seed (data.seed)
])
def test_bad_pretraining_values_name_the_fix(change, message):
    with pytest.raises(ConfigError, match=message):
        ExperimentConfig.from_dict({**CONFIG, "pretraining": {**PRETRAINING, **change}})


def test_pretraining_must_be_a_mapping_and_public_model_only_needs_it(tmp_path):
    with pytest.raises(ConfigError, match="must be a mapping"):
        ExperimentConfig.from_dict({**CONFIG, "pretraining": True})
    config = ExperimentConfig.from_dict({**CONFIG, "pretraining": {"enabled": False}})
    with pytest.raises(ConfigError, match="pretraining: {enabled: true}"):
        compare_methods(config, results_dir=tmp_path / "out", progress=False)
    assert not (tmp_path / "out").exists()  # refused before anything was written


def test_every_private_part_is_a_valid_choice():
    for part in PRIVATE_PARTS:
        assert ExperimentConfig.from_dict({**CONFIG, "pretraining": {**PRETRAINING, "private_part": part}})


# ------------------------------------------------------------------ the stage in a comparison
def _same_content(cohort, federation) -> bool:
    """Does any image of ``cohort`` equal (byte for byte) an image of some site's train/val/test split?"""
    site_images = {img.tobytes() for s in federation.sites for c in (s.train, s.val, s.test) for img in c.images}
    return any(img.tobytes() in site_images for img in cohort.images)


@pytest.fixture(scope="module")
def pretrained_comparison(tmp_path_factory):
    out = tmp_path_factory.mktemp("pretraining") / "out"
    seen: dict[str, list] = {"cohorts": [], "models": [], "public": []}
    real_pretrain, real_factory = experiment.pretrain_public_model, experiment.pretrained_model_factory

    def spy_pretrain(model, cohort, recipe, **kwargs):
        seen["cohorts"].append(cohort)
        return real_pretrain(model, cohort, recipe, **kwargs)

    def spy_factory(base, public_state, private_part):
        seen["public"].append({n: t.clone() for n, t in public_state.items()})
        inner = real_factory(base, public_state, private_part)

        def factory():
            model = inner()
            seen["models"].append(model)  # the engines' working models: trained in place
            return model
        return factory

    with pytest.MonkeyPatch.context() as mp, warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # reproducible-insecure noise warns (on purpose)
        mp.setattr(experiment, "pretrain_public_model", spy_pretrain)
        mp.setattr(experiment, "pretrained_model_factory", spy_factory)
        table, runs, federation = compare_methods(ExperimentConfig.from_dict(CONFIG), results_dir=out,
                                                  progress=False)
    return out, table, runs, federation, seen


@pytest.mark.integration
def test_pretraining_runs_once_and_touches_no_site_data(pretrained_comparison):
    out, table, runs, federation, seen = pretrained_comparison
    assert len(seen["cohorts"]) == 1  # once for every method of the comparison
    cohort = seen["cohorts"][0]
    assert len(cohort) == PRETRAINING["num_subjects"] and (cohort.sites == -1).all()
    assert not _same_content(cohort, federation)  # by content: no site patient's scan is in the public cohort
    assert _same_content(federation.sites[0].train, federation)  # (the check does flag site data)
    assert list((out / "private" / "public_pretraining").glob("public_model-*.safetensors"))


@pytest.mark.integration
def test_federated_runs_train_only_the_private_part_from_the_public_weights(pretrained_comparison):
    out, table, runs, federation, seen = pretrained_comparison
    reference = create_model("tiny", embed_dim=32, depth=1, **experiment.data_shape(federation))
    d = restrict_trainable(reference, PRETRAINING["private_part"])
    private = {n for n, p in reference.named_parameters() if p.requires_grad}
    assert 0 < d < sum(p.numel() for p in reference.parameters())
    rows = table.set_index("method")
    for label in ("fedavg", "local", "centralized", "dp-fedavg", "ditto-dp-sgd"):
        assert rows.loc[label, "d"] == d, label
        assert set(runs[label].global_state) == private, label  # only the private part is exchanged
    assert rows.loc["public-model-only", "d"] == 0
    public = seen["public"][0]
    trained = 0
    for model in seen["models"]:
        for name, p in model.named_parameters():
            if name not in private:
                assert torch.equal(p.detach().cpu(), public[name]), name  # frozen: bit-identical after training
        trained += any(not torch.equal(p.detach().cpu(), public[n]) for n, p in model.named_parameters())
    assert trained >= 4  # the working models of the training methods did move (their private part)
    for label in ("ditto-dp-sgd", "local"):
        for site in federation.sites:
            deployed = runs[label].strategy.personal_state(site.site_id, runs[label].global_state)
            assert set(deployed) == private


@pytest.mark.integration
def test_public_model_only_is_the_pretrained_model_at_every_site(pretrained_comparison):
    out, table, runs, federation, seen = pretrained_comparison
    run = runs["public-model-only"]
    public = seen["public"][0]
    assert all(torch.equal(t, public[n]) for n, t in run.global_state.items())  # never moved
    assert run.summary["megabytes_up"] == 0 and all(r["num_clients"] == 0 for r in run.history)
    row = table.set_index("method").loc["public-model-only"]
    assert row["privacy unit"] == "site+patient" and row["epsilon_client"] == 0 and row["epsilon_patient_max"] == 0


@pytest.mark.integration
def test_a_resumed_comparison_reads_the_cached_public_model(pretrained_comparison, monkeypatch):
    out, table, runs, federation, seen = pretrained_comparison

    def refuse(*args, **kwargs):
        raise AssertionError("pretrained again although the results folder holds the public model")

    monkeypatch.setattr(experiment, "pretrain_public_model", refuse)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        again, _, _ = compare_methods(ExperimentConfig.from_dict(CONFIG), results_dir=out, progress=False)
    cols = ["method", "personal acc [95% CI]", "d", "epsilon_client"]
    assert again[cols].equals(table[cols])
    # other settings are another public model: it is trained, not read from the cache
    with pytest.raises(AssertionError, match="pretrained again"):
        compare_methods(ExperimentConfig.from_dict({**CONFIG, "pretraining": {**PRETRAINING, "epochs": 2}}),
                        results_dir=out, progress=False)
    assert np.isfinite(table["d"]).all()


@pytest.mark.integration
def test_cli_turns_the_stage_on_and_names_the_fix_for_a_bad_part(tmp_path, capsys):
    from mmpfl_core.cli import main

    path = tmp_path / "smoke.yaml"
    base = {k: v for k, v in CONFIG.items() if k != "pretraining"}
    path.write_text(yaml.safe_dump({**base, "methods": [{"strategy": "public-model-only"}, {"strategy": "fedavg"}]}))
    assert main(["compare", "--config", str(path), "--pretrain", "--private-part", "everything", "--out",
                 str(tmp_path / "bad"), "--no-progress"]) == 2
    assert "use one of" in capsys.readouterr().err and not (tmp_path / "bad").exists()
    assert main(["compare", "--config", str(path), "--private-part", "head", "--out", str(tmp_path / "bad"),
                 "--no-progress"]) == 2
    assert "--pretrain" in capsys.readouterr().err
    out = tmp_path / "good"
    assert main(["compare", "--config", str(path), "--pretrain", "--private-part", "head", "--out", str(out),
                 "--no-progress"]) == 0
    report = (out / "REPORT.md").read_text()
    assert "Public pretraining" in report and "| public-model-only | " in report
    import pandas as pd
    d = pd.read_csv(out / "comparison.csv").set_index("method")["d"]
    head = create_model("tiny", embed_dim=32, depth=1, image_size=32).group_sizes()["head"]
    assert d.to_dict() == {"public-model-only": 0, "fedavg": head}


@pytest.mark.integration
def test_a_pretrained_comparison_releases_nothing_private(tmp_path):
    """The release scan (tests/release_scan.py) on a report with the stage on, public-model-only and patient-level
    rows: the privacy columns, the pretraining lines and the public model's cache release nothing private."""
    from release_scan import FigureProvenance, scan_released

    from mmpfl_core.experiment import make_federation
    from mmpfl_core.reporting import write_comparison_report

    config = ExperimentConfig.from_dict({**CONFIG, "methods": CONFIG["methods"][:2] + CONFIG["methods"][-1:]})
    federation = make_federation(config)
    with pytest.MonkeyPatch.context() as mp, warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        provenance = FigureProvenance().install(mp, federation)
        report = write_comparison_report(config, tmp_path / "report", progress=False)
    groups = list(create_model("tiny", embed_dim=32, depth=1, image_size=32).parameter_groups())
    assert scan_released(tmp_path, groups=groups, federation=federation, provenance=provenance.by_path) == []
    assert "epsilon_patient_max" in report.path.read_text()
    assert list((tmp_path / "report" / "private" / "public_pretraining").glob("*.safetensors"))
