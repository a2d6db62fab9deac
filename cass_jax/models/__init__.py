"""ResNet and ViT families as plain flax.linen modules, built by timm name."""

from cass_jax.models.registry import create_model, init_variables, is_vit, list_models
from cass_jax.models.resnet import BasicBlock, BatchNorm, Bottleneck, ResNet
from cass_jax.models.vit import VisionTransformer

__all__ = [
    "BasicBlock", "BatchNorm", "Bottleneck", "ResNet", "VisionTransformer",
    "create_model", "init_variables", "is_vit", "list_models",
]
