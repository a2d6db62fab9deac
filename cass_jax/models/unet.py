"""U-Nets for segmentation: SSL4MIS's 2D U-Net (the CNN arm of cross teaching) and a U-Net over a ResNet encoder.

`UNet` follows SSL4MIS's `code/networks/unet.py` `UNet`, the network `net_factory("unet")` builds for
`train_cross_teaching_between_cnn_transformer_2D.py`: channels 16-32-64-128-256; each level two 3x3 conv (bias) ->
BatchNorm -> LeakyReLU(0.01) with dropout 0.05/0.1/0.2/0.3/0.5 between the two convs in the encoder (none in the
decoder); 2x2 max-pool down; up by a 1x1 conv to the skip's width and bilinear x2 with align_corners=True (the
UpBlock default SSL4MIS's Decoder uses), concat [skip, upsampled]; a 3x3 conv (bias) to the logits. It takes
1-channel slices (`in_channels=1`, as SSL4MIS). Initial values are torch's defaults, as SSL4MIS's cross-teaching
script leaves them.

`ResNetUNet` is segmentation_models_pytorch's `Unet` (encoder_depth 5, decoder channels 256-128-64-32-16,
BatchNorm, no attention) over a torchvision/timm ResNet: the fully supervised baseline of S4MI, whose supervised
benchmark (DEDL, Singh & Cirrone 2022) trains smp U-Nets and reports ResNet-34 as its best U-Net encoder. DEDL's
published notebook shows an EfficientNet-B0 run with encoder_depth=3 and scSE attention; those options are not built
here. Its encoder (`ResNetEncoder`) reuses cass_jax.models.resnet's blocks under the same names as `ResNet`, so a
ported timm ResNet (cass_jax.port) fills it directly. Deviation: a 1-channel input is repeated to 3 channels where
smp would sum the first conv over its input channels (same values, the first conv's gradient differs); this keeps
the encoder's parameters identical to timm's.

All models: `__call__(x NHWC, train) -> logits (B, H, W, num_classes)`; `train=True` uses batch statistics (apply
with `mutable=["batch_stats"]`) and, for `UNet`, dropout (`rngs={"dropout": key}`).
"""

from typing import Any, Sequence, Type

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn

from cass_jax.models.kernel_grad import conv_function
from cass_jax.models.resnet import BasicBlock, BatchNorm, conv_kernel_init, max_pool_3x3_stride2
from cass_jax.models.swin import torch_bias_init, torch_conv_kernel_init
from cass_jax.models.swin_unet import repeat_grayscale

# segmentation_models_pytorch's initialize_decoder / initialize_head.
smp_decoder_kernel_init = nn.initializers.variance_scaling(2.0, "fan_in", "uniform")
smp_head_kernel_init = nn.initializers.xavier_uniform()


def check_unet_size(height: int, width: int, multiple: int, model_name: str) -> None:
    """One-line ValueError naming the size and the nearest valid sizes when a side is not a multiple of `multiple`."""
    for side in (height, width):
        if side <= 0 or side % multiple:
            below, above = side // multiple * multiple, (side // multiple + 1) * multiple
            nearest = " and ".join(str(size) for size in (below, above) if size > 0)
            raise ValueError(f"{model_name} cannot take a {height}x{width} image: its sides must be multiples of "
                             f"{multiple} (one halving per level); nearest valid sizes for {side}: {nearest}.")


def align_corners_resize_matrix(size_in: int, size_out: int) -> np.ndarray:
    """(size_out, size_in) linear interpolation weights with align_corners=True (end pixels map onto end pixels)."""
    matrix = np.zeros((size_out, size_in), np.float32)
    if size_in == 1 or size_out == 1:
        matrix[:, 0] = 1.0
        return matrix
    positions = np.arange(size_out, dtype=np.float64) * (size_in - 1) / (size_out - 1)
    low = np.minimum(np.floor(positions).astype(int), size_in - 1)
    high = np.minimum(low + 1, size_in - 1)
    fraction = positions - low
    np.add.at(matrix, (np.arange(size_out), low), 1.0 - fraction)
    np.add.at(matrix, (np.arange(size_out), high), fraction)
    return matrix


def bilinear_upsample_align_corners(x: jax.Array, scale: int = 2) -> jax.Array:
    """torch's `nn.Upsample(scale_factor=scale, mode="bilinear", align_corners=True)` on NHWC, as two small matmuls."""
    _, height, width, _ = x.shape
    rows = jnp.asarray(align_corners_resize_matrix(height, height * scale), x.dtype)
    cols = jnp.asarray(align_corners_resize_matrix(width, width * scale), x.dtype)
    x = jnp.einsum("oh,bhwc->bowc", rows, x)
    return jnp.einsum("pw,bowc->bopc", cols, x)


def nearest_upsample(x: jax.Array, scale: int = 2) -> jax.Array:
    """torch's `F.interpolate(scale_factor=scale, mode="nearest")` on NHWC."""
    batch, height, width, channels = x.shape
    x = jnp.broadcast_to(x[:, :, None, :, None, :], (batch, height, scale, width, scale, channels))
    return x.reshape(batch, height * scale, width * scale, channels)


def max_pool_2x2(x: jax.Array) -> jax.Array:
    """2x2 / stride 2 max-pool on even sides, as a reshape and max (cheaper on XLA:CPU than reduce_window)."""
    batch, height, width, channels = x.shape
    return x.reshape(batch, height // 2, 2, width // 2, 2, channels).max(axis=(2, 4))


def torch_conv(features: int, kernel: int, dtype: Any, name: str, fan_in: int, kernel_grad: str) -> nn.Conv:
    """nn.Conv with PyTorch's padding (kernel // 2), bias, and torch.nn.Conv2d's default initialisation."""
    pad = kernel // 2
    return nn.Conv(features, (kernel, kernel), padding=((pad, pad), (pad, pad)), dtype=dtype,
                   param_dtype=jnp.float32, kernel_init=torch_conv_kernel_init, bias_init=torch_bias_init(fan_in),
                   conv_general_dilated=conv_function(kernel_grad), name=name)


class ConvBlock(nn.Module):
    """conv3x3 -> BN -> LeakyReLU -> dropout -> conv3x3 -> BN -> LeakyReLU (SSL4MIS's ConvBlock)."""

    features: int
    dropout: float = 0.0
    dtype: Any = jnp.float32
    kernel_grad: str = "auto"

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        x = torch_conv(self.features, 3, self.dtype, "conv1", 9 * x.shape[-1], self.kernel_grad)(x)
        x = nn.leaky_relu(BatchNorm(dtype=self.dtype, name="bn1")(x, train), negative_slope=0.01)
        if self.dropout > 0.0:
            x = nn.Dropout(self.dropout, deterministic=not train)(x)
        x = torch_conv(self.features, 3, self.dtype, "conv2", 9 * self.features, self.kernel_grad)(x)
        return nn.leaky_relu(BatchNorm(dtype=self.dtype, name="bn2")(x, train), negative_slope=0.01)


class UpBlock(nn.Module):
    """1x1 conv to the skip's width, bilinear x2 (align_corners=True), concat [skip, up], ConvBlock (SSL4MIS)."""

    features: int
    dtype: Any = jnp.float32
    kernel_grad: str = "auto"

    @nn.compact
    def __call__(self, x: jax.Array, skip: jax.Array, train: bool = False) -> jax.Array:
        x = torch_conv(skip.shape[-1], 1, self.dtype, "conv1x1", x.shape[-1], self.kernel_grad)(x)
        x = jnp.concatenate([skip, bilinear_upsample_align_corners(x)], axis=-1)
        return ConvBlock(self.features, 0.0, self.dtype, self.kernel_grad, name="conv")(x, train)


class UNetEncoder(nn.Module):
    """in_conv at full resolution, then four (max-pool, ConvBlock) levels; returns the five level outputs."""

    feature_channels: Sequence[int]
    dropout: Sequence[float]
    dtype: Any = jnp.float32
    kernel_grad: str = "auto"

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> list[jax.Array]:
        x = ConvBlock(self.feature_channels[0], self.dropout[0], self.dtype, self.kernel_grad, name="in_conv")(x, train)
        levels = [x]
        for level in range(1, len(self.feature_channels)):
            x = ConvBlock(self.feature_channels[level], self.dropout[level], self.dtype, self.kernel_grad,
                          name=f"down{level}")(max_pool_2x2(x), train)
            levels.append(x)
        return levels


class UNetDecoder(nn.Module):
    """UpBlocks from the deepest level back to full resolution, then a 3x3 conv to `num_classes` logits."""

    feature_channels: Sequence[int]
    num_classes: int
    dtype: Any = jnp.float32
    kernel_grad: str = "auto"

    @nn.compact
    def __call__(self, levels: list[jax.Array], train: bool = False) -> jax.Array:
        x = levels[-1]
        for step, skip in enumerate(reversed(levels[:-1]), start=1):
            x = UpBlock(skip.shape[-1], self.dtype, self.kernel_grad, name=f"up{step}")(x, skip, train)
        return torch_conv(self.num_classes, 3, self.dtype, "out_conv", 9 * x.shape[-1], self.kernel_grad)(x)


class UNet(nn.Module):
    """SSL4MIS's 2D U-Net (module docstring). Input sides must be multiples of 16 (four 2x poolings)."""

    num_classes: int = 4
    in_channels: int = 1
    feature_channels: Sequence[int] = (16, 32, 64, 128, 256)
    dropout: Sequence[float] = (0.05, 0.1, 0.2, 0.3, 0.5)
    dtype: Any = jnp.float32
    kernel_grad: str = "auto"

    def __post_init__(self) -> None:
        if len(self.feature_channels) != len(self.dropout):
            raise ValueError(f"UNet needs one dropout rate per level: {len(self.feature_channels)} feature_channels "
                             f"{tuple(self.feature_channels)} but dropout {tuple(self.dropout)}.")
        if self.num_classes < 1:
            raise ValueError(f"UNet needs num_classes >= 1 (one logit map per class), got {self.num_classes}.")
        super().__post_init__()

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        if x.ndim != 4:
            raise ValueError(f"UNet expects NHWC input (B, H, W, C), got shape {x.shape}.")
        check_unet_size(x.shape[1], x.shape[2], 2 ** (len(self.feature_channels) - 1), "UNet")
        x = repeat_grayscale(x, self.in_channels, "UNet").astype(self.dtype)
        encoder = UNetEncoder(self.feature_channels, self.dropout, self.dtype, self.kernel_grad, name="encoder")
        decoder = UNetDecoder(self.feature_channels, self.num_classes, self.dtype, self.kernel_grad, name="decoder")
        return decoder(encoder(x, train), train)


class ResNetEncoder(nn.Module):
    """A ResNet without pooling and head, returning [stem (/2), layer1 (/4), layer2, layer3, layer4 (/32)].

    Submodules are named as in cass_jax.models.resnet.ResNet (conv1, bn1, layer{s}_{i}), so its variables are a
    ResNet's without `head`, and a ported timm ResNet fills it (the stem output is taken after its ReLU, before the
    max-pool, as smp's ResNet encoder does).
    """

    stage_sizes: Sequence[int]
    block_cls: Type[nn.Module] = BasicBlock
    widths: Sequence[int] = (64, 128, 256, 512)
    stem_width: int = 64
    dtype: Any = jnp.float32
    kernel_grad: str = "auto"

    @property
    def channels(self) -> list[int]:
        """Channels of each returned feature map."""
        return [self.stem_width] + [width * self.block_cls.expansion for width in self.widths]

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> list[jax.Array]:
        x = nn.Conv(
            self.stem_width, (7, 7), strides=(2, 2), padding=((3, 3), (3, 3)), use_bias=False,
            dtype=self.dtype, param_dtype=jnp.float32, kernel_init=conv_kernel_init,
            conv_general_dilated=conv_function(self.kernel_grad), name="conv1",
        )(x)
        x = nn.relu(BatchNorm(dtype=self.dtype, name="bn1")(x, train))
        features = [x]
        x = max_pool_3x3_stride2(x)
        for stage, (num_blocks, width) in enumerate(zip(self.stage_sizes, self.widths)):
            for index in range(num_blocks):
                stride = 2 if stage > 0 and index == 0 else 1
                x = self.block_cls(width=width, stride=stride, dtype=self.dtype, kernel_grad=self.kernel_grad,
                                   name=f"layer{stage + 1}_{index}")(x, train)
            features.append(x)
        return features


class DecoderBlock(nn.Module):
    """Nearest x2, concat [x, skip], then two conv3x3 (no bias) -> BN -> ReLU (smp's Unet DecoderBlock)."""

    features: int
    dtype: Any = jnp.float32
    kernel_grad: str = "auto"

    @nn.compact
    def __call__(self, x: jax.Array, skip: jax.Array | None, train: bool = False) -> jax.Array:
        x = nearest_upsample(x)
        if skip is not None:
            x = jnp.concatenate([x, skip], axis=-1)
        for index in (1, 2):
            x = nn.Conv(self.features, (3, 3), padding=((1, 1), (1, 1)), use_bias=False, dtype=self.dtype,
                        param_dtype=jnp.float32, kernel_init=smp_decoder_kernel_init,
                        conv_general_dilated=conv_function(self.kernel_grad), name=f"conv{index}")(x)
            x = nn.relu(BatchNorm(dtype=self.dtype, name=f"bn{index}")(x, train))
        return x


class ResNetUNet(nn.Module):
    """smp's Unet over a ResNet encoder (module docstring). Input sides must be multiples of 32.

    The encoder is a `ResNetEncoder` named "encoder" (defaults: ResNet-34's layout).
    """

    num_classes: int = 4
    stage_sizes: Sequence[int] = (3, 4, 6, 3)
    block_cls: Type[nn.Module] = BasicBlock
    widths: Sequence[int] = (64, 128, 256, 512)
    stem_width: int = 64
    decoder_channels: Sequence[int] = (256, 128, 64, 32, 16)
    in_channels: int = 3
    dtype: Any = jnp.float32
    kernel_grad: str = "auto"

    def __post_init__(self) -> None:
        if len(self.decoder_channels) != len(self.stage_sizes) + 1:
            raise ValueError(f"ResNetUNet needs one decoder width per encoder feature map "
                             f"({len(self.stage_sizes) + 1}), got decoder_channels {tuple(self.decoder_channels)}.")
        if self.num_classes < 1:
            raise ValueError(f"ResNetUNet needs num_classes >= 1 (one logit map per class), got {self.num_classes}.")
        super().__post_init__()

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        if x.ndim != 4:
            raise ValueError(f"ResNetUNet expects NHWC input (B, H, W, C), got shape {x.shape}.")
        check_unet_size(x.shape[1], x.shape[2], 2 ** len(self.decoder_channels), "ResNetUNet")
        x = repeat_grayscale(x, self.in_channels, "ResNetUNet").astype(self.dtype)
        features = ResNetEncoder(self.stage_sizes, self.block_cls, self.widths, self.stem_width, self.dtype,
                                 self.kernel_grad, name="encoder")(x, train)
        skips = list(reversed(features[:-1])) + [None]
        x = features[-1]
        for index, (width, skip) in enumerate(zip(self.decoder_channels, skips)):
            x = DecoderBlock(width, self.dtype, self.kernel_grad, name=f"decoder_blocks_{index}")(x, skip, train)
        return nn.Conv(self.num_classes, (3, 3), padding=((1, 1), (1, 1)), dtype=self.dtype, param_dtype=jnp.float32,
                       kernel_init=smp_head_kernel_init, conv_general_dilated=conv_function(self.kernel_grad),
                       name="segmentation_head")(x)

