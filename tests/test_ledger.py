"""PrivacyLedger: composition, curve, budget checks, persistence."""
from __future__ import annotations

import json

import pytest

from mmpfl_core.errors import PrivacyError
from mmpfl_core.privacy.accounting import combine_noise_multipliers, compose_epsilon, compute_epsilon
from mmpfl_core.privacy.ledger import PrivacyLedger

pytestmark = pytest.mark.filterwarnings("ignore::RuntimeWarning", "ignore::UserWarning")
DELTA = 1e-5


def test_empty_ledger_has_zero_epsilon():
    ledger = PrivacyLedger(delta=DELTA)
    assert ledger.epsilon() == 0.0
    assert ledger.epsilon_curve() == []
    assert ledger.summary()["epsilon"] == 0.0


@pytest.mark.parametrize("accountant", ["rdp", "prv"])
def test_epsilon_matches_accountant(accountant):
    ledger = PrivacyLedger(delta=DELTA, accountant=accountant)
    for r in range(20):
        ledger.record(name="update", noise_multiplier=1.0, sample_rate=0.1, round=r)
    ledger.record(name="adaptive_clip_count", noise_multiplier=5.0, sample_rate=0.1, steps=20)
    expected = compose_epsilon(releases=[(1.0, 0.1, 20), (5.0, 0.1, 20)], delta=DELTA,
                               accountant=accountant)
    assert ledger.epsilon() == pytest.approx(expected, abs=1e-9)
    assert ledger.epsilon(delta=1e-3) < ledger.epsilon()


def test_record_joint_uses_combined_multiplier():
    ledger = PrivacyLedger(delta=DELTA, accountant="rdp")
    ledger.record_joint(name="update+mask_scores", noise_multipliers=[3.0, 4.0], sample_rate=0.1,
                        steps=10)
    assert ledger.entries[0]["noise_multiplier"] == pytest.approx(combine_noise_multipliers(3, 4))


def test_epsilon_curve_is_monotone_and_ends_at_total():
    ledger = PrivacyLedger(delta=DELTA, accountant="rdp")
    for r in range(5):
        ledger.record(name="update", noise_multiplier=1.2, sample_rate=0.2, round=r)
        ledger.record(name="mask_scores", noise_multiplier=4.0, sample_rate=0.2, round=r)
    curve = ledger.epsilon_curve()
    assert [r for r, _ in curve] == list(range(5))
    values = [e for _, e in curve]
    assert all(a < b for a, b in zip(values, values[1:]))
    assert values[-1] == pytest.approx(ledger.epsilon())


def test_budget_check():
    ledger = PrivacyLedger(delta=DELTA, accountant="rdp", target_epsilon=2.0)
    assert ledger.budget == (2.0, DELTA)
    released = 0
    while not ledger.would_exceed(2.0, 0.1):
        ledger.check_release(2.0, 0.1)
        ledger.record(name="update", noise_multiplier=2.0, sample_rate=0.1, round=released)
        released += 1
    assert released > 10
    assert ledger.epsilon() <= 2.0
    assert compute_epsilon(noise_multiplier=2.0, sample_rate=0.1, steps=released + 1, delta=DELTA,
                           accountant="rdp") > 2.0
    with pytest.raises(PrivacyError, match="above the budget 2; stop the run or increase"):
        ledger.check_release(2.0, 0.1)
    assert PrivacyLedger(delta=DELTA).would_exceed(0.0, 1.0) is False  # no budget


def test_state_dict_round_trip_is_json():
    ledger = PrivacyLedger(delta=DELTA, accountant="rdp", target_epsilon=8.0)
    ledger.record(name="update", noise_multiplier=1.0, sample_rate=0.1, steps=3, round=2)
    ledger.record(name="mask_scores", noise_multiplier=2.0, sample_rate=0.1)
    state = json.loads(json.dumps(ledger.state_dict()))
    restored = PrivacyLedger.from_state_dict(state)
    assert restored.entries == ledger.entries
    assert restored.epsilon() == ledger.epsilon()
    assert restored.budget == ledger.budget
    other = PrivacyLedger(delta=0.1)
    other.load_state_dict(state)
    assert other.delta == DELTA and other.epsilon() == ledger.epsilon()
    summary = ledger.summary()
    json.dumps(summary)
    assert summary["releases_by_name"] == {"update": 3, "mask_scores": 1}
    assert summary["last_round"] == 2


def test_invalid_records_raise():
    ledger = PrivacyLedger(delta=DELTA)
    with pytest.raises(PrivacyError):
        ledger.record(name="update", noise_multiplier=-1.0, sample_rate=0.1)
    with pytest.raises(PrivacyError):
        ledger.record(name="", noise_multiplier=1.0, sample_rate=0.1)
    with pytest.raises(PrivacyError, match="unknown"):
        PrivacyLedger(delta=DELTA, accountant="moments")
    with pytest.raises(PrivacyError, match="delta"):
        PrivacyLedger(delta=2.0)


def test_budget_check_and_report_share_one_accountant_call():
    """The check before a release and the report after it ask the same question: one accountant call."""
    from mmpfl_core.privacy.accounting import _epsilon_of_history

    ledger = PrivacyLedger(delta=DELTA, accountant="rdp", target_epsilon=50.0)
    ledger.record(name="update", noise_multiplier=1.37, sample_rate=0.21, round=0)
    ledger.check_release(noise_multiplier=1.37, sample_rate=0.21)
    misses = _epsilon_of_history.cache_info().misses
    ledger.record(name="update", noise_multiplier=1.37, sample_rate=0.21, round=1)
    after = ledger.epsilon()
    assert _epsilon_of_history.cache_info().misses == misses
    assert after == compute_epsilon(noise_multiplier=1.37, sample_rate=0.21, steps=2, delta=DELTA, accountant="rdp")
    # the order of releases does not change the (commutative) composition's cached answer
    assert compose_epsilon(releases=[(5.0, 0.2, 3), (1.37, 0.21, 2)], delta=DELTA, accountant="rdp") == \
        compose_epsilon(releases=[(1.37, 0.21, 2), (5.0, 0.2, 3)], delta=DELTA, accountant="rdp")


def test_loaded_ledger_reports_its_own_entries():
    """A ledger restored with other entries of the same length never reports a stale epsilon."""
    small, large = (PrivacyLedger(delta=DELTA, accountant="rdp") for _ in range(2))
    small.record(name="update", noise_multiplier=4.0, sample_rate=0.5, round=0)
    large.record(name="update", noise_multiplier=0.8, sample_rate=0.5, round=0)
    before = small.epsilon()
    small.load_state_dict(large.state_dict())
    assert small.epsilon() == large.epsilon() > before
