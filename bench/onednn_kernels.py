"""oneDNN's kernels (cass_jax/onednn) against the XLA:CPU forms `kernel_grad="matmul"` uses, layer by layer.

python bench/onednn_kernels.py [--batch 32] [--iters 5]
One line per layer: median ms of a jitted forward + both gradients (a convolution: input and kernel; a Dense layer:
input and kernel; an attention product: both operands) with oneDNN and with `matmul_grad_conv` /
`transposed_grad_dot_general` / XLA's batched dot, their ratio, and the largest relative difference of the
gradients. Layers: ResNet-18 at 224 px and DINO's 96 px local crops, ViT-Tiny/16's Dense layers and attention
products at 224 px. Threads: XLA's (and so oneDNN's, which runs on XLA's pool); pin with taskset for fewer.
"""

import argparse
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench.conv_kernel_grad import median_ms  # noqa: E402
from cass_jax import onednn  # noqa: E402
from cass_jax.onednn import build  # noqa: E402
from cass_jax.models.conv import NHWC_HWIO, matmul_grad_conv  # noqa: E402
from cass_jax.models.dense import transposed_grad_dot_general  # noqa: E402
from cass_jax.models import kernel_grad as kernel_grads  # noqa: E402
from cass_jax.models.kernel_grad import xla_matmul  # noqa: E402

# (batch multiple, input size, in channels, out channels, kernel, stride, padding)
CONVS = [(1, 224, 3, 64, 7, 2, 3), (1, 56, 64, 64, 3, 1, 1), (1, 56, 64, 128, 3, 2, 1), (1, 28, 128, 128, 3, 1, 1),
         (1, 28, 128, 256, 3, 2, 1), (1, 14, 256, 256, 3, 1, 1), (1, 14, 256, 512, 3, 2, 1), (1, 7, 512, 512, 3, 1, 1),
         (1, 56, 64, 128, 1, 2, 0), (4, 24, 64, 64, 3, 1, 1)]
# (tokens per image, in, out): ViT-Tiny/16 at 224 px (197 tokens): qkv, proj, fc1, fc2
DENSES = [(197, 192, 576), (197, 192, 192), (197, 192, 768), (197, 768, 192)]
# (tokens, heads, head dim): q k^T and weights v
ATTENTION = [(197, 3, 64), (37, 3, 64)]


def compare(label: str, ours, reference, args, iters: int) -> tuple[float, float]:
    fast, slow = jax.jit(ours), jax.jit(reference)
    got, want = fast(*args), slow(*args)
    error = max(float(jnp.max(jnp.abs(a - b)) / (jnp.max(jnp.abs(b)) + 1e-30))
                for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want)))
    ours_ms, reference_ms = median_ms(fast, *args, iters=iters), median_ms(slow, *args, iters=iters)
    print(f"{label:44s} oneDNN {ours_ms:8.1f} ms  XLA forms {reference_ms:8.1f} ms  ratio {ours_ms / reference_ms:5.2f}"
          f"  max rel diff {error:.1e}", flush=True)
    return ours_ms, reference_ms


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--iters", type=int, default=5)
    args = parser.parse_args()
    if not onednn.available():
        raise SystemExit(f"oneDNN kernels unavailable here: {build.unavailable_reason()}")
    rng = np.random.default_rng(0)
    totals = np.zeros(2)

    def normal(*shape):
        return jnp.asarray(rng.normal(size=shape), jnp.float32)

    for multiple, size, cin, cout, k, stride, pad in CONVS:
        x, kernel = normal(args.batch * multiple, size, size, cin), normal(k, k, cin, cout) / np.sqrt(k * k * cin)

        def loss(conv, strides=(stride, stride), padding=((pad, pad), (pad, pad))):
            return jax.grad(lambda x, w: jnp.sum(jnp.sin(conv(x, w, strides, padding, dimension_numbers=NHWC_HWIO))),
                            argnums=(0, 1))

        totals += compare(f"conv {x.shape[0]}x{size}x{size}x{cin} k{k} s{stride} -> {cout}",
                          loss(kernel_grads.onednn_conv), loss(matmul_grad_conv), (x, kernel), args.iters)
    for tokens, cin, cout in DENSES:
        x, kernel = normal(args.batch * tokens, cin), normal(cin, cout) / np.sqrt(cin)
        dims = (((1,), (0,)), ((), ()))

        def loss(dot):
            return jax.grad(lambda x, w: jnp.sum(jnp.sin(dot(x, w, dims))), argnums=(0, 1))

        totals += compare(f"dense {x.shape[0]} x {cin} -> {cout}", loss(kernel_grads.onednn_dot_general),
                          loss(transposed_grad_dot_general), (x, kernel), args.iters)
    for tokens, heads, dim in ATTENTION:
        q, k = normal(args.batch, heads, tokens, dim), normal(args.batch, heads, tokens, dim)

        def loss(matmul):
            return jax.grad(lambda q, k: jnp.sum(jnp.sin(matmul(q, k, False, True))), argnums=(0, 1))

        totals += compare(f"attention q k^T {args.batch}x{heads}x{tokens}x{dim}", loss(onednn.matmul),
                          loss(xla_matmul), (q, k), args.iters)
    print(f"{'all layers':44s} oneDNN {totals[0]:8.1f} ms  XLA forms {totals[1]:8.1f} ms  ratio "
          f"{totals[0] / totals[1]:5.2f}")


if __name__ == "__main__":
    main()
