"""The site side of a round: train a copy of the model on the site's data and return the update.

Engine-agnostic: :func:`local_update` takes a model, the site's dataset and configs, and returns a
:class:`ClientUpdate` of plain tensors. The in-process simulator calls it directly; the Flower
client app calls the same function. It never sees other sites' data or the server's state beyond
the parameters it was sent.

What leaves the site is decided by the strategy (``Strategy.transmit``), not here: this module only
computes ``delta = theta_local - theta_global`` for every trainable parameter.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING
from collections.abc import Callable

import torch
from torch import nn

from ..data.contract import CohortDataset
from .config import LocalTrainingConfig, OptimizerConfig

if TYPE_CHECKING:  # imported lazily at run time: opacus is only needed for DP-SGD
    from ..privacy.dp_sgd import PrivateTraining

#: An extra term of the local objective, e.g. FedProx's proximal term; gets the model being trained.
LossRegulariser = Callable[[nn.Module], torch.Tensor]


@dataclass
class ClientUpdate:
    """What a site computed in one round (before the strategy decides what to transmit)."""

    site_id: int
    delta: dict[str, torch.Tensor]  # parameter name -> theta_local - theta_start
    num_examples: int
    num_steps: int
    train_loss: float
    metrics: dict[str, float] = field(default_factory=dict)


def build_optimizer(params, config: OptimizerConfig) -> torch.optim.Optimizer:
    """A fresh optimiser: clients are stateless across rounds (they may not be sampled again)."""
    if config.name == "sgd":
        return torch.optim.SGD(params, lr=config.lr, momentum=config.momentum, weight_decay=config.weight_decay)
    return torch.optim.AdamW(params, lr=config.lr, weight_decay=config.weight_decay)


def batch_schedule(num_examples: int, config: LocalTrainingConfig, generator: torch.Generator) -> list[torch.Tensor]:
    """Index batches for one round: shuffled epochs, or exactly ``local_steps`` batches.

    The last partial batch of an epoch is kept (small sites would otherwise lose data).
    """
    batches: list[torch.Tensor] = []
    target = config.local_steps
    epochs = config.local_epochs if target is None else None
    while True:
        order = torch.randperm(num_examples, generator=generator)
        for start in range(0, num_examples, config.batch_size):
            batches.append(order[start : start + config.batch_size])
            if target is not None and len(batches) == target:
                return batches
        if epochs is not None:
            epochs -= 1
            if epochs == 0:
                return batches


def forward_batch(model: nn.Module, batch: dict[str, torch.Tensor], device: torch.device) -> torch.Tensor:
    """Logits for a contract batch (images, modality_mask, clinical) moved to ``device``."""
    return model(
        batch["images"].to(device, non_blocking=True),
        batch["modality_mask"].to(device, non_blocking=True),
        batch["clinical"].to(device, non_blocking=True),
    )


def trainable_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """Detached copies of the trainable parameters, by name (what FL exchanges)."""
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


def local_update(
    model: nn.Module,
    dataset: CohortDataset,
    *,
    site_id: int,
    training: LocalTrainingConfig,
    optimizer: OptimizerConfig,
    generator: torch.Generator,
    device: torch.device,
    regulariser: LossRegulariser | None = None,
    private_training: PrivateTraining | None = None,
) -> ClientUpdate:
    """Train ``model`` in place on ``dataset`` and return the parameter delta.

    Steps: 1) remember the starting parameters theta_0; 2) run the batch schedule with a fresh
    optimiser on cross-entropy (+ the strategy's regulariser); 3) return theta_T - theta_0.

    Args:
        model: the site's working copy, already holding the parameters the round starts from.
        dataset: the site's training split.
        generator: the site's random stream for this round (shuffling), derived from the run seed.
        regulariser: extra loss term (FedProx, Ditto), evaluated on the model being trained.
        private_training: sample-level DP-SGD settings (:mod:`mmpfl_core.privacy.dp_sgd`); None
            (default) trains without it, exactly as before.
    """
    if private_training is not None:
        return _private_local_update(
            model,
            dataset,
            site_id=site_id,
            training=training,
            optimizer=optimizer,
            generator=generator,
            device=device,
            regulariser=regulariser,
            private=private_training,
        )
    model.to(device).train()
    start = trainable_state(model)
    opt = build_optimizer([p for p in model.parameters() if p.requires_grad], optimizer)
    loss_fn = nn.CrossEntropyLoss()
    total_loss, steps = 0.0, 0
    for index in batch_schedule(len(dataset), training, generator):
        batch = dataset.batch(index)
        opt.zero_grad(set_to_none=True)
        loss = loss_fn(forward_batch(model, batch, device), batch["label"].to(device))
        if regulariser is not None:
            loss = loss + regulariser(model)
        loss.backward()
        if training.max_grad_norm is not None:
            nn.utils.clip_grad_norm_(model.parameters(), training.max_grad_norm)
        opt.step()
        total_loss += loss.detach()  # summed on the device: no host sync per step on a GPU
        steps += 1
    delta = {n: p.detach() - start[n] for n, p in model.named_parameters() if n in start}
    return ClientUpdate(
        site_id=site_id,
        delta=delta,
        num_examples=len(dataset),
        num_steps=steps,
        train_loss=float(total_loss) / max(steps, 1),
    )


def steps_per_round(num_examples: int, config: LocalTrainingConfig) -> int:
    """DP-SGD steps of one round: ``local_steps``, or ``local_epochs`` x ceil(n / B) Poisson batches."""
    if config.local_steps is not None:
        return config.local_steps
    return config.local_epochs * max(1, -(-num_examples // config.batch_size))


def _private_local_update(
    model: nn.Module,
    dataset: CohortDataset,
    *,
    site_id: int,
    training: LocalTrainingConfig,
    optimizer: OptimizerConfig,
    generator: torch.Generator,
    device: torch.device,
    regulariser: LossRegulariser | None,
    private: PrivateTraining,
) -> ClientUpdate:
    """DP-SGD version of :func:`local_update` (algorithm in :mod:`mmpfl_core.privacy.dp_sgd`).

    Poisson batches with rate q = B / n and per-sample clipping and noise by Opacus; batches and
    noise from the OS CSPRNG (``private.secret_randomness``, default) or, reproducibly and NOT
    privately, from ``generator``. With ``private.group_noise`` (per-group DP-SGD, planned by the
    strategy from public data) ``make_private`` returns an optimiser that clips each parameter group
    of each per-sample gradient to C_g and adds N(0, sigma_g^2) per group; this loop is unchanged.

    A ``regulariser`` (FedProx's or MR-MTL's pull towards the global model) must depend on the
    parameters and on public or already-released values only, never on the site's patients: its
    gradient is then added AFTER Opacus clipped the per-sample gradients and added the noise, which
    is post-processing of the private gradient and costs no privacy (Liu et al. 2022, MR-MTL with
    DP-SGD). Adding it before the clipping would clip a data-independent term with the patients'.
    """
    from ..privacy.dp_sgd import make_private, poisson_batch

    model.to(device).train()
    start = trainable_state(model)
    params = [p for p in model.parameters() if p.requires_grad]
    noise_generator = batch_generator = None  # secret: OS CSPRNG batches and noise (privacy/randomness.py)
    if not private.secret_randomness:  # reproducible-insecure: both from the site's seeded stream
        noise_generator = torch.Generator(device=device)
        noise_generator.manual_seed(int(torch.randint(2**62, (1,), generator=generator)))
        batch_generator = generator
    wrapped, opt = make_private(
        module=model, optimizer=build_optimizer(params, optimizer), training=private, generator=noise_generator
    )
    loss_fn = nn.CrossEntropyLoss()
    total_loss, steps = 0.0, 0
    try:
        for _ in range(steps_per_round(len(dataset), training)):
            index = poisson_batch(len(dataset), private.sample_rate, batch_generator)
            opt.zero_grad(set_to_none=True)
            if len(index) == 0:  # an empty Poisson batch still releases (noise only) and is charged
                for p in params:
                    p.grad_sample = torch.zeros(  # type: ignore[attr-defined]  # Opacus's per-sample slot
                        (0, *p.shape), device=p.device, dtype=p.dtype
                    )
            else:
                batch = dataset.batch(index)
                loss = loss_fn(forward_batch(wrapped, batch, device), batch["label"].to(device))
                loss.backward()
                total_loss += loss.detach()
            if regulariser is None:
                opt.step()
            elif opt.pre_step():  # per-sample clip, noise, average: the private gradient in p.grad
                extra = torch.autograd.grad(regulariser(model), params, allow_unused=True)
                for p, g in zip(params, extra, strict=False):
                    if g is not None:
                        p.grad = g if p.grad is None else p.grad + g
                opt.original_optimizer.step()
            steps += 1
    finally:
        wrapped._close()  # remove Opacus hooks from the working model
    delta = {n: p.detach() - start[n] for n, p in model.named_parameters() if n in start}
    return ClientUpdate(
        site_id=site_id,
        delta=delta,
        num_examples=len(dataset),
        num_steps=steps,
        train_loss=float(total_loss) / max(steps, 1),
    )
