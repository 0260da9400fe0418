"""The headline verdicts of issue 23 are computed from the table by their stated rules, and each one flips.

On the committed table every verdict is recomputed here from the table's own values (no number typed in an assert);
on small synthetic tables each rule is driven to each of its outcomes.
"""
from __future__ import annotations

import ast
from pathlib import Path

import pandas as pd
import pytest

from mmpfl_core.errors import ConfigError
from mmpfl_core.reproduction import headline as h
from mmpfl_core.reproduction.headline import (
    DEFAULT_TABLE,
    REQUIRED_COLUMNS,
    headline_text,
    headline_verdicts,
    load_headline_table,
    strongest,
    weakest,
)

LETTERS = "abcdefghi"


def _by_letter(verdicts: pd.DataFrame) -> dict[str, pd.Series]:
    return {name[1]: row for name, (_, row) in zip(verdicts["name"], verdicts.iterrows(), strict=True)}


# ---------------------------------------------------------------- the committed table

def test_the_committed_table_loads_with_every_required_column():
    table = load_headline_table()
    assert DEFAULT_TABLE.is_file() and set(REQUIRED_COLUMNS) <= set(table.columns)
    assert (table["low"] <= table["personal_accuracy"]).all() and (table["personal_accuracy"] <= table["high"]).all()


def test_committed_verdicts_follow_their_rules_from_the_tables_values():
    table = load_headline_table()
    v = _by_letter(headline_verdicts(table))
    assert sorted(v) == list(LETTERS)
    row = {arm: table[table["arm"] == arm].iloc[0] for arm in table["arm"].unique()}
    method, local, fedsgd = row[h.METHOD], strongest(table, h.LOCAL), row[h.FEDSGD_SECAGG]
    # (a), (b): two baselines, each at its best row; the method's checks: rivals at their best
    assert v["a"]["holds"] == (strongest(table, h.CENTRALIZED)["low"] > local["high"])
    assert v["b"]["holds"] == (strongest(table, h.FEDAVG)["low"] > local["high"])
    row.update({arm: strongest(table, arm) for arm in (h.LOCAL_DP, h.FEDAVG_DP, h.PUBLIC_ONLY)})
    assert v["c"]["holds"] == (method["shared_d"] > 0 and method["patient_epsilon_max"] > 0)
    assert v["d"]["holds"] == (method["personal_accuracy"] >= row[h.LOCAL_DP]["personal_accuracy"]
                               and method["patient_epsilon_max"] <= row[h.LOCAL_DP]["patient_epsilon_max"])
    assert v["e"]["holds"] == (method["personal_accuracy"] > row[h.PUBLIC_ONLY]["high"])
    assert v["f"]["holds"] == (method["personal_accuracy"] > row[h.FEDAVG_DP]["high"])
    for letter, rival in (("g", fedsgd), ("h", row[h.UNIFORM]), ("i", row[h.NOMASK])):
        expected = ("better" if method["low"] > rival["high"] else "worse" if method["high"] < rival["low"]
                    else "no measured difference")
        assert v[letter]["verdict"] == expected and v[letter]["holds"] == (expected == "better")
        assert v[letter]["margin"] == pytest.approx(method["low"] - rival["high"])
    # the text quotes the table's numbers, formatted, and the verdicts' words
    text = headline_text(headline_verdicts(table))
    for arm in (h.CENTRALIZED, h.LOCAL, h.FEDAVG, h.METHOD, h.LOCAL_DP, h.FEDAVG_DP, h.FEDSGD_SECAGG, h.UNIFORM):
        r = strongest(table, arm)  # the rows the checks used (the method and its ablations have one each)
        assert f"{r['personal_accuracy']:.3f} [{r['low']:.3f}, {r['high']:.3f}]" in text
    assert f"{method['shared_d']:,.0f} of its d = {int(method['d']):,}" in text
    for letter in "ghi":
        assert f"**{v[letter]['verdict']}**" in text


# ---------------------------------------------------------------- synthetic tables

def _arm(arm, acc, half=0.01, *, rounds=100, eps=0.0, shared=0.0):
    return {"arm": arm, "d": 3000, "rounds": rounds, "personal_accuracy": acc, "low": acc - half,
            "high": acc + half, "patient_epsilon_max": eps, "shared_d": shared}


def _good() -> pd.DataFrame:
    """Every check holds and every part of the method is 'better': the rules' positive side."""
    return pd.DataFrame([
        _arm(h.PUBLIC_ONLY, 0.60, rounds=0),
        _arm(h.CENTRALIZED, 0.75, rounds=5),
        _arm(h.LOCAL, 0.65),
        _arm(h.FEDAVG, 0.76, shared=3000),
        _arm(h.LOCAL_DP, 0.66, eps=8.0, rounds=20),
        _arm(h.FEDAVG_DP, 0.62, eps=8.0, rounds=20, shared=3000),
        _arm(h.FEDSGD_SECAGG, 0.68, eps=8.0, rounds=200, shared=3000),
        _arm(h.METHOD, 0.74, eps=8.0, rounds=200, shared=2700),
        _arm(h.UNIFORM, 0.70, eps=8.0, rounds=200, shared=2700),
        _arm(h.NOMASK, 0.70, eps=8.0, rounds=200, shared=3000),
    ])


def _set(table: pd.DataFrame, arm: str, **values) -> pd.DataFrame:
    table = table.copy()
    for column, value in values.items():
        table.loc[table["arm"] == arm, column] = value
    return table


def _with_acc(table: pd.DataFrame, arm: str, acc: float, half: float = 0.01) -> pd.DataFrame:
    return _set(table, arm, personal_accuracy=acc, low=acc - half, high=acc + half)


def test_a_table_where_everything_holds():
    verdicts = headline_verdicts(_good())
    assert verdicts["holds"].all(), verdicts[["name", "holds", "verdict"]]
    assert list(verdicts["verdict"][6:]) == ["better"] * 3
    text = headline_text(verdicts)
    assert "pooling pays" in text and "it releases, and its ledger shows the cost" in text
    assert "Not measured to help" not in text and "docs/DESIGN.md 4.5" not in text


def test_overlapping_intervals_are_not_apart():
    table = _with_acc(_good(), h.CENTRALIZED, 0.665)  # interval [0.655, 0.675] overlaps local's [0.64, 0.66]
    v = _by_letter(headline_verdicts(table))
    assert not v["a"]["holds"] and v["a"]["verdict"] == "does not hold" and v["a"]["margin"] < 0
    assert v["a"]["difference"] > 0  # the point is above: only the intervals decide
    assert v["b"]["holds"]
    assert "**does not lie above**" in headline_text(headline_verdicts(table))


def test_uniform_beating_fisher_with_intervals_apart_is_worse_and_said_so():
    table = _with_acc(_good(), h.UNIFORM, 0.80)
    v = _by_letter(headline_verdicts(table))
    assert v["h"]["verdict"] == "worse" and not v["h"]["holds"]
    text = headline_text(headline_verdicts(table))
    assert "the Fisher allocation over uniform: **worse**" in text
    assert "Not measured to help here: the Fisher allocation over uniform." in text
    assert "docs/DESIGN.md 4.5" not in text  # g and i are better: the win is not only the mechanism's


def test_overlapping_ablations_are_no_measured_difference_and_the_win_is_attributed_to_the_mechanism():
    table = _good()
    for arm in (h.FEDSGD_SECAGG, h.UNIFORM, h.NOMASK):
        table = _with_acc(table, arm, 0.735)
    v = _by_letter(headline_verdicts(table))
    assert [v[x]["verdict"] for x in "ghi"] == ["no measured difference"] * 3
    assert v["f"]["holds"]
    text = headline_text(headline_verdicts(table))
    assert "where the noise is added" in text and "docs/DESIGN.md 4.5" in text
    # without the win over FedAvg + DP-SGD there is no win to attribute
    text = headline_text(headline_verdicts(_with_acc(table, h.FEDAVG_DP, 0.74)))
    assert "**not above**" in text and "where the noise is added" not in text


def test_a_method_that_shares_nothing_does_not_release():
    v = _by_letter(headline_verdicts(_set(_good(), h.METHOD, shared_d=0.0)))
    assert not v["c"]["holds"]
    assert "releases **nothing**" in headline_text(headline_verdicts(_set(_good(), h.METHOD, shared_d=0.0)))
    v = _by_letter(headline_verdicts(_set(_good(), h.METHOD, patient_epsilon_max=0.0)))
    assert not v["c"]["holds"]  # shares, but the ledger shows no cost


def test_point_checks_flip_and_need_the_same_budget():
    v = _by_letter(headline_verdicts(_with_acc(_good(), h.LOCAL_DP, 0.75)))
    assert not v["d"]["holds"] and v["d"]["margin"] == pytest.approx(-0.01)
    v = _by_letter(headline_verdicts(_with_acc(_good(), h.PUBLIC_ONLY, 0.735)))  # point 0.74 < its high 0.745
    assert not v["e"]["holds"]
    # a rival held to a smaller epsilon is not beaten fairly, whatever the points say
    v = _by_letter(headline_verdicts(_set(_good(), h.LOCAL_DP, patient_epsilon_max=4.0)))
    assert not v["d"]["holds"] and v["d"]["margin"] > 0
    v = _by_letter(headline_verdicts(_set(_good(), h.FEDAVG_DP, patient_epsilon_max=4.0)))
    assert not v["f"]["holds"]


def test_a_missing_arm_is_named():
    table = _good()
    table = table[table["arm"] != h.NOMASK]
    with pytest.raises(ConfigError, match=r"no arm 'public/mm-pfl-adp\+secagg-dp-sgd-nomask'.*where_collaboration_pays"):
        headline_verdicts(table)


def test_strongest_picks_the_better_round_count_and_weakest_the_worse():
    """Rivals at their strongest row; the method's claims at its weakest; (a)/(b) compare baselines at their best."""
    table = pd.concat([_good(), pd.DataFrame([_arm(h.LOCAL, 0.745, rounds=300)])], ignore_index=True)
    assert strongest(table, h.LOCAL)["rounds"] == 300 and weakest(table, h.LOCAL)["rounds"] == 100
    v = _by_letter(headline_verdicts(table))
    # the rival is taken at its strongest: centralized's [0.74, 0.76] now overlaps local's [0.735, 0.755]
    assert not v["a"]["holds"] and "(300 rounds)" in v["a"]["right"]
    # (a) compares two baselines, each at its best: a better-tuned centralized row counts
    table = pd.concat([table, pd.DataFrame([_arm(h.CENTRALIZED, 0.90, rounds=50)])], ignore_index=True)
    v = _by_letter(headline_verdicts(table))
    assert v["a"]["holds"] and "(50 rounds)" in v["a"]["left"]
    # the method's claims take it at its weakest: a second, better MM-PFL-ADP row cannot rescue check (f)
    base = _with_acc(_good(), h.FEDAVG_DP, 0.735)  # the method's [0.73, 0.75] point no longer above its upper bound
    assert not _by_letter(headline_verdicts(base))["f"]["holds"]
    rescued = pd.concat([base, pd.DataFrame([_arm(h.METHOD, 0.90, rounds=400)])], ignore_index=True)
    assert not _by_letter(headline_verdicts(rescued))["f"]["holds"]
    # a row run as one round of many epochs (one optimiser throughout) says so
    one_run = pd.concat([table, pd.DataFrame([{**_arm(h.LOCAL, 0.95, rounds=1), "epochs": 20}])], ignore_index=True)
    v = _by_letter(headline_verdicts(one_run))
    assert not v["a"]["holds"] and "(1 round of 20 epochs)" in v["a"]["right"]


def test_text_numbers_come_from_the_table():
    table = _with_acc(_good(), h.METHOD, 0.7777)
    text = headline_text(headline_verdicts(table))
    assert "MM-PFL-ADP 0.778 [0.768, 0.788]" in text


# ---------------------------------------------------------------- loading

def test_loading_errors_name_the_problem_and_the_fix(tmp_path: Path):
    with pytest.raises(FileNotFoundError, match="where_collaboration_pays.py --preset demo"):
        load_headline_table(tmp_path / "absent.csv")
    path = tmp_path / "table.csv"
    _good().drop(columns=["shared_d"]).to_csv(path, index=False)
    with pytest.raises(ConfigError, match=r"\['shared_d'\]"):
        load_headline_table(path)
    _set(_good(), h.LOCAL, low=0.70).to_csv(path, index=False)
    with pytest.raises(ConfigError, match="outside \\[low, high\\]"):
        load_headline_table(path)
    _good().to_csv(path, index=False)
    assert len(load_headline_table(path)) == len(_good())


def test_the_verdicts_read_the_table_only():
    """The module trains and releases nothing: it imports no model, data, privacy or federated code (a planted
    import of the training code would fail this)."""
    source = Path(h.__file__).read_text()
    imported = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.ImportFrom):
            imported.add("." * node.level + (node.module or ""))
        elif isinstance(node, ast.Import):
            imported |= {alias.name for alias in node.names}
    assert imported == {"__future__", "dataclasses", "pathlib", "pandas", "..errors"}, imported


def test_the_mask_verdict_carries_its_measured_reason_from_the_table():
    """Given the table, a mask verdict that is not "better" says how many scalars the masks kept personal beyond the
    head (no-mask shared_d minus the method's); a "better" verdict needs no excuse, and without the table nothing
    is said."""
    table = _set(_with_acc(_good(), h.NOMASK, 0.735), h.NOMASK, shared_d=2720.0)
    table = _set(table, h.METHOD, shared_d=2678.4)
    assert _by_letter(headline_verdicts(table))["i"]["verdict"] == "no measured difference"
    text = headline_text(headline_verdicts(table), table)
    assert "they kept on average 42 of d = " in text and "(shared 2,678 with masks, 2,720 without)" in text
    assert "Why the masks" not in headline_text(headline_verdicts(table))
    same = _set(table, h.METHOD, shared_d=2720.0)  # masks kept only the head everywhere: nothing differs but noise
    text = headline_text(headline_verdicts(same), same)
    assert "they kept nothing personal at any site (shared 2,720 with masks, 2,720 without)" in text
    assert "kept on average" not in text
    assert "Why the masks" not in headline_text(headline_verdicts(_good()), _good())  # masks better: nothing to excuse


def test_compare_intervals_is_three_way_on_rows_and_dicts():
    """The one interval rule the verdicts, notebook 05's takeaways and its section 8 share: touching is no difference."""
    assert h.compare_intervals({"low": 0.71, "high": 0.73}, {"low": 0.68, "high": 0.70}) == 1
    assert h.compare_intervals(pd.Series({"low": 0.68, "high": 0.70}), pd.Series({"low": 0.71, "high": 0.73})) == -1
    assert h.compare_intervals({"low": 0.70, "high": 0.72}, {"low": 0.68, "high": 0.70}) == 0
