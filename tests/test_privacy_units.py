"""The privacy unit on every row (issue 23): Ditto with DP-SGD inside the sites, and the unit, epsilons, deltas and
private dimension d that every comparison table, CSV and REPORT.md carries, read from the accountants."""
from __future__ import annotations

import math

import pytest
import torch

from mmpfl_core.errors import ConfigError
from mmpfl_core.federated.config import FederatedConfig, LocalTrainingConfig, OptimizerConfig
from mmpfl_core.federated.simulation import run_federated
from mmpfl_core.federated.strategies import create_strategy
from mmpfl_core.privacy import compute_epsilon

CFG = FederatedConfig(num_rounds=2, local=LocalTrainingConfig(local_steps=2, batch_size=16),
                      optimizer=OptimizerConfig(name="sgd", lr=0.05, momentum=0.0, weight_decay=0.0),
                      bootstrap_resamples=0, checkpoint_every=0, device="cpu", client_fraction=1.0)
INSECURE = dict(noise="reproducible-insecure")


def _ditto(federation, factory, **sample_level_dp):
    with pytest.warns(UserWarning):  # reproducible-insecure noise warns, on purpose
        strategy = create_strategy("ditto-dp-sgd", lam=0.5, sample_level_dp={**sample_level_dp, **INSECURE})
    return run_federated(federation, model_factory=factory, strategy=strategy, config=CFG, progress=False), strategy


# ------------------------------------------------------------------ Ditto with DP-SGD
def test_ditto_dp_sgd_charges_both_trainings_of_every_round(tiny_federation, tiny_model_factory):
    """Each site's ledger holds the global AND the personal update's DP-SGD steps, and its epsilon is the
    accountant's for their composition: 2 trainings x 2 steps x 2 rounds at (z, q_k), not half of it."""
    run, strategy = _ditto(tiny_federation, tiny_model_factory, noise_multiplier=1.1, max_grad_norm=1.0,
                           accountant="rdp")
    summary = run.summary["sample_level_privacy"]
    for site in tiny_federation.sites:
        q = 16 / len(site.train)
        ledger = strategy.sample_dp.ledgers[site.site_id]
        assert sum(e["steps"] for e in ledger.entries) == 2 * 2 * CFG.num_rounds
        both = compute_epsilon(noise_multiplier=1.1, sample_rate=q, steps=8, delta=1e-5, accountant="rdp")
        global_only = compute_epsilon(noise_multiplier=1.1, sample_rate=q, steps=4, delta=1e-5, accountant="rdp")
        assert summary["per_site_epsilon"][site.site_id] == pytest.approx(both)
        assert both > global_only * 1.05  # the personal model's steps are not free
    assert summary["max_epsilon"] == pytest.approx(max(summary["per_site_epsilon"].values()))
    # the deployed (personal) model is its own DP-SGD output, not the global model
    some = tiny_federation.sites[0].site_id
    personal = strategy.personal_state(some, run.global_state)
    assert any(not torch.equal(personal[n], run.global_state[n]) for n in personal)


def test_ditto_dp_sgd_target_epsilon_covers_both_trainings(tiny_federation, tiny_model_factory):
    """A target epsilon is calibrated for both trainings of every round: a site that takes part in every round
    ends at the target (within the accountant's calibration tolerance), never above it."""
    run, strategy = _ditto(tiny_federation, tiny_model_factory, target_epsilon=4.0, max_grad_norm=1.0,
                           accountant="rdp")
    epsilons = run.summary["sample_level_privacy"]["per_site_epsilon"]
    assert all(e <= 4.0 * 1.01 for e in epsilons.values())
    assert max(epsilons.values()) == pytest.approx(4.0, rel=0.05)  # calibrated for 2x the steps, not 1x


def test_ditto_dp_sgd_refuses_a_config_without_a_budget():
    with pytest.raises(ConfigError, match="sample_level_dp"):
        create_strategy("ditto-dp-sgd")
    with pytest.raises(ConfigError, match="exactly one of noise_multiplier or target_epsilon"):
        create_strategy("ditto-dp-sgd", sample_level_dp={"max_grad_norm": 1.0})
    with pytest.raises(ConfigError, match="target_epsilon"):
        create_strategy("ditto", sample_level_dp={"target_epsilon": math.inf})


def test_ditto_dp_sgd_averages_uniformly():
    """n_k changes with one patient: the server's mean of the deltas must not weight by it (plain Ditto does)."""
    from mmpfl_core.federated.client import ClientUpdate
    start = {"w": torch.zeros(1)}
    updates = [ClientUpdate(site_id=0, delta={"w": torch.ones(1)}, num_examples=1, num_steps=1, train_loss=0.0),
               ClientUpdate(site_id=1, delta={"w": torch.full((1,), 3.0)}, num_examples=99, num_steps=1,
                            train_loss=0.0)]
    strategy = create_strategy("ditto-dp-sgd", sample_level_dp={"noise_multiplier": 1.0})
    assert strategy.aggregate(start, updates, [u.delta for u in updates], 1)["w"].item() == pytest.approx(2.0)
    plain = create_strategy("ditto").aggregate(start, updates, [u.delta for u in updates], 1)["w"].item()
    assert plain == pytest.approx((1 + 297) / 100)


# ------------------------------------------------------------------ the privacy columns
def test_privacy_columns_name_the_units_with_finite_epsilon():
    from mmpfl_core.tables import PRIVACY_COLUMNS, privacy_columns

    both = privacy_columns(client=(2.0, 1e-5), patient=(3.0, 1e-6), dimension=7)
    assert list(both) == list(PRIVACY_COLUMNS)
    assert both == {"privacy unit": "site+patient", "epsilon_client": 2.0, "delta_client": 1e-5,
                    "epsilon_patient_max": 3.0, "delta_patient": 1e-6, "d": 7}
    assert privacy_columns(client=None, patient=(3.0, 1e-6), dimension=1)["privacy unit"] == "patient"
    none = privacy_columns(client=(math.inf, 1e-5), patient=None, dimension=1)  # zero noise: not a guarantee
    assert none["privacy unit"] == "none" and none["epsilon_client"] == math.inf and none["delta_client"] is None


SMALL = {
    "name": "units",
    "data": {"num_subjects": 150, "image_size": 32, "seed": 5},
    "federation": {"num_sites": 3, "alpha": 1.0, "public_size": 15, "seed": 5},
    "model": {"preset": "tiny", "overrides": {"embed_dim": 32, "depth": 1}},
    "federated": {"num_rounds": 2, "local": {"batch_size": 32, "local_steps": 2}, "bootstrap_resamples": 20,
                  "checkpoint_every": 0},
}


def _methods(epsilon: float, z_patient: float, delta: float) -> list[dict]:
    patient = {"noise_multiplier": z_patient, "delta": delta, "noise": "reproducible-insecure"}
    return [
        {"strategy": "fedavg"},
        {"strategy": "dp-fedavg", "target_epsilon": epsilon, "delta": delta, "noise": "reproducible-insecure"},
        {"strategy": "local-dp-sgd", "sample_level_dp": patient},
        {"strategy": "ditto-dp-sgd", "sample_level_dp": patient},
        {"strategy": "dp-fedavg", "label": "dp-fedavg+dp-sgd", "noise_multiplier": 1.0, "delta": delta,
         "noise": "reproducible-insecure", "sample_level_dp": patient},
    ]


def _table(tmp_path, name, **budget):
    import warnings

    from mmpfl_core.experiment import ExperimentConfig
    from mmpfl_core.reporting import write_comparison_report

    config = ExperimentConfig.from_dict({**SMALL, "methods": _methods(**budget)})
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # reproducible-insecure noise warns (on purpose)
        report = write_comparison_report(config, tmp_path / name, progress=False)
    return report


@pytest.mark.integration
def test_every_row_carries_the_accountants_values_in_table_csv_and_report(tmp_path):
    """Each value is the run's own ledger's (change the budget and it changes), in the table, the released
    CSV and REPORT.md; the per-site epsilons stay under private/."""
    import pandas as pd

    from mmpfl_core.tables import PRIVACY_COLUMNS

    first = _table(tmp_path, "a", epsilon=2.0, z_patient=1.0, delta=1e-5)
    second = _table(tmp_path, "b", epsilon=6.0, z_patient=2.0, delta=1e-6)
    for report in (first, second):
        rows = report.table.set_index("method")
        for label, run in report.runs.items():
            strategy = run.strategy
            ledger = getattr(strategy, "ledger", None)
            if ledger is not None:
                assert rows.loc[label, "epsilon_client"] == pytest.approx(ledger.epsilon())
                assert rows.loc[label, "delta_client"] == ledger.delta
            if getattr(strategy, "sample_dp", None) is not None:
                assert rows.loc[label, "epsilon_patient_max"] == pytest.approx(max(strategy.sample_dp.epsilons().values()))
                assert rows.loc[label, "delta_patient"] == strategy.sample_dp.delta
            assert rows.loc[label, "d"] == sum(t.numel() for t in run.global_state.values())
        assert rows["privacy unit"].to_dict() == {"fedavg": "none", "dp-fedavg": "site", "local-dp-sgd": "site+patient",
                                                  "ditto-dp-sgd": "patient", "dp-fedavg+dp-sgd": "site+patient"}
        assert rows.loc["fedavg", "epsilon_client"] == math.inf and pd.isna(rows.loc["fedavg", "delta_client"])
        csv = pd.read_csv(report.path.parent / "comparison.csv").set_index("method")
        assert list(PRIVACY_COLUMNS) == [c for c in csv.columns if c in PRIVACY_COLUMNS]
        for column in ("epsilon_client", "epsilon_patient_max", "delta_client", "d"):
            pd.testing.assert_series_equal(csv[column].astype(float), rows[column].astype(float), check_names=False)
        text = report.path.read_text()
        assert "| privacy unit | epsilon_client | delta_client | epsilon_patient_max | delta_patient | d |" in text
        assert "per_site_epsilon" not in text and "per_site_epsilon" not in (report.path.parent / "comparison.csv").read_text()
    a, b = first.table.set_index("method"), second.table.set_index("method")
    assert a.loc["dp-fedavg", "epsilon_client"] == pytest.approx(2.0, rel=0.02)
    assert b.loc["dp-fedavg", "epsilon_client"] == pytest.approx(6.0, rel=0.02)
    for label in ("local-dp-sgd", "ditto-dp-sgd", "dp-fedavg+dp-sgd"):
        assert a.loc[label, "epsilon_patient_max"] > b.loc[label, "epsilon_patient_max"]  # z 1 -> 2: less spent
        assert (a.loc[label, "delta_patient"], b.loc[label, "delta_patient"]) == (1e-5, 1e-6)
    assert a.loc["ditto-dp-sgd", "epsilon_patient_max"] > a.loc["local-dp-sgd", "epsilon_patient_max"]  # 2 trainings


def test_reports_flag_reproducible_noise_inside_the_sites_too():
    from mmpfl_core.experiment import ExperimentConfig
    from mmpfl_core.reproduction.report import not_private_lines

    config = ExperimentConfig.from_dict({**SMALL, "methods": _methods(epsilon=2.0, z_patient=1.0, delta=1e-5)})
    import re

    flagged = re.search(r"\*\*Not private\*\* \(([^)]*)\)", " ".join(not_private_lines(config))).group(1)
    assert flagged.split(", ") == ["dp-fedavg", "local-dp-sgd", "ditto-dp-sgd", "dp-fedavg+dp-sgd"]  # not fedavg


def test_ditto_personal_update_is_dp_sgd_and_a_non_private_one_is_caught(tiny_federation, tiny_model_factory,
                                                                          monkeypatch):
    """With a vanishing clip bound C the patients' clipped gradients and the noise z C are ~0, so a DP-SGD personal
    update (lam = 0: no pull) leaves v where it started (the initial model). A personal update trained WITHOUT
    DP-SGD (the broken mechanism, planted below) moves v by the patients' gradients, and the check sees it."""
    from mmpfl_core.federated.personalized_strategies import Ditto

    initial = {n: p.detach().clone() for n, p in tiny_model_factory().named_parameters()}

    def personal_drift() -> float:
        with pytest.warns(UserWarning):
            strategy = create_strategy("ditto-dp-sgd", lam=0.0, sample_level_dp={
                "noise_multiplier": 1.0, "max_grad_norm": 1e-9, **INSECURE})
        run = run_federated(tiny_federation, model_factory=tiny_model_factory, strategy=strategy, config=CFG,
                            progress=False)
        return max((strategy.personal_state(s.site_id, run.global_state)[n] - initial[n]).abs().max().item()
                   for s in tiny_federation.sites for n in initial)

    assert personal_drift() < 1e-6
    real_train = Ditto._train

    def without_dp(self, *args, private_training=None, **kwargs):
        return real_train(self, *args, **kwargs)

    monkeypatch.setattr(Ditto, "_train", without_dp)
    assert personal_drift() > 1e-3
