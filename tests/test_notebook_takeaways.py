"""No markdown cell states a result: numbers a notebook measured reach the reader only through cells that compute
them from the notebook's own results (``display(Markdown(f"..."))``), never as typed text (issue 24).

Unit tier, no execution: every markdown cell of every notebook is scanned for numeric literals that look like
results (decimals such as 0.707, percentages, thousands such as 3,000). Each one must be a definitional constant
of :data:`ALLOWED`, which says why it is not a result and where it may appear. Section references
("docs/DESIGN.md 4.6", "## 6 · ...") are not numbers of the text and are skipped.
"""
from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import nbformat
import pytest

from mmpfl_core.notebook_tools import MissingResultError, takeaways

NOTEBOOK_DIR = Path(__file__).resolve().parent.parent / "notebooks"
NOTEBOOKS = sorted(NOTEBOOK_DIR.glob("[0-9][0-9]*_*.ipynb"))

#: Decimals, percentages and comma-grouped thousands: the shapes a typed result takes.
RESULT_LIKE = re.compile(r"(?<![\w.])(\d+\.\d+|\d+(?:\.\d+)?\s?%|\d{1,3}(?:,\d{3})+)(?![\w.])")
#: References to sections of the design notes and numbered headings: labels, not quantities.
REFERENCES = re.compile(r"docs/DESIGN.md\s+\d+(?:\.\d+)?(?:\s*,\s*\d+(?:\.\d+)?)*|^#+\s.*$", re.MULTILINE)

#: value -> (why it is not a measured result, the notebooks (stem prefixes) where it may appear).
ALLOWED: dict[str, tuple[str, tuple[str, ...]]] = {
    "0.5": ("chance level of an AUC, and the shared label skew alpha of configs/notebooks.yaml", ("05", "06", "07")),
    "0.1": ("a chosen setting: alpha = 0.1 (extreme skew), sample rate q = 0.1 in exercises, an FPR of 0.1 %",
            ("02", "03", "05", "06", "07")),
    "0.05": ("an exercise's input (alpha = 0.05)", ("00",)),
    "1.0": ("a recipe constant of the ablation table (gradient clipping at 1.0)", ("01",)),
    "95%": ("the confidence level of an interval or test (a definition)", ("01", "06", "07b")),
    "1%": ("the FPR operating point at which TPR is reported (a definition)", ("07",)),
    "50%": ("random guessing on a balanced membership question", ("07",)),
    "52.1": ("the paper's published figure, quoted as the claim under test (not ours)", ("07",)),
    "70%": ("NB07's own split: validation 0.2 + test 0.5 of each site are the non-members (a setting)", ("07",)),
    "80 %": ("an exercise's question (a threshold to count sites against)", ("00",)),
    "3.5": ("pixel size of a 64 px slice of a brain-sized field of view (geometry, not a result)", ("00",)),
    "1.5": ("the field strength of older clinical scanners, 1.5 T (domain fact)", ("00",)),
    "1.1": ("ln(3), the KL divergence of a complete change of mind over 3 classes (maths)", ("05",)),
    "3.7": ("the constant of the distinguishing test's ceiling ln(n / 3.7) with n runs per world (maths of the test)",
            ("07b",)),
}


def result_like_numbers(markdown: str) -> list[str]:
    """The result-shaped numeric literals of one markdown cell, section references removed."""
    return [m.group(1) for m in RESULT_LIKE.finditer(REFERENCES.sub(" ", markdown))]


def _offences(path: Path) -> list[str]:
    nb = nbformat.read(path, as_version=4)
    found = []
    for index, cell in enumerate(nb.cells):
        if cell.cell_type != "markdown":
            continue
        for number in result_like_numbers(cell.source):
            reason = ALLOWED.get(number)
            if reason is None or not path.stem.startswith(reason[1]):
                found.append(f"cell {index}: {number!r}")
    return found


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_markdown_states_no_typed_result(path: Path):
    offences = _offences(path)
    assert not offences, (
        f"{path.name} types result-like numbers in markdown: {offences}. Compute them from the notebook's results "
        "(display(Markdown(f'...')) in a code cell) or reword; a definitional constant goes into ALLOWED with a reason.")


def test_the_scan_finds_typed_results_and_skips_references():
    assert result_like_numbers("FedAvg reached 0.707 [0.61, 0.80] on 3,000 subjects, 12% better") == [
        "0.707", "0.61", "0.80", "3,000", "12%"]
    assert result_like_numbers("## 6 · Masks (docs/DESIGN.md 4.4, 4.6)\nsee docs/DESIGN.md 4.2") == []
    assert result_like_numbers("z = 2 and epsilon 8 over 100 rounds") == []  # settings as small integers pass


def test_every_allowed_constant_is_used():
    """An allow-list entry nothing needs is dead weight that could hide a result later: remove it."""
    used = {n for path in NOTEBOOKS for cell in nbformat.read(path, as_version=4).cells
            if cell.cell_type == "markdown" for n in result_like_numbers(cell.source)}
    assert set(ALLOWED) <= used, f"unused allow-list entries: {sorted(set(ALLOWED) - used)}"


def test_a_planted_result_is_flagged(tmp_path: Path):
    """The notebook scan fails a markdown cell that types a measured number, and passes it once computed."""
    nb = nbformat.v4.new_notebook()
    nb.cells = [nbformat.v4.new_markdown_cell("# 02 · Planted"),
                nbformat.v4.new_markdown_cell("FedAvg reaches 0.707 balanced accuracy (0.5 is chance)."),
                nbformat.v4.new_code_cell('display(Markdown(f"FedAvg reaches {acc:.3f}"))')]
    path = tmp_path / "02_planted.ipynb"
    nbformat.write(nb, path)
    assert _offences(path) == ["cell 1: '0.707'", "cell 1: '0.5'"]  # 0.5 is allowed in 05-07 only
    nb.cells[1].source = "FedAvg's balanced accuracy is printed below."
    nbformat.write(nb, path)
    assert _offences(path) == []


# ---------------------------------------------------------------- takeaways rendered from the records

#: A small hand-made released record per notebook, with numbers no formatting could produce by accident, and
#: the strings its takeaways must show (each formatted from the record, as the notebook's cell renders it).
HAND_RECORDS: dict[str, tuple[dict[str, Any], list[str]]] = {
    "00": ({"num_sites": 7, "num_subjects_total": 3123, "flair_lesion_over_wm": 1.837, "t1_lesion_over_wm": 0.612,
            "mean_lesion_pixels_by_class": {"healthy": 1.2, "rrms": 41.7, "progressive_ms": 88.2},
            "label_divergence": 0.2468, "label_divergence_alpha_0.1": 0.6543, "label_divergence_alpha_100": 0.0123},
           ["1.84 times", "0.61 times", "black hole", "rises with disease: mean lesion pixels 1 (healthy), 42 (rrms)",
            "88 (progressive ms)", "7 hospitals", "3,123 subjects",
            "0.247", "0.654", "0.012"]),
    "01": ({"balanced_accuracy": {"ViT, images": 0.6612, "CNN, images": 0.6498, "ViT, images + clinical": 0.7731,
                                  "clinical only": 0.6687},
            "conv_stem_gain": 0.2104, "seed_spread": 0.0433, "seeds": [11, 12], "augmentation_gain": -0.0121,
            "fused_separated_from_both": True, "chance": 1 / 3, "balanced_accuracy_t2_present": 0.8161,
            "balanced_accuracy_t2_missing": 0.6482},
           ["+0.210 over linear patches, seed 11", "0.661", "0.650", "-0.012", "0.043", "0.773", "0.669",
            "lies above both", "0.816", "0.648", "0.333"]),
    "02": ({"global_accuracy": {"centralized": 0.712, "local-only": 0.401, "fedavg": 0.655, "fedprox": 0.649},
            "personal_accuracy": {"centralized": 0.7, "local-only": 0.873, "fedavg": 0.6, "fedprox": 0.6},
            "num_sites": 6, "num_rounds": 9, "hand_fedavg_matches_kit": True},
           ["After 9 rounds on 6 hospitals", "0.655", "0.649", "0.712", "0.873", "0.401", "equals the kit's"]),
    "03": ({"accountant_epsilon_z1_q0.1_T100": {"rdp": 2.345, "prv": 2.111, "pld": 2.109},
            "picture_ratio": 1234.5, "picture_viability": 10.0, "hand_release_matches_kit": True,
            "z_eps8_100_rounds_all_clients": 6.071, "z_eps8_100_rounds_q0.1": 0.937,
            "dp_epsilon": 7.987, "dp_fedavg_accuracy": 0.351, "fedavg_accuracy": 0.622, "dp_noise": "secure"},
           ["RDP 2.35", "PRV 2.11", "PLD 2.11", "6.07", "0.94", "1,234 times", "10.0: drowned", "7.99", "0.351",
            "0.622", 'noise="secure"']),
    "04": ({"num_rounds": 5, "default_fallback_rounds": 5, "accuracy_fisher": 0.4321,
            "global_state_equal_uniform_default": True, "z_eff_fisher": 1.23456, "z_eff_uniform": 1.23456,
            "noise_multiplier": 1.23456, "total_rho_fisher": 0.328, "epsilon_fisher": 7.89, "epsilon_uniform": 7.89,
            "target_epsilon": 8.0, "j_fisher_over_uniform": 0.8765, "accuracy_uniform": 0.4321,
            "accuracy_fisher_raw": 0.3911, "accuracy_fedavg": 0.6012},
           ["in 5 of 5 rounds", "0.432, the uniform run exactly", "1.2346", "0.328", "7.89", "0.88", "0.391",
            "0.601"]),
    "05": ({"personal_accuracy": {"fedavg": 0.512, "fedper": 0.701, "ditto": 0.802, "fedavg-ft": 0.811,
                                  "fedavg-kl-masks": 0.823},
            "global_accuracy": {"fedavg": 0.455, "fedavg-kl-masks": 0.377}, "alpha": 0.1, "target_epsilon": 8.0,
            "gate_drowned": ["block0", "block1"], "groups": ["stem", "block0", "block1", "head"],
            "gate_snr": {"stem": 1.25, "block0": 0.021, "block1": 0.022, "head": None}, "gate_min_snr": 1.0,
            "adp_epsilon": {"server": 7.654, "distributed": 7.654}, "ungated_personal_accuracy": 0.7771,
            "gate_epsilon": 3.21, "gate_personal_accuracy": 0.7612,
            "headline_num_sites": 37, "headline_d": 2915, "headline_shared_d": 2678.4, "headline_target_epsilon": 8.0,
            "headline_proposed": "ours", "headline_rival": "rival", "headline_ratio": 0.1234, "headline_viability": 8.94,
            "headline_personal_accuracy": {"ours": {"point": 0.7131, "low": 0.7062, "high": 0.7208},
                                           "rival": {"point": 0.6961, "low": 0.6853, "high": 0.6994}},
            "headline_patient_epsilon": {"ours": 7.991, "rival": 7.9986}},
           ["0.512", "fedper 0.701", "ditto 0.802", "fedavg-ft 0.811", "fedavg-kl-masks 0.823", "0.377", "0.455",
            "spent epsilon 7.65", "0.777", "kept 2 of 4 groups", "pays at home, not for the population", "1.250",
            "3.21", "0.761", "37 data-starved hospitals", "d = 2,915", "shares 2,678 of the d", "epsilon 7.99 of 8",
            "0.123 times", "below sqrt(T) / min_snr = 8.94", "0.713 [0.706, 0.721]", "0.696 [0.685, 0.699]",
            "of 8 (its ledger)", "at epsilon 8: above it, intervals apart"]),
    "06": ({"personal_accuracy": {"mm-pfl-adp": 0.6543, "local-only": 0.6012, "dp-fedavg": 0.5}, "proposed_method":
            "mm-pfl-adp", "mm_pfl_adp_released_nothing": False, "mm_pfl_adp_epsilon": 7.91, "target_epsilon": 8.0,
            "mm_pfl_adp_minus_dp_fedavg": 0.1543,
            "claims": {"a": "agrees", "b": "agrees", "c": "not measured"}, "regime_eligible_at_finite_epsilon":
            ["local-only", "mm-pfl-adp"], "regime_sites": [4, 16]},
           ["epsilon 7.91 of 8", "0.654", "+0.154", "0.601", "2 'agrees'", "1 'not measured'", "4, 16 sites",
            "local-only, mm-pfl-adp"]),
    "07": ({"mia_auc": {"centralized": {"loss": {"point": 0.6251}, "LiRA": {"point": 0.611}},
                        "fedavg": {"loss": {"point": 0.561}},
                        "dp-fedavg eps=1": {"loss": {"point": 0.4812}},
                        "mm-pfl-adp eps=1": {"loss": {"point": 0.5}}},
            "epsilon_spent": {"centralized": None, "fedavg": None, "dp-fedavg eps=1": 0.987, "mm-pfl-adp eps=1": 0.0},
            "chance_band": 0.0874, "epsilons": [1.0], "mia_tpr_at_1pct_fpr": {"centralized": {"loss": 0.0432}},
            "personal_auc": {"local-only": {"loss": {"point": 0.7123}}}, "num_members": 120, "num_non_members": 140},
           ["0.625", "TPR at 1 % FPR up to 0.043", "0.561", "0.087", "120 members", "140 non-members",
            "Membership inference is real", "dp-fedavg eps=1: best attack AUC 0.481 at epsilon 0.987",
            "mm-pfl-adp eps=1: charged nothing", "0.712"]),
    "07b": ({"audit": {"correct": {"claimed": 1.987, "lower_bound": 0.456},
                       "no-clipping": {"claimed": 1.987, "lower_bound": 4.17},
                       "noise-x0.5": {"claimed": 1.987, "lower_bound": 0.9}},
             "audit_guesses": 200, "distinguishing_delta": 0.01,
             "distinguishing": {"a/correct": {"claimed": 1.99, "lower_bound": 1.2},
                                "a/broken": {"claimed": 1.99, "lower_bound": 3.3},
                                "b/correct": {"claimed": 1.99, "lower_bound": 1.1},
                                "b/broken": {"claimed": 1.99, "lower_bound": 2.5}}},
            ["200 guesses", "0.46", "1.99", "catches no-clipping", "misses noise-x0.5", "delta 0.01", "keep 2 of 2",
             "put 2 of 2"]),
    "08": ({"methods": ["fedavg", "dp-fedavg"], "max_abs_diff": {"fedavg": 1.5e-7, "dp-fedavg": 2.5e-7},
            "epsilon_flower": {"fedavg": None, "dp-fedavg": 1.2345}, "epsilon_inprocess": {"fedavg": None,
                                                                                          "dp-fedavg": 1.2345},
            "num_rounds": 3, "secagg_ran": True, "secagg_max_abs_diff": 0.0041, "secagg_release_noise_std": 0.567,
            "adp_max_abs_diff": 3.5e-7, "adp_epsilon_flower": 2.5, "adp_epsilon_inprocess": 2.5,
            "deployment_ran": False, "deployment_completed": None},
           ["over 3 rounds", "1.5e-07 (fedavg)", "2.5e-07 (dp-fedavg)", "dp-fedavg: epsilon 1.2345 on both",
            "3.5e-07", "2.5000 vs 2.5000", "4.1e-03", "0.567", "skipped"]),
}


def _number(stem: str) -> str:
    return stem.split("_", 1)[0]


def test_every_notebook_has_hand_records():
    assert {_number(p.stem) for p in NOTEBOOKS} == set(HAND_RECORDS)


@pytest.mark.parametrize("number", sorted(HAND_RECORDS))
def test_takeaways_render_the_records_numbers(number: str):
    record, shown = HAND_RECORDS[number]
    text = takeaways(number, record)
    lines = text.splitlines()
    assert lines[0] == "### Takeaways" and 3 <= len(lines) - 1 <= 5, text
    assert all(line.startswith("- ") for line in lines[1:]) and lines[-1].startswith("- Next: "), text
    for expected in shown:
        assert expected in text, (expected, text)
    # No result is typed: change every number of the record and the rendered text changes with it.
    assert takeaways(number, _perturbed(record)) != text


def _perturbed(value: Any) -> Any:
    if isinstance(value, bool) or value is None or isinstance(value, str):
        return value
    if isinstance(value, (int, float)):
        return value * 1.37 + 0.011 if isinstance(value, float) else value + 3
    if isinstance(value, list):
        return [_perturbed(v) for v in value]
    return {k: _perturbed(v) for k, v in value.items()}


@pytest.mark.parametrize("number", sorted(HAND_RECORDS))
def test_a_missing_key_names_the_key_and_the_notebook(number: str):
    record, _ = HAND_RECORDS[number]
    for key in record:
        partial = {k: v for k, v in record.items() if k != key}
        try:
            takeaways(number, partial)
        except MissingResultError as error:
            assert repr(key) in str(error) and f"notebook {number}" in str(error) and "record_results" in str(error)
        else:  # every key of the hand-made record is one a takeaway reads
            pytest.fail(f"takeaways({number!r}) rendered without {key!r}: drop it from HAND_RECORDS")


def test_an_unknown_notebook_is_refused():
    with pytest.raises(ValueError, match="no takeaways for notebook '09_new'"):
        takeaways("09_new", {})


def test_an_undefined_value_reads_undefined():
    record, _ = HAND_RECORDS["02"]
    broken = dict(record, global_accuracy=dict(record["global_accuracy"], fedavg=None))  # NaN is stored as None
    assert "reaches undefined global test accuracy" in takeaways("02", broken)


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_takeaways_cell_renders_the_notebooks_own_released_record(path: Path):
    """One takeaways cell, after the cell that records the results and before the exercises; it renders this
    notebook's record from OUTPUT_DIR, released scope only (no include_private)."""
    cells = nbformat.read(path, as_version=4).cells
    index = [i for i, c in enumerate(cells) if c.cell_type == "code" and "takeaways(" in c.source]
    assert len(index) == 1, f"{path.name}: expected one takeaways cell, found {len(index)}"
    source = cells[index[0]].source
    assert f'display(Markdown(takeaways("{path.stem}", load_results("{path.stem}", OUTPUT_DIR))))' in source
    assert "include_private" not in source
    recorded = max(i for i, c in enumerate(cells) if c.cell_type == "code" and "record_results(" in c.source)
    exercises = min(i for i, c in enumerate(cells) if c.cell_type == "markdown" and re.match(r"#+ Exercise", c.source))
    assert recorded < index[0] < exercises
