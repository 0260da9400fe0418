"""`MultiModalViT`: a timm Vision Transformer that fuses MRI sequences and clinical variables.

Built from timm components (``timm.layers.PatchEmbed`` or ``HybridEmbed``,
``timm.models.vision_transformer.Block``) plus the tiny embedding modules of :mod:`.layers`, so that
Opacus hooks mode has a per-sample gradient rule for every trainable parameter. The tokeniser
(``ViTConfig.stem``) is a linear patch embedding (``"patch"``, the classic ViT) or a small
convolutional stem (``"conv"``, the hybrid ViT of the ``hybrid-*`` presets), which is what lets the
model learn lesions from a few hundred small slices (notebook 01 measures it). Three fusion modes (``ViTConfig.fusion``):

* ``early``: sequences stacked as input channels of one patch embedding (missing ones zeroed).
* ``token``: one patch embedding per sequence plus a learned modality embedding; all tokens share
  one transformer. Tokens of a missing sequence are removed from attention by a key-padding mask
  and never pooled, so a subject's output does not depend on what a missing sequence holds.
  Clinical variables enter as one extra token.
* ``late``: one encoder per sequence; pooled features of present sequences are averaged.

The model knows no federation and no privacy maths (see docs/DESIGN.md 2): it only exposes
stable, named parameter groups (:meth:`MultiModalViT.parameter_groups`) that those layers use.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any, Literal, cast

import torch
from timm.models.vision_transformer import Block
from torch import nn

from ..errors import ConfigError, check_range
from .layers import (
    STEMS,
    AdditiveEmbedding,
    ClassToken,
    GroupedModel,
    ModalityEmbedding,
    attention_weights,
    init_module,
    make_blocks,
    make_patch_embed,
    run_blocks,
)

__all__ = ["ViTConfig", "MultiModalViT", "FUSIONS", "DEFAULT_MODALITY_NAMES"]

FUSIONS: tuple[str, ...] = ("early", "token", "late")
#: Lower-cased ``mmpfl_core.data.contract.MODALITIES`` (models may not import data, docs/DESIGN.md 2).
DEFAULT_MODALITY_NAMES: tuple[str, ...] = ("t1", "t2", "flair")


@dataclass(frozen=True)
class ViTConfig:
    """Architecture of a :class:`MultiModalViT`. Validated on creation (raises ConfigError)."""

    image_size: int = 64  # square input side H = W, in pixels
    patch_size: int = 8  # square patch side; must divide image_size
    num_modalities: int = 3  # MRI sequences M
    num_clinical: int = 4  # clinical variables K
    num_classes: int = 3
    embed_dim: int = 96  # token width D; divisible by num_heads
    depth: int = 4  # transformer blocks (early/token fusion)
    num_heads: int = 3
    mlp_ratio: float = 4.0
    fusion: Literal["early", "token", "late"] = "token"
    use_clinical: bool = True
    drop_rate: float = 0.0  # dropout after embeddings, in blocks, and before the head
    drop_path_rate: float = 0.0  # stochastic depth, linearly increasing over blocks
    late_depth: int | None = None  # blocks per sequence encoder in late fusion; None = depth
    modality_names: tuple[str, ...] | None = None  # group/module names; None = t1,t2,flair or m0..
    qkv_bias: bool = True  # as timm's ViTs (and needed to load their weights)
    stem: Literal["patch", "conv"] = "patch"  # tokeniser: linear patches, or a conv stem (layers.make_patch_embed)
    stem_channels: int = 16  # width of the conv stem's first layer (doubles per stride-2 layer)

    def __post_init__(self) -> None:
        for f in fields(self):  # catch bools/floats where ints are meant (e.g. YAML "depth: 4.0")
            if f.type in ("int", "int | None") and getattr(self, f.name) is not None:
                v = getattr(self, f.name)
                if not isinstance(v, int) or isinstance(v, bool):
                    raise ConfigError(f"ViTConfig.{f.name}={v!r} must be an int. Pass a whole number.")
        for name in (
            "image_size",
            "patch_size",
            "num_modalities",
            "num_classes",
            "embed_dim",
            "depth",
            "num_heads",
            "stem_channels",
        ):
            check_range(f"ViTConfig.{name}", getattr(self, name), low=1, fix="Use a positive integer.")
        check_range("ViTConfig.num_clinical", self.num_clinical, low=0, fix="Use 0 or more.")
        check_range("ViTConfig.mlp_ratio", self.mlp_ratio, low=0, low_inclusive=False)
        for name in ("drop_rate", "drop_path_rate"):
            check_range(f"ViTConfig.{name}", getattr(self, name), low=0, high=1, high_inclusive=False)
        if self.late_depth is not None:
            check_range("ViTConfig.late_depth", self.late_depth, low=1, fix="Use >= 1 or None (= depth).")
        if self.image_size % self.patch_size:
            raise ConfigError(
                f"ViTConfig.image_size={self.image_size} is not divisible by patch_size="
                f"{self.patch_size}. Choose a patch_size that divides the image size "
                "(e.g. 8 for 32/64 px, 16 for 224 px) or resize the images."
            )
        if self.embed_dim % self.num_heads:
            raise ConfigError(
                f"ViTConfig.embed_dim={self.embed_dim} is not divisible by num_heads="
                f"{self.num_heads}. Pick num_heads among the divisors of embed_dim."
            )
        if self.stem not in STEMS:
            raise ConfigError(f"ViTConfig.stem={self.stem!r} is unknown; allowed: {STEMS}.")
        if self.stem == "conv" and self.patch_size & (self.patch_size - 1):
            raise ConfigError(
                f"ViTConfig.patch_size={self.patch_size} with stem='conv': the conv stem "
                "halves the resolution per layer, so the patch size must be a power of 2 "
                "(e.g. 4 or 8), or use stem='patch'."
            )
        if self.fusion not in FUSIONS:
            raise ConfigError(f"ViTConfig.fusion={self.fusion!r} is unknown; allowed: {FUSIONS}.")
        if self.use_clinical and self.num_clinical == 0:
            raise ConfigError(
                "ViTConfig.use_clinical=True but num_clinical=0. Set use_clinical=False "
                "or give the number of clinical variables."
            )
        names = self.names
        if (
            len(names) != self.num_modalities
            or len(set(names)) != len(names)
            or not all(n.isidentifier() for n in names)
        ):
            raise ConfigError(
                f"ViTConfig.modality_names={self.modality_names!r} must be "
                f"{self.num_modalities} distinct identifiers (no dots), e.g. ('t1', 't2')."
            )

    @property
    def names(self) -> tuple[str, ...]:
        """Sequence names used in module and group names."""
        if self.modality_names is not None:
            return tuple(self.modality_names)
        if self.num_modalities == len(DEFAULT_MODALITY_NAMES):
            return DEFAULT_MODALITY_NAMES
        return tuple(f"m{i}" for i in range(self.num_modalities))

    @property
    def grid_size(self) -> int:
        return self.image_size // self.patch_size

    @property
    def num_patches(self) -> int:
        return self.grid_size**2

    @property
    def encoder_depth(self) -> int:
        return self.late_depth if self.late_depth is not None else self.depth


class SequenceEncoder(nn.Module):
    """Patch embedding + class token + positions + blocks + norm for one input (late fusion)."""

    def __init__(self, cfg: ViTConfig, in_chans: int, depth: int) -> None:
        super().__init__()
        self.patch_embed = make_patch_embed(
            cfg.stem, cfg.image_size, cfg.patch_size, in_chans, cfg.embed_dim, cfg.stem_channels
        )
        self.cls_token = ClassToken(cfg.embed_dim)
        self.pos_embed = AdditiveEmbedding(1 + cfg.num_patches, cfg.embed_dim)
        self.pos_drop = nn.Dropout(cfg.drop_rate)
        self.blocks = make_blocks(
            cfg.embed_dim, depth, cfg.num_heads, cfg.mlp_ratio, cfg.qkv_bias, cfg.drop_rate, cfg.drop_path_rate
        )
        self.norm = nn.LayerNorm(cfg.embed_dim)

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        x = self.patch_embed(x)  # (B, N, D)
        return self.pos_drop(self.pos_embed(self.cls_token(x)))  # (B, 1 + N, D)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(run_blocks(self.blocks, self.embed(x), None))  # (B, 1 + N, D)


class MultiModalViT(GroupedModel):
    """Multi-modal ViT over MRI sequences ``(B, M, H, W)`` and clinical variables ``(B, K)``.

    Parameter groups (:meth:`parameter_groups`, in this order; empty groups omitted). ``{s}``
    runs over ``config.names`` (default ``t1, t2, flair``), ``{i}`` over blocks:

    * ``early``: ``patch_embed``, ``tokens`` (class token, positions), ``clinical``,
      ``block.{i}``, ``norm``, ``head``.
    * ``token``: ``patch_embed.{s}``, ``tokens`` (class token, positions, modality embedding),
      ``clinical`` (projection and clinical type embedding), ``block.{i}``, ``norm``, ``head``.
    * ``late``: per sequence ``encoder.{s}.patch_embed``, ``encoder.{s}.tokens``,
      ``encoder.{s}.block.{i}``, ``encoder.{s}.norm``; then ``clinical``, ``head``.

    ``clinical`` exists only when ``use_clinical``. Features from :meth:`forward_features` have
    width ``num_features``: ``embed_dim`` for token fusion (clinical is a token) or without
    clinical data, ``2 * embed_dim`` for early/late fusion with clinical (pooled image feature
    concatenated with the clinical projection).

    Args:
        config: architecture.
        generator: random generator for the weight init. ``None`` draws one seed from the global
            torch RNG, so ``torch.manual_seed`` still makes creation reproducible; nothing else
            touches global RNG state.
    """

    def __init__(self, config: ViTConfig, *, generator: torch.Generator | None = None) -> None:
        super().__init__()
        self.config = cfg = config
        self.num_classes = cfg.num_classes
        D, M = cfg.embed_dim, cfg.num_modalities
        # default PyTorch inits draw from the global RNG; fork so creation leaves it untouched,
        # then re-initialise every parameter from ``generator`` in init_weights.
        with torch.random.fork_rng(devices=[]):
            if cfg.fusion == "late":
                self.encoders = nn.ModuleDict({s: SequenceEncoder(cfg, 1, cfg.encoder_depth) for s in cfg.names})
            else:
                if cfg.fusion == "early":
                    self.patch_embed: nn.Module = make_patch_embed(
                        cfg.stem, cfg.image_size, cfg.patch_size, M, D, cfg.stem_channels
                    )
                    self.pos_embed = AdditiveEmbedding(1 + cfg.num_patches, D)  # incl. class token
                else:
                    self.patch_embed = nn.ModuleDict(
                        {
                            s: make_patch_embed(cfg.stem, cfg.image_size, cfg.patch_size, 1, D, cfg.stem_channels)
                            for s in cfg.names
                        }
                    )
                    self.pos_embed = AdditiveEmbedding(cfg.num_patches, D)  # shared by sequences
                    self.modality_embed = ModalityEmbedding(M, D)
                self.cls_token = ClassToken(D)
                self.pos_drop = nn.Dropout(cfg.drop_rate)
                self.blocks = make_blocks(
                    cfg.embed_dim,
                    cfg.depth,
                    cfg.num_heads,
                    cfg.mlp_ratio,
                    cfg.qkv_bias,
                    cfg.drop_rate,
                    cfg.drop_path_rate,
                )
                self.norm = nn.LayerNorm(D)
            clinical_width = 0
            if cfg.use_clinical:
                self.clinical_proj = nn.Linear(cfg.num_clinical, D)
                if cfg.fusion == "token":
                    self.clinical_embed = AdditiveEmbedding(1, D)  # type embedding of the token
                else:
                    clinical_width = D
            self.num_features = D + clinical_width
            self.head_drop = nn.Dropout(cfg.drop_rate)
            self.head = nn.Linear(self.num_features, cfg.num_classes)
        self.init_weights(generator)

    # ------------------------------------------------------------------ init
    @torch.no_grad()
    def init_weights(self, generator: torch.Generator | None = None) -> None:
        """timm-style init: trunc_normal(std=.02) for Linear and embeddings, LeCun for patch convs."""
        if generator is None:
            generator = torch.Generator().manual_seed(int(torch.randint(0, 2**62, (1,)).item()))
        for module in self.modules():  # fixed order, so one generator gives one model
            init_module(module, generator)

    # ------------------------------------------------------------------ tokens
    def _tokens(
        self, images: torch.Tensor, modality_mask: torch.Tensor, clinical: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Embedded tokens (B, T, D) and the key mask (B, T) (None = attend to all)."""
        cfg = self.config
        mask = modality_mask.to(torch.bool)
        if cfg.fusion == "early":
            x = images * mask[:, :, None, None].to(images.dtype)  # (B, M, H, W)
            x = self.pos_embed(self.cls_token(self.patch_embed(x)))  # (B, 1 + N, D)
            return self.pos_drop(x), None
        B, N = images.shape[0], cfg.num_patches
        tokens = torch.stack(
            [pe(images[:, m : m + 1]) for m, pe in enumerate(cast(nn.ModuleDict, self.patch_embed).values())], dim=1
        )  # (B, M, N, D)
        tokens = self.modality_embed(self.pos_embed(tokens))  # (B, M, N, D)
        x = tokens.flatten(1, 2)  # (B, M * N, D)
        keep = mask.repeat_interleave(N, dim=1)  # (B, M * N)
        if cfg.use_clinical:
            c = self.clinical_embed(self.clinical_proj(clinical).unsqueeze(1))  # (B, 1, D)
            x = torch.cat([x, c], dim=1)  # (B, M * N + 1, D)
            keep = torch.cat([keep, keep.new_ones(B, 1)], dim=1)
        x = self.cls_token(x)  # (B, T, D), T = 1 + M * N (+ 1)
        keep = torch.cat([keep.new_ones(B, 1), keep], dim=1)  # (B, T); the class token is kept,
        # so no attention row is ever fully masked (which would give NaN)
        try:  # no mask when every key is kept lets SDPA take its fastest kernel
            all_kept = bool(keep.all())
        except RuntimeError:  # under torch.func.vmap (per-sample Fisher) a data-dependent branch is
            all_kept = False  # impossible; an all-True mask gives the same output
        return self.pos_drop(x), None if all_kept else keep

    # ------------------------------------------------------------------ forward
    def forward_features(
        self, images: torch.Tensor, modality_mask: torch.Tensor, clinical: torch.Tensor
    ) -> torch.Tensor:
        """Pooled features (B, num_features): class-token output, fused with clinical data."""
        cfg = self.config
        if cfg.fusion != "late":
            x, keep = self._tokens(images, modality_mask, clinical)
            return self._pool(run_blocks(self.blocks, x, keep), clinical)
        feats = torch.stack(
            [enc(images[:, m : m + 1])[:, 0] for m, enc in enumerate(self.encoders.values())], dim=1
        )  # (B, M, D)
        w = modality_mask.to(feats.dtype).unsqueeze(-1)  # (B, M, 1)
        # mask-weighted mean; clamp so a subject with no sequence gets 0, not NaN
        pooled = (feats * w).sum(1) / w.sum(1).clamp(min=1.0)  # (B, D)
        if cfg.use_clinical:
            pooled = torch.cat([pooled, self.clinical_proj(clinical)], dim=1)  # (B, 2D)
        return pooled

    def _pool(self, tokens: torch.Tensor, clinical: torch.Tensor) -> torch.Tensor:
        """Early/token fusion: features (B, num_features) from the last block's output tokens."""
        pooled = self.norm(tokens)[:, 0]  # (B, D)
        if self.config.use_clinical and self.config.fusion == "early":
            pooled = torch.cat([pooled, self.clinical_proj(clinical)], dim=1)  # (B, 2D)
        return pooled

    # ------------------------------------------------------- staged forward
    def first_block_of_group(self, group: str) -> int | None:
        """Where a change of ``group`` first alters the forward pass: the index of the first block
        whose input or weights differ (``depth`` for ``norm`` and ``head``, which act after the
        blocks), or None when the group changes the tokens themselves (embeddings, clinical input,
        or any group under late fusion), so the whole forward pass must run.

        Lets a caller that varies one group at a time reuse the tokens entering that block
        (:meth:`block_inputs`, :meth:`forward_from_block`), as the KL mask scores do.
        """
        if self.config.fusion == "late":
            return None
        if group.startswith("block."):
            return int(group.split(".", 1)[1])
        if group in ("norm", "head"):
            return self.config.depth
        if group == "clinical" and self.config.fusion == "early":
            return self.config.depth  # early fusion joins the clinical projection after the blocks
        return None

    def block_inputs(
        self, images: torch.Tensor, modality_mask: torch.Tensor, clinical: torch.Tensor
    ) -> tuple[list[torch.Tensor], torch.Tensor | None]:
        """Early/token fusion: the tokens entering each block, then the last block's output
        (``depth + 1`` tensors of shape (B, T, D)), and the key mask (B, T) (None: attend to all)."""
        if self.config.fusion == "late":
            raise ValueError(
                "block_inputs is defined for early and token fusion only (late fusion has one "
                "encoder per sequence); use forward() instead."
            )
        x, keep = self._tokens(images, modality_mask, clinical)
        inputs = [x]
        for i in range(len(self.blocks)):  # run_blocks one block at a time: one place builds the key mask
            inputs.append(run_blocks(self.blocks[i : i + 1], inputs[-1], keep))
        return inputs, keep

    def forward_from_block(
        self, tokens: torch.Tensor, keep: torch.Tensor | None, clinical: torch.Tensor, start: int
    ) -> torch.Tensor:
        """Logits (B, num_classes) from the tokens entering block ``start`` (0 <= start <= depth):
        with ``inputs, keep = block_inputs(images, mask, clinical)``,
        ``forward(images, mask, clinical) == forward_from_block(inputs[start], keep, clinical, start)``."""
        return self.forward_head(self._pool(run_blocks(self.blocks[start:], tokens, keep), clinical))

    def forward_head(self, features: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        """Logits (B, num_classes) from pooled features (or the features after dropout)."""
        x = self.head_drop(features)
        return x if pre_logits else self.head(x)

    def forward(self, images: torch.Tensor, modality_mask: torch.Tensor, clinical: torch.Tensor) -> torch.Tensor:
        """Logits (B, num_classes) for images (B, M, H, W), mask (B, M) bool, clinical (B, K)."""
        return self.forward_head(self.forward_features(images, modality_mask, clinical))

    # ------------------------------------------------------------------ groups
    def _group_paths(self) -> list[tuple[str, list[str]]]:
        cfg, groups = self.config, []
        if cfg.fusion == "late":
            for s in cfg.names:
                p = f"encoders.{s}"
                groups += [
                    (f"encoder.{s}.patch_embed", [f"{p}.patch_embed"]),
                    (f"encoder.{s}.tokens", [f"{p}.cls_token", f"{p}.pos_embed"]),
                ]
                groups += [(f"encoder.{s}.block.{i}", [f"{p}.blocks.{i}"]) for i in range(cfg.encoder_depth)]
                groups.append((f"encoder.{s}.norm", [f"{p}.norm"]))
        elif cfg.fusion == "early":
            groups += [("patch_embed", ["patch_embed"]), ("tokens", ["cls_token", "pos_embed"])]
        else:
            groups += [(f"patch_embed.{s}", [f"patch_embed.{s}"]) for s in cfg.names]
            groups.append(("tokens", ["cls_token", "pos_embed", "modality_embed"]))
        if cfg.use_clinical:
            groups.append(("clinical", ["clinical_proj"] + (["clinical_embed"] if cfg.fusion == "token" else [])))
        if cfg.fusion != "late":
            groups += [(f"block.{i}", [f"blocks.{i}"]) for i in range(cfg.depth)]
            groups.append(("norm", ["norm"]))
        groups.append(("head", ["head"]))
        return groups

    def parameter_groups(self) -> dict[str, list[str]]:
        """Ordered ``{group name: [parameter names]}``; complete and disjoint (see class docstring)."""
        out: dict[str, list[str]] = {}
        for group, paths in self._group_paths():
            names = [f"{p}.{n}" for p in paths for n, _ in self.get_submodule(p).named_parameters()]
            if names:
                out[group] = names
        return out

    # ------------------------------------------------------------------ attention
    def attention_maps(
        self, images: torch.Tensor, modality_mask: torch.Tensor, clinical: torch.Tensor, block: int = -1
    ) -> torch.Tensor:
        """Attention weights of block ``block``: (B, heads, T, T); rows sum to 1.

        Token layout: early ``[cls, N patches]``; token ``[cls, M x N patches (sequence-major),
        clinical]`` (masked keys get weight 0); late: the M encoders' ``[cls, N patches]`` maps
        placed block-diagonally, T = M * (1 + N). Wrap in ``torch.no_grad()`` for plotting.
        """
        cfg = self.config
        depth = cfg.encoder_depth if cfg.fusion == "late" else cfg.depth
        if not -depth <= block < depth:
            raise ConfigError(f"block={block} is out of range for depth {depth}; use -{depth}..{depth - 1}.")
        idx = block % depth
        if cfg.fusion != "late":
            x, keep = self._tokens(images, modality_mask, clinical)
            blocks = self.blocks
            x = run_blocks(blocks[:idx], x, keep)
            return attention_weights(cast(Block, blocks[idx]), x, keep)
        maps = []
        encoders: list[Any] = list(self.encoders.values())  # ViTEncoder modules, typed Module by ModuleDict
        for m, enc in enumerate(encoders):
            x = run_blocks(enc.blocks[:idx], enc.embed(images[:, m : m + 1]), None)
            maps.append(attention_weights(enc.blocks[idx], x, None))  # (B, h, 1 + N, 1 + N)
        B, h, t, _ = maps[0].shape
        out = maps[0].new_zeros(B, h, len(maps) * t, len(maps) * t)  # (B, h, M*(1+N), M*(1+N))
        for m, a in enumerate(maps):
            out[:, :, m * t : (m + 1) * t, m * t : (m + 1) * t] = a
        return out

    def cls_attention_grids(
        self, images: torch.Tensor, modality_mask: torch.Tensor, clinical: torch.Tensor, block: int = -1
    ) -> torch.Tensor:
        """Head-averaged class-token attention to each sequence's patches: (B, M, H/p, W/p).

        Missing sequences give zeros. Early fusion has one grid for all sequences: it is repeated
        for each present sequence. Late fusion uses each sequence encoder's own class token.
        """
        cfg = self.config
        M, N, g = cfg.num_modalities, cfg.num_patches, cfg.grid_size
        attn = self.attention_maps(images, modality_mask, clinical, block).mean(1)  # (B, T, T)
        B = attn.shape[0]
        if cfg.fusion == "token":
            grids = attn[:, 0, 1 : 1 + M * N].reshape(B, M, g, g)  # (B, M, g, g)
        elif cfg.fusion == "early":
            grids = attn[:, 0, 1 : 1 + N].reshape(B, 1, g, g).expand(B, M, g, g)  # (B, M, g, g)
        else:
            t = 1 + N
            grids = torch.stack([attn[:, m * t, m * t + 1 : (m + 1) * t] for m in range(M)], dim=1).reshape(
                B, M, g, g
            )  # (B, M, N) -> (B, M, g, g)
        return grids * modality_mask.to(grids.dtype)[:, :, None, None]
