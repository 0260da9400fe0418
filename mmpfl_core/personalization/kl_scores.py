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

Privacy: the scores are computed from a site's private validation data. They must never leave the
site as they are, except to a trusted aggregator (``server`` noise placement); otherwise release
them through :func:`mmpfl_core.personalization.release.release_scores` (DESIGN 4.4).
"""
from __future__ import annotations

from typing import Mapping, Sequence

import torch
from torch import nn
from torch.func import functional_call

from ..data.contract import CohortDataset

__all__ = ["kl_group_scores"]

State = Mapping[str, torch.Tensor]


@torch.no_grad()
def kl_group_scores(model: nn.Module, global_state: State, personal_state: State, dataset: CohortDataset,
                    groups: Mapping[str, Sequence[str]], *, batch_size: int = 256,
                    device: torch.device | str | None = None) -> dict[str, float]:
    """Mean KL(p_personal_g || p_global) per parameter group on ``dataset`` (see the module docstring).

    Steps, per batch: 1) one forward pass of the global model (``functional_call`` with the global
    tensors; the module's own parameters are not touched); 2) for every group whose personal tensors
    differ from the global ones, one forward pass with just that group's tensors swapped in (no model
    copies); 3) accumulate sum_x sum_c p_g log(p_g / p_glob). Groups identical to the global model
    score exactly 0 without a forward pass. Runs in eval mode (no dropout) and restores the mode.

    Args:
        model: any module of the architecture (its own parameter values are ignored).
        global_state: parameter name -> global tensor (every trainable parameter).
        personal_state: parameter name -> the site's trained tensor; names it lacks count as global.
        dataset: the site's validation split (private).
        groups: ordered ``{group: [parameter names]}`` (``model.parameter_groups()``).

    Returns:
        ``{group: score}`` in the order of ``groups``; scores are >= 0 (nats per sample).
    """
    device = torch.device(device) if device is not None else next(model.parameters()).device
    base = {n: t.to(device) for n, t in global_state.items()}
    swaps: dict[str, dict[str, torch.Tensor]] = {}
    for group, names in groups.items():
        changed = {n: personal_state[n].to(device) for n in names
                   if n in personal_state and not torch.equal(personal_state[n].to(device), base[n])}
        if changed:
            swaps[group] = {**base, **changed}
    totals = {g: 0.0 for g in groups}
    n = len(dataset)
    if n == 0 or not swaps:
        return totals
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():  # scores need no gradients: no autograd graph for the 1 + G forward passes
            for begin in range(0, n, batch_size):
                batch = dataset.batch(torch.arange(begin, min(begin + batch_size, n)))
                args = (batch["images"].to(device), batch["modality_mask"].to(device), batch["clinical"].to(device))
                log_q = torch.log_softmax(functional_call(model, base, args).float(), dim=-1)  # (B, C)
                for group, params in swaps.items():
                    log_p = torch.log_softmax(functional_call(model, params, args).float(), dim=-1)  # (B, C)
                    totals[group] += float((log_p.exp() * (log_p - log_q)).sum())
    finally:
        model.train(was_training)
    # Rounding can leave -1e-9 for a group with no effect; KL is >= 0.
    return {g: max(0.0, s / n) for g, s in totals.items()}
