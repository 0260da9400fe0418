"""Each notebook's closing takeaways, rendered from the numbers the notebook itself recorded.

What it is for: a notebook ends with ``display(Markdown(takeaways(stem, load_results(stem, OUTPUT_DIR))))``,
so every number in its takeaways is formatted from its own released record (``record_results``), never
typed; ``tests/test_notebooks.py`` renders the same text from the record the smoke run wrote and checks that
the executed notebook shows exactly it. One small pure function per notebook (``_nb00`` ... ``_nb08``) returns
Markdown: a ``### Takeaways`` heading, a few bullets and one ``Next:`` line that names what the next notebook
shows.

What it must never do: read the private record (``private/``: per-site metrics, masks, scores, byte counts,
timings). It is given the released record only, so what it prints is post-processing of values the notebook
already released beside itself (settings, pooled accuracies, epsilons from the accountant, public quantities);
no new quantity computed from a site's data reaches the reader through it.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Callable, Mapping
from itertools import pairwise
from typing import Any

from ..reproduction.headline import compare_intervals

__all__ = ["MissingResultError", "takeaways"]


class MissingResultError(KeyError):
    """A takeaway needs a key that the notebook's released record does not hold."""

    def __str__(self) -> str:  # KeyError would print the message in quotes
        return str(self.args[0])


class _Record:
    """Read-only view of one notebook's released record whose missing keys raise a message naming the fix."""

    def __init__(self, notebook: str, values: Mapping[str, Any]) -> None:
        self.notebook, self._values = notebook, values

    def __getitem__(self, key: str) -> Any:
        if key not in self._values:
            raise MissingResultError(
                f"takeaways for notebook {self.notebook}: its released record has no {key!r} (has: "
                f"{sorted(self._values)}). Add {key!r} to the notebook's record_results(...) call (released part, "
                "never private=) and run the notebook again."
            )
        return self._values[key]


def _f(value: Any, spec: str) -> str:
    """``format(value, spec)``; a non-finite value (recorded as None, JSON has no NaN) reads "undefined"."""
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "undefined"
    return format(value, spec)


#: The cohort's classes from mild to severe (mmpfl_core.data.CLASS_NAMES): the order a lesion load should rise in.
_SEVERITY = ("healthy", "rrms", "progressive_ms")


def _nb00(r: _Record) -> list[str]:
    load = r["mean_lesion_pixels_by_class"]
    order = [c for c in _SEVERITY if c in load] + sorted(c for c in load if c not in _SEVERITY)
    rises = all(load[a] < load[b] for a, b in pairwise(order))
    flair, t1 = r["flair_lesion_over_wm"], r["t1_lesion_over_wm"]
    t1_text = 'darker than white matter, a "black hole"' if t1 < 1 else "not darker than white matter"
    return [
        f"- Sequences are complementary: a lesion is {_f(flair, '.2f')} times as bright as white matter on FLAIR and "
        f"{_f(t1, '.2f')} times on T1 ({t1_text}). A model should use every sequence and cope when one is missing.",
        f"- Lesion load {'rises with disease' if rises else 'by class'}: mean lesion pixels "
        + ", ".join(f"{_f(load[c], '.0f')} ({c.replace('_', ' ')})" for c in order)
        + ".",
        f"- {r['num_sites']} hospitals share {_f(r['num_subjects_total'], ',')} subjects; their label divergence is "
        f"{_f(r['label_divergence'], '.3f')}, and alpha sets it: {_f(r['label_divergence_alpha_0.1'], '.3f')} at "
        f"alpha 0.1, {_f(r['label_divergence_alpha_100'], '.3f')} at alpha 100. Skew, scanners and size differ at "
        "once: where plain averaging struggles and personalisation helps (notebooks 02 and 05).",
        "- Next: `01_vit_multimodal_fusion` builds the Vision Transformer that fuses these sequences with the "
        "clinical variables, and checks it against a CNN.",
    ]


def _nb01(r: _Record) -> list[str]:
    acc, gain, spread = r["balanced_accuracy"], r["conv_stem_gain"], r["seed_spread"]
    seed = r["seeds"][0]
    stem = (
        f"The convolutional stem is what lets the ViT learn from these images ({_f(gain, '+.3f')} over linear "
        f"patches, seed {seed})"
        if gain is not None and spread is not None and gain > spread
        else f"At this budget the convolutional stem did not separate from linear patches ({_f(gain, '+.3f')}, seed "
        f"{seed}, against a seed spread of {_f(spread, '.3f')}): train longer (`NUM_ROUNDS`) to look for it"
    )
    fused = "lies above both" if r["fused_separated_from_both"] else "overlaps at least one of them"
    return [
        f"- {stem}; over seeds the ViT scores {_f(acc['ViT, images'], '.3f')} and the CNN "
        f"{_f(acc['CNN, images'], '.3f')} balanced accuracy (chance {_f(r['chance'], '.3f')}).",
        f"- Measure each trick over seeds: augmentation moved one run by {_f(r['augmentation_gain'], '+.3f')}, "
        f"against a seed-to-seed spread of {_f(spread, '.3f')}.",
        f"- Images and clinical data: fused {_f(acc['ViT, images + clinical'], '.3f')} against images "
        f"{_f(acc['ViT, images'], '.3f')} and clinical {_f(acc['clinical only'], '.3f')}; the fused interval {fused}.",
        f"- A masked sequence never changes the output; losing T2 moved the fused model from "
        f"{_f(r['balanced_accuracy_t2_present'], '.3f')} to {_f(r['balanced_accuracy_t2_missing'], '.3f')}.",
        "- Next: `02_federated_baselines` trains this model across hospitals that never share their data "
        "(centralized, local-only, FedAvg, FedProx).",
    ]


def _nb02(r: _Record) -> list[str]:
    glob, personal = r["global_accuracy"], r["personal_accuracy"]
    hand = "equals" if r["hand_fedavg_matches_kit"] else "does NOT equal"
    return [
        f"- After {r['num_rounds']} rounds on {r['num_sites']} hospitals FedAvg reaches {_f(glob['fedavg'], '.3f')} "
        f"global test accuracy (FedProx {_f(glob['fedprox'], '.3f')}) without moving a single image; pooling every "
        f"patient (centralized) reaches {_f(glob['centralized'], '.3f')}. The price is communication: the whole "
        "model, down and up, per site and round.",
        f"- Local-only training scores {_f(personal['local-only'], '.3f')} on the sites' own test splits and "
        f"{_f(glob['local-only'], '.3f')} on the population: report the global test next to personalised accuracy.",
        f"- The FedAvg round written by hand {hand} the kit's: a weighted mean of the sites' updates.",
        "- Next: `03_differential_privacy_and_accounting` asks what a model update reveals about a hospital's "
        "patients, and how clipping, noise and an accountant bound it.",
    ]


def _nb03(r: _Record) -> list[str]:
    eps = r["accountant_epsilon_z1_q0.1_T100"]
    by_accountant = ", ".join(f"{name.upper()} {_f(value, '.2f')}" for name, value in sorted(eps.items()))
    viable = "viable" if r["picture_ratio"] <= r["picture_viability"] else "drowned"
    hand = "equals" if r["hand_release_matches_kit"] else "does NOT equal"
    return [
        "- Clipping bounds each hospital's influence (the sensitivity), Gaussian noise scaled to it makes the "
        f"release private, and the accountant turns (z, q, T, delta) into epsilon: at z = 1, q = 0.1, T = 100 "
        f"{by_accountant}. The release written by hand {hand} the kit's.",
        "- Epsilon 8 over 100 rounds needs z = "
        f"{_f(r['z_eps8_100_rounds_all_clients'], '.2f')} when every hospital takes part, and "
        f"{_f(r['z_eps8_100_rounds_q0.1'], '.2f')} when each joins a round with probability 0.1 (amplification).",
        f"- Here the noise on a round's average is {_f(r['picture_ratio'], ',.0f')} times the largest signal, "
        f"against the viability line {_f(r['picture_viability'], '.1f')}: {viable}. DP-FedAvg spent epsilon "
        f"{_f(r['dp_epsilon'], '.2f')} and reached {_f(r['dp_fedavg_accuracy'], '.3f')}, FedAvg "
        f"{_f(r['fedavg_accuracy'], '.3f')}.",
        f'- The guarantee holds only while the noise and the sample stay secret (this run: `noise="{r["dp_noise"]}"`).',
        "- Next: `04_fisher_budget_allocation` spends the same epsilon unevenly across parameter groups, and shows "
        "when that split must step aside for uniform noise.",
    ]


def _nb04(r: _Record) -> list[str]:
    rounds, fallback = r["num_rounds"], r["default_fallback_rounds"]
    if fallback:
        default = (
            f"the default stepped aside for uniform noise in {fallback} of {rounds} rounds, so its run reached "
            f"{_f(r['accuracy_fisher'], '.3f')}"
            + (", the uniform run exactly" if r["global_state_equal_uniform_default"] else "")
        )
    else:
        default = (
            f"the default kept the bounded Fisher split in every round and reached {_f(r['accuracy_fisher'], '.3f')}"
        )
    return [
        f"- Group-wise clipping plus group-wise noise is still one Gaussian mechanism: z_eff = "
        f"{_f(r['z_eff_fisher'], '.4f')} (Fisher) and {_f(r['z_eff_uniform'], '.4f')} (uniform) for the calibrated "
        f"z = {_f(r['noise_multiplier'], '.4f')}, so a round costs rho = 1/(2 z^2) = {_f(r['total_rho_fisher'], '.4g')} "
        "either way.",
        f"- At the same epsilon ({_f(r['epsilon_fisher'], '.3g')} against {_f(r['epsilon_uniform'], '.3g')}, target "
        f"{_f(r['target_epsilon'], 'g')}) the Fisher split cuts the Fisher-weighted noise to "
        f"{_f(r['j_fisher_over_uniform'], '.2f')} of uniform's.",
        f"- It optimises a second-order proxy: {default}; uniform noise {_f(r['accuracy_uniform'], '.3f')}, the raw "
        f"split {_f(r['accuracy_fisher_raw'], '.3f')}, FedAvg without DP {_f(r['accuracy_fedavg'], '.3f')}.",
        "- The Fisher information must come from public data or released models, never from a site's data.",
        "- Next: `05_personalisation_masks` keeps some parameter groups at each hospital, never transmitted, and "
        "asks which groups are worth sharing under DP noise at all.",
    ]


def _nb05_headline(r: _Record) -> str:
    """Section 8: patients as the unit on the headline cohort, MM-PFL-ADP against local + DP-SGD."""
    acc, eps = r["headline_personal_accuracy"], r["headline_patient_epsilon"]
    ours, rival = acc[r["headline_proposed"]], acc[r["headline_rival"]]
    verdict = {
        1: "above it, intervals apart",
        -1: "below it, intervals apart",
        0: "the intervals overlap: this notebook-sized run does not separate them",
    }[compare_intervals(ours, rival)]
    ratio = r["headline_ratio"]
    return (
        f"- With patients as the unit on {r['headline_num_sites']} data-starved hospitals (public pretraining, "
        f"d = {_f(r['headline_d'], ',')}), MM-PFL-ADP shares {_f(r['headline_shared_d'], ',.0f')} of the d coordinates "
        f"on average at patient epsilon {_f(eps[r['headline_proposed']], '.3g')} of {_f(r['headline_target_epsilon'], 'g')} "
        f"(its ledger); its noise is {_f(ratio, '.3f')} times a clipped gradient a round "
        f"({'below' if ratio < r['headline_viability'] else 'above'} sqrt(T) / min_snr = "
        f"{_f(r['headline_viability'], '.2f')}). Personal accuracy {_f(ours['point'], '.3f')} "
        f"[{_f(ours['low'], '.3f')}, {_f(ours['high'], '.3f')}] against local + DP-SGD's {_f(rival['point'], '.3f')} "
        f"[{_f(rival['low'], '.3f')}, {_f(rival['high'], '.3f')}] at epsilon {_f(eps[r['headline_rival']], '.3g')}: "
        f"{verdict}."
    )


def _nb05(r: _Record) -> list[str]:
    personal, glob = r["personal_accuracy"], r["global_accuracy"]
    own = ", ".join(f"{m} {_f(personal[m], '.3f')}" for m in ("fedper", "ditto", "fedavg-ft", "fedavg-kl-masks"))
    drowned, groups = r["gate_drowned"], r["groups"]
    snr = [v for v in r["gate_snr"].values() if v is not None]
    best_snr = _f(max(snr), ".3f") if snr else "undefined"
    home = personal["fedavg-kl-masks"] > personal["fedavg"]
    population = glob["fedavg-kl-masks"] >= glob["fedavg"]
    verdict = {
        (True, False): "personalising pays at home, not for the population",
        (True, True): "personalising pays at home and costs the population nothing here",
        (False, False): "personalising did not pay here, at home or for the population",
        (False, True): "personalising did not pay at home here",
    }[home, population]
    return [
        f"- Under label skew alpha = {_f(r['alpha'], 'g')}, FedAvg's one model scores {_f(personal['fedavg'], '.3f')} "
        f"on the hospitals' own test splits; personalised: {own}. On the population the KL-masked model scores "
        f"{_f(glob['fedavg-kl-masks'], '.3f')} against FedAvg's {_f(glob['fedavg'], '.3f')}: {verdict}.",
        "- The KL score, written by hand above, measures what a site would lose by sharing a group; masks follow "
        "the scores round by round, with hysteresis, and are computed from private data: say who can see them "
        "(docs/DESIGN.md 4.4).",
        f"- Under client-level DP (epsilon {_f(r['target_epsilon'], 'g')}) MM-PFL-ADP without the noise gate spent "
        f"epsilon {_f(r['adp_epsilon']['server'], '.3g')} and reached {_f(r['ungated_personal_accuracy'], '.3f')}; the gate "
        f"kept {len(drowned)} of {len(groups)} groups at home (best-case snr {best_snr} against min_snr "
        f"{_f(r['gate_min_snr'], 'g')}), spent {_f(r['gate_epsilon'], '.3g')} and reached "
        f"{_f(r['gate_personal_accuracy'], '.3f')}. It decides from public quantities, at no privacy cost.",
        _nb05_headline(r),
        "- Next: `06_mm_pfl_adp_end_to_end` puts masks, Fisher allocation and DP together against every baseline, "
        "and checks the paper's claims.",
    ]


def _nb06(r: _Record) -> list[str]:
    acc, ours = r["personal_accuracy"], r["proposed_method"]
    if r["mm_pfl_adp_released_nothing"]:
        first = (
            f"- Here {ours} released nothing (epsilon {_f(r['mm_pfl_adp_epsilon'], '.3g')}): its noise gate kept every "
            f"group at home, so its personal accuracy {_f(acc[ours], '.3f')} is local training's "
            f"({_f(acc['local-only'], '.3f')}). Read the epsilon and the released bytes before any claim."
        )
    else:
        first = (
            f"- {ours} spent epsilon {_f(r['mm_pfl_adp_epsilon'], '.3g')} of {_f(r['target_epsilon'], 'g')} and reached "
            f"{_f(acc[ours], '.3f')} personal accuracy, {_f(r['mm_pfl_adp_minus_dp_fedavg'], '+.3f')} against "
            f"DP-FedAvg at the same budget; local-only {_f(acc['local-only'], '.3f')}."
        )
    verdicts = Counter(r["claims"].values())
    counted = ", ".join(f"{n} {verdict!r}" for verdict, n in sorted(verdicts.items()))
    eligible = ", ".join(r["regime_eligible_at_finite_epsilon"])
    sites = ", ".join(str(n) for n in r["regime_sites"])
    return [
        first,
        f"- The claims table gives {counted}: a claim met by a method that released nothing is vacuous, and says so.",
        f"- The live regime map ({sites} sites) ranks a row only where non-private collaboration beats local-only, "
        f"then picks at most one winner per cell among the methods that hold its guarantee ({eligible} at a finite "
        "epsilon): more participants per round, a small shared part, or patient-level DP make private training pay.",
        "- Next: `07_privacy_attacks` attacks the released and the deployed models; `07b_privacy_auditing` audits "
        "the mechanism.",
    ]


def _nb07(r: _Record) -> list[str]:
    auc, spent, band = r["mia_auc"], r["epsilon_spent"], r["chance_band"]
    best = {label: max(ci["point"] for ci in attacks.values()) for label, attacks in auc.items()}
    eps = min(r["epsilons"])
    private = [label for label in auc if label.endswith(f"eps={eps:g}")]

    def dp_text(label: str) -> str:
        charged = spent[label]
        if not charged:  # nothing charged: nothing released, the global model never changed
            return f"{label}: charged nothing (released nothing: its curve is flat by construction)"
        return f"{label}: best attack AUC {_f(best[label], '.3f')} at epsilon {_f(charged, '.3g')}"

    pooled = best.get("centralized")
    lead = (
        "Membership inference is real where models memorise"
        if pooled is not None and pooled - 0.5 > band
        else "Here even pooled training stayed within the random-guess band"
    )
    tpr = r["mia_tpr_at_1pct_fpr"].get("centralized", {})
    tpr_text = f" (TPR at 1 % FPR up to {_f(max(tpr.values()), '.3f')})" if tpr else ""
    personal = r["personal_auc"].get("local-only", {})
    local = _f(max(ci["point"] for ci in personal.values()), ".3f") if personal else "undefined"
    return [
        f"- {lead}: the best attack on pooled training scores AUC "
        f"{_f(best.get('centralized'), '.3f')}{tpr_text}, FedAvg {_f(best.get('fedavg'), '.3f')}, against the "
        f"random-guess band 0.5 +/- {_f(band, '.3f')} ({r['num_members']} members, {r['num_non_members']} non-members).",
        "- Under client-level DP at the smallest budget: " + "; ".join(dp_text(label) for label in private) + ". "
        "Read every attack row with its epsilon and whether anything was released.",
        f"- Deployed models are outside the client-level guarantee: the best attack on local-only's deployed models "
        f"scores AUC {local}. "
        "Patient-level DP covers them; noise added at the site stops a curious server's gradient inversion.",
        "- Next: `07b_privacy_auditing` tests the mechanism itself: noise subtraction, a one-run audit and "
        "distinguishing tests.",
    ]


def _nb07b(r: _Record) -> list[str]:
    audit = r["audit"]
    correct = audit["correct"]
    broken = {v: a for v, a in audit.items() if v != "correct"}
    caught = sorted(v for v, a in broken.items() if a["lower_bound"] > a["claimed"])
    missed = sorted(v for v, a in broken.items() if a["lower_bound"] <= a["claimed"])
    dist = r["distinguishing"]
    right = [d for k, d in dist.items() if k.endswith("/correct")]
    wrong = [d for k, d in dist.items() if not k.endswith("/correct")]
    return [
        "- The guarantee needs secret noise and sampling (the default); the reproducible mode is for teaching and "
        "audits, and the noise-subtraction attack shows why.",
        f"- The one-run audit ({r['audit_guesses']} guesses) bounds the correct release at "
        f"{_f(correct['lower_bound'], '.2f')} against the claim {_f(correct['claimed'], '.2f')}; it catches "
        f"{', '.join(caught) or 'no broken variant'}" + (f" and misses {', '.join(missed)}." if missed else "."),
        f"- The distinguishing tests (delta {_f(r['distinguishing_delta'], 'g')}) keep "
        f"{sum(d['lower_bound'] <= d['claimed'] for d in right)} of {len(right)} correct releases at or below "
        f"the claim and put {sum(d['lower_bound'] > d['claimed'] for d in wrong)} of {len(wrong)} broken ones above "
        "it: the audit CI relies on. Passing an audit is consistency, not a proof.",
        "- Next: `08_scale_out_with_flower` runs the same methods, MM-PFL-ADP included, on Flower and checks they "
        "give the same models and epsilons.",
    ]


def _nb08(r: _Record) -> list[str]:
    diff, eps_f, eps_i = r["max_abs_diff"], r["epsilon_flower"], r["epsilon_inprocess"]
    dp = [m for m in r["methods"] if eps_f.get(m) is not None]
    eps_text = "; ".join(
        f"{m}: epsilon {_f(eps_f[m], '.4f')} on both"
        if eps_f[m] == eps_i.get(m)
        else f"{m}: epsilon {_f(eps_f[m], '.4f')} vs {_f(eps_i.get(m), '.4f')}"
        for m in dp
    )
    if r["secagg_ran"]:
        secagg = (
            f"- Distributed noise with SecAgg+: the models differ by {_f(r['secagg_max_abs_diff'], '.1e')}, the "
            f"quantisation, against DP noise of std {_f(r['secagg_release_noise_std'], '.3f')} per coordinate; "
            "private only while SecAgg+'s range never clips."
        )
    else:
        secagg = "- Distributed noise needs secure aggregation (SecAgg+); it was not run here (`RUN_SECAGG`)."
    ran, completed = r["deployment_ran"], r["deployment_completed"]
    deploy = (
        ("the loopback deployment completed" if completed else "the loopback deployment did not complete")
        if ran
        else "the loopback deployment was skipped (`RUN_DEPLOYMENT`, SMOKE)"
    )
    return [
        f"- Flower and the in-process engine agree over {r['num_rounds']} rounds: max |diff| "
        + ", ".join(f"{_f(v, '.1e')} ({m})" for m, v in diff.items())
        + f" ({eps_text}); MM-PFL-ADP {_f(r['adp_max_abs_diff'], '.1e')}, epsilon "
        f"{_f(r['adp_epsilon_flower'], '.4f')} vs {_f(r['adp_epsilon_inprocess'], '.4f')}.",
        secagg,
        f"- Flower's own DP wrappers are not used: privacy stays with the kit's clipping, allocation and ledger; {deploy}.",
        "- Next: the whole comparison from the command line, `mmpfl reproduce --preset teaching` (notebook 06's plan "
        "at full size).",
    ]


_TAKEAWAYS: dict[str, Callable[[_Record], list[str]]] = {
    "00": _nb00,
    "01": _nb01,
    "02": _nb02,
    "03": _nb03,
    "04": _nb04,
    "05": _nb05,
    "06": _nb06,
    "07": _nb07,
    "07b": _nb07b,
    "08": _nb08,
}


def takeaways(notebook: str, record: Mapping[str, Any]) -> str:
    """The takeaways of one notebook as Markdown, every number formatted from ``record``.

    Args:
        notebook: the notebook's stem (``"02_federated_baselines"``) or its number (``"02"``, ``"07b"``).
        record: the notebook's RELEASED record, ``load_results(stem, OUTPUT_DIR)`` (never ``include_private``).

    Returns:
        ``"### Takeaways"`` followed by one bullet per line, the last one the ``Next:`` bridge.

    Raises:
        ValueError: no takeaways are defined for ``notebook``.
        MissingResultError: (a ``KeyError``) the record lacks a key a takeaway needs; the message names the key,
            the notebook and the fix.
    """
    number = notebook.split("_", 1)[0]
    render = _TAKEAWAYS.get(number)
    if render is None:
        raise ValueError(f"no takeaways for notebook {notebook!r}; known notebooks: {sorted(_TAKEAWAYS)}.")
    return "\n".join(["### Takeaways", *render(_Record(number, record))])
