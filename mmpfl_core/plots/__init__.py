"""Figures. Each submodule draws from results or public numbers; none trains or releases anything."""

from .learning_curve import plot_learning_curve
from .noise_signal import PUBLISHED_DEPLOYMENTS, DeploymentMarker, noise_signal_explorer, plot_noise_signal

__all__ = [
    "PUBLISHED_DEPLOYMENTS",
    "DeploymentMarker",
    "noise_signal_explorer",
    "plot_learning_curve",
    "plot_noise_signal",
]
