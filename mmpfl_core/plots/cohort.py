"""Figures of the synthetic cohort: one example slice per class and sequence.

Uses matplotlib's object API (``Figure``), never ``pyplot``, so it changes no global state.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from matplotlib.axes import Axes
from matplotlib.figure import Figure

from ..data.contract import Cohort


def plot_cohort_preview(cohort: Cohort, path_or_ax: str | Path | np.ndarray | None = None) -> Figure:
    """Grid of example images: rows = classes, columns = sequences (T1, T2, FLAIR).

    For each class the subject with the median lesion load is shown (the first subject if the cohort
    has no lesion masks), among subjects with every sequence when there are any; otherwise a missing
    sequence is drawn as an empty panel titled "missing".

    Args:
        cohort: any cohort.
        path_or_ax: a file path (the figure is saved there), an array of Axes of shape
            (num_classes, num_modalities) to draw into, or None (just return the figure).

    Returns:
        The figure drawn on.
    """
    c, m = cohort.num_classes, cohort.num_modalities
    if isinstance(path_or_ax, np.ndarray) and path_or_ax.size and isinstance(path_or_ax.flat[0], Axes):
        axes = path_or_ax.reshape(c, m)
        fig = axes[0, 0].figure
    else:
        fig = Figure(figsize=(2.2 * m, 2.2 * c), layout="constrained")
        axes = np.asarray(fig.subplots(c, m, squeeze=False))
    load = cohort.lesion_masks.sum(axis=(1, 2)) if cohort.lesion_masks is not None else np.zeros(len(cohort))
    for row, class_name in enumerate(cohort.class_names):
        members = np.flatnonzero(cohort.labels == row)
        complete = members[cohort.modality_mask[members].all(axis=1)]
        members = complete if complete.size else members  # show every sequence when a subject has them
        i = None
        if members.size:
            i = members[np.argsort(load[members], kind="stable")[members.size // 2]]
        for col, mod in enumerate(cohort.modality_names):
            ax = axes[row, col]
            ax.set_xticks([])
            ax.set_yticks([])
            if row == 0:
                ax.set_title(mod)
            if col == 0:
                ax.set_ylabel(class_name)
            if i is None:
                continue
            ax.imshow(cohort.images[i, col], cmap="gray", vmin=0.0, vmax=1.0)
            if not cohort.modality_mask[i, col]:
                ax.set_title(f"{mod} (missing)" if row == 0 else "missing", fontsize=8)
    if isinstance(path_or_ax, (str, Path)):
        Path(path_or_ax).parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(path_or_ax, dpi=120)
    return fig
