"""The regime map: when does client-level DP federated learning beat training alone?

A grid of federation sizes N x privacy budgets epsilon (``reproduction.regime_map`` in a reproduction
preset, ``mmpfl reproduce --preset regime_smoke|regime``). In every cell each method is trained on
the same federation for every seed; the table keeps the mean personal test accuracy over seeds with a
Student-t 95% interval, and names the winner among the methods that hold that cell's guarantee:

* private methods (those with a ``target_epsilon``) run at the cell's epsilon (``inf``: the same
  clipping with noise multiplier 0, i.e. no client-level DP);
* local-only releases nothing, so it is eligible in every cell (its numbers do not depend on epsilon);
* a non-private federated method (Ditto) releases un-noised models: it is eligible only at
  epsilon = inf, and shown elsewhere as a reference.

A winner is "clear" when its interval lies above every other eligible method's interval, else the
cell is a tie. Private methods are ranked only where collaboration pays at all: in each row (one
federation size) the best communicating arm at epsilon = inf (clipping, no noise; or a non-private
method such as Ditto) must beat local-only with intervals apart (points, with a single seed). Where
it does not, pooling the sites' updates does not help even without noise, so no private method can
be expected to; the row's finite-epsilon cells are marked ``ranked = False`` with no winner, and the
report says so instead of ranking them (:func:`collaboration_table`). Convergence is reported, not
assumed: ``acc change, last interval`` is each run's personal test accuracy at the last evaluation
minus that at the one before (``eval_every`` rounds earlier), from the run's released metrics. Sites are Poisson-sampled with q = min(1, m / N) (m: ``sites_per_round``), so the
expected number of participants qN (the DP average's fixed denominator) stays near m while q, and
with it the noise multiplier z the accountant needs, falls as N grows. The per-round
noise-to-signal ratio of the released average is z C sqrt(d) / (qN) over a clipped update of norm
at most C, i.e. ``z sqrt(d) / (qN)`` (d: trained parameters): the single number that says where
client-level DP can pay off; ``z/m`` (z / (qN), the noise standard deviation of the average in
units of C) is reported beside it. All of these are computed from the accountant's calibrated z
and public configuration (N, q, d): nothing private is read.

Sites per round as an axis: with ``sites_per_round`` a list (m_1, m_2, ...), the map has one row
per m with population N = ``population_factor`` x m (``num_sites`` may be left out: it is derived),
so q = 1 / ``population_factor`` in every row and the rows differ in m (and, with it, in z/m and in
the noise-to-signal ratio). ``engine: vectorized`` trains the runs on the vectorised engine
(:mod:`~mmpfl_core.federated.vectorized`, identical mechanism and accounting); methods it does not
serve (Ditto, FedDPA) run on the loop engine, and the ``engine`` column says which engine ran.

Local-only sites train independently: with ``local_eval_sites`` set, local-only trains and is
evaluated on that many sites drawn at random per seed (an unbiased estimate of the federation mean,
and the only way its N x rounds local trainings fit a CPU budget). Every run keeps its own run
directory, so an interrupted map resumes where it stopped.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from collections.abc import Callable

import numpy as np
import pandas as pd

from ..errors import ConfigError
from ..configuration import to_plain
from ..experiment import ExperimentConfig, MethodSpec, make_federation, model_factory, run_method
from ..io.run_directory import RunDirectory
from ..federated.strategies import create_strategy
from ..federated.vectorized import VECTORIZED_STRATEGIES
from ..metrics.classification import seed_ci

__all__ = ["RegimeMap", "collaboration_table", "regime_cells", "regime_runs", "regime_verdict"]


@dataclass(frozen=True)
class RegimeMap:
    """The grid and the question it answers (see the module docstring)."""

    num_sites: tuple[int, ...] | None = None  # None: (5, 20, 100, 500), or population_factor x m on the m axis
    epsilons: tuple[float, ...] = (1.0, 4.0, 8.0, math.inf)
    subjects_per_site: tuple[int, ...] = (60, 40, 20, 12)  # one per num_sites: few per site for large N
    # Expected participants per round m; q = min(1, m / N). A list makes m an axis (one row per m).
    sites_per_round: float | tuple[float, ...] = 10.0
    population_factor: int = 10  # on the m axis: N = population_factor x m
    engine: str = "loop"  # "vectorized": methods the vectorised engine serves run on it, others on the loop engine
    methods: tuple[str, ...] = ("local-only", "ditto", "dp-fedavg", "feddpa", "mm-pfl-adp")
    baseline: str = "local-only"
    proposed: str = "mm-pfl-adp"
    rivals: tuple[str, ...] = ("dp-fedavg", "feddpa")
    local_eval_sites: int | None = 50  # local-only on a random subset of this many sites (None: all)

    def __post_init__(self) -> None:
        object.__setattr__(self, "epsilons", tuple(float(e) for e in self.epsilons))
        if self.engine not in ("loop", "vectorized"):
            raise ConfigError(f"regime_map.engine={self.engine!r} is unknown; use 'loop' or 'vectorized'.")
        if not isinstance(self.population_factor, int) or self.population_factor < 1:
            raise ConfigError(f"regime_map.population_factor={self.population_factor!r} must be an integer >= 1.")
        if isinstance(self.sites_per_round, tuple):
            ms = self.sites_per_round
            if not ms or min(ms) < 1 or any(int(m) != m for m in ms) or len(set(ms)) != len(ms):
                raise ConfigError(
                    f"regime_map.sites_per_round={ms!r}: as an axis it needs distinct whole numbers >= 1."
                )
            derived = tuple(self.population_factor * int(m) for m in ms)
            if self.num_sites is not None and tuple(self.num_sites) != derived:
                raise ConfigError(
                    f"regime_map.num_sites={self.num_sites!r} contradicts the sites_per_round axis {ms!r} "
                    f"(N = population_factor {self.population_factor} x m = {derived}); leave num_sites out."
                )
            object.__setattr__(self, "sites_per_round", tuple(float(m) for m in ms))
            object.__setattr__(self, "num_sites", derived)
        elif self.num_sites is None:
            object.__setattr__(self, "num_sites", (5, 20, 100, 500))
        if not self.num_sites or min(self.num_sites) < 2:
            raise ConfigError(f"regime_map.num_sites={self.num_sites!r} needs federations of >= 2 sites.")
        if len(self.subjects_per_site) != len(self.num_sites) or min(self.subjects_per_site) < 6:
            raise ConfigError(
                f"regime_map.subjects_per_site={self.subjects_per_site!r} needs one entry >= 6 per "
                f"num_sites entry {self.num_sites!r} (train, validation and test subjects per site)."
            )
        if not self.epsilons or min(self.epsilons) <= 0:
            raise ConfigError(f"regime_map.epsilons={self.epsilons!r} must be > 0 (.inf: no client-level noise).")
        if not min(self.per_round) >= 1:
            raise ConfigError(f"regime_map.sites_per_round={self.sites_per_round!r} must be >= 1.")
        for name in (self.baseline, self.proposed, *self.rivals):
            if name not in self.methods:
                raise ConfigError(f"regime_map: {name!r} is not among regime_map.methods {list(self.methods)}.")
        if self.local_eval_sites is not None and self.local_eval_sites < 2:
            raise ConfigError(
                f"regime_map.local_eval_sites={self.local_eval_sites!r} must be >= 2 or null (all sites)."
            )

    @property
    def sites(self) -> tuple[int, ...]:
        """The federation sizes N, one per row of the map (resolved in ``__post_init__``)."""
        assert self.num_sites is not None
        return self.num_sites

    @property
    def per_round(self) -> tuple[float, ...]:
        """m for each row of the map: the axis, or the one ``sites_per_round`` repeated."""
        if isinstance(self.sites_per_round, tuple):
            return self.sites_per_round
        return (float(self.sites_per_round),) * len(self.sites)

    def sample_rate(self, num_sites: int) -> float:
        return min(1.0, self.per_round[self.sites.index(num_sites)] / num_sites)


def _is_private(method: MethodSpec) -> bool:
    return "target_epsilon" in method.kwargs or "noise_multiplier" in method.kwargs


def _at_epsilon(method: MethodSpec, epsilon: float) -> MethodSpec:
    """The method at budget epsilon; inf keeps the clipping and sets the noise multiplier to 0."""
    kwargs = {k: v for k, v in method.kwargs.items() if k not in ("target_epsilon", "noise_multiplier")}
    kwargs.update({"noise_multiplier": 0.0} if math.isinf(epsilon) else {"target_epsilon": float(epsilon)})
    return dataclasses.replace(method, label=f"{method.label}-eps{epsilon:g}", kwargs=kwargs)


def regime_runs(
    experiment: ExperimentConfig,
    grid: RegimeMap,
    seeds: tuple[int, ...],
    out: Path,
    *,
    progress: bool = False,
    only_finished: bool = False,
) -> pd.DataFrame:
    """Train every (N, seed, method, epsilon) of the grid (resuming finished runs); one row per run.
    With ``only_finished`` nothing is trained: runs without a summary are listed in ``missing``
    rows (``personal acc`` NaN), so a map cut short by its time budget says what it lacks."""
    methods = {m.label: m for m in experiment.methods}
    missing = [m for m in grid.methods if m not in methods]
    if missing:
        raise ConfigError(f"regime_map.methods {missing} are not among the experiment's methods {sorted(methods)}.")
    # d does not depend on N or the seed (same image size, sequences and clinical variables).
    dim = sum(
        p.numel() for p in model_factory(experiment, make_federation(experiment))().parameters() if p.requires_grad
    )
    rows: list[dict[str, Any]] = []
    for n, per_site, m in zip(grid.sites, grid.subjects_per_site, grid.per_round, strict=True):
        q = grid.sample_rate(n)
        for seed in seeds:
            config = experiment.replace(
                data={"num_subjects": n * per_site + experiment.federation.public_size, "seed": seed},
                federation={"num_sites": n, "seed": seed},
                federated={"client_fraction": q, "sampling": "poisson", "seed": seed, "engine": "loop"},
            )
            built: dict[str, Any] = {}  # the federation is built only if a run has to be trained

            def federation_for(subset: bool, config=config, built=built, n=n, seed=seed):
                if "all" not in built:
                    built["all"] = make_federation(config)
                if not subset:
                    return built["all"]
                keep = np.sort(np.random.default_rng([seed, n]).choice(n, grid.local_eval_sites, replace=False))
                return dataclasses.replace(built["all"], sites=[built["all"].sites[i] for i in keep])

            for label in grid.methods:
                method = methods[label]
                private = _is_private(method)
                subset = bool(not _communicates(method) and grid.local_eval_sites and n > grid.local_eval_sites)
                engine = _engine_for(method, grid.engine)
                cfg = config if engine == "loop" else config.replace(federated={"engine": engine})
                for epsilon in grid.epsilons if private else (None,):
                    spec = _at_epsilon(method, epsilon) if private else method
                    summary = _finished_or_run(
                        cfg,
                        spec,
                        lambda subset=subset: federation_for(subset),
                        out / "runs" / f"sites{n}-seed{seed}",
                        progress,
                        only_finished,
                    )
                    cell = {
                        "sites": n,
                        "sites per round m": m,
                        "seed": seed,
                        "method": label,
                        "engine": engine,
                        "private": private,
                        "communicates": _communicates(method),
                        "epsilon": epsilon if private else float("nan"),
                    }
                    if summary is None:
                        rows.append({**cell, "personal acc": float("nan"), "missing": True})
                        continue
                    privacy = summary.get("privacy", {})
                    z, qn = privacy.get("noise_multiplier"), privacy.get("expected_participants")
                    change = _last_interval_change(out / "runs" / f"sites{n}-seed{seed}" / spec.label)
                    rows.append(
                        {
                            **cell,
                            "personal acc": summary["personal_test"]["accuracy"]["point"],
                            "acc change, last interval": change,
                            "epsilon spent": summary.get("final", {}).get("epsilon"),
                            "noise multiplier": z,
                            "expected participants": qn,
                            "sample rate": q,
                            "parameters": dim,
                            "z/m": (z / qn) if z is not None and qn else None,
                            "noise/signal per round": (z * math.sqrt(dim) / qn) if z is not None and qn else None,
                            "sites evaluated": grid.local_eval_sites if subset else n,
                            "missing": False,
                        }
                    )
    return pd.DataFrame(rows)


def _finished_or_run(
    config: ExperimentConfig,
    method: MethodSpec,
    federation: Callable[[], Any],
    results_dir: Path,
    progress: bool,
    only_finished: bool = False,
) -> dict[str, Any] | None:
    """A finished run's summary read back (its stored config must equal this one: ``RunDirectory``
    checks it), else the run trained or resumed by :func:`run_method`. Reading back skips the
    re-evaluation a resumed run would do: the map has hundreds of runs."""
    run_config = {**config.to_dict(), "method": to_plain(method)}
    run_config.pop("methods")
    if only_finished and not (results_dir / method.label / "summary.json").is_file():
        return None
    run_dir = RunDirectory.create(results_dir, method.label, run_config, exist_ok_resume=True)
    if run_dir.summary_path.is_file():
        return run_dir.read_summary()
    return run_method(config, method, federation(), results_dir=results_dir, progress=progress).summary


def _last_interval_change(run_path: Path) -> float:
    """Personal test accuracy at the run's last evaluation minus that at the evaluation before (NaN
    with fewer than two evaluations). Read from the released ``metrics.csv`` (pooled evaluation
    metrics, docs/DESIGN.md 6): a convergence check that reads nothing private."""
    path = run_path / "metrics.csv"
    if not path.is_file():
        return float("nan")
    frame = pd.read_csv(path)
    if "personal_test_accuracy" not in frame:
        return float("nan")
    acc = frame["personal_test_accuracy"].dropna().to_numpy()
    return float(acc[-1] - acc[-2]) if len(acc) >= 2 else float("nan")


def _engine_for(method: MethodSpec, engine: str) -> str:
    """The engine a method's runs use: ``engine`` if it serves the method, else the loop engine
    (the vectorised engine serves :data:`VECTORIZED_STRATEGIES` without sample-level DP; the
    equivalence of the engines is ``tests/test_vectorized.py``'s to show)."""
    if engine == "loop":
        return "loop"
    strategy = create_strategy(method.strategy, **dict(method.kwargs))
    served = strategy.name in VECTORIZED_STRATEGIES and getattr(strategy, "sample_dp", None) is None
    return engine if served else "loop"


def _communicates(method: MethodSpec) -> bool:
    """Whether the method's strategy sends anything (local-only does not)."""
    return type(create_strategy(method.strategy, **dict(method.kwargs))).communicates


def regime_cells(runs: pd.DataFrame, grid: RegimeMap) -> pd.DataFrame:
    """One row per (N, epsilon, method): mean accuracy over seeds with a t-interval, eligibility, winner."""
    rows = []
    for n, m in zip(grid.sites, grid.per_round, strict=True):
        for epsilon in grid.epsilons:
            cell = []
            for label in grid.methods:
                sel = runs[(runs["sites"] == n) & (runs["method"] == label) & ~runs["missing"]]
                private = bool(sel["private"].iloc[0]) if len(sel) else False
                if private:
                    sel = sel[sel["epsilon"] == epsilon]
                if sel.empty:
                    continue
                mean, low, high = seed_ci(sel["personal acc"].tolist())
                eligible = private or math.isinf(epsilon) or not bool(sel["communicates"].iloc[0])
                cell.append(
                    {
                        "sites": n,
                        "sites per round m": m,
                        "epsilon": epsilon,
                        "method": label,
                        "acc": mean,
                        "low": low,
                        "high": high,
                        "seeds": len(sel),
                        "eligible": eligible,
                        "engine": ",".join(sorted(set(sel["engine"]))) if "engine" in sel else "loop",
                        "noise multiplier": _mean(sel, "noise multiplier") if private else None,
                        "z/m": _mean(sel, "z/m") if private else None,
                        "parameters": _mean(sel, "parameters"),
                        "noise/signal per round": sel["noise/signal per round"].mean() if private else None,
                        "acc change, last interval": _mean(sel, "acc change, last interval"),
                    }
                )
            rows += cell
    frame = pd.DataFrame(rows)
    if frame.empty:
        return frame
    pays = {row["sites"]: bool(row["collaboration pays"]) for _, row in collaboration_table(frame, grid).iterrows()}
    # A row where collaboration does not pay even without noise ranks no private method (module docstring).
    frame["ranked"] = [
        bool(math.isinf(e) or pays.get(n, True)) for n, e in zip(frame["sites"], frame["epsilon"], strict=True)
    ]
    frame["winner"], frame["clear"] = False, False
    for _, cell in frame.groupby(["sites", "epsilon"]):
        eligible = cell[cell["eligible"] & cell["ranked"]]
        if eligible.empty:
            continue
        best = eligible["acc"].idxmax()
        others = eligible.drop(index=best)["high"]
        frame.loc[best, "winner"] = True
        low = frame.loc[best, "low"]
        frame.loc[best, "clear"] = bool(not math.isnan(low) and (low > others).all())
    return frame


def _beats(ours: pd.Series, other: pd.Series) -> bool:
    """Intervals apart (ours above), or with a single seed (no interval) the point estimates."""
    if math.isnan(ours["low"]) or math.isnan(other["high"]):
        return bool(ours["acc"] > other["acc"])
    return bool(ours["low"] > other["high"])


def collaboration_table(cells: pd.DataFrame, grid: RegimeMap) -> pd.DataFrame:
    """Per row of the map: does non-private collaboration beat local-only?

    The best communicating arm at epsilon = inf (private methods with clipping and no noise, or a
    non-private method) against ``grid.baseline``: ``collaboration pays`` when its interval lies
    above the baseline's (:func:`_beats`). Rows without an epsilon = inf column or without the
    baseline are taken to pay (nothing measured contradicts ranking). ``acc change, last interval``
    of the two arms says whether they had converged (module docstring)."""
    rows = []
    for (n, m), row in cells.groupby(["sites", "sites per round m"], sort=False):
        inf = row[row["epsilon"].map(math.isinf)]
        base = inf[inf["method"] == grid.baseline]
        communicating = inf[inf["method"] != grid.baseline]
        if base.empty or communicating.empty:
            rows.append({"sites": n, "sites per round m": m, "collaboration pays": True})
            continue
        b, best = base.iloc[0], communicating.loc[communicating["acc"].idxmax()]
        rows.append(
            {
                "sites": n,
                "sites per round m": m,
                "best non-private collaboration": best["method"],
                "its acc": best["acc"],
                "its low": best["low"],
                "its high": best["high"],
                "its acc change, last interval": best.get("acc change, last interval"),
                f"{grid.baseline} acc": b["acc"],
                f"{grid.baseline} low": b["low"],
                f"{grid.baseline} high": b["high"],
                f"{grid.baseline} acc change, last interval": b.get("acc change, last interval"),
                "collaboration pays": _beats(best, b),
            }
        )
    return pd.DataFrame(rows)


def _mean(sel: pd.DataFrame, column: str) -> float | None:
    """The column's mean over a cell's seeds (None where the runs table lacks it)."""
    return float(sel[column].mean()) if column in sel else None


def regime_verdict(
    cells: pd.DataFrame, grid: RegimeMap, *, min_sites: int = 100, max_epsilon: float = 8.0
) -> pd.DataFrame:
    """For every cell with at least ``min_sites`` sites (sites per round m where the map has the m axis,
    else the federation size N) and epsilon <= ``max_epsilon``: does the proposed method's interval lie
    above the baseline's and each rival's? (The issue's done-when question.)"""
    rows = []
    per_round = dict(zip(grid.sites, grid.per_round, strict=True))
    on_m_axis = isinstance(grid.sites_per_round, tuple)
    for (n, epsilon), cell in cells.groupby(["sites", "epsilon"]):
        if (per_round.get(n, n) if on_m_axis else n) < min_sites or epsilon > max_epsilon:
            continue
        by = cell.set_index("method")
        if grid.proposed not in by.index:
            continue
        ours = by.loc[grid.proposed]
        row: dict[str, Any] = {
            "sites": n,
            "sites per round m": per_round.get(n),
            "epsilon": epsilon,
            grid.proposed: f"{ours['acc']:.3f} [{ours['low']:.3f}, {ours['high']:.3f}]",
        }
        beats = []
        for other in (grid.baseline, *grid.rivals):
            if other not in by.index:  # not run (reduced grid): no claim can be made against it
                row[other], _ = "not run", beats.append(False)
                continue
            o = by.loc[other]
            row[other] = f"{o['acc']:.3f} [{o['low']:.3f}, {o['high']:.3f}]"
            beats.append(bool(ours["low"] > o["high"]))
        ranked = bool(ours["ranked"]) if "ranked" in ours else True
        # Not ranked (collaboration does not pay even without noise): no claim, whatever the points say.
        row["beats all (CIs apart)"] = bool(beats) and all(beats) and ranked
        row["collaboration pays (eps=inf)"] = ranked
        row["noise/signal per round"] = ours["noise/signal per round"]
        rows.append(row)
    return pd.DataFrame(rows)


def winner_table(cells: pd.DataFrame) -> pd.DataFrame:
    """sites x epsilon: the winning method, with '(tie)' where its interval overlaps another eligible one,
    and 'not ranked' where non-private collaboration does not beat local-only in that row."""
    wins = cells[cells["winner"]].copy()
    wins["text"] = [
        f"{m} {a:.2f}" + ("" if c else " (tie)")
        for m, a, c in zip(wins["method"], wins["acc"], wins["clear"], strict=True)
    ]
    if "ranked" in cells:
        unranked = (
            cells[~cells["ranked"]]
            .drop_duplicates(["sites", "epsilon"])
            .assign(text="not ranked: collaboration does not pay at eps=inf")
        )
        wins = pd.concat([wins, unranked])
    table = wins.pivot(index="sites", columns="epsilon", values="text")
    table.columns = [f"eps={e:g}" for e in table.columns]
    return table.reset_index()
