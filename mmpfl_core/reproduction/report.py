"""The reproduction's written report and its privacy figure."""

from __future__ import annotations

from collections.abc import Mapping

import pandas as pd

from ..federated.simulation import RunResult
from ..tables import markdown_table
from .plan import ReproductionPlan


def plot_epsilon(runs: Mapping[str, RunResult]):
    """Epsilon (from each run's ledger, as recorded per round) against the round."""
    import matplotlib.pyplot as plt
    import seaborn as sns

    frame = pd.concat([pd.DataFrame(r.history).assign(method=label) for label, r in runs.items()], ignore_index=True)
    ax = plt.subplots(figsize=(6, 4))[1]
    sns.lineplot(data=frame, x="round", y="epsilon", hue="method", marker="o", ax=ax)
    ax.set(title="Privacy spent (accountant's epsilon) vs round")
    return ax


#: Said wherever personalised accuracy stands beside a client-level epsilon (docs/DESIGN.md 4.6).
_PERSONAL_NOTE = (
    "*epsilon (site)* covers what leaves the sites: the released global model. Personal parameters "
    "never leave their site, and a personalised model that is released or queried is NOT covered by "
    "that epsilon; only *epsilon (patient)* (DP-SGD inside the site) protects its patients. "
    "*epsilon (site)* holds against outsiders, who do not know which sites took part (amplification by "
    "sampling); *epsilon (site, insiders)* against the server and the participants, who do: the "
    "accountant at sampling rate 1, an upper bound (with server placement the trusted server itself "
    "sees the clipped updates and is not covered)."
)


#: What the released folder leaves out, and where it is (docs/DESIGN.md 6).
_PRIVATE_NOTE = (
    "Communication (`MB total`, `MB to target`, the communication claim and its figure: byte counts depend "
    "on the sites' private masks and on who took part) and per-site accuracies (`site_accuracy.png`) are in "
    "`private/`, for the operator only."
)


def not_private_lines(experiment) -> list[str]:
    """A warning naming the methods that ran with reproducible (regenerable) noise."""
    from ..privacy import NOT_PRIVATE_WARNING

    def noise_modes(kwargs) -> tuple:  # the client-level release's and the sites' DP-SGD's
        return kwargs.get("noise"), (kwargs.get("sample_level_dp") or {}).get("noise")

    labels = [m.label for m in experiment.methods if "reproducible-insecure" in noise_modes(m.kwargs)]
    if not labels:
        return []
    return [
        "",
        f"**Not private** ({', '.join(labels)}): noise='reproducible-insecure', {NOT_PRIVATE_WARNING}. "
        "Their epsilons describe the noise these runs drew, not a guarantee anyone can rely on.",
    ]


def report_markdown(
    plan: ReproductionPlan,
    main_alpha: float,
    main: pd.DataFrame,
    alpha_table: pd.DataFrame,
    sweep: pd.DataFrame | None,
    claims: pd.DataFrame,
    figures: list[str],
    membership: pd.DataFrame | None = None,
) -> str:
    """``REPORT.md``: settings, the main table, accuracy per alpha, the sweep, attacks, claims, figures."""
    c = plan.experiment
    f = c.federated
    deltas = sorted(
        {
            m.kwargs.get("delta", 1e-5)
            for m in c.methods
            if "target_epsilon" in m.kwargs or "noise_multiplier" in m.kwargs
        }
    )
    lines = [
        f"# Reproduction of MM-PFL-ADP: {c.name}",
        "",
        (
            f"Cohort file `{c.data.cohort}` (sites from its site column); model preset"
            if hasattr(c.data, "cohort")
            else f"Embedded synthetic MS cohort: {c.data.num_subjects} subjects, {c.data.image_size}x{c.data.image_size} px, "
            f"{c.federation.num_sites} sites; model preset"
        )
        + f" `{c.model.preset}`; {f.num_rounds} rounds, "
        f"{f.local.local_epochs} local epoch(s), client fraction {f.client_fraction} ({f.sampling}); seeds {list(plan.seeds)}.",
        f"Rounds to target: first round at which the {f.smoothing_window}-round moving average of validation accuracy "
        f"of the deployed models (personal where a method has them, else global) reaches {f.target_accuracy}. Epsilons come from the accountant"
        + (f" at delta = {deltas[0]:g}." if len(deltas) == 1 else "."),
        "Intervals: 95% bootstrap over test subjects (one seed) or Student-t across seeds (several).",
        "",
        f"## Main comparison (alpha = {main_alpha:g})",
        markdown_table(main),
        "",
        _PERSONAL_NOTE,
        *not_private_lines(c),
        "",
        "## Personalised accuracy vs heterogeneity (lower alpha: more skewed sites)",
        markdown_table(alpha_table),
        "",
    ]
    if sweep is not None:
        lines += [
            "## Client-level DP as the federation grows (fixed epsilon)",
            "With a handful of hospitals, client-level DP needs a noise multiplier near 6 (epsilon 8, 100 rounds), "
            "which swamps the update. Sampling from many more institutions (amplification by subsampling) and "
            "sharing fewer parameters move that point; the table shows where it becomes usable here.",
            markdown_table(sweep),
            "",
            _PERSONAL_NOTE,
            "",
        ]
    if membership is not None:
        shown = membership.drop(columns=["AUC", "balanced acc", "balanced acc low", "balanced acc high"])
        lines += [
            "## Membership inference (is this patient in the training data?)",
            f"Attacks on the released global model (all sites' patients) and on site "
            f"{plan.membership_inference.personal_site}'s deployed model (its personalised model where the method "
            "has one: outside the client-level guarantee, docs/DESIGN.md 4.6). Members: training subjects; non-members: "
            "held-out subjects of the same sites. 0.5 is chance; TPR at 1% / 0.1% FPR is what a confident attacker "
            "achieves (below 1 / non-members it cannot be resolved). Balanced accuracy uses a threshold fitted on "
            "the other half of the candidates. Intervals: 95% bootstrap over candidates.",
            markdown_table(shown),
            "",
        ]
    lines += [
        "## The paper's headline claims, side by side",
        markdown_table(claims),
        "",
        "Where a claim does not hold here, the cohort is synthetic and small and the rounds are few: read the "
        "tables above for the size of the difference, not only its sign.",
        "",
        "## Figures",
        *[f"![{name}]({name})" for name in figures],
        "",
        _PRIVATE_NOTE,
        "",
    ]
    return "\n".join(lines)
