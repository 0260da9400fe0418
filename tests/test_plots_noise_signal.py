"""The noise-vs-signal picture: the figure is drawn, its numbers are the formula's, and z is the accountant's."""
from __future__ import annotations

import math

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import pytest

from mmpfl_core.errors import ConfigError, PrivacyError
from mmpfl_core.personalization.noise_gate import release_snr, round_noise
from mmpfl_core.plots.noise_signal import (
    PUBLISHED_DEPLOYMENTS,
    DeploymentMarker,
    noise_signal_explorer,
    plot_noise_signal,
)
from mmpfl_core.privacy import calibrate_noise, compute_epsilon

SETTING = dict(sites=5, sample_rate=1.0, epsilon=8.0, rounds=100, dimension=10_000, accountant="rdp")


def test_figure_is_built_with_both_panels_and_every_marker():
    run = DeploymentMarker("dp-fedavg (kit)", participants=5, noise_multiplier=6.0)
    fig, noise = plot_noise_signal(**SETTING, runs=[run])
    left, right = fig.axes
    labels = [t.get_text() for t in right.get_legend().get_texts()]
    for marker in (*PUBLISHED_DEPLOYMENTS, run):
        assert any(text.startswith(marker.label) for text in labels), (marker.label, labels)
    assert any(text.startswith("viability") for text in labels)
    # the viability line sits at sqrt(T) / min_snr
    assert noise.viability in [float(line.get_ydata()[0]) for line in right.get_lines()]
    # the federation's dot is at (qN, ratio) on the right, (qN, noise norm) on the left
    offsets = [tuple(c.get_offsets()[0]) for c in right.collections if len(c.get_offsets()) == 1]
    assert (pytest.approx(noise.participants), pytest.approx(noise.ratio)) in offsets
    offsets = [tuple(c.get_offsets()[0]) for c in left.collections if len(c.get_offsets()) == 1]
    assert (pytest.approx(noise.participants), pytest.approx(noise.noise_norm)) in offsets
    plt.close("all")


@pytest.mark.parametrize("clip_norm", [0.1, 1.0, 5.0])
def test_ratio_is_z_sqrt_d_over_qn_whatever_c(clip_norm):
    noise = round_noise(sites=40, sample_rate=0.25, epsilon=4.0, rounds=50, dimension=2_500, clip_norm=clip_norm,
                        accountant="rdp")
    z = noise.noise_multiplier
    assert noise.participants == pytest.approx(10.0)
    assert noise.noise_norm == pytest.approx(z * clip_norm * 50 / 10)  # z C sqrt(d) / (qN)
    assert noise.signal_norm == clip_norm
    assert noise.ratio == pytest.approx(z * 50 / 10, rel=1e-12)
    # the gate's snr for one group is sqrt(T) / ratio, and viability is the ratio the gate still accepts
    assert noise.snr == pytest.approx(math.sqrt(50) / noise.ratio, rel=1e-12)
    assert noise.snr == release_snr(clip_bounds={"m": clip_norm}, sigmas={"m": z * clip_norm},
                                    group_sizes={"m": 2_500}, expected_participants=10.0, rounds=50)["m"]
    assert noise.viable == (noise.ratio <= noise.viability)


def test_z_comes_from_the_accountant_and_moves_with_epsilon():
    noise = round_noise(**SETTING)
    assert noise.noise_multiplier == calibrate_noise(target_epsilon=8.0, target_delta=1e-5, sample_rate=1.0,
                                                     steps=100, accountant="rdp")
    spent = compute_epsilon(noise_multiplier=noise.noise_multiplier, sample_rate=1.0, steps=100, delta=1e-5,
                            accountant="rdp")
    assert spent <= 8.0
    tighter = round_noise(**{**SETTING, "epsilon": 2.0})
    assert tighter.noise_multiplier > noise.noise_multiplier and tighter.ratio > noise.ratio
    # fewer rounds, same budget: less noise per round
    assert round_noise(**{**SETTING, "rounds": 10}).noise_multiplier < noise.noise_multiplier


def test_published_deployments_are_viable_where_a_handful_of_hospitals_is_not():
    d = 199_210  # the TFF tutorial's own model: 120 clients at z = 1.2 over 100 rounds
    tff = PUBLISHED_DEPLOYMENTS[0]
    assert tff.ratio(d) == pytest.approx(1.2 * math.sqrt(d) / 120)
    assert tff.ratio(d) < math.sqrt(100)
    hospitals = round_noise(sites=5, sample_rate=1.0, epsilon=8.0, rounds=100, dimension=d, accountant="rdp")
    assert not hospitals.viable and hospitals.ratio > 100 * tff.ratio(d)


def test_marker_from_a_run_summary_reads_the_public_privacy_block():
    marker = DeploymentMarker.from_summary("run", {"privacy": {"noise_multiplier": 2.5, "expected_participants": 4.0}})
    assert (marker.participants, marker.noise_multiplier) == (4.0, 2.5)
    with pytest.raises(ValueError, match="privacy block"):
        DeploymentMarker.from_summary("fedavg", {"strategy": "fedavg"})


def test_static_explorer_draws_one_figure_and_no_widget():
    plt.close("all")
    noise = noise_signal_explorer(**{k: v for k, v in SETTING.items() if k != "accountant"}, interactive=False)
    assert len(plt.get_fignums()) == 1
    assert noise.noise_multiplier == round_noise(**SETTING).noise_multiplier  # the explorer's default accountant: RDP
    plt.close("all")


def test_bad_inputs_name_the_problem():
    with pytest.raises(ConfigError, match="dimension"):
        round_noise(**{**SETTING, "dimension": 0})
    with pytest.raises(ConfigError, match="sites"):
        round_noise(**{**SETTING, "sites": 0})
    with pytest.raises(PrivacyError, match="sample_rate"):
        round_noise(**{**SETTING, "sample_rate": 1.5})
