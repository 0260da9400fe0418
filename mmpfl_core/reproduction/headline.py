"""The headline comparison of issue 23: where private collaboration pays, decided from the committed table.

The setting (``configs/headline.yaml``; ``bench/where_collaboration_pays.py --preset demo``): 40 data-starved
hospitals, encoders pretrained on a public cohort, a small private part (head and biases) trained at the sites, and
the patient as the privacy unit at the same patient-level epsilon for every private arm. The bench writes one row
per (arm, rounds) to ``docs/results/headline/headline_3seeds.csv``: personal accuracy pooled over the test patients
of every site and seed with a 95% bootstrap interval ``[low, high]``, the private dimension ``d``, the mean number of
scalars a site shares at the end (``shared_d``) and the largest patient-level epsilon any site's DP-SGD ledger
charged (``patient_epsilon_max``, from the accountant; 0 for arms without DP).

This module reads that table and nothing else: it trains nothing, and every number it prints is formatted from a
row of the table, so the notebook's text cannot drift from the committed results. It releases nothing new: the
table holds pooled accuracies and accountant epsilons, already released by the bench.

Each check claims that a LEFT arm beats a RIGHT arm. Rules (:func:`headline_verdicts`):

* *intervals apart*: holds iff ``left.low > right.high`` (checks a, b: pooling pays without DP);
* *releases*: holds iff the method's ``shared_d > 0`` and ``patient_epsilon_max > 0`` (check c: it shares
  something and its ledger shows the cost);
* *point at least*: ``left.acc >= right.acc`` at no larger patient epsilon (check d, against local + DP-SGD);
* *point above upper bound*: ``left.acc > right.high`` at no larger patient epsilon (checks e, f);
* *three-way* (checks g, h, i: what the method adds beyond its mechanism, the Fisher allocation, the KL masks):
  "better" iff ``left.low > right.high``, "worse" iff ``left.high < right.low``, otherwise "no measured difference";
  the check holds only for "better".

Arms repeated at several round counts (the lead may append e.g. ``public/local`` at more rounds): the RIGHT side of
every check is taken at its strongest row (:func:`strongest`, highest personal accuracy) and the LEFT side at its
weakest (:func:`weakest`). Choosing on the test set favours whichever side it is applied to, so this choice can
only make a claim harder to meet: it is conservative for every "left beats right" verdict. A "worse" verdict is the
one exception, so the rows used are shown with their round counts. Checks (a) and (b) compare two BASELINES (does
pooling pay at all, without DP?), so both sides are taken at their strongest row: each baseline as well tuned as
the runs allow (e.g. centralized at the batch and steps of the cross-silo runs, local training as one run of the
epoch count before it overfits its ~18 patients: rows with an ``epochs`` column are R rounds of E local epochs).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from ..errors import ConfigError

__all__ = [
    "ARM_LABELS",
    "CHECKS",
    "DEFAULT_TABLE",
    "REQUIRED_COLUMNS",
    "compare_intervals",
    "headline_text",
    "headline_verdicts",
    "load_headline_table",
    "strongest",
    "weakest",
]

#: The committed table, located like notebook 06 locates ``docs/results/regime_map``: beside the package in a checkout.
DEFAULT_TABLE = Path(__file__).resolve().parents[2] / "docs" / "results" / "headline" / "headline_3seeds.csv"
#: Columns the verdicts read (the bench writes more: seed_mean, seed_low, seed_high, test_subjects, seconds, curve;
#: and ``epochs``, local epochs per round where not 1, which the text shows beside the rounds).
REQUIRED_COLUMNS = ("arm", "d", "rounds", "personal_accuracy", "low", "high", "patient_epsilon_max", "shared_d")
_REGENERATE = "python bench/where_collaboration_pays.py --preset demo --seeds 0 1 2"

PUBLIC_ONLY = "public-model-only"
CENTRALIZED = "public/centralized"
LOCAL = "public/local"
FEDAVG = "public/fedavg"
LOCAL_DP = "public/local+dp-sgd"
FEDAVG_DP = "public/fedavg+dp-sgd"
FEDSGD_SECAGG = "public/fedsgd+secagg-dp-sgd"
METHOD = "public/mm-pfl-adp+secagg-dp-sgd"
UNIFORM = METHOD + "-uniform"
NOMASK = METHOD + "-nomask"

#: arm (the bench's ``ARMS`` key) -> how a reader meets it.
ARM_LABELS: dict[str, str] = {
    PUBLIC_ONLY: "public model only",
    CENTRALIZED: "centralized (no DP)",
    LOCAL: "local-only (no DP)",
    FEDAVG: "FedAvg (no DP)",
    LOCAL_DP: "local-only + DP-SGD",
    FEDAVG_DP: "FedAvg + DP-SGD",
    FEDSGD_SECAGG: "FedSGD + secure-aggregation DP-SGD",
    "public/cross-silo-head+secagg-dp-sgd": "head personal + secure-aggregation DP-SGD",
    METHOD: "MM-PFL-ADP",
    UNIFORM: "MM-PFL-ADP, uniform allocation",
    NOMASK: "MM-PFL-ADP, no KL masks",
}


def load_headline_table(path: str | Path | None = None) -> pd.DataFrame:
    """The headline table (default :data:`DEFAULT_TABLE`), checked for the columns and intervals the verdicts read.

    Raises:
        FileNotFoundError: no file at ``path`` (outside a checkout, pass ``path``; or regenerate it with the bench).
        ConfigError: a required column is missing, or a row's interval does not contain its point.
    """
    path = Path(path) if path is not None else DEFAULT_TABLE
    if not path.is_file():
        raise FileNotFoundError(
            f"no headline table at {path}: run from a checkout of the repository (the table is committed under "
            f"docs/results/headline/), pass load_headline_table(path=...), or regenerate it with `{_REGENERATE}`"
        )
    table = pd.read_csv(path)
    missing = [c for c in REQUIRED_COLUMNS if c not in table.columns]
    if missing:
        raise ConfigError(
            f"{path} lacks the columns {missing} (has {list(table.columns)}): it is not the bench's headline table; "
            f"regenerate it with `{_REGENERATE}`"
        )
    bad = table[(table["low"] > table["personal_accuracy"]) | (table["personal_accuracy"] > table["high"])]
    if not bad.empty:
        raise ConfigError(
            f"{path}: rows {list(bad['arm'])} have personal_accuracy outside [low, high]; the columns are mixed up "
            f"or edited by hand: regenerate the table with `{_REGENERATE}`"
        )
    return table


def _rows(table: pd.DataFrame, arm: str) -> pd.DataFrame:
    rows = table[table["arm"] == arm]
    if rows.empty:
        raise ConfigError(
            f"the headline table has no arm {arm!r} (arms: {sorted(table['arm'].unique())}); run it with "
            f"`{_REGENERATE} --arms {arm}` and append its row"
        )
    return rows


def strongest(table: pd.DataFrame, arm: str) -> pd.Series:
    """``arm``'s row with the highest personal accuracy, over the round counts it was run at.

    Used for the rival side of every check: picking the best round count on the test set favours the rival,
    so it is conservative for the method's claims (a claim that holds against it holds against every row).
    """
    rows = _rows(table, arm)
    return rows.loc[rows["personal_accuracy"].idxmax()]


def weakest(table: pd.DataFrame, arm: str) -> pd.Series:
    """``arm``'s row with the lowest personal accuracy: the claimed-better side of a check (see the module doc)."""
    rows = _rows(table, arm)
    return rows.loc[rows["personal_accuracy"].idxmin()]


def _ci(row: pd.Series) -> str:
    """``label acc [low, high]``, with the round count and the ledger's patient epsilon where they apply."""
    label = ARM_LABELS.get(row["arm"], row["arm"])
    text = f"{label} {row['personal_accuracy']:.3f} [{row['low']:.3f}, {row['high']:.3f}]"
    rounds, epochs = int(row["rounds"]), row.get("epochs", 1)
    epochs = 1 if pd.isna(epochs) else int(epochs)  # rows without the column, or with it blank: one epoch a round
    extras = [f"{rounds} round{'s' * (rounds != 1)}"] if rounds > 0 else []
    if rounds > 0 and epochs > 1:  # e.g. local training as one run of 20 epochs with one optimiser
        extras[0] += f" of {epochs} epochs"
    extras += [f"patient epsilon {row['patient_epsilon_max']:g}"] if row["patient_epsilon_max"] > 0 else []
    return text + (f" ({', '.join(extras)})" if extras else "")


@dataclass(frozen=True)
class _Check:
    name: str
    left: str
    right: str
    rule: str  # "apart", "releases", "point", "upper", "three-way"
    same_budget: bool = False  # the left arm's patient epsilon must not exceed the right arm's (both private)
    left_at_best: bool = False  # a baseline on the left (checks a, b): its strongest row, not its weakest


#: The checks in the order of issue 23's done-when list.
CHECKS: tuple[_Check, ...] = (
    _Check("(a) no DP: centralized above local-only", CENTRALIZED, LOCAL, "apart", left_at_best=True),
    _Check("(b) no DP: FedAvg above local-only", FEDAVG, LOCAL, "apart", left_at_best=True),
    _Check("(c) MM-PFL-ADP releases", METHOD, METHOD, "releases"),
    _Check("(d) MM-PFL-ADP at least local-only + DP-SGD", METHOD, LOCAL_DP, "point", same_budget=True),
    _Check("(e) MM-PFL-ADP above public-model-only", METHOD, PUBLIC_ONLY, "upper"),
    _Check("(f) MM-PFL-ADP above FedAvg + DP-SGD", METHOD, FEDAVG_DP, "upper", same_budget=True),
    _Check("(g) beyond its mechanism: vs FedSGD + secure-aggregation DP-SGD", METHOD, FEDSGD_SECAGG, "three-way"),
    _Check("(h) Fisher allocation vs uniform", METHOD, UNIFORM, "three-way"),
    _Check("(i) KL masks vs no masks", METHOD, NOMASK, "three-way"),
)
_RULES = {
    "apart": "intervals apart: left low > right high",
    "releases": "shared_d > 0 and patient epsilon > 0 (the ledger shows the cost)",
    "point": "left point >= right point",
    "upper": "left point > right upper bound",
    "three-way": "better iff left low > right high; worse iff left high < right low; else no measured difference",
}


def compare_intervals(left: pd.Series, right: pd.Series) -> int:
    """+1 where ``left``'s interval lies above ``right``'s (left low > right high), -1 where below (left high <
    right low), 0 where they overlap or touch: no measured difference. Each side has ``low`` and ``high``
    (a table row, or a record's dict)."""
    if left["low"] > right["high"]:
        return 1
    if left["high"] < right["low"]:
        return -1
    return 0


def _three_way(left: pd.Series, right: pd.Series) -> str:
    return {1: "better", -1: "worse", 0: "no measured difference"}[compare_intervals(left, right)]


def headline_verdicts(table: pd.DataFrame) -> pd.DataFrame:
    """One row per check of :data:`CHECKS`: ``name, left, right, rule, holds, verdict, margin, difference, left_arm,
    right_arm``.

    ``margin`` is the quantity the rule compares with 0 (``holds`` iff it is > 0, >= 0 for the point check):
    ``left.low - right.high`` for interval rules, ``left.acc - right.acc`` for the point rule, ``left.acc -
    right.high`` for the upper-bound rule, and the shared scalars ``shared_d`` for the release check. ``difference``
    is the point difference ``left.acc - right.acc`` (NaN for the release check). ``verdict`` spells the outcome
    ("holds" / "does not hold", or the three-way word).

    Raises:
        ConfigError: an arm of a check is missing from the table.
    """
    out = []
    for check in CHECKS:
        left = (strongest if check.left_at_best else weakest)(table, check.left)
        right = strongest(table, check.right)
        # a private rival at a smaller budget is not the rival of issue 23 (the same patient epsilon for all)
        fair = not check.same_budget or left["patient_epsilon_max"] <= right["patient_epsilon_max"]
        right_text = _ci(right)
        if check.rule == "apart":
            margin = left["low"] - right["high"]
            holds = bool(margin > 0)
        elif check.rule == "releases":
            margin = float(left["shared_d"])
            holds = bool(margin > 0 and left["patient_epsilon_max"] > 0)
            right_text = "nothing released (shared_d = 0)"
        elif check.rule == "point":
            margin = left["personal_accuracy"] - right["personal_accuracy"]
            holds = bool(margin >= 0 and fair)
        elif check.rule == "upper":
            margin = left["personal_accuracy"] - right["high"]
            holds = bool(margin > 0 and fair)
        else:
            margin = left["low"] - right["high"]
            verdict = _three_way(left, right)
            holds = verdict == "better"
        if check.rule != "three-way":
            verdict = "holds" if holds else "does not hold"
        left_text = _ci(left)
        if check.rule == "releases":
            left_text += (
                f" shares {left['shared_d']:,.0f} of its d = {int(left['d']):,} private scalars (mean over sites)"
            )
        out.append(
            {
                "name": check.name,
                "left": left_text,
                "right": right_text,
                "rule": _RULES[check.rule] + (", at no larger patient epsilon" if check.same_budget else ""),
                "holds": holds,
                "verdict": verdict,
                "margin": float(margin),
                "difference": (
                    float("nan")
                    if check.rule == "releases"
                    else float(left["personal_accuracy"] - right["personal_accuracy"])
                ),
                "left_arm": check.left,
                "right_arm": check.right,
            }
        )
    return pd.DataFrame(out)


def headline_text(verdicts: pd.DataFrame, table: pd.DataFrame | None = None) -> str:
    """A short markdown paragraph rendered from :func:`headline_verdicts` (every number from the table).

    With the ``table`` the verdicts came from, a mask verdict other than "better" is followed by its measured
    reason: how many of d scalars the KL masks kept personal beyond the always-personal head (``shared_d`` of the
    no-mask ablation minus the method's, a mean over sites and seeds)."""

    def row(letter: str) -> pd.Series:
        return verdicts[verdicts["name"].str.startswith(f"({letter})")].iloc[0]

    a, b, c, d, e, f = (row(x) for x in "abcdef")
    parts = [row(x) for x in "ghi"]
    pays = a["holds"] and b["holds"]
    lines = [
        f"**Without DP**, pooling {'pays' if pays else 'does not clearly pay'}: {a['left']} "
        f"{'lies above' if a['holds'] else '**does not lie above**'} {a['right']} with intervals apart, and "
        f"{b['left']} {'does too' if b['holds'] else '**does not**'}.",
        f"**With patients as the privacy unit** (each epsilon from the sites' DP-SGD ledgers), {c['left']}: "
        + ("it releases, and its ledger shows the cost. " if c["holds"] else "it releases **nothing**. ")
        + f"It is {'at least as good as' if d['holds'] else '**not at least as good as**'} {d['right']}, "
        f"by {d['margin']:+.3f} in the point; its point lies {'above' if e['holds'] else '**not above**'} the "
        f"upper bound of {e['right']} and {'above' if f['holds'] else '**not above**'} that of {f['right']}.",
    ]
    labels = {
        "g": "its additions (personal head, KL masks, Fisher allocation, noise gate) over FedSGD with the same "
        "secure-aggregation DP-SGD",
        "h": "the Fisher allocation over uniform",
        "i": "the KL masks over none",
    }
    said = []
    for letter, p in zip("ghi", parts, strict=True):
        said.append(
            f"{labels[letter]}: **{p['verdict']}** (against {p['right']}; point difference {p['difference']:+.3f})"
        )
    lines.append("**What the method adds beyond its mechanism**: " + "; ".join(said) + ".")
    idle = [labels[letter] for letter, p in zip("ghi", parts, strict=True) if p["verdict"] != "better"]
    if idle:
        lines.append(f"Not measured to help here: {'; '.join(idle)}.")
        if f["holds"] and len(idle) == len(parts):
            lines[-1] += (
                " The win over FedAvg + DP-SGD comes from where the noise is added: one DP-SGD step over the union "
                "of the hospitals' patients with secure aggregation, so one noise draw is divided by the expected "
                "patients of every hospital together (per-step noise-to-signal z sqrt(d) / (q N)) instead of each of "
                "K hospitals noising its own batch of B (z sqrt(d) / (B sqrt(K))): docs/DESIGN.md 4.5."
            )
    masks = parts[2]
    if table is not None and masks["verdict"] != "better" and {METHOD, NOMASK} <= set(table["arm"]):
        full, none = strongest(table, METHOD), strongest(table, NOMASK)
        extra = float(none["shared_d"]) - float(full["shared_d"])
        shared = f"(shared {float(full['shared_d']):,.0f} with masks, {float(none['shared_d']):,.0f} without)"
        if round(extra) == 0:  # e.g. every site kept only the head: the two runs differ only by their secret noise
            lines.append(
                f"Why the masks cannot matter here: beyond the head (personal in both runs) they kept nothing "
                f"personal at any site {shared}, so both runs share the same groups and differ only by their noise."
            )
        else:
            lines.append(
                f"Why the masks cannot matter much here: beyond the head (personal in both runs) they kept on "
                f"average {extra:,.0f} of d = {int(full['d']):,} scalars personal {shared}, so both runs share "
                "nearly the same groups."
            )
    return "\n\n".join(lines)
