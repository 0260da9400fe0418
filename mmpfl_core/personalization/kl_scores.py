"""KL-divergence scores: how much each parameter group of a site's locally trained model matters.

What it is for: deciding which parameter groups a site should keep personal. For group g the score
is the mean, over the site's own validation samples x, of

    KL( p_g(. | x) || p_glob(. | x) ),

where p_glob is the global model's predictive distribution and p_g that of the global model with
group g replaced by the site's locally trained (personalised) version of g.

Why this direction: the expectation is taken under the personalised predictions, so the score is
the expected log-likelihood ratio log p_g / p_glob where the site's own version puts its mass: the
information (nats per sample) the site would lose if it deployed the shared group instead of its
own. It is large exactly where the personal group is confident and the global model disagrees
(what personalisation is for) and small where the personal group only changes classes it gives
little probability anyway. Both distributions are softmaxes (full support), so the score is finite;
it is 0 when the group is unchanged.

Privacy: the scores are a function of exactly the inputs of :func:`kl_group_scores`: the model's
architecture, the global state (released), the site's trained state and ``dataset``. With a site's
private validation split they must never leave the site as they are, except to a trusted aggregator
(``server`` noise placement, client-level DP only); otherwise release them through
:func:`mmpfl_core.personalization.release.release_scores` (docs/DESIGN.md 4.4). Under patient-level DP the
server is not trusted with patients: score on the PUBLIC set with the DP-SGD-trained state, which
makes the scores post-processing of the site's DP release (docs/DESIGN.md 4.5; ``mm-pfl-adp``'s ``mask_data``).
"""

from __future__ import annotations

import copy
from typing import Any
from collections.abc import Mapping, Sequence

import torch
from torch import nn

from ..data.contract import CohortDataset

__all__ = ["kl_group_scores"]

State = Mapping[str, torch.Tensor]


@torch.no_grad()
def kl_group_scores(
    model: nn.Module,
    global_state: State,
    personal_state: State,
    dataset: CohortDataset,
    groups: Mapping[str, Sequence[str]],
    *,
    batch_size: int = 256,
    device: torch.device | str | None = None,
) -> dict[str, float]:
    """Mean KL(p_personal_g || p_global) per parameter group on ``dataset`` (see the module docstring).

    Steps: 1) copy the model once and load the global tensors into the copy (``model`` itself is
    never modified); 2) per batch, one forward pass of the global model; 3) for every group whose
    personal tensors differ from the global ones, swap that group's tensors into the copy, compute
    the logits, swap the global ones back; 4) accumulate sum_x sum_c p_g log(p_g / p_glob). Groups
    identical to the global model score exactly 0 without a forward pass. Runs in eval mode.

    Why one group costs less than a forward pass: a model that says where a group first acts
    (``first_block_of_group``, ``block_inputs`` and ``forward_from_block`` of
    :class:`~mmpfl_core.models.MultiModalViT`) has its global forward pass keep the tokens entering
    every block; swapping block i then reruns blocks i.. only, and ``norm`` / ``head`` only the
    pooling and the head. For a ViT of depth L with E embedding groups that is about
    1 + E + (L + 1) / 2 forward passes instead of 1 + E + L + 2 (other models: the full forward pass).

    Args:
        model: any module of the architecture (its own parameter values are ignored).
        global_state: parameter name -> global tensor (every trainable parameter).
        personal_state: parameter name -> the site's trained tensor; names it lacks count as global.
        dataset: the site's validation split (private), or the server's public set (patient-level DP).
        groups: ordered ``{group: [parameter names]}`` (``model.parameter_groups()``).

    Returns:
        ``{group: score}`` in the order of ``groups``; scores are >= 0 (nats per sample).
    """
    device = torch.device(device) if device is not None else next(model.parameters()).device
    base = {n: t.to(device) for n, t in global_state.items()}
    swaps: dict[str, dict[str, torch.Tensor]] = {}
    for group, names in groups.items():
        changed = {
            n: personal_state[n].to(device)
            for n in names
            if n in personal_state and not torch.equal(personal_state[n].to(device), base[n])
        }
        if changed:
            swaps[group] = changed
    totals = {g: 0.0 for g in groups}
    n = len(dataset)
    if n == 0 or not swaps:
        return totals
    scratch: Any = _global_copy(model, base, device)  # Any: the staged forward is a MultiModalViT method
    params = dict(scratch.named_parameters())
    entry = getattr(scratch, "first_block_of_group", None)
    starts = {g: entry(g) if entry is not None else None for g in swaps}
    staged = any(start is not None for start in starts.values())
    for begin in range(0, n, batch_size):
        batch = dataset.batch(torch.arange(begin, min(begin + batch_size, n)))
        images, mask, clinical = (batch[k].to(device) for k in ("images", "modality_mask", "clinical"))
        if staged:
            inputs, keep = scratch.block_inputs(images, mask, clinical)
            logits = scratch.forward_from_block(inputs[-1], keep, clinical, len(inputs) - 1)
        else:
            logits = scratch(images, mask, clinical)
        log_q = torch.log_softmax(logits.double(), dim=-1)  # (B, C); float64: KL of nearly equal distributions
        for group, changed in swaps.items():
            _assign(params, changed)
            try:
                start = starts[group]
                logits = (
                    scratch(images, mask, clinical)
                    if start is None
                    else scratch.forward_from_block(inputs[start], keep, clinical, start)
                )
            finally:
                _assign(params, {name: base[name] for name in changed})
            log_p = torch.log_softmax(logits.double(), dim=-1)  # (B, C)
            totals[group] += float((log_p.exp() * (log_p - log_q)).sum())
    # Rounding can leave -1e-9 for a group with no effect; KL is >= 0.
    return {g: max(0.0, s / n) for g, s in totals.items()}


def _global_copy(model: nn.Module, base: State, device: torch.device) -> nn.Module:
    """An eval-mode copy of ``model`` holding the global tensors (no gradients carried over)."""
    scratch = copy.deepcopy(model).to(device).eval()
    for p in scratch.parameters():
        p.grad = None
        p.requires_grad_(False)
    scratch.load_state_dict(dict(base), strict=False)
    return scratch


def _assign(params: Mapping[str, nn.Parameter], tensors: State) -> None:
    for name, value in tensors.items():
        params[name].copy_(value)
