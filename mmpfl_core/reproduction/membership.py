"""Membership inference as part of a comparison: which methods to attack, the shadows, the table, the paper's claim.

The orchestration of :mod:`mmpfl_core.attacks.targets` (the attack itself), which trains runs through the
experiment layer; it lives here so that ``attacks`` never imports the experiment layer above it.

Used by :mod:`mmpfl_core.reproduction` (the ``membership_inference`` section of
``configs/reproduce_*.yaml``) and by notebook 07. For each attacked method it attacks the released
global model (every site's candidates) and one site's deployed model (that site's candidates), with
the loss-threshold attack, plus the reference-calibrated attack and offline LiRA when shadows are
trained. The epsilon shown next to each row is the run's own ledger value (the accountant's), or
"none" for a method without client-level DP.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any
from collections.abc import Sequence

import pandas as pd

from ..attacks.targets import MembershipConfig, MembershipResult, run_membership_attacks
from ..data.federation import Federation
from ..errors import ConfigError
from ..experiment import ExperimentConfig, MethodSpec, make_federation, method_model_factory, run_method
from ..federated.simulation import RunResult

__all__ = ["MembershipPlan", "attack_method", "membership_claim", "membership_frame", "train_shadows"]

#: The paper's reported membership-inference success (balanced attack accuracy; random guessing is 0.5).
PAPER_MIA_SUCCESS = 0.521


@dataclass(frozen=True)
class MembershipPlan:
    """The ``membership_inference`` section of a reproduction config."""

    methods: tuple[str, ...] = ("fedavg", "dp-fedavg", "mm-pfl-adp")  # labels of the experiment's methods
    personal_site: int = 0  # the hospital whose deployed model the adversary queries
    num_shadows: int = 0  # 0: loss attack only (no extra training); >= 2: also LiRA (offline)
    num_resamples: int = 200

    def __post_init__(self) -> None:
        object.__setattr__(self, "methods", tuple(self.methods))
        if not self.methods:
            raise ConfigError("membership_inference.methods is empty; list method labels such as [fedavg, mm-pfl-adp].")
        MembershipConfig(num_shadows=self.num_shadows, num_resamples=self.num_resamples)  # same validation
        if self.personal_site < 0:
            raise ConfigError(f"membership_inference.personal_site={self.personal_site} must be a site index >= 0.")


def _epsilon(run: RunResult) -> float | str:
    eps = run.summary.get("final", {}).get("epsilon")
    return "none" if eps is None else float(eps)


def attack_method(
    run: RunResult,
    config: ExperimentConfig,
    method: MethodSpec,
    federation: Federation,
    *,
    plan: MembershipPlan,
    seed: int,
    shadow_dir: Path | None = None,
    progress: bool = False,
) -> dict[str, MembershipResult]:
    """Attack one finished run: ``{"global": ..., "personal": ...}`` (global only if the method has one)."""
    if plan.personal_site >= federation.num_sites:
        raise ConfigError(
            f"membership_inference.personal_site={plan.personal_site} but the federation has "
            f"{federation.num_sites} sites."
        )
    shadows: Sequence[RunResult] = ()
    if plan.num_shadows:
        shadows = train_shadows(config, method, num_shadows=plan.num_shadows, results_dir=shadow_dir, progress=progress)
    factory = method_model_factory(config, federation)  # with public pretraining: the public weights too
    targets = {"global": None, "personal": (plan.personal_site,)}
    if not run.strategy.has_global_model:
        targets.pop("global")
    return {
        target: run_membership_attacks(
            run,
            factory,
            federation,
            shadows=shadows,
            config=MembershipConfig(
                target=target, sites=sites, num_shadows=plan.num_shadows, num_resamples=plan.num_resamples, seed=seed
            ),
        )
        for target, sites in targets.items()
    }


def _ci(ci: Any) -> str:
    return f"{ci.point:.3f} [{ci.low:.3f}, {ci.high:.3f}]"


def membership_frame(
    results: dict[str, tuple[RunResult, dict[str, MembershipResult]]], *, personal_site: int
) -> pd.DataFrame:
    """One row per (method, target, attack): epsilon, AUC and balanced accuracy with CIs, TPR at low FPR."""
    rows = []
    for label, (run, by_target) in results.items():
        for target, result in by_target.items():
            for attack, m in result.metrics.items():
                rows.append(
                    {
                        "method": label,
                        "epsilon (site)": _epsilon(run),
                        "target": "global model" if target == "global" else f"site {personal_site} deployed model",
                        "attack": attack,
                        "AUC [95% CI]": _ci(m.auc),
                        "balanced acc [95% CI]": _ci(m.balanced_accuracy),
                        **{f"TPR@{level:.1%}FPR": ci.point for level, ci in m.tpr_at_fpr.items()},
                        "members / non-members": f"{m.num_members} / {m.num_non_members}",
                        "AUC": m.auc.point,
                        "balanced acc": m.balanced_accuracy.point,
                        "balanced acc low": m.balanced_accuracy.low,
                        "balanced acc high": m.balanced_accuracy.high,
                    }
                )
    return pd.DataFrame(rows)


def membership_claim(frame: pd.DataFrame, proposed: str) -> tuple[str, bool | None]:
    """The paper's claim (attack success 52.1%) against the strongest attack on ``proposed``'s global model.

    Verdict: holds unless the 95% CI of the balanced attack accuracy lies entirely above 0.521 (the
    attack is then clearly more successful than the paper reports). ``None`` when not measured.
    """
    rows = frame[(frame["method"] == proposed) & (frame["target"] == "global model")] if len(frame) else frame
    if not len(rows):
        return f"{proposed} was not attacked (add it to membership_inference.methods)", None
    best = rows.loc[rows["balanced acc"].idxmax()]
    eps = best["epsilon (site)"]
    eps = eps if str(eps) == "none" else f"{float(eps):.3g}"  # a CSV round trip turns the column into text
    text = (
        f"{proposed}, global model, {best['attack']}: balanced attack accuracy {best['balanced acc [95% CI]']}, "
        f"AUC {best['AUC [95% CI]']} at epsilon {eps}"
    )
    return text, bool(best["balanced acc low"] <= PAPER_MIA_SUCCESS)


def train_shadows(
    config: ExperimentConfig,
    method: MethodSpec,
    *,
    num_shadows: int,
    seed_offset: int = 1000,
    results_dir: Path | None = None,
    progress: bool = False,
) -> list[RunResult]:
    """Train ``num_shadows`` OUT shadow runs of ``method`` on fresh federations (module docstring).

    With ``results_dir`` each shadow keeps a run directory ``<results_dir>/shadow<s>/<label>`` and resumes.
    """
    runs = []
    for s in range(num_shadows):
        seed = config.federated.seed + seed_offset + s
        shadow = config.replace(data={"seed": seed}, federation={"seed": seed}, federated={"seed": seed})
        run_dir = None if results_dir is None else Path(results_dir) / f"shadow{s}"
        runs.append(run_method(shadow, method, make_federation(shadow), results_dir=run_dir, progress=progress))
    return runs
