"""Attention-map overlays: where a ViT's class token looks, drawn on the MRI it looked at.

Takes grids from :meth:`mmpfl_core.models.vit.MultiModalViT.cls_attention_grids` (B, M, g, g) and
upsamples them to the image size by nearest-neighbour repetition (one attention value per patch, so
no interpolation invents structure that the model did not produce). Uses the object API of
matplotlib only.
"""

from __future__ import annotations

from collections.abc import Sequence

import matplotlib.pyplot as plt
import numpy as np

__all__ = ["upsample_grid", "plot_attention_overlay"]


def upsample_grid(grid: np.ndarray, image_size: int) -> np.ndarray:
    """Repeat each cell of a (g, g) patch grid into a (image_size, image_size) map."""
    grid = np.asarray(grid, dtype=np.float32)
    if grid.ndim != 2 or grid.shape[0] != grid.shape[1] or image_size % grid.shape[0]:
        raise ValueError(
            f"grid of shape {grid.shape} cannot tile an image of side {image_size}; "
            "pass one (g, g) grid with g dividing the image size."
        )
    p = image_size // grid.shape[0]
    return np.kron(grid, np.ones((p, p), dtype=np.float32))  # (H, W)


def plot_attention_overlay(
    images: np.ndarray,
    grids: np.ndarray,
    names: Sequence[str],
    *,
    lesion_mask: np.ndarray | None = None,
    alpha: float = 0.5,
    axes=None,
):
    """Each sequence with its class-token attention overlaid (heat), and the lesion outline if given.

    Args:
        images: (M, H, W) one subject's sequences.
        grids: (M, g, g) attention per sequence (zeros for a missing sequence).
        names: M sequence names (titles).
        lesion_mask: optional (H, W) bool, drawn as a contour to compare with the attention.
    Returns:
        The array of axes drawn into.
    """
    M = len(names)
    if axes is None:
        axes = plt.subplots(1, M, figsize=(3 * M, 3), squeeze=False)[1][0]
    vmax = float(np.max(grids)) or 1.0  # one colour scale across sequences, so they compare
    for m, ax in enumerate(axes):
        ax.imshow(images[m], cmap="gray", vmin=0, vmax=1)
        ax.imshow(upsample_grid(grids[m], images.shape[-1]), cmap="inferno", alpha=alpha, vmin=0, vmax=vmax)
        if lesion_mask is not None and lesion_mask.any():
            ax.contour(lesion_mask.astype(float), levels=[0.5], colors="cyan", linewidths=0.8)
        ax.set(title=f"{names[m]}  (sum {grids[m].sum():.2f})", xticks=[], yticks=[])
    return axes
