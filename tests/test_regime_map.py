"""The regime map: eligibility and winners from a known table, epsilon handling, and the smoke preset end to end."""
from __future__ import annotations

import json
import math

import pandas as pd
import pytest
import yaml

from mmpfl_core.cli import main
from mmpfl_core.errors import ConfigError
from mmpfl_core.experiment import MethodSpec
from mmpfl_core.reproduction import load_reproduction
from mmpfl_core.reproduction.regime import (
    RegimeMap,
    _at_epsilon,
    collaboration_table,
    regime_cells,
    regime_runs,
    regime_verdict,
    winner_table,
)

GRID = RegimeMap(num_sites=(100,), subjects_per_site=(10,), epsilons=(4.0, math.inf),
                 methods=("local-only", "ditto", "dp-fedavg", "mm-pfl-adp"), rivals=("dp-fedavg",))


def _runs(acc: dict[tuple[str, float | None], list[float]]) -> pd.DataFrame:
    rows = []
    for (method, eps), values in acc.items():
        for seed, a in enumerate(values):
            rows.append({"sites": 100, "seed": seed, "method": method, "private": eps is not None,
                         "communicates": method != "local-only", "epsilon": float("nan") if eps is None else eps,
                         "personal acc": a, "noise/signal per round": 2.0 if eps is not None else None,
                         "sites evaluated": 100, "missing": False})
    return pd.DataFrame(rows)


def test_winner_is_the_best_eligible_method_and_clear_only_when_intervals_separate():
    runs = _runs({("local-only", None): [0.60, 0.62, 0.61], ("ditto", None): [0.90, 0.91, 0.92],
                  ("dp-fedavg", 4.0): [0.40, 0.41, 0.42], ("dp-fedavg", math.inf): [0.70, 0.71, 0.72],
                  ("mm-pfl-adp", 4.0): [0.70, 0.72, 0.71], ("mm-pfl-adp", math.inf): [0.80, 0.60, 0.95]})
    cells = regime_cells(runs, GRID).set_index(["epsilon", "method"])
    # Ditto releases un-noised models: not eligible at a finite epsilon, though it scores highest.
    assert not cells.loc[(4.0, "ditto"), "eligible"] and cells.loc[(math.inf, "ditto"), "eligible"]
    assert cells.loc[(4.0, "mm-pfl-adp"), "winner"] and cells.loc[(4.0, "mm-pfl-adp"), "clear"]
    assert cells.loc[(math.inf, "ditto"), "winner"]
    assert cells.loc[(4.0, "local-only"), "acc"] == pytest.approx(0.61)
    # Local-only ignores epsilon: the same numbers in every column.
    assert cells.loc[(4.0, "local-only"), "high"] == cells.loc[(math.inf, "local-only"), "high"]
    verdict = regime_verdict(regime_cells(runs, GRID), GRID)
    assert list(verdict["epsilon"]) == [4.0] and bool(verdict["beats all (CIs apart)"].iloc[0])
    table = winner_table(regime_cells(runs, GRID))
    assert table.loc[0, "eps=4"].startswith("mm-pfl-adp 0.71") and "(tie)" not in table.loc[0, "eps=4"]


def test_overlapping_intervals_are_a_tie_and_no_verdict():
    runs = _runs({("local-only", None): [0.60, 0.75, 0.68], ("ditto", None): [0.90, 0.91, 0.92],
                  ("dp-fedavg", 4.0): [0.40, 0.41, 0.42], ("dp-fedavg", math.inf): [0.4, 0.4, 0.4],
                  ("mm-pfl-adp", 4.0): [0.70, 0.66, 0.71], ("mm-pfl-adp", math.inf): [0.4, 0.4, 0.4]})
    cells = regime_cells(runs, GRID).set_index(["epsilon", "method"])
    assert cells.loc[(4.0, "mm-pfl-adp"), "winner"] and not cells.loc[(4.0, "mm-pfl-adp"), "clear"]
    assert not regime_verdict(regime_cells(runs, GRID), GRID)["beats all (CIs apart)"].any()


def test_a_row_where_collaboration_does_not_pay_ranks_no_private_method():
    """Non-private collaboration (every communicating arm at eps = inf) not above local-only with intervals
    apart: the finite-epsilon cells get no winner and the tables say why, even where a private method
    scores highest and would otherwise be a clear winner."""
    table = {("local-only", None): [0.60, 0.62, 0.61], ("ditto", None): [0.58, 0.63, 0.60],
             ("dp-fedavg", 4.0): [0.40, 0.41, 0.42], ("dp-fedavg", math.inf): [0.55, 0.66, 0.62],
             ("mm-pfl-adp", 4.0): [0.80, 0.81, 0.82], ("mm-pfl-adp", math.inf): [0.59, 0.61, 0.63]}
    cells = regime_cells(_runs(table), GRID)
    collab = collaboration_table(cells, GRID)
    assert len(collab) == 1 and not collab["collaboration pays"].iloc[0]
    finite = cells[cells["epsilon"] == 4.0]
    assert not finite["ranked"].any() and not finite["winner"].any() and not finite["clear"].any()
    # eps = inf is the collaboration test itself: still ranked, and its winner named.
    assert cells[cells["epsilon"] == math.inf]["ranked"].all() and cells[cells["epsilon"] == math.inf]["winner"].sum() == 1
    verdict = regime_verdict(cells, GRID)
    assert not verdict["collaboration pays (eps=inf)"].iloc[0] and not verdict["beats all (CIs apart)"].iloc[0]
    assert winner_table(cells).loc[0, "eps=4"].startswith("not ranked")
    # The same table with one arm clearly above local-only at eps = inf: ranked, and mm-pfl-adp wins clearly.
    cells = regime_cells(_runs({**table, ("dp-fedavg", math.inf): [0.70, 0.71, 0.72]}), GRID)
    assert collaboration_table(cells, GRID)["collaboration pays"].iloc[0]
    assert cells.set_index(["epsilon", "method"]).loc[(4.0, "mm-pfl-adp"), "clear"]
    # The break this test must catch: ranking by the private arms alone would have named a clear winner.
    assert collaboration_table(regime_cells(_runs(table), GRID), GRID).loc[0, "its acc"] == pytest.approx(0.61)


def test_on_the_m_axis_the_verdict_counts_sites_per_round_not_sites():
    """The done-when question is about m >= 100 sites per round: N = 100 (m = 10) is not such a cell."""
    grid = RegimeMap(sites_per_round=(10, 100), subjects_per_site=(10, 10), epsilons=(4.0, math.inf),
                     methods=("local-only", "dp-fedavg", "mm-pfl-adp"), rivals=("dp-fedavg",))
    table = {("local-only", None): [0.60, 0.62, 0.61], ("dp-fedavg", 4.0): [0.40, 0.41, 0.42],
             ("dp-fedavg", math.inf): [0.70, 0.71, 0.72], ("mm-pfl-adp", 4.0): [0.80, 0.81, 0.82],
             ("mm-pfl-adp", math.inf): [0.80, 0.81, 0.82]}
    runs = pd.concat([_runs(table).assign(sites=n) for n in grid.sites])
    verdict = regime_verdict(regime_cells(runs, grid), grid)
    assert list(verdict["sites"]) == [1000] and list(verdict["sites per round m"]) == [100.0]
    assert verdict["beats all (CIs apart)"].all()


def test_epsilon_inf_keeps_the_clipping_and_removes_the_noise():
    spec = MethodSpec("dp-fedavg", kwargs={"target_epsilon": 8.0, "clip_norm": 0.5})
    assert _at_epsilon(spec, math.inf).kwargs == {"clip_norm": 0.5, "noise_multiplier": 0.0}
    assert _at_epsilon(spec, 1.0).kwargs == {"clip_norm": 0.5, "target_epsilon": 1.0}
    assert _at_epsilon(spec, 1.0).label == "dp-fedavg-eps1"


def test_bad_regime_maps_are_named(tmp_path):
    with pytest.raises(ConfigError, match="subjects_per_site"):
        RegimeMap(num_sites=(5, 20), subjects_per_site=(10,))
    with pytest.raises(ConfigError, match="not among regime_map.methods"):
        RegimeMap(methods=("local-only", "dp-fedavg"))
    with pytest.raises(ConfigError, match="contradicts the sites_per_round axis"):
        RegimeMap(sites_per_round=(10, 100), num_sites=(100, 500), subjects_per_site=(10, 10))
    with pytest.raises(ConfigError, match="engine"):
        RegimeMap(engine="vectorised")
    values = yaml.safe_load(open(load_reproduction.__globals__["CONFIG_DIR"] / "reproduce_regime_smoke.yaml"))
    values["reproduction"]["regime_map"]["methods"].append("fedavg-typo")
    (tmp_path / "bad.yaml").write_text(yaml.safe_dump(values))
    with pytest.raises(ConfigError, match="fedavg-typo"):
        load_reproduction(tmp_path / "bad.yaml")


def test_full_preset_is_the_map_that_was_run():
    """The preset reproduces docs/results/regime_map/ (what fitted the CPU budget; the YAML says what was left
    out): m = 100 is on the axis, a model that learns from the images, and enough rounds that a site trains
    in about ten of them."""
    plan = load_reproduction("regime")
    grid = plan.regime_map
    assert grid.per_round == (10, 100) and grid.sites == (100, 1000) and grid.engine == "vectorized"
    assert {8.0, math.inf} <= set(grid.epsilons)
    assert set(grid.methods) == {"local-only", "dp-fedavg", "mm-pfl-adp"}
    assert len(plan.seeds) >= 3
    assert plan.experiment.model.preset == "hybrid-tiny"
    assert plan.experiment.federated.num_rounds * grid.sample_rate(1000) >= 10


def test_smoke_map_runs_end_to_end(tmp_path):
    assert main(["reproduce", "--preset", "regime_smoke", "--out", str(tmp_path), "--no-progress"]) == 0
    plan = load_reproduction("regime_smoke")
    grid = plan.regime_map
    runs = pd.read_csv(tmp_path / "regime_runs.csv")
    private = [m.label for m in plan.experiment.methods if "target_epsilon" in m.kwargs and m.label in grid.methods]
    expected = len(grid.num_sites) * len(plan.seeds) * (len(grid.methods) - len(private) + len(private) * len(grid.epsilons))
    assert len(runs) == expected
    finite = runs[runs["private"] & runs["epsilon"].lt(math.inf)]
    assert (finite["epsilon spent"] >= 0).all() and (finite["epsilon spent"] <= finite["epsilon"] + 1e-9).all()
    # DP-FedAvg and FedDPA release every round; MM-PFL-ADP's noise gate may keep everything at home (epsilon 0).
    assert (finite.loc[finite["method"].isin(["dp-fedavg", "feddpa"]), "epsilon spent"] > 0).all()
    # Every private method gets the same noise multiplier in a cell: the same accountant, the same budget.
    assert (finite.groupby(["sites", "seed", "epsilon"])["noise multiplier"].nunique() == 1).all()
    # Local-only is evaluated on a random subset where the federation is large.
    local = runs[runs["method"] == grid.baseline]
    assert (local.loc[local["sites"] > grid.local_eval_sites, "sites evaluated"] == grid.local_eval_sites).all()
    cells = pd.read_csv(tmp_path / "regime_cells.csv")
    # One winner per ranked cell; none where non-private collaboration does not beat local-only (not ranked).
    winners = cells.groupby(["sites", "epsilon"]).agg(winners=("winner", "sum"), ranked=("ranked", "all"))
    assert (winners["winners"] == winners["ranked"].astype(int)).all()
    assert winners.loc[winners.index.get_level_values("epsilon") == math.inf, "ranked"].all()
    collab = pd.read_csv(tmp_path / "regime_collaboration.csv")
    assert len(collab) == len(grid.num_sites) and "## First: does non-private collaboration" in (
        tmp_path / "REPORT.md"
    ).read_text()
    text = (tmp_path / "REPORT.md").read_text()
    for heading in ("## Winners", "## At N >= 100 and epsilon <= 8", "## Why: the noise", "## Every cell"):
        assert heading in text
    assert (tmp_path / "regime_map.png").stat().st_size > 0
    noise = pd.read_csv(tmp_path / "regime_noise.csv")
    assert len(noise) == len(grid.num_sites) * len([e for e in grid.epsilons if e < math.inf])
    ratio = noise["noise multiplier z"] * noise["parameters d"] ** 0.5 / noise["expected participants qN"]
    assert noise["noise/signal per round z*sqrt(d)/qN"].to_numpy() == pytest.approx(ratio.to_numpy())


def test_sites_per_round_axis_on_the_vectorized_engine(tmp_path):
    """Two values of m (N = 10 m, q = 0.1): the served methods run vectorised, Ditto on the loop engine,
    every cell reports z, z/m = z / (qN), d and z sqrt(d) / (qN), and the cells differ by m."""
    plan = load_reproduction("regime_smoke")
    grid = RegimeMap(sites_per_round=(2, 4), subjects_per_site=(6, 6), epsilons=(8.0,), engine="vectorized",
                     methods=("local-only", "ditto", "dp-fedavg"), baseline="local-only", proposed="dp-fedavg",
                     rivals=(), local_eval_sites=None)
    assert grid.sites == (20, 40) and grid.sample_rate(20) == grid.sample_rate(40) == pytest.approx(0.1)
    runs = regime_runs(plan.experiment, grid, (0,), tmp_path)
    engines = runs.groupby("method")["engine"].unique()
    assert list(engines["dp-fedavg"]) == ["vectorized"] and list(engines["local-only"]) == ["vectorized"]
    assert list(engines["ditto"]) == ["loop"]
    # The engine the run directory recorded, not only the column we wrote.
    stored = json.loads((tmp_path / "runs" / "sites40-seed0" / "dp-fedavg-eps8" / "config.json").read_text())
    assert stored["config"]["federated"]["engine"] == "vectorized"
    stored = json.loads((tmp_path / "runs" / "sites40-seed0" / "ditto" / "config.json").read_text())
    assert stored["config"]["federated"]["engine"] == "loop"
    cells = regime_cells(runs, grid)
    dp = cells[cells["method"] == "dp-fedavg"].set_index("sites per round m")
    assert list(dp.index) == [2.0, 4.0] and list(dp["sites"]) == [20, 40]
    # Same q and budget: the accountant gives the same z; z/m and the noise-to-signal ratio halve with 2x m.
    assert dp.loc[2.0, "noise multiplier"] == pytest.approx(dp.loc[4.0, "noise multiplier"])
    assert dp["noise multiplier"].gt(0).all() and dp["parameters"].gt(0).all()
    assert dp["z/m"].to_numpy() == pytest.approx((dp["noise multiplier"] / (0.1 * dp["sites"])).to_numpy())
    assert dp.loc[2.0, "z/m"] == pytest.approx(2 * dp.loc[4.0, "z/m"])
    ratio = dp["noise multiplier"] * dp["parameters"] ** 0.5 / (0.1 * dp["sites"])
    assert dp["noise/signal per round"].to_numpy() == pytest.approx(ratio.to_numpy())
    private = runs[runs["method"] == "dp-fedavg"]
    assert (private["epsilon spent"] > 0).all() and (private["epsilon spent"] <= 8.0 + 1e-9).all()
