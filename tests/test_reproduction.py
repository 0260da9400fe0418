"""The reproduction command runs end to end on the smoke preset and reports every method honestly."""
from __future__ import annotations

import pandas as pd
import pytest
import yaml

from mmpfl_core.cli import main
from mmpfl_core.errors import ConfigError
from mmpfl_core.reproduction import PAPER_CLAIMS, load_reproduction


@pytest.fixture(scope="module")
def smoke_report(tmp_path_factory):
    out = tmp_path_factory.mktemp("reproduce")
    assert main(["reproduce", "--preset", "smoke", "--out", str(out), "--no-progress"]) == 0
    return out


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
    assert set(claims["verdict"]) <= {"agrees", "does not hold here", "not measured"}
    sweep = pd.read_csv(smoke_report / "sweep.csv")
    assert len(sweep) == len(plan.site_sweep.num_sites) * len(plan.site_sweep.methods)


def test_privacy_columns_come_from_the_accountant_and_respect_the_budget(smoke_report):
    main_table = pd.read_csv(smoke_report / "main.csv").set_index("method")
    for label in ("dp-fedavg", "mm-pfl-adp", "mm-pfl-adp-no-fisher", "mm-pfl-adp-no-masks"):
        assert 0 < float(main_table.loc[label, "epsilon (site)"]) <= 8.0
    assert main_table.loc["fedavg", "epsilon (site)"] == "none"
    assert main_table.loc["mm-pfl-adp-no-dp", "epsilon (site)"] == "inf"
    assert 0 < float(main_table.loc["mm-pfl-adp-patient-dp", "epsilon (patient)"]) <= 8.0
    # Masks keep groups at home: less traffic than the same method without them.
    assert main_table.loc["mm-pfl-adp", "MB total"] < main_table.loc["mm-pfl-adp-no-masks", "MB total"]


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
    with pytest.raises(ConfigError, match="presets"):
        load_reproduction("no-such-preset")
