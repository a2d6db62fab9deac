"""Convolutions and matrix products from oneDNN inside jitted JAX code on the CPU, with their gradients.

XLA:CPU's own kernels run a ResNet's convolutions (forward and both gradients) and a ViT's matrix products slower
than oneDNN, the library PyTorch uses on CPUs (bench/onednn_kernels.py, BENCHMARKS.md). These functions call
oneDNN through XLA's FFI (kernels.cc, built by build.py) and give gradients through `jax.custom_vjp`, so they
back the drop-ins of `cass_jax.models.kernel_grad` (for `lax.conv_general_dilated` in `nn.Conv`, `lax.dot_general`
in `nn.Dense`, and attention's batched products). Float32 only, in strict float32 maths.
"""

import functools
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from cass_jax.onednn import build


def available() -> bool:
    """Whether oneDNN kernels can run here: the CPU backend and a library that built and loaded."""
    return jax.default_backend() == "cpu" and build.load() is not None


def status() -> str:
    """One line for a run's log: whether the CPU backend's models get oneDNN kernels, and why not."""
    if jax.default_backend() != "cpu":
        return f"oneDNN kernels: not used on the {jax.default_backend()} backend"
    if build.load() is None:
        return f"oneDNN kernels: off, kernel_grad='auto' uses XLA's ({build.unavailable_reason()})"
    return "oneDNN kernels: on for kernel_grad='auto' (float32 convolutions and products)"


def _call(target: str, shape: Sequence[int] | None, dtype: Any, *args: jax.Array, vmap_method: str,
          shapes: Sequence[Sequence[int]] = (), **attributes: Any):
    """Calls an FFI target of the library: one result of `shape`, or one per entry of `shapes`."""
    build.load()
    results = (jax.ShapeDtypeStruct(tuple(shape), dtype) if shape is not None
               else tuple(jax.ShapeDtypeStruct(tuple(each), dtype) for each in shapes))
    return jax.ffi.ffi_call(target, results, vmap_method=vmap_method)(*args, **attributes)


def _conv_attributes(strides: tuple[int, int], padding: tuple) -> dict[str, np.int64]:
    (top, bottom), (left, right) = padding
    return {"stride_h": np.int64(strides[0]), "stride_w": np.int64(strides[1]), "pad_top": np.int64(top),
            "pad_bottom": np.int64(bottom), "pad_left": np.int64(left), "pad_right": np.int64(right)}


def conv_output_shape(x_shape: Sequence[int], kernel_shape: Sequence[int], strides: tuple[int, int],
                      padding: tuple) -> tuple[int, int, int, int]:
    """NHWC output shape of an HWIO convolution with explicit padding."""
    n, h, w, _ = x_shape
    kh, kw, _, out = kernel_shape
    return (n, (h + sum(padding[0]) - kh) // strides[0] + 1, (w + sum(padding[1]) - kw) // strides[1] + 1, out)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def conv(x: jax.Array, kernel: jax.Array, strides: tuple[int, int], padding: tuple) -> jax.Array:
    """NHWC x HWIO -> NHWC float32 convolution; padding is ((top, bottom), (left, right))."""
    return _call("cass_onednn_conv_forward", conv_output_shape(x.shape, kernel.shape, strides, padding), x.dtype,
                 x, kernel, vmap_method="sequential", **_conv_attributes(strides, padding))


def _conv_forward(x, kernel, strides, padding):
    return conv(x, kernel, strides, padding), (x, kernel)


def _conv_backward(strides, padding, residuals, grad):
    x, kernel = residuals
    attributes = _conv_attributes(strides, padding)
    grad_x = _call("cass_onednn_conv_input_grad", x.shape, x.dtype, grad, kernel, vmap_method="sequential",
                   **attributes)
    grad_kernel = _call("cass_onednn_conv_kernel_grad", kernel.shape, kernel.dtype, x, grad,
                        vmap_method="sequential", **attributes)
    return grad_x, grad_kernel


conv.defvjp(_conv_forward, _conv_backward)


def _matmul_call(a: jax.Array, b: jax.Array, transpose_a: bool, transpose_b: bool) -> jax.Array:
    m = a.shape[-1] if transpose_a else a.shape[-2]
    n = b.shape[-2] if transpose_b else b.shape[-1]
    return _call("cass_onednn_matmul", a.shape[:-2] + (m, n), a.dtype, a, b, vmap_method="broadcast_all",
                 transpose_a=transpose_a, transpose_b=transpose_b)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def _matmul(a: jax.Array, b: jax.Array, transpose_a: bool, transpose_b: bool) -> jax.Array:
    return _matmul_call(a, b, transpose_a, transpose_b)


def _matmul_forward(a, b, transpose_a, transpose_b):
    return _matmul_call(a, b, transpose_a, transpose_b), (a, b)


def _matmul_backward(transpose_a, transpose_b, residuals, grad):
    a, b = residuals
    # c = op(a) op(b): each gradient is itself one product of the stored operands, read through transposes.
    if transpose_a:
        grad_a = _matmul_call(b, grad, transpose_b, True)  # stored [K, M] = op(b) grad^T
    else:
        grad_a = _matmul_call(grad, b, False, not transpose_b)  # grad op(b)^T
    if transpose_b:
        grad_b = _matmul_call(grad, a, True, transpose_a)  # stored [N, K] = grad^T op(a)
    else:
        grad_b = _matmul_call(a, grad, not transpose_a, False)  # op(a)^T grad
    return grad_a, grad_b


_matmul.defvjp(_matmul_forward, _matmul_backward)


def matmul(a: jax.Array, b: jax.Array, transpose_a: bool = False, transpose_b: bool = False) -> jax.Array:
    """op(a) @ op(b) over equal leading (batch) axes, float32; op transposes the last two axes when asked."""
    if a.shape[:-2] != b.shape[:-2] or a.dtype != jnp.float32 or b.dtype != jnp.float32:
        raise ValueError(f"matmul takes float32 operands with equal batch axes; got {a.shape} {a.dtype} and "
                         f"{b.shape} {b.dtype}")
    if (a.shape[-2] if transpose_a else a.shape[-1]) != (b.shape[-1] if transpose_b else b.shape[-2]):
        raise ValueError(f"contracted sizes differ: {a.shape} (transposed: {transpose_a}) and {b.shape} "
                         f"(transposed: {transpose_b})")
    return _matmul(a, b, transpose_a, transpose_b)


def _attention_attributes(num_heads: int, scale: float, queries: int) -> dict[str, Any]:
    return {"heads": np.int64(num_heads), "scale": np.float32(scale), "queries": np.int64(queries)}


@functools.partial(jax.custom_vjp, nondiff_argnums=(1, 2, 3))
def attention(qkv: jax.Array, num_heads: int, scale: float, queries: int) -> jax.Array:
    """softmax(scale q k^T) v per head from timm's fused projection `qkv` [B, T, 3 * H * D] (q, k, v, then heads),
    for the first `queries` tokens (T, or 1 for the class token alone): [B, queries, H * D], float32.

    q, k and v are read where the projection wrote them and the output is written where the next projection reads
    it, so none of the transposes and copies around XLA's attention products happen (BENCHMARKS.md).
    """
    return _attention_forward(qkv, num_heads, scale, queries)[0]


def _attention_forward(qkv, num_heads, scale, queries):
    batch, tokens, width = qkv.shape
    out, probs = _call("cass_onednn_attention_forward", None, qkv.dtype, qkv, vmap_method="sequential",
                       shapes=((batch, queries, width // 3), (batch, num_heads, queries, tokens)),
                       **_attention_attributes(num_heads, scale, queries))
    return out, (qkv, probs)


def _attention_backward(num_heads, scale, queries, residuals, grad):
    qkv, probs = residuals
    return (_call("cass_onednn_attention_backward", qkv.shape, qkv.dtype, qkv, probs, grad,
                  vmap_method="sequential", **_attention_attributes(num_heads, scale, queries)),)


attention.defvjp(_attention_forward, _attention_backward)
