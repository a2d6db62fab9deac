"""Which kernel-gradient implementation the models use: `kernel_grad` = "auto", "xla" or "matmul".

"matmul" swaps in functions with the same forward pass whose kernel (weight) gradients XLA:CPU runs several
times faster: `matmul_grad_conv` for convolutions, `transposed_grad_dot_general` for Dense layers. "auto"
picks them on the CPU backend and XLA's own elsewhere (GPU libraries compute kernel gradients well).
"""

from typing import Callable

import jax

from cass_jax.models.conv import matmul_grad_conv
from cass_jax.models.dense import transposed_grad_dot_general

KERNEL_GRADS = ("auto", "xla", "matmul")


def uses_matmul_kernel_grad(kernel_grad: str) -> bool:
    """Whether `kernel_grad` selects the matrix-product kernel gradients on the current backend."""
    if kernel_grad not in KERNEL_GRADS:
        raise ValueError(f"kernel_grad={kernel_grad!r}; choose one of {KERNEL_GRADS}.")
    return kernel_grad == "matmul" or (kernel_grad == "auto" and jax.default_backend() == "cpu")


def conv_function(kernel_grad: str) -> Callable | None:
    """The convolution nn.Conv should call: XLA's (None) or `matmul_grad_conv`."""
    return matmul_grad_conv if uses_matmul_kernel_grad(kernel_grad) else None


def dense_function(kernel_grad: str) -> Callable | None:
    """The dot_general nn.Dense should call: XLA's (None) or `transposed_grad_dot_general`."""
    return transposed_grad_dot_general if uses_matmul_kernel_grad(kernel_grad) else None
