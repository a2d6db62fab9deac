"""Forward+backward time of each CASS arm, JAX (jit) vs timm (PyTorch), on the same CPU threads.

    python bench/model_step.py                       # resnet50/vit_base bs 4, resnet18/vit_tiny bs 16, @224
    python bench/model_step.py --config resnet50:4:224 --steps 7

Both frameworks get 2 threads (XLA_FLAGS set below before jax is imported; torch.set_num_threads(2)).
Models are in train mode (ResNet BatchNorm uses batch statistics, as in CASS); the loss is the sum of
the logits; timings are the median over --steps steps after two warm-up steps, JAX and torch steps
interleaved so that load from other processes hits both alike.
"""

import os

os.environ.setdefault("XLA_FLAGS", "--xla_cpu_multi_thread_eigen=true intra_op_parallelism_threads=2")

import argparse  # noqa: E402
import statistics  # noqa: E402
import time  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from cass_jax.models import create_model, init_variables, is_vit  # noqa: E402

DEFAULT_CONFIGS = ("resnet50:4:224", "vit_base_patch16_224:4:224", "resnet18:16:224", "vit_tiny_patch16_224:16:224")


def jax_step_fn(name: str, batch: int, size: int):
    """Returns a zero-argument callable running one jitted forward+backward to completion."""
    model = create_model(name, **({"img_size": size} if "vit" in name else {}))
    variables = init_variables(model, jax.random.key(0), size)
    params, batch_stats = variables["params"], variables.get("batch_stats")
    x = jnp.asarray(np.random.default_rng(0).standard_normal((batch, size, size, 3)), jnp.float32)

    def loss(params, batch_stats, x):
        if is_vit(model):
            return jnp.sum(model.apply({"params": params}, x, train=True)), batch_stats
        logits, updates = model.apply({"params": params, "batch_stats": batch_stats}, x, train=True,
                                      mutable=["batch_stats"])
        return jnp.sum(logits), updates["batch_stats"]

    grad_fn = jax.jit(jax.grad(loss, has_aux=True))
    return lambda: jax.block_until_ready(grad_fn(params, batch_stats, x))


def torch_step_fn(name: str, batch: int, size: int):
    import timm
    import torch

    torch.manual_seed(0)
    model = timm.create_model(name, pretrained=False, **({"img_size": size} if "vit" in name else {})).train()
    x = torch.from_numpy(np.random.default_rng(0).standard_normal((batch, 3, size, size)).astype(np.float32))

    def step():
        model.zero_grad(set_to_none=True)
        model(x).sum().backward()

    return step


def timed(step) -> float:
    start = time.perf_counter()
    step()
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", nargs="+", default=list(DEFAULT_CONFIGS), help="name:batch:size entries")
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    import torch

    torch.set_num_threads(args.threads)
    print(f"jax {jax.__version__} ({jax.default_backend()}), torch {torch.__version__}, "
          f"XLA_FLAGS={os.environ['XLA_FLAGS']!r}, torch threads {torch.get_num_threads()}")
    for config in args.config:
        name, batch, size = config.split(":")
        batch, size = int(batch), int(size)
        jax_step, torch_step = jax_step_fn(name, batch, size), torch_step_fn(name, batch, size)
        compile_s = timed(jax_step)
        for _ in range(2):
            jax_step(), torch_step()
        jax_times, torch_times = [], []
        for _ in range(args.steps):
            jax_times.append(timed(jax_step))
            torch_times.append(timed(torch_step))
        jax_s, torch_s = statistics.median(jax_times), statistics.median(torch_times)
        print(f"{name} bs{batch} @{size}: jax {jax_s * 1000:.0f} ms, timm {torch_s * 1000:.0f} ms, "
              f"jax/timm {jax_s / torch_s:.2f} (jax first call incl. compile {compile_s:.1f} s)", flush=True)


if __name__ == "__main__":
    main()
