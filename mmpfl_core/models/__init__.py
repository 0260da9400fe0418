"""Models: the multi-modal Vision Transformer, its presets and named parameter groups.

Importing this package also registers the Opacus grad samplers of :mod:`.layers`.
"""

from .cnn import CNNConfig, MultiModalCNN
from .layers import AdditiveEmbedding, ClassToken, ModalityEmbedding
from .presets import PRESETS, create_model, get_config, list_presets, load_timm_vit_weights
from .vit import DEFAULT_MODALITY_NAMES, FUSIONS, MultiModalViT, ViTConfig

__all__ = [
    "CNNConfig",
    "MultiModalCNN",
    "AdditiveEmbedding",
    "ClassToken",
    "ModalityEmbedding",
    "PRESETS",
    "create_model",
    "get_config",
    "list_presets",
    "load_timm_vit_weights",
    "DEFAULT_MODALITY_NAMES",
    "FUSIONS",
    "MultiModalViT",
    "ViTConfig",
]
