"""Public pretraining: the stage before federation, and the choice of which parameters stay private.

What it is for. Differentially private training pays for every private parameter: the noise a
round adds grows with sqrt(d), the signal does not. The field's answer (Tramer and Boneh 2021,
De et al. 2022, Li et al. 2022) is to learn the features from PUBLIC data first, centrally and at no
privacy cost, and to train privately only a few parameters (a head, the norms, an adapter) on top.
This module is that first stage for the kit:

1. :func:`public_cohort` draws a public cohort: the synthetic generator with its OWN seed (so its
   subjects are new draws, not patients of any site) acquired on the public reference scanner. It
   stands in for public MRI collections; on a GPU, timm's ImageNet ViT weights are another source
   (``create_model(..., pretrained=True)``).
2. :func:`pretrain_public_model` trains the image and clinical encoders on it with the centralized
   recipe of notebook 01 (:func:`mmpfl_core.centralized.train_centralized`: AdamW, warm-up + cosine).
3. :func:`restrict_trainable` freezes every parameter group outside the private part
   (``requires_grad = False``); the federated engines exchange, clip, noise and account only
   ``requires_grad`` parameters, so d, the dimension every accountant-sized noise vector has, is
   the private part's size. :func:`pretrained_model_factory` gives the engines a factory of such
   models.

Privacy argument: steps 1-2 touch no site's data (the public cohort is generated from its own seed
and the reference scanner profile, both public), so the pretrained weights are public and every
later release is post-processing of them plus the site-private training that the strategy accounts.
What this module must never do: read a federation's site splits, or be handed private data as the
"public" cohort (it cannot tell; the caller's config names the source).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from collections.abc import Callable, Sequence

import torch
from torch import nn

from .data.contract import Cohort
from .data.federation import acquire_cohort
from .data.scanners import reference_profile
from .data.synthetic import SyntheticCohortConfig, generate_subjects
from .errors import ConfigError, check_range
from .centralized import TrainedModel, TrainingRecipe, train_centralized
from .seeding import Stream, numpy_generator

__all__ = [
    "BIAS_TERMS",
    "LAST_BLOCK",
    "PRIVATE_PARTS",
    "PublicPretrainingConfig",
    "public_cohort",
    "pretrain_public_model",
    "restrict_trainable",
    "pretrained_model_factory",
    "private_dimension",
]

#: Named private parts: the parameter groups (``model.parameter_groups()``) a site trains privately.
#: ``all`` trains every group (no pretraining benefit in d, the from-scratch baseline).
#: ``head+norm+block`` adds the LAST transformer block (:data:`LAST_BLOCK` resolves to ``block.{depth-1}``;
#: about 50k parameters on ``hybrid-tiny``): enough capacity to adapt the features to the hospitals'
#: domain, too much for one small site's DP-SGD to carry alone (sqrt(d) noise), which is where sharing it pays.
LAST_BLOCK = "block.last"
#: ``head+bias`` is bias-term fine-tuning (BitFit, Zaken et al. 2022; its DP form DP-BiTFiT, Bu et al. 2022):
#: the head plus every one-dimensional parameter of every group, that is every bias and every normalisation
#: scale and shift (the conv stems' norms, the blocks' LayerNorms and biases, the final norm). About 2.9k
#: parameters on ``hybrid-tiny``: the per-feature shifts and gains that undo a contrast or intensity shift between
#: the public scanner and the hospitals' protocol, at a sqrt(d) noise about four times smaller than one block's.
BIAS_TERMS = "bias.all"
PRIVATE_PARTS: dict[str, tuple[str, ...] | None] = {
    "head": ("head",),
    "head+norm": ("norm", "head"),
    "head+norm+clinical": ("clinical", "norm", "head"),
    "head+norm+block": (LAST_BLOCK, "norm", "head"),
    "head+bias": (BIAS_TERMS, "head"),
    "all": None,
}


@dataclass(frozen=True)
class PublicPretrainingConfig:
    """The public stage: how many public subjects, their seed, the recipe, and the private part.

    ``seed`` must differ from the federation cohort's seed: the public subjects are then other draws
    of the same population (checked by :func:`public_cohort`'s caller where it knows both seeds).
    """

    num_subjects: int = 2000
    seed: int = 104_729  # the public cohort's own seed (a prime far from the sites' small seeds)
    recipe: TrainingRecipe = field(default_factory=lambda: TrainingRecipe(epochs=10, lr=1e-3))
    private_part: str = "head+norm"
    difficulty: float = 0.5  # the population's difficulty: the same disease, other subjects

    def __post_init__(self) -> None:
        check_range(
            "PublicPretrainingConfig.num_subjects",
            self.num_subjects,
            low=30,
            fix="A public cohort needs at least a few dozen subjects (2,000 is the kit's default).",
        )
        if self.private_part not in PRIVATE_PARTS:
            raise ConfigError(f"private_part={self.private_part!r} is unknown; use one of {list(PRIVATE_PARTS)}.")
        if isinstance(self.recipe, dict):
            object.__setattr__(self, "recipe", TrainingRecipe(**self.recipe))


def public_cohort(
    num_subjects: int, *, image_size: int, seed: int, difficulty: float = 0.5, forbidden_seeds: Sequence[int] = ()
) -> Cohort:
    """A public cohort: ``num_subjects`` fresh synthetic subjects (own ``seed``) on the reference scanner.

    Args:
        forbidden_seeds: seeds of private cohorts (the federation's); using one of them as the public
            seed would re-draw the sites' own patients, so it is refused.
    """
    if int(seed) in {int(s) for s in forbidden_seeds}:
        raise ConfigError(
            f"public seed {seed} equals a private cohort's seed: the 'public' subjects would be the "
            "sites' own patients. Give the public cohort a seed of its own."
        )
    subjects = generate_subjects(
        SyntheticCohortConfig(num_subjects=num_subjects, image_size=image_size, difficulty=difficulty, seed=int(seed))
    )
    assert isinstance(subjects, Cohort)  # without return_tissue_maps it is the cohort alone
    return acquire_cohort(subjects, reference_profile(), numpy_generator(int(seed), Stream.PUBLIC_SCAN), site=-1)


def pretrain_public_model(
    model: nn.Module, cohort: Cohort, recipe: TrainingRecipe, *, seed: int = 0, device: str | torch.device = "cpu"
) -> TrainedModel:
    """Train ``model`` (all parameters) in place on the public ``cohort`` with the centralized recipe."""
    if cohort.sites is not None and len(cohort) and int(cohort.sites.max()) >= 0:
        raise ConfigError(
            "pretrain_public_model got a cohort with site ids >= 0 (a site's private data?); the "
            "public cohort carries site -1 (public_cohort or Federation.public)."
        )
    return train_centralized(model, cohort, recipe, seed=seed, device=device)


def restrict_trainable(model: nn.Module, private_part: str | Sequence[str] | None) -> int:
    """Freeze every parameter group outside ``private_part``; return the private dimension d.

    ``private_part`` is a name of :data:`PRIVATE_PARTS`, a sequence of group names of
    ``model.parameter_groups()``, or None (every parameter stays trainable).
    """
    groups = (
        PRIVATE_PARTS[private_part] if isinstance(private_part, str) and private_part in PRIVATE_PARTS else private_part
    )
    if isinstance(groups, str):
        raise ConfigError(
            f"private part {private_part!r} is unknown; use one of {list(PRIVATE_PARTS)} or a list of "
            "parameter-group names."
        )
    if groups is None:
        for p in model.parameters():
            p.requires_grad_(True)
        return private_dimension(model)
    groups_of = getattr(model, "parameter_groups", None)
    if not callable(groups_of):
        raise ConfigError("restrict_trainable needs a model with parameter_groups() (the kit's ViT or CNN).")
    known = groups_of()
    groups = [_last_block(known) if g == LAST_BLOCK else g for g in groups]
    unknown = [g for g in groups if g not in known and g != BIAS_TERMS]
    if unknown:
        raise ConfigError(f"private part names unknown parameter groups {unknown}; the model has {list(known)}.")
    keep = {n for g in groups if g != BIAS_TERMS for n in known[g]}
    if BIAS_TERMS in groups:  # every bias and norm scale/shift, whatever its group (the groups stay whole)
        keep |= {n for n, p in model.named_parameters() if p.ndim == 1}
    for name, p in model.named_parameters():
        p.requires_grad_(name in keep)
    return private_dimension(model)


def _last_block(known: dict[str, list[str]]) -> str:
    """The name of the model's last transformer block group (``block.{i}`` with the largest i)."""
    blocks = [g for g in known if g.startswith("block.") and g[len("block.") :].isdigit()]
    if not blocks:
        raise ConfigError(
            f"private part {LAST_BLOCK!r} needs a model with transformer blocks (groups 'block.i'); the model "
            f"has {list(known)}. Use 'head+norm' for a model without blocks."
        )
    return max(blocks, key=lambda g: int(g[len("block.") :]))


def private_dimension(model: nn.Module) -> int:
    """d: the number of trainable (private, exchanged, noised) scalars."""
    return int(sum(p.numel() for p in model.parameters() if p.requires_grad))


def pretrained_model_factory(
    base_factory: Callable[[], nn.Module],
    public_state: dict[str, torch.Tensor],
    private_part: str | Sequence[str] | None,
) -> Callable[[], nn.Module]:
    """A factory of models that hold the public weights and train only ``private_part``."""
    frozen = {n: t.detach().clone() for n, t in public_state.items()}

    def factory() -> nn.Module:
        model = base_factory()
        missing, unexpected = model.load_state_dict(frozen, strict=False)
        if unexpected or missing:
            raise ConfigError(
                f"public weights do not fit the model (missing {missing[:3]}, unexpected "
                f"{unexpected[:3]}); pretrain the same preset the federation uses."
            )
        restrict_trainable(model, private_part)
        return model

    return factory
