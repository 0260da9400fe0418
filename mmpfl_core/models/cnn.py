"""`MultiModalCNN`: the convolutional baseline beside the ViT, with the same inputs, outputs and groups.

A small timm ``ResNet`` (BasicBlocks, one per stage, deep 3x3 stem) reads the MRI sequences stacked
as input channels (missing ones zeroed by the modality mask, as the ViT's early fusion), its pooled
features are concatenated with a linear projection of the clinical vector, and one linear head
classifies: ``logits = W [resnet(x * mask); W_c c] + b``. Same call, ``model(images, modality_mask,
clinical)``, so the engine, the strategies and the privacy code take it unchanged.

Two changes to timm's ImageNet ResNet, both for 32-64 px slices in federated, private training:

* ``nn.GroupNorm`` instead of BatchNorm: BatchNorm keeps running statistics (buffers) that federated
  averaging does not aggregate, and mixes samples within a batch, which breaks per-sample gradients
  (Opacus refuses it). Plain ``nn.GroupNorm`` (not a timm subclass) so Opacus finds its exact rule.
* no stem max-pool (as CIFAR ResNets): a 32 px slice would otherwise be 8 px before the first stage.

The model knows no federation and no privacy maths: it exposes named parameter groups
(:meth:`MultiModalCNN.parameter_groups`): ``stem``, ``stage.0`` .. ``stage.3``, ``clinical``, ``head``.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Literal, cast

import torch
from timm.models.resnet import BasicBlock, ResNet
from torch import nn

from ..errors import ConfigError, check_range
from .layers import GroupedModel, init_module
from .vit import DEFAULT_MODALITY_NAMES

__all__ = ["CNNConfig", "MultiModalCNN"]


@dataclass(frozen=True)
class CNNConfig:
    """Architecture of a :class:`MultiModalCNN`. Validated on creation (raises ConfigError).

    Shares the data-shape fields of ``ViTConfig`` (``image_size``, ``num_modalities``,
    ``num_clinical``, ``num_classes``, ``use_clinical``), so :func:`~.presets.create_model` fills
    them the same way for both model families.
    """

    image_size: int = 32  # square input side; any size >= 16 (global average pooling)
    num_modalities: int = 3
    num_clinical: int = 4
    num_classes: int = 3
    channels: tuple[int, ...] = (16, 32, 64, 128)  # widths of the four ResNet stages
    use_clinical: bool = True
    drop_rate: float = 0.0  # dropout before the head
    fusion: Literal["early"] = "early"  # sequences are input channels; the only mode of the CNN
    modality_names: tuple[str, ...] | None = None  # accepted for symmetry with ViTConfig

    def __post_init__(self) -> None:
        for f in fields(self):
            if f.type == "int":
                v = getattr(self, f.name)
                if not isinstance(v, int) or isinstance(v, bool):
                    raise ConfigError(f"CNNConfig.{f.name}={v!r} must be an int. Pass a whole number.")
        check_range("CNNConfig.image_size", self.image_size, low=16, fix="Use images of at least 16 px.")
        for name in ("num_modalities", "num_classes"):
            check_range(f"CNNConfig.{name}", getattr(self, name), low=1, fix="Use a positive integer.")
        check_range("CNNConfig.num_clinical", self.num_clinical, low=0, fix="Use 0 or more.")
        check_range("CNNConfig.drop_rate", self.drop_rate, low=0, high=1, high_inclusive=False)
        chans = tuple(self.channels)
        if len(chans) != 4 or any(not isinstance(c, int) or c < 4 or c % 4 for c in chans):
            raise ConfigError(
                f"CNNConfig.channels={self.channels!r} must be four stage widths, each a "
                "multiple of 4 (GroupNorm groups), e.g. (16, 32, 64, 128)."
            )
        object.__setattr__(self, "channels", chans)
        if self.fusion != "early":
            raise ConfigError(
                f"CNNConfig.fusion={self.fusion!r}: the CNN stacks sequences as channels "
                "('early') only. Use a ViT preset for token or late fusion."
            )
        if self.use_clinical and self.num_clinical == 0:
            raise ConfigError(
                "CNNConfig.use_clinical=True but num_clinical=0. Set use_clinical=False "
                "or give the number of clinical variables."
            )

    @property
    def names(self) -> tuple[str, ...]:
        if self.modality_names is not None:
            return tuple(self.modality_names)
        return (
            DEFAULT_MODALITY_NAMES if self.num_modalities == 3 else tuple(f"m{i}" for i in range(self.num_modalities))
        )


def _relu(inplace: bool = False) -> nn.ReLU:
    """timm asks for ``act_layer(inplace=True)``; an in-place ReLU on the output of an Opacus
    backward hook is forbidden by autograd, so the CNN always uses the out-of-place one."""
    return nn.ReLU(inplace=False)


class _OutOfPlaceResidual(nn.Module):
    """Sits in timm BasicBlock's attention slot (after the last norm) and returns a fresh tensor.

    timm's BasicBlock ends with ``x += shortcut``: in place on the last norm's output, which under
    Opacus hooks mode is the output of a backward hook, and autograd forbids modifying that in
    place. ``x * 1`` costs one elementwise op and makes the add legal (timm offers no flag).
    """

    def __init__(self, channels: int, **kwargs) -> None:
        super().__init__()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * 1


def _group_norm(num_channels: int, **kwargs) -> nn.GroupNorm:
    """timm calls ``norm_layer(channels, device=, dtype=)``; groups of 4+ channels, at most 8 groups."""
    return nn.GroupNorm(min(8, num_channels // 4), num_channels, **kwargs)


class MultiModalCNN(GroupedModel):
    """ResNet over stacked MRI sequences ``(B, M, H, W)`` fused with clinical variables ``(B, K)``.

    Args:
        config: architecture.
        generator: random generator for the weight init (``None``: one seed from the global RNG,
            as :class:`~.vit.MultiModalViT`).
    """

    def __init__(self, config: CNNConfig, *, generator: torch.Generator | None = None) -> None:
        super().__init__()
        self.config = cfg = config
        self.num_classes = cfg.num_classes
        with torch.random.fork_rng(devices=[]):  # creation leaves the global RNG untouched
            self.backbone = ResNet(
                block=BasicBlock,  # type: ignore[arg-type]  # timm types block as an instance; it takes the class
                layers=(1, 1, 1, 1),
                channels=cfg.channels,
                in_chans=cfg.num_modalities,
                num_classes=0,
                stem_width=cfg.channels[0],
                stem_type="deep",
                norm_layer=_group_norm,
                act_layer=_relu,
                block_args={"attn_layer": _OutOfPlaceResidual},
            )
            self.backbone.maxpool = nn.Identity()  # type: ignore[assignment]  # keep resolution for 32-64 px slices
            width = self.backbone.num_features
            self.clinical_proj = nn.Linear(cfg.num_clinical, width) if cfg.use_clinical else None
            self.num_features = width * (2 if cfg.use_clinical else 1)
            self.head_drop = nn.Dropout(cfg.drop_rate)
            self.head = nn.Linear(self.num_features, cfg.num_classes)
        self.init_weights(generator)

    @torch.no_grad()
    def init_weights(self, generator: torch.Generator | None = None) -> None:
        """LeCun-normal convs, truncated-normal linears (:func:`~.layers.init_module`); then the last
        norm of each residual block to zero (timm's ``zero_init_last``: blocks start as identities)."""
        if generator is None:
            generator = torch.Generator().manual_seed(int(torch.randint(0, 2**62, (1,)).item()))
        for module in self.modules():
            init_module(module, generator)
        for stage in (self.backbone.layer1, self.backbone.layer2, self.backbone.layer3, self.backbone.layer4):
            for block in cast(nn.Sequential, stage):
                cast(BasicBlock, block).zero_init_last()

    def forward_features(
        self, images: torch.Tensor, modality_mask: torch.Tensor, clinical: torch.Tensor
    ) -> torch.Tensor:
        """Pooled features (B, num_features): image features, then the clinical projection."""
        x = images * modality_mask.to(images.dtype)[:, :, None, None]  # (B, M, H, W), missing = 0
        feats = self.backbone(x)  # (B, C) after global average pooling
        if self.clinical_proj is not None:
            feats = torch.cat([feats, self.clinical_proj(clinical)], dim=1)  # (B, 2C)
        return feats

    def forward_head(self, features: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        x = self.head_drop(features)
        return x if pre_logits else self.head(x)

    def forward(self, images: torch.Tensor, modality_mask: torch.Tensor, clinical: torch.Tensor) -> torch.Tensor:
        """Logits (B, num_classes) for images (B, M, H, W), mask (B, M) bool, clinical (B, K)."""
        return self.forward_head(self.forward_features(images, modality_mask, clinical))

    def first_block_of_group(self, group: str) -> int | None:
        """Always None: every group changes the whole forward pass (no staged forward for the CNN)."""
        return None

    def parameter_groups(self) -> dict[str, list[str]]:
        """Ordered ``{group: [parameter names]}``: ``stem``, ``stage.0..3``, ``clinical``, ``head``."""
        prefixes: list[tuple[str, tuple[str, ...]]] = [("stem", ("backbone.conv1", "backbone.bn1"))]
        prefixes += [(f"stage.{i}", (f"backbone.layer{i + 1}",)) for i in range(4)]
        prefixes += [("clinical", ("clinical_proj",)), ("head", ("head",))]
        out: dict[str, list[str]] = {}
        for group, heads in prefixes:
            names = [n for n, _ in self.named_parameters() if any(n.startswith(h + ".") for h in heads)]
            if names:
                out[group] = names
        return out
