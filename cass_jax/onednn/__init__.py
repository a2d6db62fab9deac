"""oneDNN kernels for XLA:CPU (convolutions, matrix products) with JAX gradients; see ops.py and build.py."""

from cass_jax.onednn.ops import attention, available, conv, matmul, status

__all__ = ["attention", "available", "conv", "matmul", "status"]
