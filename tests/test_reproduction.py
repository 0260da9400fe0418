"""The reproduction command runs end to end on the smoke preset and reports every method honestly."""
from __future__ import annotations

import json

import pandas as pd
import pytest
import yaml

from mmpfl_core.cli import main
from mmpfl_core.errors import ConfigError
from mmpfl_core.reproduction import PAPER_CLAIMS, load_reproduction
from mmpfl_core.reproduction.claims import VACUOUS


_PROVENANCE: dict[str, str] = {}


@pytest.fixture(scope="module")
def smoke_report(tmp_path_factory):
    from release_scan import FigureProvenance

    from mmpfl_core.experiment import make_federation
    out = tmp_path_factory.mktemp("reproduce")
    with pytest.MonkeyPatch.context() as mp:  # records what each figure is drawn from (tests/release_scan.py)
        spy = FigureProvenance().install(mp, make_federation(load_reproduction("smoke").experiment))
        assert main(["reproduce", "--preset", "smoke", "--out", str(out), "--no-progress"]) == 0
    _PROVENANCE.update(spy.by_path)
    return out


def test_nothing_private_is_released_by_the_reproduction(smoke_report):
    """Per-site figures, byte counts and the communication claim's figures are under private/ only (issue 21)."""
    from release_scan import scan_released

    from mmpfl_core.experiment import make_federation
    from mmpfl_core.models.presets import create_model
    federation = make_federation(load_reproduction("smoke").experiment)
    groups = list(create_model("tiny", embed_dim=32, depth=1, image_size=32).parameter_groups())
    assert scan_released(smoke_report, groups=groups, federation=federation, provenance=_PROVENANCE) == []
    for name in ("communication.csv", "claims.csv", "site_accuracy.png", "communication_vs_accuracy.png"):
        assert (smoke_report / "private" / name).is_file(), name
    # mm-pfl-adp-patient-dp holds its claim: its masks were scored on the public set, not on validation patients.
    summaries = sorted(smoke_report.glob("runs/alpha*/mm-pfl-adp-patient-dp/summary.json"))
    assert summaries
    for summary in summaries:
        assert "public set" in json.loads(summary.read_text())["mask_privacy"]


def test_report_has_every_method_alpha_and_claim(smoke_report):
    plan = load_reproduction("smoke")
    text = (smoke_report / "REPORT.md").read_text()
    for heading in ("## Main comparison", "## Personalised accuracy vs heterogeneity",
                    "## Client-level DP as the federation grows", "## The paper's headline claims"):
        assert heading in text
    main_table = pd.read_csv(smoke_report / "main.csv")
    assert list(main_table["method"]) == [m.label for m in plan.experiment.methods]
    alpha = pd.read_csv(smoke_report / "alpha.csv")
    assert [c for c in alpha.columns if c.startswith("alpha=")] == [f"alpha={a:g}" for a in plan.alphas]
    claims = pd.read_csv(smoke_report / "claims.csv")
    assert list(claims["claim"]) == list(PAPER_CLAIMS.values())
    assert set(claims["verdict"]) <= {"agrees", "does not hold here", "not measured", "not released", VACUOUS}
    # The communication claim is decided from byte counts (private): its verdict is in private/claims.csv only.
    assert claims.set_index("claim").loc[PAPER_CLAIMS["communication"], "verdict"] == "not released"
    private_claims = pd.read_csv(smoke_report / "private" / "claims.csv").set_index("claim")
    assert private_claims.loc[PAPER_CLAIMS["communication"], "verdict"] in {"agrees", "does not hold here", VACUOUS}
    # The verdicts follow from the tables, recomputed here from main.csv and alpha.csv: "vacuous" wherever the
    # proposed method's accountant charged nothing (it released nothing), else agrees / does not hold here.
    row = main_table.set_index("method")
    ours, ref = plan.proposed_method, plan.reference_method
    verdict = dict(zip(claims["claim"], claims["verdict"], strict=True))
    idle = float(row.loc[ours, "epsilon (site)"]) == 0.0

    def said(ok):
        return VACUOUS if idle else "agrees" if ok else "does not hold here"
    extreme = alpha.set_index("method")[f"alpha={min(plan.alphas):g}"].astype(float)
    assert verdict[PAPER_CLAIMS["heterogeneity"]] == said(extreme[ours] > extreme[ref])
    r_ours, r_ref = str(row.loc[ours, "rounds to target"]), str(row.loc[ref, "rounds to target"])
    expected_rounds = ("not measured" if r_ours == r_ref == "never" else said(r_ref == "never") if "never" in (r_ours, r_ref)
                       else said(float(r_ours) < float(r_ref)))
    assert verdict[PAPER_CLAIMS["rounds_to_converge"]] == expected_rounds
    sweep = pd.read_csv(smoke_report / "sweep.csv")
    assert len(sweep) == len(plan.site_sweep.num_sites) * len(plan.site_sweep.methods)


def test_privacy_columns_come_from_the_accountant_and_respect_the_budget(smoke_report):
    main_table = pd.read_csv(smoke_report / "main.csv").set_index("method")
    for label in ("dp-fedavg", "mm-pfl-adp-no-masks"):
        assert 0 < float(main_table.loc[label, "epsilon (site)"]) <= 8.0
    # MM-PFL-ADP's noise gate may keep every group at home (few sites): nothing released, nothing charged.
    for label in ("mm-pfl-adp", "mm-pfl-adp-no-fisher"):
        assert 0 <= float(main_table.loc[label, "epsilon (site)"]) <= 8.0
    assert main_table.loc["fedavg", "epsilon (site)"] == "none"
    assert main_table.loc["mm-pfl-adp-no-dp", "epsilon (site)"] == "inf"
    assert 0 < float(main_table.loc["mm-pfl-adp-patient-dp", "epsilon (patient)"]) <= 8.0
    # Masks keep groups at home: less traffic than the same method without them (byte counts: operator only).
    assert "MB total" not in main_table.columns
    traffic = pd.read_csv(smoke_report / "private" / "communication.csv").set_index("method")
    assert traffic.loc["mm-pfl-adp", "MB total"] < traffic.loc["mm-pfl-adp-no-masks", "MB total"]


def test_membership_inference_is_measured_for_the_planned_methods(smoke_report):
    plan = load_reproduction("smoke")
    mia = pd.read_csv(smoke_report / "membership.csv")
    assert set(mia["method"]) == set(plan.membership_inference.methods)
    site = plan.membership_inference.personal_site
    assert set(mia["target"]) == {"global model", f"site {site} deployed model"}
    assert mia["AUC"].between(0, 1).all() and mia["balanced acc"].between(0, 1).all()
    assert (mia["balanced acc low"] <= mia["balanced acc"]).all() and (mia["balanced acc"] <= mia["balanced acc high"]).all()
    # Epsilons are the runs' own ledger values: none for FedAvg, within the budget for the private methods.
    eps = mia.drop_duplicates("method").set_index("method")["epsilon (site)"]
    assert eps["fedavg"] == "none" and 0 <= float(eps["mm-pfl-adp"]) <= 8.0  # 0: the noise gate released nothing
    claims = pd.read_csv(smoke_report / "claims.csv").set_index("claim")
    row = claims.loc[PAPER_CLAIMS["membership_inference"]]
    assert row["verdict"] in {"agrees", "does not hold here", VACUOUS} and "balanced attack accuracy" in row["ours"]
    assert "## Membership inference" in (smoke_report / "REPORT.md").read_text()


def test_rerun_resumes_finished_runs(smoke_report):
    before = pd.read_csv(smoke_report / "main.csv")
    assert main(["reproduce", "--preset", "smoke", "--out", str(smoke_report), "--no-progress"]) == 0
    pd.testing.assert_frame_equal(before, pd.read_csv(smoke_report / "main.csv"))


def test_bad_reproduction_configs_are_named(tmp_path):
    values = yaml.safe_load(open(load_reproduction.__globals__["CONFIG_DIR"] / "reproduce_smoke.yaml"))
    values["reproduction"]["site_sweep"]["methods"] = ["no-such-method"]
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(values))
    with pytest.raises(ConfigError, match="site_sweep.methods"):
        load_reproduction(path)
    values = yaml.safe_load(open(load_reproduction.__globals__["CONFIG_DIR"] / "reproduce_smoke.yaml"))
    values["reproduction"]["membership_inference"]["methods"] = ["ditto-typo"]
    path.write_text(yaml.safe_dump(values))
    with pytest.raises(ConfigError, match="membership_inference.methods"):
        load_reproduction(path)
    values["reproduction"]["membership_inference"] = {"num_shadow": 2}
    path.write_text(yaml.safe_dump(values))
    with pytest.raises(ConfigError, match="unknown membership_inference key"):
        load_reproduction(path)
    with pytest.raises(ConfigError, match="presets"):
        load_reproduction("no-such-preset")


def test_claims_are_vacuous_when_the_proposed_method_released_nothing():
    """A claim that would "agree" only because MM-PFL-ADP's noise gate kept the whole model at home is "vacuous:
    released nothing", with local-only's figure beside it; a run that released (epsilon > 0, bytes moved) gets the
    usual verdict and no note. Decided from the accountant's epsilon where the table has it, else from the bytes."""
    from types import SimpleNamespace

    from mmpfl_core.reproduction.claims import claims_table
    plan = SimpleNamespace(reference_method="fedavg", proposed_method="mm-pfl-adp", alphas=[0.1, 0.5])
    alpha = pd.DataFrame({"method": ["local-only", "fedavg", "mm-pfl-adp"], "alpha=0.1": [0.832, 0.700, 0.832],
                          "alpha=0.5": [0.696, 0.632, 0.696]})
    membership = pd.DataFrame({"method": ["mm-pfl-adp"], "target": ["global model"], "attack": ["loss threshold"],
                               "balanced acc": [0.49], "balanced acc low": [0.46],
                               "balanced acc [95% CI]": ["0.490 [0.460, 0.520]"], "AUC [95% CI]": ["0.5 [0.45, 0.55]"],
                               "epsilon (site)": [0.0]})
    cases = [  # (MB total, epsilon (site) column or None, released nothing)
        (0.0, None, True), (17.4, None, False), (0.0, [0.0, "none", 0.0], True), (17.4, [0.0, "none", 3.2], False)]
    for mb, eps, idle in cases:
        main_table = pd.DataFrame({"method": ["local-only", "fedavg", "mm-pfl-adp"], "rounds to target": [6, 8, 6],
                                   "MB total": [0.0, 91.5, mb]})
        if eps is not None:
            main_table["epsilon (site)"] = eps
        claims = claims_table(plan, main_table, alpha, membership.assign(**{"epsilon (site)": [eps[2] if eps else 0.0]}))
        expected = VACUOUS if idle else "agrees"
        assert list(claims["verdict"]) == [expected] * 4, (mb, eps)
        assert all(("released nothing" in text) == idle for text in claims["ours"]), (mb, eps)
        if idle:
            assert "local-only: 6 rounds" in claims["ours"][0] and "local-only: 0.832" in claims["ours"][2]
    # Nothing to decide stays "not measured", released or not.
    main_table = pd.DataFrame({"method": ["local-only", "fedavg", "mm-pfl-adp"], "rounds to target": ["never"] * 3,
                               "MB total": [0.0, 91.5, 0.0], "epsilon (site)": [0.0, "none", 0.0]})
    assert claims_table(plan, main_table, alpha, None)["verdict"][0] == "not measured"
    # A release that does not meet a claim still says so.
    alpha_worse = alpha.assign(**{"alpha=0.1": [0.832, 0.700, 0.650]})
    main_table["epsilon (site)"] = [0.0, "none", 3.2]
    main_table["MB total"] = [0.0, 91.5, 17.4]
    assert claims_table(plan, main_table, alpha_worse, None)["verdict"][2] == "does not hold here"
