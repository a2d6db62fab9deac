"""Convolution kernel gradients on XLA:CPU: XLA's own against cass_jax's matrix-product version, per ResNet layer.

python bench/conv_kernel_grad.py [--batch 16] [--iters 5]
One line per layer shape of ResNet-18/50 at 224 px: median ms of the kernel gradient alone (jit of the vjp with
respect to the kernel) for `lax.conv_general_dilated` and for `cass_jax.models.conv.matmul_grad_conv`, and their
largest relative difference. Threads follow XLA_FLAGS (e.g. --xla_cpu_multi_thread_eigen=false for one).
"""

import argparse
import statistics
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from cass_jax.models.conv import NHWC_HWIO, matmul_grad_conv  # noqa: E402

# (input size, in channels, out channels, kernel, stride, padding): ResNet-18/50 layers at 224 px.
LAYERS = [
    (224, 3, 64, 7, 2, 3),     # stem
    (56, 64, 64, 3, 1, 1),
    (28, 128, 128, 3, 1, 1),
    (14, 256, 256, 3, 1, 1),
    (7, 512, 512, 3, 1, 1),
    (56, 64, 128, 3, 2, 1),
    (56, 64, 256, 1, 1, 0),    # bottleneck expand
    (56, 256, 64, 1, 1, 0),    # bottleneck reduce
    (56, 256, 512, 1, 2, 0),   # strided downsample
    (14, 1024, 256, 1, 1, 0),
]


def median_ms(fn, *args, iters: int) -> float:
    jax.block_until_ready(fn(*args))
    times = []
    for _ in range(iters):
        start = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - start)
    return 1e3 * statistics.median(times)


def kernel_grad(conv, strides, padding):
    def grad(x, kernel, cotangent):
        _, pullback = jax.vjp(lambda k: conv(x, k, strides, padding, dimension_numbers=NHWC_HWIO), kernel)
        return pullback(cotangent)[0]
    return jax.jit(grad)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--iters", type=int, default=5)
    args = parser.parse_args()
    rng = np.random.default_rng(0)
    print("| layer (in px, Cin -> Cout, k, stride) | XLA ms | matmul ms | speed-up | max rel. diff |")
    print("|---|---|---|---|---|")
    for size, cin, cout, k, stride, pad in LAYERS:
        x = jnp.asarray(rng.normal(size=(args.batch, size, size, cin)), jnp.float32)
        kernel = jnp.asarray(rng.normal(size=(k, k, cin, cout)) * 0.05, jnp.float32)
        strides, padding = (stride, stride), ((pad, pad), (pad, pad))
        out_shape = lax.conv_general_dilated(x, kernel, strides, padding, dimension_numbers=NHWC_HWIO).shape
        cotangent = jnp.asarray(rng.normal(size=out_shape), jnp.float32)
        xla = kernel_grad(lax.conv_general_dilated, strides, padding)
        ours = kernel_grad(matmul_grad_conv, strides, padding)
        expected, got = xla(x, kernel, cotangent), ours(x, kernel, cotangent)
        diff = float(jnp.max(jnp.abs(got - expected)) / jnp.max(jnp.abs(expected)))
        xla_ms, ours_ms = median_ms(xla, x, kernel, cotangent, iters=args.iters), median_ms(
            ours, x, kernel, cotangent, iters=args.iters)
        print(f"| {size} px, {cin} -> {cout}, {k}x{k}, /{stride} | {xla_ms:.0f} | {ours_ms:.0f} | "
              f"{xla_ms / ours_ms:.1f}x | {diff:.1e} |", flush=True)


if __name__ == "__main__":
    main()
