"""Swin-UNet (Cao et al. 2021) as SSL4MIS builds it for cross teaching: a Swin encoder, a symmetric Swin decoder.

The transformer arm of "Semi-Supervised Medical Image Segmentation via Cross Teaching between CNN and Transformer"
(Luo et al., MIDL 2022), following SSL4MIS's `SwinTransformerSys` (code/networks/
swin_transformer_unet_skip_expand_decoder_sys.py) with its `swin_tiny_patch4_window7_224_lite.yaml` settings:
patch 4, embed 96, encoder depths 2-2-2-2, heads 3-6-12-24, window 7, 224 px, stochastic depth 0.2, no absolute
position embedding, no dropout. The decoder mirrors the encoder: a patch expanding of the normed bottleneck, then
per level concat(skip) -> Linear(2C -> C) -> Swin blocks (that level's encoder depth and heads) -> patch expanding,
a LayerNorm, a final 4x patch expanding and a bias-free 1x1 convolution to `num_classes` logits.

Skips, as in SSL4MIS, are each stage's *block input*: the patch-embedding output and the patch-merging outputs.
Decoder submodule names follow SSL4MIS's state_dict (`layers_up_{k}`, `concat_back_dim_{k}`, `norm_up`, `up`,
`output`); the encoder is cass_jax.models.swin.SwinTransformer, named as timm names it.

Input channels: SSL4MIS feeds single-channel slices and repeats them to 3 channels for the Swin-UNet; so does this
module (any 1-channel input becomes `in_channels` channels). Deviations: the patch merging sits at the start of the
next stage (timm's layout; the same function), and a bad image size is one ValueError naming the nearest valid sizes
instead of an assert. With window 7 the valid sizes are multiples of 224 (every stage grid a multiple of 7).
Initial values follow SSL4MIS (Linear and position-bias tables: normal 0.02, which is what its trunc_normal_ cut at
+-2 amounts to; LayerNorm 1/0; convolutions torch's default); the ImageNet encoder, and the decoder copy SSL4MIS's
`load_from` makes, come from cass_jax.port.segmentation.load_pretrained_encoder.
"""

from typing import Any, Sequence

import jax
import jax.numpy as jnp
from flax import linen as nn

from cass_jax.models.kernel_grad import conv_function
from cass_jax.models.swin import (
    SwinBlock,
    SwinTransformer,
    dense,
    layer_norm,
    nearest_valid_swin_sizes,
    stochastic_depth_rates,
    swin_size_problem,
    torch_conv_kernel_init,
)


def depth_to_space(x: jax.Array, scale: int) -> jax.Array:
    """(B, H, W, scale*scale*C) -> (B, H*scale, W*scale, C), channels read as (row offset, column offset, C)."""
    batch, height, width, channels = x.shape
    out = channels // (scale * scale)
    x = x.reshape(batch, height, width, scale, scale, out).transpose(0, 1, 3, 2, 4, 5)
    return x.reshape(batch, height * scale, width * scale, out)


class PatchExpand(nn.Module):
    """Linear(C -> scale^2 * out_dim, no bias), spread over a scale x scale neighbourhood, LayerNorm(out_dim).

    scale 2, out_dim C/2 is SSL4MIS's PatchExpand; scale 4, out_dim C its FinalPatchExpand_X4.
    """

    scale: int
    out_dim: int
    dtype: Any = jnp.float32
    kernel_grad: str = "auto"

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        x = dense(self.scale**2 * self.out_dim, self.dtype, "expand", self.kernel_grad, use_bias=False)(x)
        return layer_norm(self.dtype, "norm")(depth_to_space(x, self.scale))


class SwinDecoderStage(nn.Module):
    """Swin blocks at one decoder level, then (except at the top level) a 2x patch expanding to half the width."""

    depth: int
    num_heads: int
    upsample: bool
    window_size: int = 7
    mlp_ratio: float = 4.0
    drop_path_rates: Sequence[float] = ()
    dtype: Any = jnp.float32
    kernel_grad: str = "auto"

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        for index in range(self.depth):
            x = SwinBlock(
                self.num_heads, self.window_size, shifted=index % 2 == 1, mlp_ratio=self.mlp_ratio,
                drop_path=self.drop_path_rates[index] if self.drop_path_rates else 0.0, dtype=self.dtype,
                kernel_grad=self.kernel_grad, name=f"blocks_{index}",
            )(x, train)
        if self.upsample:
            x = PatchExpand(2, x.shape[-1] // 2, self.dtype, self.kernel_grad, name="upsample")(x)
        return x


class SwinUNet(nn.Module):
    """Swin-UNet: `__call__(x NHWC, train) -> logits (B, H, W, num_classes)` for square `img_size` inputs.

    `train=True` enables stochastic depth, which needs an rng: `apply(..., rngs={"dropout": key})`.
    """

    num_classes: int = 4
    img_size: int = 224
    in_channels: int = 3
    patch_size: int = 4
    embed_dim: int = 96
    depths: Sequence[int] = (2, 2, 2, 2)
    num_heads: Sequence[int] = (3, 6, 12, 24)
    window_size: int = 7
    mlp_ratio: float = 4.0
    drop_path_rate: float = 0.2
    dtype: Any = jnp.float32
    kernel_grad: str = "auto"

    def __post_init__(self) -> None:
        check_swin_unet_size(self.img_size, self.patch_size, len(self.depths), self.window_size)
        if self.num_classes < 1:
            raise ValueError(f"SwinUNet needs num_classes >= 1 (one logit map per class), got {self.num_classes}.")
        super().__post_init__()

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        if x.ndim != 4 or x.shape[1:3] != (self.img_size, self.img_size):
            raise ValueError(f"SwinUNet built for NHWC input of {self.img_size}x{self.img_size}, got shape {x.shape}; "
                             f"create the model with img_size equal to the (square) input side.")
        x = repeat_grayscale(x, self.in_channels, "SwinUNet")
        features = SwinTransformer(
            self.patch_size, self.embed_dim, self.depths, self.num_heads, self.window_size, self.mlp_ratio,
            self.drop_path_rate, self.dtype, self.kernel_grad, name="encoder",
        )(x, train)
        num_levels = len(self.depths)
        rates = stochastic_depth_rates(self.drop_path_rate, self.depths)
        bottleneck_dim = features.normed.shape[-1]
        x = PatchExpand(2, bottleneck_dim // 2, self.dtype, self.kernel_grad, name="layers_up_0")(features.normed)
        for step in range(1, num_levels):
            level = num_levels - 1 - step
            skip = features.block_inputs[level]
            x = jnp.concatenate([x, skip], axis=-1)
            x = dense(skip.shape[-1], self.dtype, f"concat_back_dim_{step}", self.kernel_grad)(x)
            x = SwinDecoderStage(
                self.depths[level], self.num_heads[level], upsample=level > 0, window_size=self.window_size,
                mlp_ratio=self.mlp_ratio, drop_path_rates=tuple(rates[level]), dtype=self.dtype,
                kernel_grad=self.kernel_grad, name=f"layers_up_{step}",
            )(x, train)
        x = layer_norm(self.dtype, "norm_up")(x)
        x = PatchExpand(self.patch_size, self.embed_dim, self.dtype, self.kernel_grad, name="up")(x)
        logits = nn.Conv(
            self.num_classes, (1, 1), use_bias=False, dtype=self.dtype, param_dtype=jnp.float32,
            kernel_init=torch_conv_kernel_init, conv_general_dilated=conv_function(self.kernel_grad), name="output",
        )(x)
        return logits


def check_swin_unet_size(img_size: int, patch_size: int, num_stages: int, window_size: int) -> None:
    """One-line ValueError naming `img_size` and the nearest sizes the Swin-UNet can take, if it cannot take it."""
    problem = swin_size_problem(img_size, patch_size, num_stages, window_size)
    if problem:
        nearest = nearest_valid_swin_sizes(img_size, patch_size, num_stages, window_size)
        raise ValueError(
            f"Swin-UNet cannot take img_size={img_size}: {problem}; nearest valid sizes: "
            f"{' and '.join(map(str, nearest))}. Resize or crop the images to one of them."
        )


def repeat_grayscale(x: jax.Array, in_channels: int, model_name: str) -> jax.Array:
    """Repeats a 1-channel input to `in_channels` (SSL4MIS does this for the Swin-UNet); other mismatches are errors."""
    channels = x.shape[-1]
    if channels == in_channels:
        return x
    if channels == 1:
        return jnp.repeat(x, in_channels, axis=-1)
    raise ValueError(f"{model_name} takes {in_channels}-channel (or 1-channel, repeated) NHWC input, got {channels} "
                     f"channels in shape {x.shape}; create it with in_channels={channels}.")

