"""Model names (timm's spelling) -> configured flax modules, and variable initialisation."""

import functools
from typing import Any, Callable

import jax
import jax.numpy as jnp
from flax import linen as nn

from cass_jax.models.resnet import RESNET_DEPTHS, BasicBlock, ResNet, resnet
from cass_jax.models.swin_unet import SwinUNet
from cass_jax.models.unet import ResNetUNet, UNet
from cass_jax.models.vit import VIT_WIDTHS, VisionTransformer


def _resnet_tiny(num_classes: int, dtype: Any, kernel_grad: str = "auto") -> ResNet:
    """Test-sized ResNet (128 features), equal in layout to timm's
    `ResNet(BasicBlock, (1, 1, 1, 1), channels=(16, 32, 64, 128))` (whose plain stem is always 64 wide)."""
    return ResNet(
        stage_sizes=(1, 1, 1, 1), block_cls=BasicBlock, widths=(16, 32, 64, 128), stem_width=64,
        num_classes=num_classes, dtype=dtype, kernel_grad=kernel_grad,
    )


def _vit(width: str, patch_size: int, default_img_size: int) -> Callable[..., VisionTransformer]:
    def build(num_classes: int, dtype: Any, img_size: int = default_img_size, kernel_grad: str = "auto",
              last_block_class_token_only: bool = True, interpolate_pos_encoding: bool = False) -> VisionTransformer:
        return VisionTransformer(
            img_size=img_size, patch_size=patch_size, num_classes=num_classes, dtype=dtype, kernel_grad=kernel_grad,
            last_block_class_token_only=last_block_class_token_only,
            interpolate_pos_encoding=interpolate_pos_encoding, **VIT_WIDTHS[width],
        )

    return build


def _vit_micro(num_classes: int, dtype: Any, img_size: int = 224, kernel_grad: str = "auto",
               last_block_class_token_only: bool = True, interpolate_pos_encoding: bool = False) -> VisionTransformer:
    return VisionTransformer(
        img_size=img_size, patch_size=16, embed_dim=64, depth=2, num_heads=2, mlp_ratio=4.0,
        num_classes=num_classes, dtype=dtype, kernel_grad=kernel_grad,
        last_block_class_token_only=last_block_class_token_only, interpolate_pos_encoding=interpolate_pos_encoding,
    )


def _unet_ssl4mis(num_classes: int, dtype: Any, kernel_grad: str = "auto", in_channels: int = 1,
                  feature_channels: tuple[int, ...] = (16, 32, 64, 128, 256),
                  dropout: tuple[float, ...] = (0.05, 0.1, 0.2, 0.3, 0.5)) -> UNet:
    return UNet(num_classes=num_classes, in_channels=in_channels, feature_channels=tuple(feature_channels),
                dropout=tuple(dropout), dtype=dtype, kernel_grad=kernel_grad)


def _unet_resnet(stage_sizes: tuple[int, ...], widths: tuple[int, ...], default_decoder: tuple[int, ...]):
    def build(num_classes: int, dtype: Any, kernel_grad: str = "auto", in_channels: int = 3,
              decoder_channels: tuple[int, ...] = default_decoder) -> ResNetUNet:
        return ResNetUNet(num_classes=num_classes, stage_sizes=stage_sizes, widths=widths,
                          decoder_channels=tuple(decoder_channels), in_channels=in_channels, dtype=dtype,
                          kernel_grad=kernel_grad)

    return build


def _swin_unet(embed_dim: int, default_depths: tuple[int, ...], num_heads: tuple[int, ...], window_size: int,
               default_img_size: int):
    def build(num_classes: int, dtype: Any, kernel_grad: str = "auto", img_size: int = default_img_size,
              in_channels: int = 3, depths: tuple[int, ...] = default_depths, drop_path_rate: float = 0.2) -> SwinUNet:
        return SwinUNet(num_classes=num_classes, img_size=img_size, in_channels=in_channels, embed_dim=embed_dim,
                        depths=tuple(depths), num_heads=num_heads, window_size=window_size,
                        drop_path_rate=drop_path_rate, dtype=dtype, kernel_grad=kernel_grad)

    return build


# Segmentation networks: logits (B, H, W, num_classes). unet_ssl4mis_narrow, unet_resnet_tiny and swin_unet_micro
# are test-sized; swin_unet_tiny is the Swin-T-sized Swin-UNet (timm's naming).
SEGMENTATION_BUILDERS: dict[str, Callable[..., nn.Module]] = {
    "unet_ssl4mis": _unet_ssl4mis,
    "unet_ssl4mis_narrow": functools.partial(_unet_ssl4mis, feature_channels=(4, 8, 16, 32, 64)),
    "unet_resnet34": _unet_resnet(RESNET_DEPTHS[34][1], (64, 128, 256, 512), (256, 128, 64, 32, 16)),
    # Encoder equal in layout to `resnet_tiny` (and so to its timm twin).
    "unet_resnet_tiny": _unet_resnet((1, 1, 1, 1), (16, 32, 64, 128), (32, 16, 16, 8, 8)),
    "swin_unet_tiny": _swin_unet(96, (2, 2, 2, 2), (3, 6, 12, 24), 7, 224),
    # Three stages (grids 16, 8, 4 at 64 px): shifted windows at two levels, a single window at the third.
    "swin_unet_micro": _swin_unet(16, (2, 2, 2), (1, 2, 4), 4, 64),
    # A CPU-budget Swin-UNet: half Swin-T's width with its first three stages' heads, window 4, 64 px.
    "swin_unet_mini": _swin_unet(48, (2, 2, 2), (3, 6, 12), 4, 64),
}

MODEL_BUILDERS: dict[str, Callable[..., nn.Module]] = {
    **{f"resnet{depth}": functools.partial(resnet, depth) for depth in RESNET_DEPTHS},
    **{f"vit_{width}_patch{patch}_{size}": _vit(width, patch, size)
       for width in VIT_WIDTHS for patch in (16, 32) for size in (224, 384)
       if (width, patch) != ("tiny", 32)},  # timm has no vit_tiny_patch32
    "resnet_tiny": _resnet_tiny,
    "vit_micro_patch16": _vit_micro,
    **SEGMENTATION_BUILDERS,
}


def list_models() -> list[str]:
    """Names accepted by create_model."""
    return sorted(MODEL_BUILDERS)


def create_model(name: str, num_classes: int = 1000, dtype: Any = jnp.float32, **kwargs: Any) -> nn.Module:
    """Builds a model by timm name (`resnet50`, `vit_base_patch16_384`, ...).

    `num_classes=0` removes the head (the model returns pooled features). ViTs accept `img_size=` to
    override the size in the name, `last_block_class_token_only=` and `interpolate_pos_encoding=`
    (VisionTransformer); both families accept `kernel_grad=` ("auto", "onednn", "matmul" or "xla", see
    models.kernel_grad). Segmentation models (SEGMENTATION_BUILDERS) need num_classes >= 1 and accept
    `in_channels=`; Swin-UNets also `img_size=`, `depths=`, `drop_path_rate=`.
    """
    if name not in MODEL_BUILDERS:
        raise ValueError(f"Unknown model name {name!r}; known names: {', '.join(list_models())}.")
    if num_classes < 0:
        raise ValueError(f"num_classes must be >= 0 (0 = no head), got {num_classes} for {name!r}.")
    try:
        return MODEL_BUILDERS[name](num_classes=num_classes, dtype=dtype, **kwargs)
    except TypeError as error:
        raise ValueError(f"Bad keyword arguments {sorted(kwargs)} for model {name!r}: {error}") from None


def is_vit(model: nn.Module) -> bool:
    return isinstance(model, VisionTransformer)


def is_segmentation_model(model: nn.Module) -> bool:
    """Whether `model` returns per-pixel logits (B, H, W, num_classes) rather than class logits."""
    return isinstance(model, (UNet, ResNetUNet, SwinUNet))


def _init(model: nn.Module, rng: jax.Array, shape: tuple[int, ...]) -> dict:
    return model.init(rng, jnp.zeros(shape, jnp.float32), train=False)


# Modules are hashable dataclasses, so equal models share one compiled init. Init runs once, so on
# XLA:CPU backend optimisation is wasted on it: level 0 compiles about 3x faster (each random
# initializer otherwise costs ~1 s of LLVM time). Other backends keep their defaults.
_jitted_init = jax.jit(_init, static_argnums=(0, 2))
_jitted_init_cpu = jax.jit(_init, static_argnums=(0, 2), compiler_options={"xla_backend_optimization_level": 0})


def init_variables(model: nn.Module, rng: jax.Array, image_size: int, batch_size: int = 1) -> dict:
    """Initialises `model` on a zero NHWC batch; returns plain nested dicts ({"params"[, "batch_stats"]}).

    The batch has the model's `in_channels` channels where it declares them (segmentation models), else 3.
    """
    init = _jitted_init_cpu if jax.default_backend() == "cpu" else _jitted_init
    variables = init(model, rng, (batch_size, image_size, image_size, getattr(model, "in_channels", 3)))
    return _to_plain_dict(variables)


def _to_plain_dict(tree: Any) -> Any:
    if hasattr(tree, "items"):
        return {key: _to_plain_dict(value) for key, value in tree.items()}
    return tree
