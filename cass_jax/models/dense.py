"""A dot_general for flax.linen.Dense whose kernel gradient runs as an untransposed matrix product on XLA:CPU.

A Dense layer's kernel gradient is x^T g, a product that contracts the first axis of both operands. XLA:CPU
runs that form at about half the speed of a plain product (ViT-B's fc1, 788 tokens, one core: 84 ms at
44 GFLOP/s against 43 ms when x^T is first written out as its own array; BENCHMARKS.md), and XLA folds an
ordinary transpose back into the product. `transposed_grad_dot_general` writes x^T out behind an
`optimization_barrier`, which XLA cannot fold, for layers no wider in than out (ViT's qkv, proj, fc1, head; see
`transposed_lhs_product` for fc2), and leaves the forward pass and the input gradient as XLA's own.
Use it as `nn.Dense(..., dot_general=transposed_grad_dot_general)`: parameters are unchanged, values equal
lax.dot_general's up to float rounding. Anything but Dense's plain contraction falls back to lax.dot_general.
"""

from typing import Any

import jax
from jax import lax


def transposed_lhs_product(a: jax.Array, b: jax.Array) -> jax.Array:
    """a^T b over the shared first axis ([M, K], [M, N] -> [K, N]), from an explicit a^T when K <= N.

    When K > N (ViT's fc2) writing out a^T, or b^T with the [N, K] result transposed back, costs more than it
    saves: either copy is fused with its producer (the GELU) or its consumer (Adam) into a strided loop.
    """
    if a.shape[1] <= b.shape[1]:
        return lax.optimization_barrier(a.T) @ b
    return lax.dot_general(a, b, (((0,), (0,)), ((), ())))


def _matmul(x: jax.Array, kernel: jax.Array) -> jax.Array:
    return lax.dot_general(x, kernel, (((x.ndim - 1,), (0,)), ((), ())))


@jax.custom_vjp
def _transposed_grad_matmul(x: jax.Array, kernel: jax.Array) -> jax.Array:
    return _matmul(x, kernel)


def _forward(x: jax.Array, kernel: jax.Array) -> tuple[jax.Array, tuple[jax.Array, jax.Array]]:
    return _matmul(x, kernel), (x, kernel)


def _backward(residuals: tuple[jax.Array, jax.Array], grad: jax.Array) -> tuple[jax.Array, jax.Array]:
    x, kernel = residuals
    grad_x = lax.dot_general(grad, kernel, (((grad.ndim - 1,), (1,)), ((), ())))
    grad_kernel = transposed_lhs_product(x.reshape(-1, x.shape[-1]), grad.reshape(-1, grad.shape[-1]))
    return grad_x, grad_kernel.astype(kernel.dtype)


_transposed_grad_matmul.defvjp(_forward, _backward)


def transposed_grad_dot_general(lhs: jax.Array, rhs: jax.Array, dimension_numbers: Any, precision: Any = None,
                                preferred_element_type: Any = None) -> jax.Array:
    """`lax.dot_general` with the same forward pass and a kernel gradient computed from an explicit x^T."""
    (lhs_contract, rhs_contract), (lhs_batch, rhs_batch) = dimension_numbers
    plain = (rhs.ndim == 2 and tuple(lhs_contract) == (lhs.ndim - 1,) and tuple(rhs_contract) == (0,)
             and not lhs_batch and not rhs_batch and precision is None and preferred_element_type is None
             and lhs.dtype == rhs.dtype)
    if not plain:
        return lax.dot_general(lhs, rhs, dimension_numbers, precision, preferred_element_type)
    return _transposed_grad_matmul(lhs, rhs)
