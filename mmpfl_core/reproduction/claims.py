"""The paper's headline claims and the verdicts our numbers give on them."""

from __future__ import annotations

import pandas as pd

from .membership import membership_claim
from .plan import ReproductionPlan

#: The paper's headline claims (Scientific Reports, 2026), quoted for the side-by-side.
PAPER_CLAIMS = {
    "rounds_to_converge": "MM-PFL-ADP converges in 47 rounds vs 85 for FedAvg",
    "communication": "MM-PFL-ADP needs less communication than FedAvg",
    "heterogeneity": "MM-PFL-ADP keeps its accuracy under extreme non-IID data",
    "membership_inference": "membership-inference success 52.1% (random: 50%)",
}


def claims_table(
    plan: ReproductionPlan, main: pd.DataFrame, alpha_table: pd.DataFrame, membership: pd.DataFrame | None
) -> pd.DataFrame:
    """The paper's headline claims beside ours, each with a verdict computed from the tables: "agrees", "does not
    hold here", "not measured" when the runs cannot decide it, or :data:`VACUOUS` when the proposed method released
    nothing (see :func:`released_nothing`): a claim it "meets" by training each site alone says nothing about it."""
    ref, ours = plan.reference_method, plan.proposed_method
    row = main.set_index("method")
    extreme = min(plan.alphas)

    idle = released_nothing(row.loc[ours])

    def verdict(ok: bool | None) -> str:
        if ok is None:
            return "not measured"
        if idle:
            return VACUOUS
        return "agrees" if ok else "does not hold here"

    r_ref, r_ours = row.loc[ref, "rounds to target"], row.loc[ours, "rounds to target"]
    if r_ref == "never" and r_ours == "never":
        rounds_ok = None  # neither reached the target: nothing to compare
    elif "never" in (r_ref, r_ours):
        rounds_ok = r_ref == "never"  # only one reached it: that one converged faster
    else:
        rounds_ok = bool(r_ours < r_ref)
    mb_ref, mb_ours = row.loc[ref, "MB total"], row.loc[ours, "MB total"]
    acc = alpha_table.set_index("method")
    acc_ref, acc_ours = acc.loc[ref, f"alpha={extreme:g}"], acc.loc[ours, f"alpha={extreme:g}"]
    # When the proposed method released nothing (its noise gate kept every group at home), a claim can "agree" only
    # because it trained each site alone: say so beside the number, with local-only's figure where it ran.
    local = "local-only" if "local-only" in row.index else None

    def caveat(local_figure: str) -> str:
        if not idle:
            return ""
        return (
            f" ({ours} released nothing: its noise gate kept every group at every site, so it trained each site "
            f"alone" + (f"; local-only: {local_figure}" if local else "") + ")"
        )

    membership_row = _membership_verdict(membership, ours, verdict)
    if idle and membership is not None:
        membership_row["ours"] += f" ({ours} released nothing: its global model was never updated)"
    return pd.DataFrame(
        [
            {
                "claim": PAPER_CLAIMS["rounds_to_converge"],
                "ours": f"{ours}: {r_ours}, {ref}: {r_ref} rounds to target"
                + caveat(f"{row.loc[local, 'rounds to target'] if local else ''} rounds"),
                "verdict": verdict(rounds_ok),
            },
            {
                "claim": PAPER_CLAIMS["communication"],
                "ours": f"{ours}: {mb_ours:.2f} MB, {ref}: {mb_ref:.2f} MB in total" + caveat("0 MB"),
                "verdict": verdict(bool(mb_ours < mb_ref)),
            },
            {
                "claim": PAPER_CLAIMS["heterogeneity"],
                "ours": f"personal accuracy at alpha={extreme:g}: {ours} {acc_ours:.3f}, {ref} {acc_ref:.3f}"
                + caveat(f"{acc.loc[local, f'alpha={extreme:g}']:.3f}" if local else ""),
                "verdict": verdict(bool(acc_ours > acc_ref)),
            },
            {"claim": PAPER_CLAIMS["membership_inference"], **membership_row},
        ]
    )


#: The verdict of a claim on a proposed method that released nothing: whatever it "agrees" with, it did as local
#: training, so the claim about the method is not tested (such rows would otherwise read "agrees").
VACUOUS = "vacuous: released nothing"


def released_nothing(row: pd.Series) -> bool:
    """Whether a main-table row describes a run that released nothing: epsilon (site) 0 from the accountant (no
    round charged) or 0 MB moved. Read from the released epsilon where the table has it, so the verdict can be
    released; the byte count (private) is the fallback of tables without an epsilon column."""
    eps = row.get("epsilon (site)")
    if eps is not None and str(eps) not in ("none", "inf", "nan"):
        return float(eps) == 0.0  # a finite epsilon decides: every release is charged (the ledger is written first)
    return "MB total" in row.index and float(row["MB total"]) == 0.0


#: The verdict of a claim decided from private quantities, in the released claims table.
NOT_RELEASED = "not released"


def release_claims(claims: pd.DataFrame) -> pd.DataFrame:
    """The released claims table: the communication claim is decided from byte counts, which depend on the sites'
    private masks and on who took part, so its figures and verdict stay in ``private/claims.csv``."""
    out = claims.copy()
    row = out["claim"] == PAPER_CLAIMS["communication"]
    out.loc[row, "ours"] = (
        "decided from byte counts, which depend on the sites' private masks: see "
        "private/claims.csv and private/communication.csv (operator only)"
    )
    out.loc[row, "verdict"] = NOT_RELEASED
    return out


def _membership_verdict(membership: pd.DataFrame | None, proposed: str, verdict) -> dict[str, str]:
    if membership is None:
        return {
            "ours": "membership inference was not run (add a membership_inference section)",
            "verdict": verdict(None),
        }
    text, ok = membership_claim(membership, proposed)
    return {"ours": text, "verdict": verdict(ok)}
