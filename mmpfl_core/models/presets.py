"""Named model sizes and :func:`create_model`, the one way the rest of mmpfl builds a model.

=========  ==========  =====  =====  =====  ======  =============================================
preset     image_size  patch  dim    depth  heads   use
=========  ==========  =====  =====  =====  ======  =============================================
tiny       32          8      64     2      2       tests and smoke runs; trains in seconds on CPU
teaching   64          8      128    4      4       notebooks on a laptop CPU
paper      224         16     384    12     6       ViT-S/16, as in the paper (GPU)
=========  ==========  =====  =====  =====  ======  =============================================

Hybrid ViTs: the same trunks with a convolutional stem as tokeniser (``stem="conv"``,
:func:`~.layers.make_patch_embed`). On the quickstart cohort (32 px, 910 training subjects, 10
epochs) the images-only tiny ViT reached balanced accuracy 0.50 with linear patches and 0.71 with the
conv stem (notebook 01 measures this over seeds):

===============  ==========  =====  =====  =====  ======  ========================================
preset           image_size  patch  dim    depth  heads   use
===============  ==========  =====  =====  =====  ======  ========================================
hybrid-tiny      32          8      64     2      2       notebook 01; learns from the images
hybrid-teaching  64          16     128    4      4       64 px slices, same 4 x 4 token grid
===============  ==========  =====  =====  =====  ======  ========================================

CNN baselines (:class:`~.cnn.MultiModalCNN`, a small timm ResNet with GroupNorm), built by the same
:func:`create_model`, so any experiment can put a CNN beside the ViT:

============  ==========  ==================  ===============================================
preset        image_size  stage widths        use
============  ==========  ==================  ===============================================
cnn           32          16, 32, 64, 128     CNN beside "tiny" (notebook 01, federated runs)
cnn-teaching  64          32, 64, 128, 256    CNN beside "teaching"
============  ==========  ==================  ===============================================

Creation never touches the global RNG except to draw one seed when neither ``seed`` nor
``generator`` is given (so ``torch.manual_seed`` before ``create_model`` is still reproducible).
"""

from __future__ import annotations

from dataclasses import fields, replace
from typing import Any

import torch

from ..errors import ConfigError
from .cnn import CNNConfig, MultiModalCNN
from .vit import MultiModalViT, ViTConfig

__all__ = ["PRESETS", "create_model", "list_presets", "get_config", "load_timm_vit_weights"]

ModelConfig = ViTConfig | CNNConfig
#: The model registry: preset name -> config; the config's type picks the model class.
MODEL_CLASSES: dict[type, type] = {ViTConfig: MultiModalViT, CNNConfig: MultiModalCNN}

PRESETS: dict[str, ModelConfig] = {
    "tiny": ViTConfig(image_size=32, patch_size=8, embed_dim=64, depth=2, num_heads=2),
    "teaching": ViTConfig(image_size=64, patch_size=8, embed_dim=128, depth=4, num_heads=4),
    "paper": ViTConfig(image_size=224, patch_size=16, embed_dim=384, depth=12, num_heads=6),
    "hybrid-tiny": ViTConfig(image_size=32, patch_size=8, embed_dim=64, depth=2, num_heads=2, stem="conv"),
    "hybrid-teaching": ViTConfig(image_size=64, patch_size=16, embed_dim=128, depth=4, num_heads=4, stem="conv"),
    "cnn": CNNConfig(image_size=32, channels=(16, 32, 64, 128)),
    "cnn-teaching": CNNConfig(image_size=64, channels=(32, 64, 128, 256)),
}

#: timm model whose weights ``pretrained=True`` copies into the "paper" preset (same D, heads).
PRETRAINED_SOURCE = "vit_small_patch16_224"


def list_presets() -> list[str]:
    """Names accepted by :func:`create_model`."""
    return list(PRESETS)


def get_config(preset: str | ModelConfig = "teaching", **overrides: Any) -> ModelConfig:
    """The validated config (:class:`ViTConfig` or :class:`CNNConfig`) of ``preset`` with ``overrides``."""
    if isinstance(preset, (ViTConfig, CNNConfig)):
        base = preset
    elif preset in PRESETS:
        base = PRESETS[preset]
    else:
        raise ConfigError(
            f"unknown model preset {preset!r}; known presets: {list_presets()}. Pass one of them or a ViTConfig."
        )
    known = {f.name for f in fields(base)}
    unknown = sorted(set(overrides) - known)
    if unknown:
        raise ConfigError(f"unknown {type(base).__name__} field(s) {unknown}; allowed: {sorted(known)}.")
    return replace(base, **overrides)  # replace re-runs __post_init__ validation


def create_model(
    preset: str | ModelConfig = "teaching",
    *,
    seed: int | None = None,
    generator: torch.Generator | None = None,
    pretrained: bool = False,
    **overrides: Any,
) -> MultiModalViT | MultiModalCNN:
    """Build a :class:`MultiModalViT` (or, for the ``cnn`` presets, a :class:`MultiModalCNN`).

    Args:
        preset: a name from :data:`PRESETS` or a :class:`ViTConfig`.
        seed: seed for a private generator used for the weight init (global RNG untouched).
        generator: explicit generator for the init (mutually exclusive with ``seed``).
        pretrained: copy ImageNet weights of timm's ``vit_small_patch16_224`` into the blocks,
            final norm, class token, positions and patch embeddings (needs embed_dim 384, 6 heads,
            depth <= 12, image 224 / patch 16). Needs the weights downloaded or in the HF cache.
        **overrides: any field of the preset's config, e.g. ``fusion="late"``, ``num_classes=2``.

    Raises:
        ConfigError: unknown preset or field, invalid value, or pretrained weights unavailable.
    """
    cfg = get_config(preset, **overrides)
    if seed is not None and generator is not None:
        raise ConfigError("pass either seed or generator to create_model, not both.")
    if seed is not None:
        generator = torch.Generator().manual_seed(int(seed))
    if pretrained and (not isinstance(cfg, ViTConfig) or cfg.stem != "patch"):
        raise ConfigError(
            "pretrained=True needs a ViT preset with stem='patch' (timm's ViT weights have a "
            "linear patch embedding). Use the 'paper' preset or pretrained=False."
        )
    model = MODEL_CLASSES[type(cfg)](cfg, generator=generator)
    if pretrained:
        load_timm_vit_weights(model, PRETRAINED_SOURCE)
    return model


def load_timm_vit_weights(model: MultiModalViT, source: str | torch.nn.Module = PRETRAINED_SOURCE) -> None:
    """Copy weights of a timm ``VisionTransformer`` (name, loaded with pretrained=True, or module).

    Blocks ``0..depth-1``, the final norm, class token, positions and the patch embedding
    (RGB filters summed/repeated to the model's input channels) are copied into the trunk, or
    into every sequence encoder for late fusion. Clinical layers and the head keep their init.
    """
    import timm  # imported here: only this optional path needs the model zoo

    cfg = model.config
    if isinstance(source, str):
        try:
            source = timm.create_model(source, pretrained=True)
        except Exception as exc:  # network, missing cache, hub errors: all mean "no weights"
            raise ConfigError(
                f"could not load pretrained weights for {source!r} ({type(exc).__name__}: {exc}). "
                "Download them once with network access (timm.create_model(name, pretrained=True)) "
                "or point HF_HOME / HF_HUB_CACHE at a cache that holds them, or use pretrained=False."
            ) from exc
    # timm's submodules reach us through nn.Module.__getattr__ (typed Tensor | Module): read them untyped
    vit: Any = source
    src_blocks = vit.blocks
    enc_depth = cfg.encoder_depth if cfg.fusion == "late" else cfg.depth
    src_grid = getattr(vit.patch_embed, "grid_size", None)
    if (
        vit.embed_dim != cfg.embed_dim
        or src_blocks[0].attn.num_heads != cfg.num_heads
        or enc_depth > len(src_blocks)
        or tuple(src_grid or ()) != (cfg.grid_size, cfg.grid_size)
        or vit.patch_embed.patch_size != (cfg.patch_size, cfg.patch_size)
    ):
        raise ConfigError(
            f"pretrained source (embed_dim={vit.embed_dim}, depth={len(src_blocks)}, "
            f"grid={src_grid}) does not fit ViTConfig(embed_dim={cfg.embed_dim}, num_heads="
            f"{cfg.num_heads}, depth={enc_depth}, image_size={cfg.image_size}, patch_size="
            f"{cfg.patch_size}). Use the 'paper' preset (depth <= 12) or pretrained=False."
        )
    from timm.models import adapt_input_conv

    src_pos = vit.pos_embed.detach()  # (1, 1 + N, D) incl. the class token's position
    with torch.no_grad():
        trunks: list[Any] = list(model.encoders.values()) if cfg.fusion == "late" else [model]
        for trunk in trunks:
            for i in range(enc_depth):
                trunk.blocks[i].load_state_dict(src_blocks[i].state_dict())
            trunk.norm.load_state_dict(vit.norm.state_dict())
            trunk.cls_token.weight.copy_(vit.cls_token.detach())
            # token fusion positions cover patches only (1, N, D); others include the class token
            pos = src_pos[:, 1:] if cfg.fusion == "token" else src_pos
            trunk.pos_embed.weight.copy_(pos)
            embeds = trunk.patch_embed.values() if cfg.fusion == "token" else [trunk.patch_embed]
            for pe in embeds:
                w = adapt_input_conv(pe.proj.in_channels, vit.patch_embed.proj.weight.detach())
                pe.proj.weight.copy_(w)
                pe.proj.bias.copy_(vit.patch_embed.proj.bias.detach())
