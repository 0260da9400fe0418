"""The regime map's written report: ``REPORT.md``, ``regime_runs.csv``, ``regime_cells.csv``,
``regime_winners.csv``, ``regime_verdict.csv``, ``regime_collaboration.csv`` and two figures, from
:mod:`.regime`'s tables. Everything here is computed from released run outputs (pooled accuracies,
the accountant's z and epsilon) and public configuration (N, q, d)."""

from __future__ import annotations

import math
from pathlib import Path

import pandas as pd

from ..tables import markdown_table
from .plan import ReproductionPlan
from .regime import collaboration_table, regime_cells, regime_runs, regime_verdict, winner_table

__all__ = ["run_regime_map"]


def _ci(acc: float, low: float, high: float) -> str:
    return f"{acc:.3f}" if math.isnan(low) else f"{acc:.3f} [{low:.3f}, {high:.3f}]"


def noise_table(runs: pd.DataFrame, method: str, rounds: int) -> pd.DataFrame:
    """sites x epsilon for ``method``: the accountant's z, the expected participants qN, the ratio
    z sqrt(d) / qN, the participants per round that would bring it to 1, and a site's expected
    number of rounds qT (how often its personal part gets trained at all)."""
    sel = runs[(runs["method"] == method) & runs["epsilon"].notna() & ~runs["epsilon"].isin([math.inf])]
    if sel.empty:
        return pd.DataFrame()
    grouped = (
        sel.groupby(["sites", "epsilon"])
        .agg(
            q=("sample rate", "first"),
            qN=("expected participants", "first"),
            z=("noise multiplier", "first"),
            d=("parameters", "first"),
            ratio=("noise/signal per round", "first"),
        )
        .reset_index()
    )
    # z/m: the noise standard deviation of the released average in units of the clip norm C.
    grouped.insert(grouped.columns.get_loc("z") + 1, "z/m", grouped["z"] / grouped["qN"])
    grouped["participants for ratio 1"] = grouped["z"] * grouped["d"] ** 0.5  # qN at which z sqrt(d) / qN = 1
    grouped["rounds per site qT"] = grouped["q"] * rounds
    return grouped.rename(
        columns={
            "q": "sample rate q",
            "qN": "expected participants qN",
            "z": "noise multiplier z",
            "z/m": "z/m = z/qN",
            "d": "parameters d",
            "ratio": "noise/signal per round z*sqrt(d)/qN",
            "participants for ratio 1": "participants per round for ratio 1 (z*sqrt(d))",
        }
    )


def collaboration_text(collab: pd.DataFrame, grid) -> str:
    """One line per row of the map: does the best non-private collaboration beat local-only?"""
    if collab.empty or "best non-private collaboration" not in collab:
        return "(no epsilon = inf column: not measured)"
    lines = []
    for _, r in collab.iterrows():
        if pd.isna(r.get("best non-private collaboration")):
            continue
        best = _ci(r["its acc"], r["its low"], r["its high"])
        base = _ci(r[f"{grid.baseline} acc"], r[f"{grid.baseline} low"], r[f"{grid.baseline} high"])
        verdict = (
            "collaboration pays: private methods are ranked"
            if r["collaboration pays"]
            else "collaboration does **not** pay: the private methods of this row are not ranked"
        )
        lines.append(
            f"- N = {r['sites']:g} (m = {r['sites per round m']:g}): {r['best non-private collaboration']} {best} vs "
            f"{grid.baseline} {base} (accuracy change over the last evaluation interval "
            f"{r['its acc change, last interval']:+.3f} and {r[f'{grid.baseline} acc change, last interval']:+.3f}): "
            f"{verdict}."
        )
    return "\n".join(lines)


def _size(grid) -> str:
    """What the done-when threshold counts: sites per round on the m axis, else sites (N)."""
    return "m >= 100 sites per round" if isinstance(grid.sites_per_round, tuple) else "N >= 100"


def answer_text(verdict: pd.DataFrame, grid) -> str:
    """The computed answer to the done-when question, in one paragraph."""
    if verdict.empty:
        return f"No cell of this map has {_size(grid)} and epsilon <= 8: the question is not measured here."
    won = verdict[verdict["beats all (CIs apart)"]]
    if not won.empty:
        cells = ", ".join(f"N={n}, eps={e:g}" for n, e in zip(won["sites"], won["epsilon"], strict=True))
        return (
            f"**Yes** at {cells}: {grid.proposed}'s 95% interval lies above those of {grid.baseline} and "
            f"{', '.join(grid.rivals)}."
        )
    unpaid = (
        verdict[~verdict["collaboration pays (eps=inf)"]] if "collaboration pays (eps=inf)" in verdict else verdict[:0]
    )
    because = (
        " Where non-private collaboration does not beat local-only (rows N = "
        + ", ".join(f"{n:g}" for n in sorted(set(unpaid["sites"])))
        + ") no private method can be expected to: see the section above."
        if not unpaid.empty
        else ""
    )
    return (
        f"**No**: in no cell with {_size(grid)} and epsilon <= 8 does {grid.proposed}'s interval lie above all of "
        f"{grid.baseline}, {', '.join(grid.rivals)}.{because} The noise table below gives the noise in one number "
        "per cell."
    )


def run_regime_map(plan: ReproductionPlan, out: Path, *, progress: bool = False, only_finished: bool = False):
    """Run the plan's regime map (resuming finished runs) and write its report; returns
    (report path, winners, verdict, cells, runs). ``only_finished``: train nothing, report the runs
    that finished and list the missing ones (a map cut short by its time budget)."""
    from ..plots.regime import plot_regime_accuracy, plot_regime_map
    from ..plots.training import save_axes

    grid, base = plan.regime_map, plan.experiment
    all_runs = regime_runs(base, grid, plan.seeds, out, progress=progress, only_finished=only_finished)
    missing, runs = all_runs[all_runs["missing"]], all_runs[~all_runs["missing"]]
    cells = regime_cells(runs, grid)
    winners, verdict = winner_table(cells), regime_verdict(cells, grid)
    collab = collaboration_table(cells, grid)
    noise = noise_table(runs, grid.rivals[0] if grid.rivals else grid.proposed, base.federated.num_rounds)
    save_axes(plot_regime_map(cells), out / "regime_map.png")
    save_axes(plot_regime_accuracy(cells), out / "regime_accuracy.png")
    for name, frame in (
        ("regime_runs", runs),
        ("regime_cells", cells),
        ("regime_winners", winners),
        ("regime_verdict", verdict),
        ("regime_noise", noise),
        ("regime_collaboration", collab),
    ):
        frame.to_csv(out / f"{name}.csv", index=False)
    shown = cells.assign(
        **{
            "personal acc [95% CI]": [
                _ci(a, lo, hi) for a, lo, hi in zip(cells["acc"], cells["low"], cells["high"], strict=True)
            ]
        }
    )
    shown = shown[
        ["sites", "sites per round m", "epsilon", "method", "engine", "personal acc [95% CI]", "eligible", "winner"]
        + ["ranked", "clear", "noise multiplier", "z/m", "parameters", "noise/signal per round"]
        + ["acc change, last interval"]
    ]
    f = base.federated
    lines = [
        f"# Regime map: {base.name}",
        "",
        "When does client-level DP federated learning beat training alone? Every cell trains each method on the same "
        f"federation for seeds {list(plan.seeds)} and compares personal test accuracy (each site's deployed model on its "
        "own test subjects, pooled), mean over seeds with a Student-t 95% interval.",
        "",
        f"Synthetic MS cohort at {base.data.image_size}x{base.data.image_size} px, model `{base.model.preset}` "
        f"{dict(base.model.overrides)}, alpha = {base.federation.alpha:g}, {f.num_rounds} rounds, "
        f"{f.local.local_epochs} local epoch(s) of batch {f.local.batch_size}; Poisson sampling with "
        + (
            f"q = min(1, m / N) with sites per round m on an axis, N = {grid.population_factor} m; "
            if isinstance(grid.sites_per_round, tuple)
            else f"q = min(1, {grid.sites_per_round:g} / N); "
        )
        + "sites x subjects per site: "
        + ", ".join(f"{n} x {s}" for n, s in zip(grid.sites, grid.subjects_per_site, strict=True))
        + ". "
        + (
            "Engine: vectorised for the methods it serves, the loop engine for the others (`engine` column). "
            if grid.engine == "vectorized"
            else ""
        )
        + (
            f"Local-only trains and is evaluated on {grid.local_eval_sites} random sites per seed where N is larger "
            "(sites train independently: an unbiased estimate of the mean). "
            if grid.local_eval_sites
            else ""
        )
        + "Epsilons come from each run's accountant (delta as configured); eps = inf keeps the clipping and sets "
        "the noise multiplier to 0. Eligible: private methods at the cell's epsilon, local-only (releases nothing), "
        "non-private methods (Ditto) only at eps = inf.",
        "",
        *(
            []
            if missing.empty
            else [
                f"**Reduced grid: {len(missing)} of {len(all_runs)} planned runs did not finish within the time budget** "
                "and are left out (cells show only the methods and seeds that finished; the `seeds` column of "
                "`regime_cells.csv` says how many). Missing (sites, epsilon, method: seeds): "
                + "; ".join(
                    f"({n}, {'-' if pd.isna(e) else f'{e:g}'}, {m}: {sorted(g['seed'])})"
                    for (n, e, m), g in missing.groupby(["sites", "epsilon", "method"], dropna=False)
                )
                + ".",
                "",
            ]
        ),
        "## First: does non-private collaboration beat local-only?",
        "Every row first trains its non-private arms (epsilon = inf: the same clipping, no noise). Where the best of "
        f"them does not beat {grid.baseline} with intervals apart, pooling does not help even without noise, and the "
        "row's private methods are not ranked.",
        collaboration_text(collab, grid),
        "",
        "## Winners (tie: the winner's interval overlaps another eligible method's)",
        markdown_table(winners),
        "",
        f"## At {_size(grid)} and epsilon <= 8: does {grid.proposed} beat {grid.baseline} and {', '.join(grid.rivals)}?",
        answer_text(verdict, grid),
        "",
        markdown_table(verdict) if not verdict.empty else "(no such cell)",
        "",
        "## Why: the noise the accountant needs, per round",
        "The released average is (sum of clipped updates + N(0, z^2 C^2 I_d)) / (qN); a clipped update has norm at most "
        "C, so the noise-to-signal ratio of one round is at best z sqrt(d) / (qN). Below ~1 the shared model can learn "
        "from the federation; far above it the shared part mostly carries noise and personal/local parameters must do "
        "the work. It falls as qN grows (more sites per round) and as q falls at fixed qN (amplification: smaller z). "
        "A federated personal model is trained only in the rounds its site is sampled (qT of them in expectation), "
        "while local-only trains every site in every round.",
        markdown_table(noise) if not noise.empty else "(no private runs)",
        "",
        "## Every cell",
        markdown_table(shown),
        "",
        "## Figures",
        "![regime map](regime_map.png)",
        "![accuracy per cell](regime_accuracy.png)",
        "",
    ]
    path = out / "REPORT.md"
    path.write_text("\n".join(lines))
    return path, winners, verdict, cells, runs
