"""Diagonal Fisher information on PUBLIC data, for the per-group noise allocation (docs/DESIGN.md 4.3).

What it is for: estimating how sensitive the model's predictions are to each parameter,
F_theta = E_x E_{y ~ p(y|x)} [(d log p(y|x) / d theta)^2] (the "true" Fisher; with ``labels="true"``
the empirical Fisher using the observed labels), and averaging it per named parameter group. The
weights F_g feed :func:`mmpfl_core.privacy.allocation.fisher_noise_allocation`.

Privacy argument: these functions must only ever be given the global model (already released) and
the PUBLIC server-side set (or already released noisy aggregates). Then F_g, and the sigma_g chosen
from it, are post-processing of public information and cost no privacy. They have no access to any
site's data and must never be called on it: a Fisher computed from private data would leak through
the noise scales and would have to be privatised and accounted.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterable, Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, grad, vmap

from mmpfl_core.errors import ConfigError

__all__ = ["diagonal_fisher", "group_fisher"]

Batch = tuple[tuple[torch.Tensor, ...], torch.Tensor]  # (inputs tuple, integer labels)


def _per_sample_sq_grads(
    model: nn.Module,
    params: dict[str, torch.Tensor],
    buffers: dict[str, torch.Tensor],
    inputs: tuple[torch.Tensor, ...],
    labels: torch.Tensor,
    method: str,
) -> dict[str, torch.Tensor]:
    """Sum over the batch of squared per-sample gradients of log p(y_i | x_i) (``vmap`` or ``loop``)."""

    def nll(p: dict[str, torch.Tensor], xs: tuple[torch.Tensor, ...], y: torch.Tensor):
        out = functional_call(model, (p, buffers), tuple(x.unsqueeze(0) for x in xs))  # (1, K)
        return F.cross_entropy(out, y.unsqueeze(0))

    if method == "vmap":
        grads = vmap(grad(nll), in_dims=(None, 0, 0))(params, inputs, labels)  # name -> (B, *shape)
        return {k: (g**2).sum(0) for k, g in grads.items()}
    sums = {k: torch.zeros_like(v) for k, v in params.items()}
    for i in range(labels.shape[0]):
        g = grad(nll)(params, tuple(x[i] for x in inputs), labels[i])
        for k in sums:
            sums[k] += g[k] ** 2
    return sums


def _hooks_sq_grads(
    sampler: nn.Module,
    params: dict[str, nn.Parameter],
    inputs: tuple[torch.Tensor, ...],
    labels: str,
    generator: torch.Generator | None,
    given: torch.Tensor,
) -> tuple[dict[str, torch.Tensor], int]:
    """Opacus ``GradSampleModule`` version: one forward and one backward for the whole batch.

    The loss is summed over the batch, so each ``grad_sample[i]`` is sample i's own gradient.
    With sampled labels the one forward pass also gives the softmax they are drawn from (dropout is
    off, see :func:`_capture_without_randomness`, so it is the softmax the other methods' no-grad
    pass sees, and a seeded generator draws the same labels).
    """
    logits = sampler(*inputs)
    y = given
    if labels == "model":
        probs = torch.softmax(logits.detach().float(), dim=-1)  # (B, K)
        y = torch.multinomial(probs.cpu(), 1, generator=generator).squeeze(1).to(probs.device)
    F.cross_entropy(logits, y.long(), reduction="sum").backward()
    sums = {}
    for k, p in params.items():
        grad_sample = p.grad_sample  # type: ignore[attr-defined]  # set by Opacus' hooks
        sums[k] = (grad_sample**2).sum(0)
        p.grad_sample, p.grad = None, None  # type: ignore[attr-defined]
    return sums, int(y.shape[0])


def diagonal_fisher(
    model: nn.Module,
    batches: Iterable[Batch],
    *,
    labels: str = "model",
    generator: torch.Generator | None = None,
    max_batches: int | None = None,
    method: str = "hooks",
) -> dict[str, torch.Tensor]:
    """Diagonal Fisher of ``model`` (classifier returning logits ``model(*inputs)``) on public data.

    Algorithm:
        1. Put the model in eval mode (no dropout, batch-norm running statistics) and restore its
           mode afterwards; parameters are read, never changed.
        2. For each batch (inputs tuple, labels): with ``labels="model"`` draw y_i ~ p(y | x_i) from
           the model's softmax using ``generator`` (true Fisher); with ``labels="true"`` use the
           given labels (empirical Fisher).
        3. Per-sample gradients g_i of log p(y_i | x_i) w.r.t. every trainable parameter, with
           Opacus's per-sample gradient hooks (``method="hooks"``, the default: one forward and one
           backward per batch, fused attention allowed, data-dependent branches allowed; 1.4x a
           plain training step at the teaching preset on 2 CPU cores, vmap 1.5x),
           ``torch.func.vmap(grad(...))`` (``method="vmap"``, needs explicit attention) or a
           per-sample loop (``method="loop"``, for any model).
        4. Return the mean over samples of g_i^2, per parameter (same shapes as the parameters).

    Args:
        model: the global model (public). Only parameters with ``requires_grad`` are included.
        batches: iterable of ``((x1, x2, ...), y)`` from the PUBLIC server set only.
        labels: "model" (sampled labels, true Fisher) or "true" (observed labels).
        generator: torch.Generator for the label sampling; required when ``labels="model"``.
        max_batches: stop after this many batches (None: all).
        method: "hooks", "vmap" or "loop" (equal up to float rounding; a test checks it).

    Raises:
        ConfigError: unknown ``labels``/``method``, missing generator, or no samples seen.
    """
    if labels not in ("model", "true"):
        raise ConfigError(f"labels={labels!r} must be 'model' (sampled, true Fisher) or 'true'.")
    if method not in ("hooks", "vmap", "loop"):
        raise ConfigError(f"method={method!r} must be 'hooks', 'vmap' or 'loop'.")
    if labels == "model" and generator is None:
        raise ConfigError(
            "labels='model' samples y ~ p(y|x) and needs a torch.Generator; pass "
            "generator=mmpfl_core.seeding.torch_generator(seed, ...)."
        )
    if method == "hooks":
        return _hooks_fisher(model, batches, labels=labels, generator=generator, max_batches=max_batches)
    params = {k: v.detach() for k, v in model.named_parameters() if v.requires_grad}
    buffers = {k: v.detach() for k, v in model.named_buffers()}
    sums = {k: torch.zeros_like(v) for k, v in params.items()}
    count = 0
    was_training = model.training
    model.eval()
    try:
        for b, (inputs, y) in enumerate(batches):
            if max_batches is not None and b >= max_batches:
                break
            inputs = tuple(inputs)
            if labels == "model":
                with torch.no_grad():
                    probs = torch.softmax(model(*inputs).float(), dim=-1)  # (B, K)
                y = torch.multinomial(probs.cpu(), 1, generator=generator).squeeze(1).to(probs.device)
            batch_sums = _per_sample_sq_grads(model, params, buffers, inputs, y.long(), method)
            for k in sums:
                sums[k] += batch_sums[k]
            count += int(y.shape[0])
    finally:
        model.train(was_training)
    return _mean(sums, count)


def _hooks_fisher(
    model: nn.Module,
    batches: Iterable[Batch],
    *,
    labels: str,
    generator: torch.Generator | None,
    max_batches: int | None,
) -> dict[str, torch.Tensor]:
    """``diagonal_fisher(method="hooks")`` on ``model`` itself (a copy cost a fifth of the time on the
    tiny preset); whatever happens, the model leaves with its own modes and ``.grad`` and without
    Opacus's hooks or attributes."""
    from opacus import GradSampleModule

    modes = {module: module.training for module in model.modules()}
    params = {k: v for k, v in model.named_parameters() if v.requires_grad}
    saved_grads = {k: v.grad for k, v in params.items()}
    sums = {k: torch.zeros_like(v) for k, v in params.items()}
    count = 0
    _capture_without_randomness(model)
    sampler = None
    try:
        for p in params.values():
            p.grad = None
        sampler = GradSampleModule(model, batch_first=True, loss_reduction="sum")
        with warnings.catch_warnings():
            # The inputs (images) need no gradient, so torch warns that the full backward hook fires
            # on the outputs' gradients: that is what Opacus relies on.
            warnings.filterwarnings("ignore", message="Full backward hook is firing", category=UserWarning)
            for b, (inputs, y) in enumerate(batches):
                if max_batches is not None and b >= max_batches:
                    break
                batch_sums, seen = _hooks_sq_grads(sampler, params, tuple(inputs), labels, generator, y)
                for k in sums:
                    sums[k] += batch_sums[k]
                count += seen
    finally:
        if sampler is not None:
            sampler._close()
        for module, training in modes.items():
            module.training = training
        for k, p in params.items():
            p.grad = saved_grads[k]
    return _mean(sums, count)


def _capture_without_randomness(model: nn.Module) -> None:
    """Eval-mode behaviour with Opacus still capturing activations.

    Opacus records a layer's activations only while that layer is in training mode, so the layers
    that own parameters (Linear, LayerNorm, conv, embeddings: the same computation in either mode)
    are put in training mode and every other module (dropout, drop-path, attention's dropout switch)
    in eval mode. Norm layers with running statistics behave differently in training mode, so they
    are refused.
    """
    for module in model.modules():
        if isinstance(module, nn.modules.batchnorm._NormBase):
            raise ConfigError(
                f"diagonal_fisher(method='hooks') cannot run {type(module).__name__} (running statistics "
                "change in training mode); use method='vmap' or 'loop'."
            )
        module.training = any(True for _ in module.parameters(recurse=False))


def _mean(sums: dict[str, torch.Tensor], count: int) -> dict[str, torch.Tensor]:
    if count == 0:
        raise ConfigError("diagonal_fisher saw no samples; pass a non-empty public set.")
    return {k: s / count for k, s in sums.items()}


def group_fisher(fisher: Mapping[str, torch.Tensor], groups: Mapping[str, Sequence[str]]) -> dict[str, float]:
    """Mean diagonal Fisher per group: sum of entries over the group's parameters / their count.

    Parameters named in a group but absent from ``fisher`` (frozen) are skipped.

    Raises:
        ConfigError: a group has none of its parameters in ``fisher``.
    """
    out = {}
    for group, names in groups.items():
        present = [fisher[n] for n in names if n in fisher]
        if not present:
            raise ConfigError(
                f"group {group!r} has no parameter in the Fisher estimate (names "
                f"{list(names)[:3]}...); leave untransmitted or frozen groups out."
            )
        total = sum(float(t.double().sum()) for t in present)
        out[group] = total / sum(t.numel() for t in present)
    return out
