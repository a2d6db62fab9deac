"""ResNet-18..200 as plain flax.linen modules that compute the same function as timm/torchvision.

Layout follows torchvision/timm ("v1.5": stride on the 3x3 conv of the bottleneck) with explicit
PyTorch padding, because Flax's 'SAME' padding is asymmetric on even inputs and would shift every
feature map by one pixel relative to the PyTorch weights. Input is NHWC.
"""

import functools
from typing import Any, Sequence, Type

import jax
import jax.numpy as jnp
from flax import linen as nn

from cass_jax.models.kernel_grad import conv_function, dense_function

# kaiming_normal_(mode="fan_out", nonlinearity="relu"), as timm and torchvision initialise convs.
conv_kernel_init = nn.initializers.variance_scaling(2.0, "fan_out", "normal")
# torch.nn.Linear's default weight init: U(-1/sqrt(fan_in), 1/sqrt(fan_in)).
linear_kernel_init = nn.initializers.variance_scaling(1.0 / 3.0, "fan_in", "uniform")


class BatchNorm(nn.Module):
    """BatchNorm with PyTorch semantics.

    Normalises with the biased batch variance in training but updates the running variance with
    the unbiased one (`var * n / (n - 1)`), as torch.nn.BatchNorm2d does; Flax's nn.BatchNorm uses
    the biased one, which drifts 0.3-0.5% from PyTorch's running statistics at small batches.
    `momentum` is in Flax terms (0.9 == PyTorch's 0.1). Statistics are computed in float32.
    """

    momentum: float = 0.9
    epsilon: float = 1e-5
    dtype: Any = jnp.float32
    scale_init: Any = nn.initializers.ones

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        features = x.shape[-1]
        scale = self.param("scale", self.scale_init, (features,), jnp.float32)
        bias = self.param("bias", nn.initializers.zeros, (features,), jnp.float32)
        running_mean = self.variable("batch_stats", "mean", jnp.zeros, (features,), jnp.float32)
        running_var = self.variable("batch_stats", "var", jnp.ones, (features,), jnp.float32)
        x32 = x.astype(jnp.float32)
        if train:
            axes = tuple(range(x.ndim - 1))
            count = x.size // features
            if count < 2:
                raise ValueError(
                    f"BatchNorm in train mode needs more than 1 value per channel, got input shape "
                    f"{x.shape}; use a batch of 2 or more, or train=False."
                )
            mean = jnp.mean(x32, axis=axes)
            var = jnp.mean(jnp.square(x32 - mean), axis=axes)
            if not self.is_initializing():
                unbiased_var = var * (count / (count - 1))
                running_mean.value = self.momentum * running_mean.value + (1.0 - self.momentum) * mean
                running_var.value = self.momentum * running_var.value + (1.0 - self.momentum) * unbiased_var
        else:
            mean, var = running_mean.value, running_var.value
        y = (x32 - mean) * (scale * jax.lax.rsqrt(var + self.epsilon)) + bias
        return y.astype(self.dtype)


def max_pool_3x3_stride2(x: jax.Array) -> jax.Array:
    """3x3 / stride 2 max-pool with PyTorch's (1, 1) padding, as the max of nine strided slices.

    Same values as `nn.max_pool(x, (3, 3), (2, 2), ((1, 1), (1, 1)))`, but its gradient is plain
    selects and pads instead of XLA's select_and_scatter, which is ~4x slower on XLA:CPU (1.4 s vs
    0.46 s forward+backward at batch 16, 224 px). Gradients split only between exactly equal maxima,
    which after a ReLU are zeros whose gradient is zero anyway.
    """
    batch, height, width, channels = x.shape
    padded = jnp.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)), constant_values=-jnp.inf)
    out_h, out_w = (height - 1) // 2 + 1, (width - 1) // 2 + 1
    windows = [
        jax.lax.slice(padded, (0, i, j, 0), (batch, i + 2 * out_h - 1, j + 2 * out_w - 1, channels), (1, 2, 2, 1))
        for i in range(3)
        for j in range(3)
    ]
    return functools.reduce(jnp.maximum, windows)


def conv3x3(features: int, stride: int, dtype: Any, name: str, kernel_grad: str = "auto") -> nn.Conv:
    return nn.Conv(
        features, (3, 3), strides=(stride, stride), padding=((1, 1), (1, 1)), use_bias=False,
        dtype=dtype, param_dtype=jnp.float32, kernel_init=conv_kernel_init,
        conv_general_dilated=conv_function(kernel_grad), name=name,
    )


def conv1x1(features: int, stride: int, dtype: Any, name: str, kernel_grad: str = "auto") -> nn.Conv:
    return nn.Conv(
        features, (1, 1), strides=(stride, stride), padding="VALID", use_bias=False,
        dtype=dtype, param_dtype=jnp.float32, kernel_init=conv_kernel_init,
        conv_general_dilated=conv_function(kernel_grad), name=name,
    )


class BasicBlock(nn.Module):
    """Two 3x3 convs (ResNet-18/34). Submodule names mirror timm's state_dict keys."""

    width: int
    stride: int = 1
    dtype: Any = jnp.float32
    kernel_grad: str = "auto"
    expansion = 1

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        out_features = self.width * self.expansion
        y = conv3x3(self.width, self.stride, self.dtype, "conv1", self.kernel_grad)(x)
        y = nn.relu(BatchNorm(dtype=self.dtype, name="bn1")(y, train))
        y = conv3x3(out_features, 1, self.dtype, "conv2", self.kernel_grad)(y)
        # timm zero-initialises the last BatchNorm scale of each block (zero_init_last=True).
        y = BatchNorm(dtype=self.dtype, scale_init=nn.initializers.zeros, name="bn2")(y, train)
        shortcut = downsample_if_needed(x, out_features, self.stride, self.dtype, train, self.kernel_grad)
        return nn.relu(y + shortcut)


class Bottleneck(nn.Module):
    """1x1 -> 3x3 (strided) -> 1x1 bottleneck (ResNet-50 and deeper), torchvision's v1.5 layout."""

    width: int
    stride: int = 1
    dtype: Any = jnp.float32
    kernel_grad: str = "auto"
    expansion = 4

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        out_features = self.width * self.expansion
        y = conv1x1(self.width, 1, self.dtype, "conv1", self.kernel_grad)(x)
        y = nn.relu(BatchNorm(dtype=self.dtype, name="bn1")(y, train))
        y = conv3x3(self.width, self.stride, self.dtype, "conv2", self.kernel_grad)(y)
        y = nn.relu(BatchNorm(dtype=self.dtype, name="bn2")(y, train))
        y = conv1x1(out_features, 1, self.dtype, "conv3", self.kernel_grad)(y)
        y = BatchNorm(dtype=self.dtype, scale_init=nn.initializers.zeros, name="bn3")(y, train)
        shortcut = downsample_if_needed(x, out_features, self.stride, self.dtype, train, self.kernel_grad)
        return nn.relu(y + shortcut)


def downsample_if_needed(x: jax.Array, out_features: int, stride: int, dtype: Any, train: bool,
                         kernel_grad: str = "auto") -> jax.Array:
    """Identity shortcut, or 1x1 conv + BN (`downsample.0` / `downsample.1` in PyTorch) when shapes change.

    Called inside a block's compact __call__, so the modules it creates belong to that block.
    """
    if stride == 1 and x.shape[-1] == out_features:
        return x
    y = conv1x1(out_features, stride, dtype, "downsample_conv", kernel_grad)(x)
    return BatchNorm(dtype=dtype, name="downsample_bn")(y, train)


class ResNet(nn.Module):
    """ResNet with a 7x7/2 stem, 3x3/2 max-pool, four stages, global average pool and a `head` Dense.

    Returns logits (B, num_classes), or the pooled features when num_classes == 0; with
    `return_features=True` returns (logits, features). `train=True` uses batch statistics and must be
    applied with `mutable=["batch_stats"]`.
    """

    stage_sizes: Sequence[int]
    block_cls: Type[nn.Module]
    widths: Sequence[int] = (64, 128, 256, 512)
    stem_width: int = 64
    num_classes: int = 1000
    dtype: Any = jnp.float32
    # Which kernels the convolutions and the head run (models.kernel_grad): "auto", "onednn", "matmul" or "xla".
    kernel_grad: str = "auto"

    @property
    def num_features(self) -> int:
        return self.widths[-1] * self.block_cls.expansion

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False, return_features: bool = False):
        if x.ndim != 4:
            raise ValueError(f"ResNet expects NHWC input (B, H, W, C), got shape {x.shape}.")
        x = x.astype(self.dtype)
        x = nn.Conv(
            self.stem_width, (7, 7), strides=(2, 2), padding=((3, 3), (3, 3)), use_bias=False,
            dtype=self.dtype, param_dtype=jnp.float32, kernel_init=conv_kernel_init,
            conv_general_dilated=conv_function(self.kernel_grad), name="conv1",
        )(x)
        x = nn.relu(BatchNorm(dtype=self.dtype, name="bn1")(x, train))
        x = max_pool_3x3_stride2(x)
        for stage, (num_blocks, width) in enumerate(zip(self.stage_sizes, self.widths)):
            for index in range(num_blocks):
                stride = 2 if stage > 0 and index == 0 else 1
                x = self.block_cls(
                    width=width, stride=stride, dtype=self.dtype, kernel_grad=self.kernel_grad,
                    name=f"layer{stage + 1}_{index}",
                )(x, train)
        features = jnp.mean(x.astype(jnp.float32), axis=(1, 2)).astype(self.dtype)
        if self.num_classes == 0:
            logits = features
        else:
            logits = nn.Dense(
                self.num_classes, dtype=self.dtype, param_dtype=jnp.float32,
                kernel_init=linear_kernel_init, dot_general=dense_function(self.kernel_grad), name="head",
            )(features)
        return (logits, features) if return_features else logits


RESNET_DEPTHS: dict[int, tuple[Type[nn.Module], tuple[int, ...]]] = {
    18: (BasicBlock, (2, 2, 2, 2)),
    34: (BasicBlock, (3, 4, 6, 3)),
    50: (Bottleneck, (3, 4, 6, 3)),
    101: (Bottleneck, (3, 4, 23, 3)),
    152: (Bottleneck, (3, 8, 36, 3)),
    200: (Bottleneck, (3, 24, 36, 3)),
}


def resnet(depth: int, num_classes: int = 1000, dtype: Any = jnp.float32, kernel_grad: str = "auto") -> ResNet:
    """torchvision/timm ResNet-`depth` (18, 34, 50, 101, 152 or 200)."""
    if depth not in RESNET_DEPTHS:
        raise ValueError(f"Unknown ResNet depth {depth}; known depths: {sorted(RESNET_DEPTHS)}.")
    block_cls, stage_sizes = RESNET_DEPTHS[depth]
    return ResNet(stage_sizes=stage_sizes, block_cls=block_cls, num_classes=num_classes, dtype=dtype,
                  kernel_grad=kernel_grad)
