"""ResNet, ViT and segmentation (U-Net, Swin-UNet) families as plain flax.linen modules, built by name."""

from cass_jax.models.registry import (
    SEGMENTATION_BUILDERS,
    create_model,
    init_variables,
    is_segmentation_model,
    is_vit,
    list_models,
)
from cass_jax.models.resnet import BasicBlock, BatchNorm, Bottleneck, ResNet
from cass_jax.models.swin import SwinFeatures, SwinTransformer
from cass_jax.models.swin_unet import SwinUNet
from cass_jax.models.unet import ResNetEncoder, ResNetUNet, UNet
from cass_jax.models.vit import VisionTransformer

__all__ = [
    "BasicBlock", "BatchNorm", "Bottleneck", "ResNet", "ResNetEncoder", "ResNetUNet", "SEGMENTATION_BUILDERS",
    "SwinFeatures", "SwinTransformer", "SwinUNet", "UNet", "VisionTransformer",
    "create_model", "init_variables", "is_segmentation_model", "is_vit", "list_models",
]
