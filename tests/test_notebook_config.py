"""The one notebook configuration (configs/notebooks.yaml): typed loading, its smoke overlay, and that every
notebook loads it and none federates the linear-patch ``tiny`` preset (issue 24)."""
from __future__ import annotations

import ast
from dataclasses import asdict
from pathlib import Path

import nbformat
import pytest

from mmpfl_core.errors import ConfigError
from mmpfl_core.notebook_tools import SMOKE_PARAMETERS, load_notebook_config
from mmpfl_core.notebook_tools.config import PARAMETER_FIELDS

NOTEBOOK_DIR = Path(__file__).resolve().parent.parent / "notebooks"
NOTEBOOKS = sorted(NOTEBOOK_DIR.glob("[0-9][0-9]*_*.ipynb"))
#: The one place that may build `tiny`: notebook 01 compares it with the hybrid and the CNN (linear patches vs
#: conv stem), which is the evidence for federating the hybrid everywhere else.
TINY_ALLOWED = {"01_vit_multimodal_fusion"}


def _code(path: Path) -> list[str]:
    return [c.source for c in nbformat.read(path, as_version=4).cells if c.cell_type == "code"]


def test_the_config_loads_typed_with_a_model_that_learns_from_images():
    config, smoke = load_notebook_config(), load_notebook_config(smoke=True)
    assert config.experiment.model.preset == smoke.experiment.model.preset == "hybrid-tiny"
    # The overlay shrinks the run; it does not change the cohort generator, the image size or the model.
    assert smoke.experiment.data.num_subjects < config.experiment.data.num_subjects
    assert smoke.experiment.federated.num_rounds < config.experiment.federated.num_rounds
    assert smoke.experiment.data.image_size == config.experiment.data.image_size
    assert set(config.parameters()) == set(PARAMETER_FIELDS)
    # CI injects exactly the smoke overlay's values.
    assert {k: SMOKE_PARAMETERS[k] for k in PARAMETER_FIELDS} == smoke.parameters()
    assert "smoke overlay" in smoke.describe() and "hybrid-tiny" in config.describe()


def test_fill_keeps_given_values_and_fills_none():
    config = load_notebook_config()
    assert config.fill(SEED=7, NUM_ROUNDS=None) == (7, config.experiment.federated.num_rounds)
    assert config.fill(MODEL_PRESET=None) == "hybrid-tiny"
    with pytest.raises(ConfigError, match="unknown notebook parameter"):
        config.fill(NUM_HOSPITALS=None)


@pytest.mark.parametrize("text, match", [
    ("data: {num_subjects: 100}\nsmoke: [1, 2]\n", "smoke=.* must be a mapping"),
    ("data: {num_subjects: 100}\nsmoke: {methods: []}\n", "not config sections"),
    ("data: {num_subjects: 100}\nsmoke: {data: {num_subject: 10}}\n", "num_subject"),
    ("model: {preset: no-such-model}\n", "model.preset"),
    ("data: {num_subjects: 100}\nfederaton: {num_sites: 3}\n", "not config sections"),
    ("methods: [fedavg]\n", "not config sections"),
    # the headline: experiment (its keys, its own smoke overlay, its sections' fields and methods)
    ("data: {num_subjects: 100}\nheadline: {dta: {num_subjects: 100}}\n", r"headline has unknown key\(s\) \['dta'\]"),
    ("data: {num_subjects: 100}\nheadline: {data: {num_subjects: 100}, smoke: {federaton: {num_sites: 3}}}\n",
     r"headline.smoke has unknown key\(s\) \['federaton'\]"),
    ("data: {num_subjects: 100}\nheadline: {data: {num_subjects: 100}, smoke: {smoke: {}}}\n",
     r"headline.smoke has unknown key\(s\) \['smoke'\]"),
    ("data: {num_subjects: 100}\nheadline: [1, 2]\n", "headline=.* must be a mapping"),
    ("data: {num_subjects: 100}\nheadline: {smoke: [1]}\n", "headline.smoke=.* must be a mapping"),
    ("data: {num_subjects: 100}\nheadline: {data: {num_subject: 100}}\n", "num_subject"),
    ("data: {num_subjects: 100}\nheadline: {methods: [{strategy: no-such-strategy}]}\n", "no-such-strategy"),
])
def test_bad_configs_name_the_problem(tmp_path: Path, text: str, match: str):
    path = tmp_path / "notebooks.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=match):
        load_notebook_config(smoke=True, path=path)
    with pytest.raises(ConfigError, match="not found"):
        load_notebook_config(path=tmp_path / "missing.yaml")


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_every_notebook_loads_the_config_right_after_its_parameters(path: Path):
    code = _code(path)
    # code[2] is the parameters cell (tests/test_notebook_structure.py); the next cell loads the config and fills
    # from it, under the smoke overlay when SMOKE is set.
    assert "load_notebook_config(smoke=SMOKE)" in code[3] and ".fill(" in code[3], path.name
    params = {n.targets[0].id: n.value for n in ast.parse(code[2]).body if isinstance(n, ast.Assign)}
    filled = [kw.arg for node in ast.walk(ast.parse(code[3])) if isinstance(node, ast.Call)
              and getattr(node.func, "attr", "") == "fill" for kw in node.keywords]
    assert "SEED" in filled and "IMAGE_SIZE" in filled, f"{path.name}: the cohort's seed and image size come from the config"
    for node in ast.parse(code[3]).body:
        if isinstance(node, ast.Assign) and isinstance(node.value, ast.Call) and getattr(node.value.func, "attr", "") == "fill":
            for kw in node.value.keywords:  # each filled knob defaults to None in the parameters cell
                name = kw.value.id
                assert isinstance(params.get(name), ast.Constant) and params[name].value is None, (path.name, name)


def _string_constants(source: str) -> set[str]:
    clean = "\n".join(line for line in source.splitlines() if not line.lstrip().startswith(("!", "%")))
    return {n.value for n in ast.walk(ast.parse(clean)) if isinstance(n, ast.Constant) and isinstance(n.value, str)}


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_no_notebook_builds_the_linear_patch_tiny_preset(path: Path):
    """The string "tiny" (the preset's name) appears in no notebook's code but NB01's comparison of presets, and
    no notebook's code names a reproduction/experiment preset that federates it."""
    constants = set().union(*(_string_constants(s) for s in _code(path)))
    if path.stem not in TINY_ALLOWED:
        assert "tiny" not in constants, f"{path.name} builds the linear-patch `tiny` preset; use MODEL_PRESET"
    assert "reproduce_smoke" not in constants and "quickstart" not in constants, (
        f"{path.name} federates a preset config whose model is `tiny`; take the model from configs/notebooks.yaml")


def test_the_tiny_check_can_fail():
    """The check above flags a notebook that builds `tiny` directly."""
    assert "tiny" in _string_constants('model = create_model("tiny", seed=0)')
    assert "tiny" not in _string_constants("model = create_model(MODEL_PRESET, seed=0)")


# ---------------------------------------------------------------- the headline: section (notebook 05, section 8)
def _training_patients_per_site(config) -> float:
    """Expected training patients per hospital: the non-public subjects over the sites, times the train share."""
    fed = config.federation
    return (config.data.num_subjects - fed.public_size) / fed.num_sites * (1 - fed.val_fraction - fed.test_fraction)


def _fields(section, *but: str) -> dict:
    """A config section's fields as a dict, without ``but``."""
    return {k: v for k, v in asdict(section).items() if k not in but}


def test_the_headline_section_is_configs_headline_notebook_sized():
    from mmpfl_core.experiment import load_experiment

    full, nb = load_experiment("headline"), load_notebook_config().headline
    assert nb is not None
    # Same generator, hospitals, skew, model, public stage and training recipe as configs/headline.yaml ...
    assert _fields(nb.data, "num_subjects") == _fields(full.data, "num_subjects")
    # the split shares are sized for each cohort's size (what must match is the training patients a site, below)
    shares = ("test_fraction", "val_fraction")
    assert _fields(nb.federation, *shares) == _fields(full.federation, *shares)
    assert nb.model == full.model and nb.pretraining == full.pretraining and nb.pretraining.enabled
    assert (nb.federated.local, nb.federated.optimizer) == (full.federated.local, full.federated.optimizer)
    # ... and the same arms with the same arguments (patients as the unit at the same epsilon); only rounds differ.
    arms = {m.label: m for m in full.methods}
    for method in nb.methods:
        assert method.label in arms and method.strategy == arms[method.label].strategy
        assert dict(method.kwargs) == dict(arms[method.label].kwargs), method.label
    assert {m.strategy for m in nb.methods} == {"local-dp-sgd", "mm-pfl-adp-cross-silo"}
    # Fewer subjects with a smaller test share: a hospital keeps the headline's ~18 training patients (within 5%).
    assert nb.data.num_subjects < full.data.num_subjects and nb.federation.test_fraction < full.federation.test_fraction
    assert _training_patients_per_site(nb) == pytest.approx(_training_patients_per_site(full), rel=0.05)
    rounds = {m.label: m.num_rounds or nb.federated.num_rounds for m in nb.methods}
    assert all(rounds[label] <= (arms[label].num_rounds or full.federated.num_rounds) for label in rounds)
    # ... and a method's own local epochs as there (local + DP-SGD: one run of 20 epochs)
    assert all(m.local_epochs == arms[m.label].local_epochs for m in nb.methods)


def test_the_headline_smoke_overlay_shrinks_it():
    full, smoke = load_notebook_config().headline, load_notebook_config(smoke=True).headline
    assert smoke.data.num_subjects < full.data.num_subjects and smoke.federation.num_sites < full.federation.num_sites
    assert smoke.pretraining.num_subjects < full.pretraining.num_subjects
    assert [m.label for m in smoke.methods] == [m.label for m in full.methods]
    def epochs(m, config):  # rounds x a method's local epochs: what it trains
        return (m.num_rounds or config.federated.num_rounds) * (m.local_epochs or config.federated.local.local_epochs)

    assert all(epochs(s, smoke) < epochs(f, full) for s, f in zip(smoke.methods, full.methods, strict=True))
    assert [dict(m.kwargs) for m in smoke.methods] == [dict(m.kwargs) for m in full.methods]
    assert smoke.model == full.model and smoke.data.image_size == full.data.image_size
    # The smoke cohort still has more training patients than the cross-silo arm's expected batch (q < 1).
    cross_silo = next(m for m in smoke.methods if m.strategy == "mm-pfl-adp-cross-silo")
    patients = _training_patients_per_site(smoke) * smoke.federation.num_sites
    assert patients > cross_silo.kwargs["expected_batch_size"]


def test_a_config_without_headline_has_none(tmp_path: Path):
    path = tmp_path / "notebooks.yaml"
    path.write_text("data: {num_subjects: 100}\n")
    assert load_notebook_config(path=path).headline is None
