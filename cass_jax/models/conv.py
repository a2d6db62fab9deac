"""A convolution for flax.linen.Conv whose kernel gradient is computed as matrix products (fast on XLA:CPU).

XLA:CPU computes a convolution's kernel gradient with Eigen's generic spatial convolution, which is slow for
a ResNet's shapes: 5-27x slower for 1x1 convs than the same sum written as one matrix product, and 1.3-6.5x
for 3x3 convs and the 7x7 stem against the paths below (bench/conv_kernel_grad.py, BENCHMARKS.md).
`matmul_grad_conv` is a drop-in for `lax.conv_general_dilated` as `nn.Conv(conv_general_dilated=...)` calls it:
the forward values and the input gradient are XLA's convolution, except that 1x1 convolutions (any stride) are
one matrix product over channels and convolutions onto maps of at most 4x4 one im2col product, forward and back
(XLA:CPU is up to 70x slower there); the kernel gradient is summed differently (same value up to float rounding),
except for narrow outputs on large maps, where XLA's own is the fastest (`kernel_grad_path` says which is used).
Anything other than a plain NHWC/HWIO convolution (dilation, groups) falls back to `lax.conv_general_dilated`
unchanged.
"""

import functools
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
from jax import lax

NHWC_HWIO = ("NHWC", "HWIO", "NHWC")
# For a stem on RGB images (few input channels) the per-tap products are too thin to be efficient, and on
# large feature maps copying each tap's window costs as much as its product. There the kernel gradient is XLA's,
# over chunks of about CHUNK_POSITIONS output positions (one example at 56x56), which keeps Eigen's working set
# in cache: 2-4x faster than over the whole batch at once.
THIN_INPUT_CHANNELS = 4
LARGE_MAP_POSITIONS = 28 * 28
CHUNK_POSITIONS = 1568
MAX_CHUNKS = 32
# On those large maps a narrow output (at most NARROW_OUTPUT_CHANNELS, a U-Net's 16 -> 16 at 224 px, a 4-class head)
# inverts this: XLA's kernel gradient over the whole batch at once is 3-8x faster than chunked (16 x 224x224,
# 16 -> 16: 101-131 against 395-405 ms; 16 x 64x64, 4 -> 16: 1.7 against 9-11 ms; 2 threads), while from 32 output
# channels up the chunks keep their 2-4x lead (224 px, 16 -> 32: 128-139 against 484-516 ms).
NARROW_OUTPUT_CHANNELS = 16
# Output maps of at most this many positions (4x4) are convolved as one im2col product (forward and input gradient).
SMALL_MAP_POSITIONS = 16
# Stride-1 kernels over many small maps (DINO's local crops: 512 x 12x12 x 64 channels) also take the chunked
# XLA kernel gradient once the tap windows to copy exceed WINDOW_VALUES values each, on maps of at least 6x6: there
# copying the nine windows costs more than the products (128 -> 46 ms for 512 x 12x12 x 64, 2 threads).
WINDOW_VALUES = 1 << 20
MIN_CHUNKED_MAP_POSITIONS = 36


def _windows(x: jax.Array, kernel_shape: Sequence[int], strides: tuple[int, int], padding: tuple) -> list[jax.Array]:
    """Per kernel tap (i, j), row-major: the (N, out_h, out_w, C) input values that tap multiplies."""
    kh, kw, cin, _ = kernel_shape
    padded = jnp.pad(x, ((0, 0), padding[0], padding[1], (0, 0)))
    out_h = (padded.shape[1] - kh) // strides[0] + 1
    out_w = (padded.shape[2] - kw) // strides[1] + 1
    return [lax.slice(padded, (0, i, j, 0), (x.shape[0], i + strides[0] * (out_h - 1) + 1,
                                             j + strides[1] * (out_w - 1) + 1, cin), (1, strides[0], strides[1], 1))
            for i in range(kh) for j in range(kw)]


def _conv(x: jax.Array, kernel: jax.Array, strides: tuple[int, int], padding: tuple) -> jax.Array:
    kh, kw, cin, cout = kernel.shape
    if (kh, kw) == (1, 1) and all(lo == hi == 0 for lo, hi in padding):
        # A 1x1 convolution is a matrix product over channels; Eigen's convolution is up to 6x slower for it when
        # the output is narrow (a segmentation head's 96 -> 4 classes, ResNet-50's 256 -> 64 reductions).
        x = x[:, ::strides[0], ::strides[1], :]
        return lax.dot_general(x, kernel[0, 0], (((3,), (0,)), ((), ())))
    windows = _windows(x, kernel.shape, strides, padding)
    if windows[0].shape[1] * windows[0].shape[2] <= SMALL_MAP_POSITIONS:
        # On tiny output maps Eigen's convolution collapses (3x3, 512 channels, 2x2 maps: 70x slower than this);
        # the taps side by side (im2col) make one matrix product, in the kernel's HWIO order.
        patches = jnp.concatenate(windows, axis=-1)
        return lax.dot_general(patches, kernel.reshape(kh * kw * cin, cout), (((3,), (0,)), ((), ())))
    return lax.conv_general_dilated(x, kernel, strides, padding, dimension_numbers=NHWC_HWIO)


def _tap_products(x: jax.Array, grad: jax.Array, kernel_shape: Sequence[int], strides: tuple[int, int],
                  padding: tuple) -> jax.Array:
    """sum over (n, h, w) of x[n, s*h + i, s*w + j, c] * grad[n, h, w, d], as one (C, D) product per tap (i, j)."""
    cin, cout = kernel_shape[2], kernel_shape[3]
    rows = grad.reshape(-1, cout)
    taps = []
    for window in _windows(x, kernel_shape, strides, padding):
        window = window.reshape(-1, cin)
        # The narrower operand goes first: Eigen's products are fastest with the short side as rows.
        if cin <= cout:
            tap = lax.dot_general(window, rows, (((0,), (0,)), ((), ())), preferred_element_type=jnp.float32)
        else:
            tap = lax.dot_general(rows, window, (((0,), (0,)), ((), ())), preferred_element_type=jnp.float32).T
        taps.append(tap)
    return jnp.stack(taps).reshape(kernel_shape)


def _chunked_kernel_grad(x: jax.Array, kernel: jax.Array, grad: jax.Array, strides: tuple[int, int],
                         padding: tuple) -> jax.Array:
    """XLA's kernel gradient summed over chunks of the batch (at most MAX_CHUNKS pieces, unrolled)."""
    n, out_h, out_w, _ = grad.shape
    size = max(-(-n // MAX_CHUNKS), CHUNK_POSITIONS // (out_h * out_w), 1)
    total = jnp.zeros(kernel.shape, jnp.float32)
    for start in range(0, n, size):
        _, pullback = jax.vjp(lambda k, xs=x[start:start + size]: _conv(xs, k, strides, padding), kernel)
        total = total + pullback(grad[start:start + size])[0].astype(jnp.float32)
    return total


def kernel_grad_path(kernel_shape: Sequence[int], grad_shape: Sequence[int], strides: tuple[int, int]) -> str:
    """How `matmul_grad_conv` computes a kernel gradient on XLA:CPU: "xla" (XLA's own, whole batch), "chunked"
    (XLA's, summed over chunks of the batch) or "taps" (one matrix product per kernel tap)."""
    kh, kw, cin, cout = kernel_shape
    if kh * kw == 1:
        return "taps"
    map_positions = grad_shape[1] * grad_shape[2]
    large_map = map_positions >= LARGE_MAP_POSITIONS
    if large_map and cout <= NARROW_OUTPUT_CHANNELS:
        return "xla"
    many_windows = (tuple(strides) == (1, 1) and map_positions >= MIN_CHUNKED_MAP_POSITIONS
                    and grad_shape[0] * map_positions * cin >= WINDOW_VALUES)
    if cin <= THIN_INPUT_CHANNELS or large_map or many_windows:
        return "chunked"
    return "taps"


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def _matmul_grad_conv(x: jax.Array, kernel: jax.Array, strides: tuple[int, int], padding: tuple) -> jax.Array:
    return _conv(x, kernel, strides, padding)


def _forward(x, kernel, strides, padding):
    return _conv(x, kernel, strides, padding), (x, kernel)


def _backward(strides, padding, residuals, grad):
    x, kernel = residuals
    _, pullback = jax.vjp(lambda inputs: _conv(inputs, kernel, strides, padding), x)
    (grad_x,) = pullback(grad)
    path = kernel_grad_path(kernel.shape, grad.shape, strides)
    if path == "xla":
        _, kernel_pullback = jax.vjp(lambda k: _conv(x, k, strides, padding), kernel)
        (grad_kernel,) = kernel_pullback(grad)
    elif path == "chunked":
        grad_kernel = _chunked_kernel_grad(x, kernel, grad, strides, padding)
    else:
        grad_kernel = _tap_products(x, grad, kernel.shape, strides, padding)
    return grad_x, grad_kernel.astype(kernel.dtype)


_matmul_grad_conv.defvjp(_forward, _backward)


def _explicit_padding(padding: Any, kernel_shape: Sequence[int]) -> tuple | None:
    if isinstance(padding, str):
        return ((0, 0), (0, 0)) if padding.upper() == "VALID" else None
    return tuple((int(lo), int(hi)) for lo, hi in padding)


def plain_padding(lhs: jax.Array, rhs: jax.Array, padding: Any, lhs_dilation: Sequence[int] | None = None,
                  rhs_dilation: Sequence[int] | None = None, dimension_numbers: Any = None,
                  feature_group_count: int = 1, batch_group_count: int = 1, precision: Any = None,
                  preferred_element_type: Any = None) -> tuple | None:
    """((top, bottom), (left, right)) when a `lax.conv_general_dilated` call is a plain NHWC/HWIO convolution
    (no dilation, groups, precision or output type; padding explicit or "VALID"), else None."""
    plain = (lhs.ndim == 4 and feature_group_count == 1 and batch_group_count == 1
             and all(d == 1 for d in (lhs_dilation or (1, 1))) and all(d == 1 for d in (rhs_dilation or (1, 1)))
             and lax.conv_dimension_numbers(lhs.shape, rhs.shape, dimension_numbers)
             == lax.conv_dimension_numbers(lhs.shape, rhs.shape, NHWC_HWIO)
             and preferred_element_type is None and precision is None)
    return _explicit_padding(padding, rhs.shape) if plain else None


def matmul_grad_conv(lhs: jax.Array, rhs: jax.Array, window_strides: Sequence[int], padding: Any,
                     lhs_dilation: Sequence[int] | None = None, rhs_dilation: Sequence[int] | None = None,
                     dimension_numbers: Any = None, feature_group_count: int = 1, batch_group_count: int = 1,
                     precision: Any = None, preferred_element_type: Any = None) -> jax.Array:
    """`lax.conv_general_dilated` with the same forward pass and a matrix-product kernel gradient."""
    explicit = plain_padding(lhs, rhs, padding, lhs_dilation, rhs_dilation, dimension_numbers, feature_group_count,
                             batch_group_count, precision, preferred_element_type)
    if explicit is None:
        return lax.conv_general_dilated(lhs, rhs, window_strides, padding, lhs_dilation, rhs_dilation,
                                        dimension_numbers, feature_group_count, batch_group_count, precision,
                                        preferred_element_type)
    return _matmul_grad_conv(lhs, rhs, tuple(int(s) for s in window_strides), explicit)
