"""Our CASS training step next to the PyTorch + timm reference, on the same machine, batch, size and threads.

python bench/cass_step.py [--settings big:4:224,big:2:384,small:16:224] [--iters 5] [--threads 2]
    [--reference ../shared/reference/torch_cass_step.py] [--device cpu|gpu] [--dtype float32|bfloat16]
    [--kernel-grad auto|onednn|matmul|xla] [--xla-flags "..."]

Each setting runs in fresh processes (JAX, then PyTorch), and prints one line ending in
`ratio=<our median step time / timm median step time>` (below 1: we are faster).
  big   = resnet50 + vit_base_patch16 at SIZE;  small = resnet18 + vit_tiny_patch16 at SIZE.
"""

import argparse
import functools
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
ARMS = {"big": ("resnet50", "vit_base_patch16_224"), "small": ("resnet18", "vit_tiny_patch16_224")}


def measure_jax(variant: str, batch: int, size: int, iters: int, dtype: str, kernel_grad: str) -> dict:
    """Median step time of our jitted CASS step (same Adam, constant lr 1e-4, as the reference)."""
    import jax
    import numpy as np

    sys.path.insert(0, str(REPO))
    from cass_jax import parallel
    from cass_jax.methods.cass import build_arms, initial_state, train_step
    from configs.common import base_config

    config = base_config()
    config.cnn.name, config.vit.name = ARMS[variant]
    config.cnn.init = config.vit.init = "random"
    config.data.image_size = size
    config.dtype = dtype
    config.cnn.kernel_grad = config.vit.kernel_grad = kernel_grad
    config.optim.schedule = "constant"
    config.optim.cnn_lr = config.optim.vit_lr = 1e-4
    arms = build_arms(config, total_steps=1000, steps_per_epoch=100)
    mesh = parallel.data_mesh()  # the same data-parallel layout as pretrain(): batch split over the devices
    state = jax.device_put(initial_state(config, arms), parallel.replicated(mesh))
    step = jax.jit(functools.partial(train_step, arms=arms), in_shardings=(parallel.replicated(mesh),
                   parallel.batch_sharding(mesh)), donate_argnums=0)
    images = np.random.default_rng(0).normal(size=(batch, size, size, 3)).astype(np.float32)
    batch_data = {"image": jax.device_put(images, parallel.batch_sharding(mesh))}

    t0 = time.perf_counter()
    compiled = step.lower(state, batch_data).compile()
    compile_s = time.perf_counter() - t0
    flops = (compiled.cost_analysis() or {}).get("flops", float("nan"))
    state, metrics = compiled(state, batch_data)
    jax.block_until_ready(metrics)
    times = []
    for _ in range(iters):
        t0 = time.perf_counter()
        state, metrics = compiled(state, batch_data)
        jax.block_until_ready(metrics)
        times.append(time.perf_counter() - t0)
    median = statistics.median(times)
    return dict(framework="jax", jax=jax.__version__, device=str(jax.devices()[0]), devices=jax.device_count(),
                dtype=dtype, variant=variant,
                kernel_grad=kernel_grad, xla_flags=os.environ.get("XLA_FLAGS", ""),
                batch=batch, size=size, compile_s=round(compile_s, 1), step_times_s=[round(t, 4) for t in times],
                median_step_s=round(median, 4), img_per_s=round(batch / median, 3),
                step_gflop=round(flops / 1e9, 1),
                peak_rss_GiB=round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 2))


def run_child(command: list[str], env: dict) -> dict:
    result = subprocess.run(command, capture_output=True, text=True, env=env)
    lines = [line for line in result.stdout.splitlines() if line.startswith("RESULT ")]
    if result.returncode != 0 or not lines:
        raise RuntimeError(f"{' '.join(command)} failed:\n{result.stderr[-3000:]}")
    return json.loads(lines[-1][len("RESULT "):])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--settings", default="big:4:224,big:2:384,small:16:224")
    parser.add_argument("--iters", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--device", default="cpu", help="cpu or gpu (the reference then runs with --device cuda)")
    parser.add_argument("--reference", default=str(REPO.parent / "shared" / "reference" / "torch_cass_step.py"))
    parser.add_argument("--amp", action="store_true", help="reference in bf16 autocast (pair with --dtype bfloat16)")
    parser.add_argument("--kernel-grad", default="auto",
                        help="config.cnn.kernel_grad and config.vit.kernel_grad: auto, onednn, matmul or xla")
    parser.add_argument("--xla-flags", default="", help="extra XLA_FLAGS for our step (e.g. to try an XLA option)")
    parser.add_argument("--skip-reference", action="store_true", help="time our step only")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.worker:
        variant, batch, size = args.worker.split(":")
        print("RESULT " + json.dumps(measure_jax(variant, int(batch), int(size), args.iters, args.dtype,
                                                 args.kernel_grad)), flush=True)
        return

    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads)}
    if args.device == "cpu":
        env["JAX_PLATFORMS"] = "cpu"
        env["XLA_FLAGS"] = (env.get("XLA_FLAGS", "") + " --xla_cpu_multi_thread_eigen=true "
                            f"intra_op_parallelism_threads={args.threads}").strip()
    for setting in args.settings.split(","):
        variant, batch, size = setting.split(":")
        ours = run_child([sys.executable, __file__, "--worker", setting, "--iters", str(args.iters),
                          "--dtype", args.dtype, "--kernel-grad", args.kernel_grad],
                         {**env, "XLA_FLAGS": f"{env.get('XLA_FLAGS', '')} {args.xla_flags}".strip()})
        if args.skip_reference:
            print(f"{variant} ({'+'.join(ARMS[variant])}) bs {batch} @{size} {args.dtype} kernel_grad="
                  f"{args.kernel_grad}: jax {ours['median_step_s']:.3f} s/step ({ours['img_per_s']:.2f} img/s, "
                  f"peak RSS {ours['peak_rss_GiB']} GiB)", flush=True)
            continue
        reference_command = [sys.executable, args.reference, variant, batch, size, "--iters", str(args.iters),
                             "--threads", str(args.threads), "--device", "cuda" if args.device == "gpu" else "cpu"]
        theirs = run_child(reference_command + (["--amp"] if args.amp else []), env)
        print(json.dumps({"jax": ours, "torch": theirs}), file=sys.stderr)
        print(f"{variant} ({'+'.join(ARMS[variant])}) bs {batch} @{size} {args.dtype} kernel_grad={args.kernel_grad}: "
              f"jax {ours['median_step_s']:.3f} s/step ({ours['img_per_s']:.2f} img/s, peak RSS "
              f"{ours['peak_rss_GiB']} GiB) | timm {theirs['median_step_s']:.3f} s/step ({theirs['img_per_s']:.2f} "
              f"img/s, peak RSS {theirs['peak_rss_GiB']} GiB) | ratio={ours['median_step_s'] / theirs['median_step_s']:.2f}",
              flush=True)


if __name__ == "__main__":
    main()
