"""Figure of a gradient-inversion attack: original scans next to the attacker's reconstructions.

Input: a contract batch and the ``DefenceResult`` list of
:func:`mmpfl_core.attacks.gradient_inversion.compare_defences` (read by attribute, not imported, so
plots never depend on attacks). Nothing here runs an attack. The originals shown are private
patient data: put real scans in a figure only where the data agreement allows it.
"""

from __future__ import annotations

from typing import Any
from collections.abc import Mapping, Sequence

import matplotlib.pyplot as plt
import torch

from ..data.contract import MODALITIES

__all__ = ["plot_reconstructions"]


def _column_title(result: Any) -> str:
    title = result.name if result.epsilon is None else f"{result.name}\n\u03b5 = {result.epsilon:g}"
    return f"{title}\nPSNR {result.psnr:.1f} dB, SSIM {result.ssim:.2f}"


def plot_reconstructions(
    batch: Mapping[str, torch.Tensor],
    results: Sequence[Any],
    *,
    modality_names: Sequence[str] | None = None,
    max_subjects: int = 4,
    cell_size: float = 1.6,
):
    """Grid of images: one row per (subject, sequence), columns = original + one per defence.

    Column titles give the defence, its epsilon (noisy releases) and PSNR/SSIM over the whole
    batch; row labels give the subject and sequence. A missing sequence is drawn blank and marked
    "missing" (it is never reconstructed). Grey scale is fixed to the contract's [0, 1].

    Returns:
        The matplotlib ``Figure``.
    """
    if not results:
        raise ValueError("results is empty; pass the list returned by compare_defences().")
    images = batch["images"].detach().cpu()  # (B, M, H, W)
    mask = batch["modality_mask"].detach().cpu().to(torch.bool)  # (B, M)
    B, M = images.shape[:2]
    names = (
        list(modality_names)
        if modality_names is not None
        else (list(MODALITIES) if M == len(MODALITIES) else [f"seq {m}" for m in range(M)])
    )
    rows = [(b, m) for b in range(min(B, max_subjects)) for m in range(M)]
    columns = [("original", images)] + [(_column_title(r), r.reconstruction.detach().cpu()) for r in results]
    fig, axes = plt.subplots(
        len(rows), len(columns), squeeze=False, figsize=(cell_size * len(columns), cell_size * len(rows) + 0.9)
    )
    for j, (title, stack) in enumerate(columns):
        for i, (b, m) in enumerate(rows):
            ax = axes[i, j]
            ax.set_xticks([])
            ax.set_yticks([])
            if bool(mask[b, m]):
                ax.imshow(stack[b, m].numpy(), cmap="gray", vmin=0.0, vmax=1.0)
            else:
                ax.text(0.5, 0.5, "missing", ha="center", va="center", fontsize=8, color="0.4", transform=ax.transAxes)
            if i == 0:
                ax.set_title(title, fontsize=8)
            if j == 0:
                ax.set_ylabel(f"subject {b}\n{names[m]}", fontsize=8)
    fig.suptitle("Gradient inversion of one site update (Inverting Gradients, Geiping et al. 2020)", fontsize=9)
    fig.tight_layout()
    return fig
