"""Which convolution and matrix-product kernels the models use: `kernel_grad` = "auto", "xla", "matmul" or "onednn".

"matmul" swaps in functions with the same forward pass whose kernel (weight) gradients XLA:CPU runs several
times faster: `matmul_grad_conv` for convolutions, `transposed_grad_dot_general` for Dense layers. "onednn" runs
convolutions, Dense layers and attention's batched products, forward and both gradients, in oneDNN through XLA's
FFI (cass_jax/onednn; faster still on CPUs, BENCHMARKS.md). "auto" picks "onednn" on the CPU backend when its
library builds here, else "matmul" on the CPU and XLA's own elsewhere (GPU libraries do all of this well).
"""

from collections.abc import Sequence
from typing import Any, Callable

import jax
import jax.numpy as jnp
from jax import lax

from cass_jax.models.conv import SMALL_MAP_POSITIONS, matmul_grad_conv, plain_padding
from cass_jax.models.dense import transposed_grad_dot_general
from cass_jax.onednn import build as onednn_build
from cass_jax.onednn import ops as onednn

KERNEL_GRADS = ("auto", "xla", "matmul", "onednn")


def onednn_conv(lhs: jax.Array, rhs: jax.Array, window_strides: Sequence[int], padding: Any,
                lhs_dilation: Sequence[int] | None = None, rhs_dilation: Sequence[int] | None = None,
                dimension_numbers: Any = None, feature_group_count: int = 1, batch_group_count: int = 1,
                precision: Any = None, preferred_element_type: Any = None) -> jax.Array:
    """A drop-in for `lax.conv_general_dilated` (`nn.Conv(conv_general_dilated=onednn_conv)`).

    Plain float32 NHWC/HWIO convolutions run in oneDNN, except onto maps of at most SMALL_MAP_POSITIONS outputs,
    where `matmul_grad_conv`'s single im2col product is faster; everything else goes to `matmul_grad_conv`.
    """
    explicit = plain_padding(lhs, rhs, padding, lhs_dilation, rhs_dilation, dimension_numbers, feature_group_count,
                             batch_group_count, precision, preferred_element_type)
    strides = tuple(int(s) for s in window_strides)
    if explicit is not None and lhs.dtype == rhs.dtype == jnp.float32 and onednn.available():
        _, out_h, out_w, _ = onednn.conv_output_shape(lhs.shape, rhs.shape, strides, explicit)
        if out_h * out_w > SMALL_MAP_POSITIONS:
            return onednn.conv(lhs, rhs, strides, explicit)
    return matmul_grad_conv(lhs, rhs, window_strides, padding, lhs_dilation, rhs_dilation, dimension_numbers,
                            feature_group_count, batch_group_count, precision, preferred_element_type)


def onednn_dot_general(lhs: jax.Array, rhs: jax.Array, dimension_numbers: Any, precision: Any = None,
                       preferred_element_type: Any = None) -> jax.Array:
    """A drop-in for `lax.dot_general` in `nn.Dense(dot_general=onednn_dot_general)`: x @ kernel in oneDNN."""
    (lhs_contract, rhs_contract), (lhs_batch, rhs_batch) = dimension_numbers
    plain = (rhs.ndim == 2 and tuple(lhs_contract) == (lhs.ndim - 1,) and tuple(rhs_contract) == (0,)
             and not lhs_batch and not rhs_batch and precision is None and preferred_element_type is None
             and lhs.dtype == rhs.dtype == jnp.float32)
    if not plain or not onednn.available():
        return lax.dot_general(lhs, rhs, dimension_numbers, precision, preferred_element_type)
    rows = lhs.reshape(1, -1, lhs.shape[-1])
    return onednn.matmul(rows, rhs[None])[0].reshape(*lhs.shape[:-1], rhs.shape[1])


def resolve_kernel_grad(kernel_grad: str) -> str:
    """The kernels `kernel_grad` selects on the current backend: "xla", "matmul" or "onednn"."""
    if kernel_grad not in KERNEL_GRADS:
        raise ValueError(f"kernel_grad={kernel_grad!r}; choose one of {KERNEL_GRADS}.")
    if kernel_grad == "onednn" and not onednn.available():
        raise ValueError(f"kernel_grad='onednn' needs the CPU backend and oneDNN "
                         f"(backend: {jax.default_backend()}; {onednn_build.unavailable_reason() or 'library built'}). "
                         "Use kernel_grad='auto' to fall back to XLA's kernels.")
    if kernel_grad != "auto":
        return kernel_grad
    if jax.default_backend() != "cpu":
        return "xla"
    return "onednn" if onednn.available() else "matmul"


def conv_function(kernel_grad: str) -> Callable | None:
    """The convolution nn.Conv should call: XLA's (None), `matmul_grad_conv` or oneDNN's `onednn_conv`."""
    return {"xla": None, "matmul": matmul_grad_conv, "onednn": onednn_conv}[resolve_kernel_grad(kernel_grad)]


def dense_function(kernel_grad: str) -> Callable | None:
    """The dot_general nn.Dense should call: XLA's (None), `transposed_grad_dot_general` or `onednn_dot_general`."""
    return {"xla": None, "matmul": transposed_grad_dot_general,
            "onednn": onednn_dot_general}[resolve_kernel_grad(kernel_grad)]


def xla_matmul(a: jax.Array, b: jax.Array, transpose_a: bool = False, transpose_b: bool = False) -> jax.Array:
    """op(a) @ op(b) over equal leading (batch) axes as one XLA dot_general (same call signature as onednn.matmul)."""
    batch = tuple(range(a.ndim - 2))
    contract_a = a.ndim - 2 if transpose_a else a.ndim - 1
    contract_b = b.ndim - 1 if transpose_b else b.ndim - 2
    return lax.dot_general(a, b, (((contract_a,), (contract_b,)), (batch, batch)))


def batched_matmul_function(kernel_grad: str) -> Callable:
    """The batched product attention should call: `xla_matmul`, or oneDNN's `matmul` for float32 under "onednn"."""
    if resolve_kernel_grad(kernel_grad) != "onednn":
        return xla_matmul

    def float32_onednn_matmul(a, b, transpose_a=False, transpose_b=False):
        if a.dtype != jnp.float32 or b.dtype != jnp.float32:
            return xla_matmul(a, b, transpose_a, transpose_b)
        return onednn.matmul(a, b, transpose_a, transpose_b)

    return float32_onednn_matmul
