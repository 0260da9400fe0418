"""Small Opacus-compatible modules that own the model's "bare" parameters.

timm's ``VisionTransformer`` keeps ``cls_token`` and ``pos_embed`` as ``nn.Parameter`` on the root
module. Opacus (hooks mode) computes per-sample gradients module by module from captured
activations and backprops, so a parameter that belongs to no leaf module with a grad sampler gets
none (Opacus issues #239, #462). Here every such parameter lives in a tiny module, and each module
has a registered grad sampler (and norm sampler, for ghost clipping) whose rule is exact:

* :class:`AdditiveEmbedding` adds a learned tensor ``(1, *S)`` to ``x`` of shape ``(B, ..., *S)``:
  the per-sample gradient is the backprop summed over the broadcast dimensions.
* :class:`ModalityEmbedding` adds row ``m`` of an ``(M, D)`` table to every token of sequence ``m``
  in ``x`` of shape ``(B, M, N, D)``: the per-sample gradient is the backprop summed over tokens.
* :class:`ClassToken` prepends a learned ``(1, 1, D)`` token: the per-sample gradient is the
  backprop of the first output token.

It also holds the small transformer helpers the fusion modes share: :func:`make_blocks` (timm
``Block``s), :func:`run_blocks` (with a key-padding mask), :func:`attention_weights` (explicit
softmax weights, which timm's fused attention never materialises) and :func:`init_module`.

These modules must never hold state between calls (no buffers that depend on data), so that the
per-sample gradients are functions of one sample only.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any, cast

import torch
from opacus.grad_sample import register_grad_sampler, register_norm_sampler
from timm.layers import HybridEmbed, PatchEmbed
from timm.models.vision_transformer import Block
from torch import nn

__all__ = [
    "GroupedModel",
    "AdditiveEmbedding",
    "ModalityEmbedding",
    "ClassToken",
    "make_blocks",
    "run_blocks",
    "attention_weights",
    "init_module",
    "make_patch_embed",
    "STEMS",
]

#: Patch-embedding types of :func:`make_patch_embed` (``ViTConfig.stem``).
STEMS: tuple[str, ...] = ("patch", "conv")


class GroupedModel(nn.Module):
    """A model whose parameters are split into named groups (``parameter_groups``): the unit of masks,
    clipping bounds and noise allocation. Shared by the ViT and the CNN so both count groups alike."""

    num_features: int  # width of the features the head reads
    num_classes: int
    head: nn.Module

    def parameter_groups(self) -> dict[str, list[str]]:  # pragma: no cover - every model overrides it
        raise NotImplementedError

    def group_sizes(self) -> dict[str, int]:
        """Number of scalars per parameter group, in the order of :meth:`parameter_groups`."""
        params = dict(self.named_parameters())
        return {g: sum(params[n].numel() for n in names) for g, names in self.parameter_groups().items()}

    def reset_classifier(self, num_classes: int, *, generator: torch.Generator | None = None) -> None:
        """Replace the head on ``self.num_features`` (``num_classes=0`` gives an identity head, as in timm)."""
        self.num_classes = num_classes
        self.head = nn.Linear(self.num_features, num_classes) if num_classes > 0 else nn.Identity()
        if num_classes > 0:
            g = generator or torch.Generator().manual_seed(int(torch.randint(0, 2**62, (1,)).item()))
            init_module(self.head, g)


class AdditiveEmbedding(nn.Module):
    """Adds a learned tensor of shape ``(1, *shape)`` to inputs of shape ``(B, ..., *shape)``.

    Used for position embeddings ``(1, T, D)`` (also shared across sequences when the input is
    ``(B, M, N, D)``) and for type embeddings such as the clinical token's ``(1, 1, D)``.

    Args:
        *shape: trailing shape of the embedding, e.g. ``(T, D)``.
    """

    def __init__(self, *shape: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(1, *shape))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # the leading singleton broadcasts over the batch and any extra dims (e.g. sequences)
        return x + self.weight

    def extra_repr(self) -> str:
        return f"shape={tuple(self.weight.shape[1:])}"


class ModalityEmbedding(nn.Module):
    """Adds a learned per-sequence vector to every token of that sequence.

    Args:
        num_modalities: number of sequences M.
        embed_dim: token width D.

    Shape:
        input ``(B, M, N, D)``, output the same.
    """

    def __init__(self, num_modalities: int, embed_dim: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(num_modalities, embed_dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.weight[None, :, None, :]  # (1, M, 1, D) broadcast over B and N

    def extra_repr(self) -> str:
        return f"num_modalities={self.weight.shape[0]}, embed_dim={self.weight.shape[1]}"


class ClassToken(nn.Module):
    """Prepends a learned ``(1, 1, D)`` class token to a token sequence.

    Shape:
        input ``(B, T, D)``, output ``(B, 1 + T, D)``.
    """

    def __init__(self, embed_dim: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(1, 1, embed_dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        token = self.weight.expand(x.shape[0], -1, -1)  # (B, 1, D)
        return torch.cat([token, x], dim=1)  # (B, 1 + T, D)

    def extra_repr(self) -> str:
        return f"embed_dim={self.weight.shape[-1]}"


# ---------------------------------------------------------------------------------------------
# Transformer helpers shared by the fusion modes (timm blocks, explicit attention weights, init).
# ---------------------------------------------------------------------------------------------


def make_blocks(
    embed_dim: int,
    depth: int,
    num_heads: int,
    mlp_ratio: float,
    qkv_bias: bool,
    drop_rate: float,
    drop_path_rate: float,
) -> nn.ModuleList:
    """``depth`` timm ``Block``s with stochastic depth rising linearly to ``drop_path_rate``."""
    dpr = torch.linspace(0, drop_path_rate, depth).tolist()
    # nn.LayerNorm, not timm's LayerNorm subclass: Opacus looks grad samplers up by exact type and
    # would otherwise fall back to its functorch path for every norm layer.
    return nn.ModuleList(
        [
            Block(
                embed_dim,
                num_heads,
                mlp_ratio=mlp_ratio,
                qkv_bias=qkv_bias,
                proj_drop=drop_rate,
                drop_path=dpr[i],
                norm_layer=nn.LayerNorm,
            )
            for i in range(depth)
        ]
    )


def run_blocks(blocks: nn.ModuleList, x: torch.Tensor, keep: torch.Tensor | None) -> torch.Tensor:
    """Run ``blocks`` on tokens (B, T, D); ``keep`` (B, T) bool marks the keys that may be attended."""
    # (B, 1, 1, T) bool, True = may be attended to. timm>=1.0 Block/Attention pass attn_mask straight
    # to F.scaled_dot_product_attention, so a key-padding mask needs no custom attention class.
    # Masking (not per-sample gathering of present tokens) keeps one fixed (B, T, D) shape per
    # batch: batched, Opacus hooks see ordinary Linear/LayerNorm calls, and a masked key gets an
    # attention weight of exactly 0, so values of a missing sequence cannot reach any kept token.
    mask = None if keep is None else keep[:, None, None, :]
    for blk in blocks:
        x = blk(x, attn_mask=mask)
    return x


def attention_weights(block: Block, x: torch.Tensor, keep: torch.Tensor | None) -> torch.Tensor:
    """Softmax attention of ``block`` for its input tokens ``x`` (B, T, D) -> (B, heads, T, T).

    timm's fused (SDPA) path never materialises the weights, so recompute them from ``qkv``.
    """
    attn: Any = block.attn  # timm's Attention: q_norm/k_norm/scale are untyped attributes
    B, T, _ = x.shape
    qkv = attn.qkv(block.norm1(x)).reshape(B, T, 3, attn.num_heads, attn.head_dim)  # (B, T, 3, h, d)
    q, k, _ = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # each (B, h, T, d)
    q, k = attn.q_norm(q), attn.k_norm(k)
    scores = (q * attn.scale) @ k.transpose(-2, -1)  # (B, h, T, T)
    if keep is not None:
        scores = scores.masked_fill(~keep[:, None, None, :], float("-inf"))
    return scores.softmax(dim=-1)


def make_patch_embed(
    stem: str, image_size: int, patch_size: int, in_chans: int, embed_dim: int, stem_channels: int
) -> nn.Module:
    """The tokeniser: ``(B, C, H, W)`` images -> ``(B, N, D)`` tokens, N = (H / patch_size)^2.

    * ``patch``: timm ``PatchEmbed``, one linear map of each non-overlapping p x p patch (ViT).
    * ``conv``: timm ``HybridEmbed`` over a small convolutional stem (Xiao et al., "Early
      convolutions help transformers see better", NeurIPS 2021): log2(p) blocks of
      3x3 conv (stride 2) + GroupNorm + GELU, widths ``stem_channels, 2 * stem_channels, ...``,
      then HybridEmbed's 1x1 projection to D. Overlapping 3x3 filters give the small-data ViT the
      locality prior a patch projection lacks: a lesion that straddles a patch border is still one
      local pattern. GroupNorm, not BatchNorm: no running statistics (which federated averaging
      would not aggregate) and an exact Opacus per-sample gradient rule.
    """
    if stem == "patch":
        return PatchEmbed(image_size, patch_size, in_chans, embed_dim)
    layers, width, chans = [], stem_channels, in_chans
    for _ in range(int(math.log2(patch_size))):
        layers += [
            nn.Conv2d(chans, width, 3, stride=2, padding=1, bias=False),
            nn.GroupNorm(min(8, width // 4) or 1, width),
            nn.GELU(),
        ]
        chans, width = width, width * 2
    # HybridEmbed probes the backbone with one zero image to size its projection (no RNG use).
    return HybridEmbed(
        nn.Sequential(*layers) if layers else nn.Identity(),
        img_size=image_size,
        patch_size=1,
        in_chans=in_chans,
        embed_dim=embed_dim,
    )


def init_module(module: nn.Module, g: torch.Generator) -> None:
    """timm-style init of one module from generator ``g`` (parameters owned directly by it)."""
    if isinstance(module, nn.Linear):
        nn.init.trunc_normal_(module.weight, std=0.02, generator=g)
        if module.bias is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, nn.Conv2d):  # patch embedding and conv stem: LeCun normal (jax-style init)
        fan_in = module.weight[0].numel()
        nn.init.trunc_normal_(module.weight, std=fan_in**-0.5, a=-2 * fan_in**-0.5, b=2 * fan_in**-0.5, generator=g)
        if module.bias is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, (nn.LayerNorm, nn.GroupNorm)):
        nn.init.ones_(module.weight)
        nn.init.zeros_(module.bias)
    elif isinstance(module, (AdditiveEmbedding, ModalityEmbedding, ClassToken)):
        nn.init.trunc_normal_(module.weight, std=0.02, generator=g)


# ---------------------------------------------------------------------------------------------
# Opacus per-sample gradient rules. Signature fixed by Opacus:
# ``(layer, activations: list[Tensor], backprops: Tensor) -> dict[Parameter, Tensor (B, *param.shape)]``.
# ``backprops`` is dLoss/d(output) for the whole batch (already rescaled by Opacus for the loss
# reduction); activations are not needed because every rule here is linear in the parameter.
# ---------------------------------------------------------------------------------------------


def _additive_grad_sample(layer: AdditiveEmbedding, backprops: torch.Tensor) -> torch.Tensor:
    batch = backprops.shape[0]
    trailing = layer.weight.shape[1:]
    # sum over every broadcast dim between the batch dim and the embedding's own dims
    gs = backprops.reshape(batch, -1, *trailing).sum(dim=1)  # (B, *S)
    return gs.unsqueeze(1)  # (B, 1, *S) == (B, *weight.shape)


def _modality_grad_sample(layer: ModalityEmbedding, backprops: torch.Tensor) -> torch.Tensor:
    return backprops.sum(dim=2)  # (B, M, N, D) -> (B, M, D)


def _class_token_grad_sample(layer: ClassToken, backprops: torch.Tensor) -> torch.Tensor:
    return backprops[:, :1].unsqueeze(1)  # (B, 1, D) -> (B, 1, 1, D) == (B, *weight.shape)


_RULES: dict[type[nn.Module], Callable[[Any, torch.Tensor], torch.Tensor]] = {
    AdditiveEmbedding: _additive_grad_sample,
    ModalityEmbedding: _modality_grad_sample,
    ClassToken: _class_token_grad_sample,
}


def _embedding_grad_sample(layer: nn.Module, backprops: torch.Tensor) -> tuple[nn.Parameter, torch.Tensor | None]:
    """The layer's weight and its per-sample gradients (B, *weight.shape), or None when it is frozen."""
    weight = cast(nn.Parameter, layer.weight)
    return weight, (_RULES[type(layer)](layer, backprops) if weight.requires_grad else None)


@register_grad_sampler([AdditiveEmbedding, ModalityEmbedding, ClassToken])
def compute_embedding_grad_sample(
    layer: nn.Module, activations: list[torch.Tensor], backprops: torch.Tensor
) -> dict[nn.Parameter, torch.Tensor]:
    """Per-sample gradients of the embedding modules of this file (see module docstring)."""
    weight, gs = _embedding_grad_sample(layer, backprops)
    return {} if gs is None else {weight: gs.to(weight.dtype)}


@register_norm_sampler([AdditiveEmbedding, ModalityEmbedding, ClassToken])
def compute_embedding_norm_sample(
    layer: nn.Module, activations: list[torch.Tensor], backprops: torch.Tensor
) -> dict[nn.Parameter, torch.Tensor]:
    """Per-sample gradient norms (ghost clipping): the parameters are small, so materialise them."""
    weight, gs = _embedding_grad_sample(layer, backprops)
    return {} if gs is None else {weight: gs.flatten(start_dim=1).norm(2, dim=1)}  # (B,)
