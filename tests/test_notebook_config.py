"""The one notebook configuration (configs/notebooks.yaml): typed loading, its smoke overlay, and that every
notebook loads it and none federates the linear-patch ``tiny`` preset (issue 24)."""
from __future__ import annotations

import ast
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
