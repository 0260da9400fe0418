"""Nothing private outside ``private/`` (issue 21, docs/DESIGN.md 6): one scan of everything a comparison, its report and a
notebook's records write, with a planted leak per kind to prove the scan can fail.

The comparison runs FedAvg, MM-PFL-ADP (client-level DP, noise gate on) and MM-PFL-ADP under patient-level DP
with masks that appear, at smoke size; the report is ``write_comparison_report``; the notebook record is
notebook 05's own recording cell, executed on these runs. Every notebook's recording cell is also checked
statically (what it releases, by name), and tests/test_notebooks.py scans the records each notebook wrote.
Scanner rules: tests/release_scan.py.
"""
from __future__ import annotations

import json
import shutil
import time
import warnings
from pathlib import Path
from types import SimpleNamespace

import nbformat
import pandas as pd
import pytest
from release_scan import (
    FigureProvenance,
    recording_findings,
    released_files,
    scan_notebook_records,
    scan_released,
)

from mmpfl_core.experiment import ExperimentConfig, make_federation
from mmpfl_core.notebook_tools import load_notebook_config, load_results, record_results
from mmpfl_core.reporting import write_comparison_report
from mmpfl_core.personalization.noise_gate import round_noise

NOTEBOOK_DIR = Path(__file__).resolve().parent.parent / "notebooks"
NOTEBOOKS = sorted(NOTEBOOK_DIR.glob("[0-9][0-9]*_*.ipynb"))
NOTEBOOK_05 = NOTEBOOK_DIR / "05_personalisation_masks.ipynb"
MASK = {"mode": "threshold", "threshold": 1e-4, "update_every": 1}
ADP = {"fisher_max_batches": 1, "fisher_batch_size": 8, "noise": "reproducible-insecure"}
CONFIG = {
    "name": "scan",
    "data": {"num_subjects": 160, "image_size": 32, "seed": 3},
    "federation": {"num_sites": 3, "alpha": 1.0, "public_size": 16, "seed": 3},
    "model": {"preset": "tiny", "overrides": {"embed_dim": 32, "depth": 1}},
    "federated": {"num_rounds": 2, "local": {"batch_size": 32}, "bootstrap_resamples": 20, "checkpoint_every": 2},
    "methods": [
        {"strategy": "fedavg"},
        {"strategy": "mm-pfl-adp", "target_epsilon": 8.0, "clip_norm": 0.5, "mask": MASK, **ADP},
        {"strategy": "mm-pfl-adp", "label": "mm-pfl-adp-patient-dp", "dp": False, "mask": MASK,
         "sample_level_dp": {"noise_multiplier": 1.0, "max_grad_norm": 1.0}, **ADP},
    ],
}


def _record_like_notebook_05(runs, federation, output_dir: Path) -> None:
    """Execute notebook 05's recording cell, its variables taken from this comparison's runs."""
    cell = next(c.source for c in nbformat.read(NOTEBOOK_05, as_version=4).cells
                if c.cell_type == "code" and 'record_results("05_personalisation_masks"' in c.source)
    patient, gated = runs["mm-pfl-adp-patient-dp"], runs["mm-pfl-adp"]
    masker = patient.strategy.masker
    sites = [s.site_id for s in federation.sites]
    bytes_up = pd.DataFrame({label: {row["round"]: row["bytes_up"] for row in run.history} for label, run in runs.items()})
    ratio = {label: float(bytes_up[label].sum() / bytes_up["fedavg"].sum()) for label in runs}
    namespace = {
        "record_results": record_results, "time": time, "started": time.perf_counter(), "OUTPUT_DIR": str(output_dir),
        "federation": federation, "NUM_ROUNDS": 2, "SKEW_ALPHA": 1.0, "TARGET_EPSILON": 8.0,
        "masker": masker, "sites": sites, "groups": list(masker.masks.groups),
        "last": {label: run.history[-1] for label, run in runs.items()},
        "site_keys": [f"site{s}_personal_test_accuracy" for s in sites],
        "bytes_up": bytes_up, "bytes_ratio": {**ratio, "fedavg-kl-masks": ratio["mm-pfl-adp-patient-dp"]},
        "mask_rounds": pd.DataFrame(patient.history).set_index("round"), "partition_ok": True,
        "mask_privacy": {label: run.summary.get("mask_privacy", "") for label, run in runs.items()},
        "adp_runs": {"server": gated}, "gated": gated, "gate": gated.summary["noise_gate"],
        "kl_check": {"group": "head", "by_hand": 0.0, "kit": 0.0},
        # the notebook's noise-to-signal picture of the gated run: public inputs only (configuration, accountant)
        "picture": round_noise(sites=federation.num_sites, sample_rate=gated.summary["privacy"]["sample_rate"],
                               epsilon=8.0, rounds=2, dimension=sum(gated.strategy.group_sizes.values()),
                               accountant="rdp"),
    }
    # section 8 (patients as the unit, the headline cohort): the same shapes, taken from this comparison's runs
    sizes = pd.Series(patient.strategy.group_sizes)
    shared_d = pd.Series({s: int(sizes[[g not in masker.personal_groups(s) for g in sizes.index]].sum()) for s in sites})
    summary = pd.DataFrame({
        label: {"personal acc": acc["point"], "95% low": acc["low"], "95% high": acc["high"],
                "epsilon (patients, max)": 8.0}
        for label, acc in ((lb, runs[lb].summary["personal_test"]["accuracy"]) for lb in ("fedavg", "mm-pfl-adp-patient-dp"))
    }).T
    namespace.update({
        "headline_federation": federation, "headline_summary": summary,
        "headline_config": load_notebook_config().headline,
        "arm": {"mm-pfl-adp-cross-silo": "mm-pfl-adp-patient-dp", "local-dp-sgd": "fedavg"},
        "d_private": int(sizes.sum()), "shared_d": shared_d, "z_h": 1.0, "qn_h": 8.0, "ratio_h": 1.0,
        "viability_h": 1.0, "adp": SimpleNamespace(personal_groups_of=masker.personal_groups), "hospitals": sites,
    })
    exec(compile(cell, "notebook 05, recording cell", "exec"), namespace)


@pytest.fixture(scope="module")
def released(tmp_path_factory):
    out = tmp_path_factory.mktemp("scan")
    config = ExperimentConfig.from_dict(CONFIG)
    federation = make_federation(config)
    with pytest.MonkeyPatch.context() as mp, warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # reproducible-insecure noise warns (on purpose)
        provenance = FigureProvenance().install(mp, federation)
        report = write_comparison_report(config, out / "report", progress=False)
    _record_like_notebook_05(report.runs, federation, out / "notebooks")
    groups = list(report.runs["mm-pfl-adp-patient-dp"].strategy.masker.masks.groups)
    return out, federation, provenance.by_path, groups, report


def test_nothing_private_is_written_outside_private(released):
    out, federation, provenance, groups, report = released
    # The private material exists (else the scan proves nothing) and sits under private/.
    assert any(report.runs["mm-pfl-adp-patient-dp"].summary["masks"].values()), "no masks appeared: lower the threshold"
    for path in ("report/private/site_accuracy.png", "report/private/communication.csv",
                 "report/private/cohort_summary.csv", "report/private/communication_vs_accuracy.png",
                 "notebooks/private/05_personalisation_masks.json"):
        assert (out / path).is_file(), path
    files = {p.relative_to(out).as_posix() for p in released_files(out)}
    assert {"report/REPORT.md", "report/comparison.csv", "report/cohort_preview.png", "report/accuracy_vs_round.png",
            "notebooks/05_personalisation_masks.json", "report/fedavg/summary.json",
            "report/mm-pfl-adp-patient-dp/metrics.csv"} <= files
    assert scan_released(out, groups=groups, federation=federation, provenance=provenance) == []
    # Readers still get everything: the notebook tests read the merged record, the report points at private/.
    merged = load_results("05_personalisation_masks", out / "notebooks", include_private=True)
    assert {"kl_scores", "final_masks", "site_accuracy", "bytes_up_per_round"} <= set(merged)
    assert "private/" in (out / "report" / "REPORT.md").read_text()


@pytest.mark.parametrize("plant", ["per-site column", "mask", "kl scores in a record", "byte count", "test patient",
                                   "figure of site patients", "unknown figure"])
def test_the_scan_flags_each_planted_leak(released, plant, tmp_path):
    out, federation, provenance, groups, _ = released
    copy = tmp_path / "copy"
    shutil.copytree(out, copy)
    provenance = {p.replace(str(out.resolve()), str(copy.resolve()), 1): k for p, k in provenance.items()}
    report = copy / "report"
    if plant == "per-site column":
        table = pd.read_csv(report / "comparison.csv").assign(site0_personal_test_accuracy=0.5)
        table.to_csv(report / "comparison.csv", index=False)
    elif plant == "mask":
        summary = json.loads((report / "mm-pfl-adp" / "summary.json").read_text())
        (report / "mm-pfl-adp" / "summary.json").write_text(json.dumps({**summary, "masks": {"0": [groups[-1]]}}))
    elif plant == "kl scores in a record":
        record_results("planted", {"kl_scores": {g: 0.1 for g in groups}}, copy / "notebooks")
    elif plant == "byte count":
        pd.read_csv(report / "private" / "communication.csv").to_csv(report / "communication.csv", index=False)
    elif plant == "test patient":
        test_id = str(federation.sites[1].test.subject_ids[0])
        (report / "REPORT.md").write_text((report / "REPORT.md").read_text() + f"\nExample scan: {test_id}\n")
    elif plant == "figure of site patients":
        provenance_spy = FigureProvenance()
        with pytest.MonkeyPatch.context() as mp:
            provenance_spy.install(mp, federation)
            import mmpfl_core.plots.cohort as cohort_plots
            cohort_plots.plot_cohort_preview(federation.global_test, report / "cohort_preview.png")
        provenance.update(provenance_spy.by_path)
    else:
        shutil.copy(report / "private" / "site_accuracy.png", report / "per_site.png")
    findings = scan_released(copy, groups=groups, federation=federation, provenance=provenance)
    assert findings, plant


def _recording_cells(path: Path) -> list[str]:
    return [c.source for c in nbformat.read(path, as_version=4).cells
            if c.cell_type == "code" and "record_results(" in c.source]


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_every_notebook_releases_nothing_private_in_its_record(path):
    """Per-site figures, masks, KL scores, byte counts, participant counts and timings go to ``private=``."""
    cells = _recording_cells(path)
    assert cells, f"{path.name}: no recording cell found"
    for source in cells:
        assert recording_findings(source, path.stem) == []


STATIC_PLANTS = {
    "per-site figure released": ('}, OUTPUT_DIR, private={', '    "site_accuracy": {},\n}, OUTPUT_DIR, private={'),
    "byte count released": ('}, OUTPUT_DIR, private={', '    "fedavg_total_bytes": 1,\n}, OUTPUT_DIR, private={'),
    "timing released": ('}, OUTPUT_DIR, private={', '    "wall_seconds": 1.0,\n}, OUTPUT_DIR, private={'),
    "a released value reads a site's figure": ('}, OUTPUT_DIR, private={',
                                               '    "best": last["site0_personal_test_accuracy"],\n}, OUTPUT_DIR, private={'),
    "released values not a dict literal": ('record_results("02_federated_baselines", {',
                                           'record_results("02_federated_baselines", values := {'),
}


@pytest.mark.parametrize("plant", sorted(STATIC_PLANTS))
def test_the_static_check_flags_each_planted_leak(plant):
    (source,) = _recording_cells(NOTEBOOK_DIR / "02_federated_baselines.ipynb")
    old, new = STATIC_PLANTS[plant]
    assert old in source
    assert recording_findings(source.replace(old, new, 1), "02") != [], plant


GROUPS = ["patch_embed.t1", "tokens", "clinical", "block.0", "block.1", "norm", "head"]
IDS = ["syn-000007", "syn-000042"]
RECORD_PLANTS = {
    "worst site of a sweep": {"alpha_sweep": {"fedavg_alpha_0.1": {"global test": 0.4, "worst site": 0.1}}},
    "site-keyed map": {"personal_accuracy": {"0": 0.5, "1": 0.7}},
    "mask": {"kept_home": ["block.1", "head"]},
    "subject id": {"example": "syn-000042"},
    "timing": {"seconds": 3.0},
}


@pytest.mark.parametrize("plant", sorted(RECORD_PLANTS) + ["figure"])
def test_the_records_scan_flags_each_planted_leak(plant, tmp_path):
    clean = {"num_sites": 5, "personal_accuracy": {"fedavg": 0.5}, "groups": GROUPS, "gate_drowned": ["head"]}
    record_results("clean", clean, tmp_path, private={"seconds": 1.0, "final_masks": {"0": ["head"]}})
    assert scan_notebook_records(tmp_path, groups=GROUPS, subject_ids=IDS) == []
    if plant == "figure":
        (tmp_path / "site_accuracy.png").write_bytes(b"\x89PNG")
    else:
        record_results("planted", {"num_sites": 5, **RECORD_PLANTS[plant]}, tmp_path)
    assert scan_notebook_records(tmp_path, groups=GROUPS, subject_ids=IDS) != [], plant
