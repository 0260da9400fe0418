"""The picture behind every client-level DP result: one round's noise against its signal.

A round of DP-FedAvg releases (sum of qN clipped updates + N(0, z^2 C^2 I_d)) / (qN). The signal in that
average has norm at most C (every participant at the clip bound, all pointing the same way); the noise
has norm about z C sqrt(d) / (qN). Their ratio, z sqrt(d) / (qN), does not depend on C: it shrinks only
with more participants per round and fewer private parameters, and grows with the multiplier z that the
budget (epsilon, delta) imposes for q and T. Over T rounds a consistent signal adds up as T and the noise
as sqrt(T), so a round is worth releasing when the ratio stays below sqrt(T) (the noise gate's rule,
:func:`mmpfl_core.personalization.noise_gate.round_noise`, with ``min_snr = 1``).

:func:`plot_noise_signal` draws both panels for a federation (N, q), a budget (epsilon, delta) and a
model (T rounds, d private parameters), with z taken from the accountant; :func:`noise_signal_explorer`
puts sliders on it. Published DP-FL deployments are marked with their own z and m, drawn at the
figure's d (what their noise per participant would leave on your model):

* TensorFlow Federated tutorial "Differential Privacy in TFF" (EMNIST digits, tensorflow.org/federated/
  tutorials/federated_learning_with_differential_privacy): 120 clients a round at z = 1.2 for 100 rounds,
  (2, 1e-5)-DP, on a 784-200-200-10 dense network (199,210 parameters).
* Gboard next-word prediction with DP-FTRL (Xu et al., "Federated Learning of Gboard Language Models with
  Differential Privacy", ACL Industry 2023, arXiv:2305.18465): 6,500 clients a round at z = 7 for about
  2,000 rounds.

Everything drawn here is computed from public numbers (budget, configuration, model size, a run's
released z and qN); nothing reads a site's data.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any
from collections.abc import Mapping, Sequence

import matplotlib.pyplot as plt
import numpy as np
from matplotlib.figure import Figure

from ..personalization.noise_gate import RoundNoise, round_noise

__all__ = [
    "PUBLISHED_DEPLOYMENTS",
    "DeploymentMarker",
    "noise_signal_explorer",
    "plot_noise_signal",
]


@dataclass(frozen=True)
class DeploymentMarker:
    """A point on the picture: a deployment's (or a kit run's) participants per round m and multiplier z.

    Attributes:
        label: legend text.
        participants: m = qN, expected participants per round.
        noise_multiplier: z (noise std on the sum over the clip bound C).
        rounds: T of that deployment (shown in the legend only; the viability line uses the figure's T).
        source: where the numbers come from.
    """

    label: str
    participants: float
    noise_multiplier: float
    rounds: int | None = None
    source: str = ""

    def ratio(self, dimension: int) -> float:
        """z sqrt(d) / m at the figure's d."""
        return self.noise_multiplier * math.sqrt(dimension) / self.participants

    @classmethod
    def from_summary(cls, label: str, summary: Mapping[str, Any]) -> DeploymentMarker:
        """A kit run's marker from its summary's ``privacy`` block: the calibrated z and the fixed denominator qN
        (both public: the run's configuration and the accountant's calibration)."""
        privacy = summary.get("privacy")
        if not isinstance(privacy, Mapping) or "noise_multiplier" not in privacy:
            raise ValueError(
                f"run {label!r} has no privacy block with a noise multiplier in its summary; pass the summary of a "
                "client-level DP run (dp-fedavg, dp-fedavg-fisher, mm-pfl-adp)."
            )
        return cls(
            label=label,
            participants=float(privacy["expected_participants"]),
            noise_multiplier=float(privacy["noise_multiplier"]),
            source="this kit",
        )


#: Published DP-FL deployments (module docstring gives the sources).
PUBLISHED_DEPLOYMENTS: tuple[DeploymentMarker, ...] = (
    DeploymentMarker(
        "TFF EMNIST tutorial",
        participants=120,
        noise_multiplier=1.2,
        rounds=100,
        source="tensorflow.org/federated/tutorials/federated_learning_with_differential_privacy",
    ),
    DeploymentMarker(
        "Gboard DP-FTRL",
        participants=6500,
        noise_multiplier=7.0,
        rounds=2000,
        source="Xu et al. 2023, arXiv:2305.18465",
    ),
)


def plot_noise_signal(
    *,
    sites: int,
    sample_rate: float,
    epsilon: float,
    rounds: int,
    dimension: int,
    delta: float = 1e-5,
    clip_norm: float = 1.0,
    accountant: str = "prv",
    min_snr: float = 1.0,
    deployments: Sequence[DeploymentMarker] = PUBLISHED_DEPLOYMENTS,
    runs: Sequence[DeploymentMarker] = (),
) -> tuple[Figure, RoundNoise]:
    """Two panels against m = qN (expected participants per round), for N sites sampled at rate q.

    Left: the noise norm on the released average, z C sqrt(d) / m, against the signal bound C.
    Right: their ratio z sqrt(d) / m against the viability line sqrt(T) / min_snr (shaded below: viable).
    z is calibrated by the accountant for (epsilon, delta, q, T) and held fixed along the curve (it depends
    on q, not on N); the federation itself is the large dot. ``deployments`` (default: the published ones)
    and ``runs`` (kit runs, e.g. :meth:`DeploymentMarker.from_summary`) are drawn with their own z and m
    at this figure's d.

    Returns:
        (figure, the numbers of the federation's round as :class:`RoundNoise`).
    """
    noise = round_noise(
        sites=sites,
        sample_rate=sample_rate,
        epsilon=epsilon,
        rounds=rounds,
        dimension=dimension,
        delta=delta,
        clip_norm=clip_norm,
        accountant=accountant,
        min_snr=min_snr,
    )
    z, m, root_d = noise.noise_multiplier, noise.participants, math.sqrt(dimension)
    markers = [(d, "D", "black") for d in deployments] + [(r, "*", "tab:red") for r in runs]
    lo = min([m, 1.0] + [d.participants for d, _, _ in markers]) / 2
    hi = max([m, 1e4] + [d.participants for d, _, _ in markers]) * 2
    grid = np.logspace(math.log10(lo), math.log10(hi), 200)
    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4.2))

    left.plot(grid, z * clip_norm * root_d / grid, color="tab:blue", label=f"noise norm z C sqrt(d) / m (z = {z:.3g})")
    left.axhline(clip_norm, color="tab:green", label=f"signal bound C = {clip_norm:g} (mean of m clipped updates)")
    left.scatter(
        [m],
        [noise.noise_norm],
        s=90,
        color="tab:blue",
        edgecolor="black",
        zorder=3,
        label=f"your federation: m = qN = {m:g}",
    )
    left.set(
        xscale="log",
        yscale="log",
        xlabel="expected participants per round m = qN",
        ylabel="L2 norm",
        title="one round: noise vs signal on the released average",
    )

    right.plot(grid, z * root_d / grid, color="tab:blue", label="noise / signal = z sqrt(d) / m")
    right.axhline(
        noise.viability,
        color="tab:orange",
        linestyle="--",
        label=f"viability: sqrt(T) / min_snr = {noise.viability:.3g}",
    )
    right.axhspan(min(z * root_d / hi, noise.viability) / 10, noise.viability, color="tab:orange", alpha=0.08)
    right.scatter(
        [m],
        [noise.ratio],
        s=90,
        color="tab:blue",
        edgecolor="black",
        zorder=3,
        label=f"your federation: {noise.ratio:.3g} ({'viable' if noise.viable else 'drowned'})",
    )
    for marker, symbol, colour in markers:
        ratio = marker.ratio(dimension)
        rounds_text = f", T = {marker.rounds}" if marker.rounds else ""
        text = f"{marker.label} (m = {marker.participants:g}, z = {marker.noise_multiplier:.3g}{rounds_text})"
        right.scatter([marker.participants], [ratio], marker=symbol, s=70, color=colour, zorder=4, label=text)
        left.scatter([marker.participants], [ratio * clip_norm], marker=symbol, s=70, color=colour, zorder=4)
    right.set(
        xscale="log",
        yscale="log",
        xlabel="expected participants per round m = qN",
        ylabel="noise norm / signal norm",
        title=f"epsilon = {epsilon:g}, delta = {delta:g}, q = {sample_rate:g}, T = {rounds}, d = {dimension:,}",
    )
    left.legend(fontsize=7, loc="lower left")
    right.legend(fontsize=7, loc="lower left")
    fig.tight_layout()
    return fig, noise


def noise_signal_explorer(
    *,
    sites: int = 5,
    sample_rate: float = 1.0,
    epsilon: float = 8.0,
    rounds: int = 100,
    dimension: int = 100_000,
    delta: float = 1e-5,
    accountant: str = "rdp",
    runs: Sequence[DeploymentMarker] = (),
    interactive: bool = True,
) -> RoundNoise:
    """Sliders (sites N, sample rate q, epsilon, rounds T, private dimension d) over :func:`plot_noise_signal`.

    ``interactive=False`` draws the static figure once and creates no widget: use it for headless runs
    (papermill, CI), where a live control has no front end to talk to. The default accountant is RDP,
    which answers each slider move in well under a second; it overstates epsilon a little, so the z it
    calibrates is a little larger than PRV's (a conservative picture).

    Returns:
        The numbers of the starting values (:class:`RoundNoise`).
    """

    def draw(sites: float, sample_rate: float, epsilon: float, rounds: float, dimension: float) -> RoundNoise:
        _, noise = plot_noise_signal(
            sites=max(1, int(round(sites))),
            sample_rate=sample_rate,
            epsilon=epsilon,
            rounds=max(1, int(round(rounds))),
            dimension=max(1, int(round(dimension))),
            delta=delta,
            accountant=accountant,
            runs=runs,
        )
        return noise

    if not interactive:
        return draw(sites, sample_rate, epsilon, rounds, dimension)
    import ipywidgets as widgets
    from IPython.display import display

    def redraw(sites: float, sample_rate: float, epsilon: float, rounds: float, dimension: float) -> None:
        try:
            draw(sites, sample_rate, epsilon, rounds, dimension)
            plt.show()
        except Exception as exc:  # a budget the accountant refuses: say why instead of a traceback
            print(f"cannot draw: {exc}")

    log: dict[str, Any] = dict(base=10, continuous_update=False, readout_format=".3g")
    sliders = {
        "sites": widgets.FloatLogSlider(value=sites, min=0, max=5, step=0.1, description="sites N", **log),
        "sample_rate": widgets.FloatLogSlider(value=sample_rate, min=-3, max=0, step=0.1, description="rate q", **log),
        "epsilon": widgets.FloatLogSlider(value=epsilon, min=-1, max=2, step=0.05, description="epsilon", **log),
        "rounds": widgets.FloatLogSlider(value=rounds, min=0, max=3.5, step=0.1, description="rounds T", **log),
        "dimension": widgets.FloatLogSlider(value=dimension, min=1, max=8, step=0.1, description="dim d", **log),
    }
    output = widgets.interactive_output(redraw, sliders)
    display(widgets.VBox([widgets.HBox(list(sliders.values())[:3]), widgets.HBox(list(sliders.values())[3:]), output]))
    return round_noise(
        sites=sites,
        sample_rate=sample_rate,
        epsilon=epsilon,
        rounds=rounds,
        dimension=dimension,
        delta=delta,
        accountant=accountant,
    )
