"""Our cross-teaching step (CNN + Swin-UNet, SSL4MIS) next to a PyTorch reference step: same networks, batch, threads.

python bench/cross_teaching_step.py [--settings full,small] [--size N] [--labeled 8] [--unlabeled 8]
    [--iters 3] [--warmup 1] [--threads 2] [--breakdown] [--skip-reference]

full  = unet_ssl4mis + swin_unet_tiny at 224 px (SSL4MIS's ACDC run); small = unet_ssl4mis_narrow + swin_unet_micro
at 64 px (a check that takes seconds). `--size` overrides every setting's size. Each side runs in a fresh process
(JAX, then PyTorch) with the same thread count (and pinned to that many cores with taskset when fewer than the
machine has); warm-up steps are excluded and the median of `--iters` steps is reported. Per side: step seconds,
images/s, peak RSS, (JAX) compile seconds, and the projected time of SSL4MIS's 30,000 iterations; then one line
ending in `ratio=<our median step time / torch median step time>` (below 1: we are faster).

The reference step is what SSL4MIS's train_cross_teaching_between_cnn_transformer_2D.py does per iteration: both
networks (torch renderings from bench/torch_segmentation.py, timm's Swin modules) forward the labelled + unlabelled
batch in train mode, softmax, 0.5 * (CE + Dice) on the labelled half, each network's Dice against the other's
detached argmax on the unlabelled half times the consistency weight, one backward of the summed loss, two SGD steps
(lr 0.01, momentum 0.9, weight decay 1e-4), the poly learning rate set. Random weights and data, fp32.
`--breakdown` times one extra (untimed) torch step network by network: forward+loss+backward of each on its own.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench.cass_step import run_child  # noqa: E402

SETTINGS = {"full": ("unet_ssl4mis", "swin_unet_tiny", 224), "small": ("unet_ssl4mis_narrow", "swin_unet_micro", 64)}
NUM_CLASSES = 4
ITERATIONS = 30_000  # SSL4MIS's max_iterations: the projected run


def make_batch(labeled: int, unlabeled: int, size: int, seed: int = 0) -> dict:
    """The loader's batch layout: images f32 (b, S, S, 1) in [0, 1], masks i32 (b, S, S) in [0, NUM_CLASSES)."""
    import numpy as np

    rng = np.random.default_rng(seed)
    return {"labeled_image": rng.random((labeled, size, size, 1), dtype=np.float32),
            "labeled_mask": rng.integers(0, NUM_CLASSES, (labeled, size, size), dtype=np.int32),
            "unlabeled_image": rng.random((unlabeled, size, size, 1), dtype=np.float32)}


def peak_rss_gib() -> float:
    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 2)


def summary(times: list[float], images: int) -> dict:
    median = statistics.median(times)
    return dict(step_times_s=[round(t, 3) for t in times], median_step_s=round(median, 3),
                img_per_s=round(images / median, 3), projected_30k_h=round(median * ITERATIONS / 3600, 1),
                peak_rss_GiB=peak_rss_gib())


def config_for(setting: str, size: int, labeled: int, unlabeled: int):
    from cass_jax.segmentation.cross_teaching import CrossTeachingConfig

    cnn, transformer, _ = SETTINGS[setting]
    return CrossTeachingConfig(cnn=cnn, transformer=transformer, image_size=size, num_classes=NUM_CLASSES,
                               labeled_batch_size=labeled, unlabeled_batch_size=unlabeled)


def measure_jax(setting: str, size: int, labeled: int, unlabeled: int, iters: int, warmup: int) -> dict:
    """Median step time of CrossTeaching's jitted step, the state replicated and the batch placed as in training."""
    import jax

    from cass_jax import parallel
    from cass_jax.segmentation.cross_teaching import CrossTeaching

    method = CrossTeaching(config_for(setting, size, labeled, unlabeled))
    state = method.init(jax.random.key(0))
    batch = jax.device_put(make_batch(labeled, unlabeled, size), parallel.batch_sharding(method.mesh))

    def rng(state):
        return jax.random.fold_in(state.rng, state.step)  # what CrossTeaching.train_step passes

    t0 = time.perf_counter()
    compiled = method.jitted_step.lower(state, batch, rng(state)).compile()
    compile_s = time.perf_counter() - t0
    flops = (compiled.cost_analysis() or {}).get("flops", float("nan"))
    times = []
    for index in range(warmup + iters):
        t0 = time.perf_counter()
        state, metrics = compiled(state, batch, rng(state))
        jax.block_until_ready((state, metrics))
        if index >= warmup:
            times.append(time.perf_counter() - t0)
    params = {name: sum(leaf.size for leaf in jax.tree_util.tree_leaves(tree)) for name, tree in state.params.items()}
    return dict(framework="jax", jax=jax.__version__, compile_s=round(compile_s, 1), step_gflop=round(flops / 1e9, 1),
                params=params, loss=round(float(metrics["loss"]), 4), **summary(times, labeled + unlabeled))


def architectures(setting: str, size: int) -> dict:
    """The flax networks' settings the torch renderings are built from (read in the parent, not the torch child)."""
    from cass_jax.segmentation.cross_teaching import build_networks

    networks = build_networks(config_for(setting, size, 1, 1))
    cnn, swin = networks.cnn, networks.transformer
    return {"cnn": dict(feature_channels=list(cnn.feature_channels), in_channels=cnn.in_channels,
                        num_classes=NUM_CLASSES, dropout=list(cnn.dropout)),
            "transformer": dict(img_size=swin.img_size, embed_dim=swin.embed_dim, depths=list(swin.depths),
                                num_heads=list(swin.num_heads), window_size=swin.window_size, num_classes=NUM_CLASSES,
                                drop_path_rate=swin.drop_path_rate, mlp_ratio=swin.mlp_ratio,
                                patch_size=swin.patch_size)}


def torch_dice_loss(probabilities, labels, num_classes: int):
    """SSL4MIS's DiceLoss on softmax outputs (B, C, H, W): per class 1 - (2 I + 1e-5) / (sum p^2 + sum t^2 + 1e-5)."""
    import torch

    target = torch.nn.functional.one_hot(labels, num_classes).permute(0, 3, 1, 2).float()
    dims = (0, 2, 3)
    intersect = (probabilities * target).sum(dims)
    dice = (2 * intersect + 1e-5) / ((probabilities * probabilities).sum(dims) + (target * target).sum(dims) + 1e-5)
    return (1 - dice).mean()


def measure_torch(arch: dict, size: int, labeled: int, unlabeled: int, iters: int, warmup: int, threads: int,
                  breakdown: bool) -> dict:
    """Median time of SSL4MIS's cross-teaching iteration in eager PyTorch (see the module docstring)."""
    import math

    import numpy as np
    import torch

    from bench.torch_segmentation import ssl4mis_unet, swin_unet

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    nets = [ssl4mis_unet(**arch["cnn"]).train(), swin_unet(**arch["transformer"]).train()]
    optimizers = [torch.optim.SGD(net.parameters(), lr=0.01, momentum=0.9, weight_decay=1e-4) for net in nets]
    data = make_batch(labeled, unlabeled, size)
    images = torch.from_numpy(np.concatenate([data["labeled_image"], data["unlabeled_image"]]).transpose(0, 3, 1, 2))
    labels = torch.from_numpy(data["labeled_mask"]).long()
    weight = 0.1 * math.exp(-5.0)  # SSL4MIS's consistency weight at iteration 0 (0.1 * sigmoid_rampup(0, 200))

    def step(iteration: int) -> float:
        outputs = [net(images) for net in nets]
        soft = [torch.softmax(out, dim=1) for out in outputs]
        pseudo = [s[labeled:].detach().argmax(dim=1) for s in soft]
        loss = 0.0
        for i, (out, s) in enumerate(zip(outputs, soft)):
            supervised = 0.5 * (torch.nn.functional.cross_entropy(out[:labeled], labels)
                                + torch_dice_loss(s[:labeled], labels, NUM_CLASSES))
            loss = loss + supervised + weight * torch_dice_loss(s[labeled:], pseudo[1 - i], NUM_CLASSES)
        for optimizer in optimizers:
            optimizer.zero_grad()
        loss.backward()
        for optimizer in optimizers:
            optimizer.step()
            for group in optimizer.param_groups:
                group["lr"] = 0.01 * (1.0 - (iteration + 1) / ITERATIONS) ** 0.9
        return float(loss)

    times = []
    for index in range(warmup + iters):
        t0 = time.perf_counter()
        loss = step(index)
        if index >= warmup:
            times.append(time.perf_counter() - t0)
    result = dict(framework="torch", torch=torch.__version__, threads=torch.get_num_threads(), loss=round(loss, 4),
                  params={name: sum(p.numel() for p in net.parameters()) for name, net in zip(("cnn", "transformer"),
                                                                                              nets)})
    if breakdown:  # each network on its own: forward, its supervised loss, backward (the same gradients)
        result["breakdown_s"] = {}
        for name, net in zip(("cnn", "transformer"), nets):
            t0 = time.perf_counter()
            out = net(images)
            s = torch.softmax(out, dim=1)
            loss = 0.5 * (torch.nn.functional.cross_entropy(out[:labeled], labels)
                          + torch_dice_loss(s[:labeled], labels, NUM_CLASSES))
            net.zero_grad()
            loss.backward()
            result["breakdown_s"][name] = round(time.perf_counter() - t0, 3)
    return {**result, **summary(times, labeled + unlabeled)}


def side_line(name: str, result: dict) -> str:
    compile_part = f", compile {result['compile_s']:.1f} s" if "compile_s" in result else ""
    return (f"  {name:5s} {result['median_step_s']:.3f} s/step (steps {result['step_times_s']}), "
            f"{result['img_per_s']:.2f} img/s, peak RSS {result['peak_rss_GiB']} GiB{compile_part}, "
            f"30k iterations {result['projected_30k_h']:.1f} h")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--settings", default="full", help=f"comma-separated, of {', '.join(SETTINGS)}")
    parser.add_argument("--size", type=int, help="image side for every setting (default: 224 full, 64 small)")
    parser.add_argument("--labeled", type=int, default=8)
    parser.add_argument("--unlabeled", type=int, default=8)
    parser.add_argument("--iters", type=int, default=3)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--breakdown", action="store_true", help="time each torch network alone in one extra step")
    parser.add_argument("--skip-reference", action="store_true", help="time our step only")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--arch", help=argparse.SUPPRESS)
    args = parser.parse_args()
    shape = (args.labeled, args.unlabeled, args.iters, args.warmup)

    if args.worker:
        framework, setting, size = args.worker.split(":")
        result = (measure_jax(setting, int(size), *shape) if framework == "jax" else
                  measure_torch(json.loads(args.arch), int(size), *shape, args.threads, args.breakdown))
        print("RESULT " + json.dumps(result), flush=True)
        return

    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "JAX_PLATFORMS": "cpu",
           "XLA_FLAGS": (os.environ.get("XLA_FLAGS", "") + " --xla_cpu_multi_thread_eigen=true "
                         f"intra_op_parallelism_threads={args.threads}").strip()}
    pin = ["taskset", "-c", f"0-{args.threads - 1}"] if args.threads < (os.cpu_count() or 1) else []
    common = ["--labeled", str(args.labeled), "--unlabeled", str(args.unlabeled), "--iters", str(args.iters),
              "--warmup", str(args.warmup), "--threads", str(args.threads)]
    for setting in args.settings.split(","):
        cnn, transformer, default_size = SETTINGS[setting]
        size = args.size or default_size
        worker = [sys.executable, __file__, *common]
        ours = run_child(pin + worker + ["--worker", f"jax:{setting}:{size}"], env)
        results = {"jax": ours}
        header = (f"{setting} ({cnn} + {transformer}) {args.labeled}+{args.unlabeled} @{size} px, {args.threads} "
                  f"threads, median of {args.iters} after {args.warmup} warm-up")
        print(header + "\n" + side_line("jax", ours), flush=True)
        if not args.skip_reference:
            arch = architectures(setting, size)
            results["torch"] = theirs = run_child(
                pin + worker + ["--worker", f"torch:{setting}:{size}", "--arch", json.dumps(arch)]
                + (["--breakdown"] if args.breakdown else []), env)
            if theirs["params"] != ours["params"]:
                print(f"  WARNING: parameter counts differ: jax {ours['params']}, torch {theirs['params']}")
            print(side_line("torch", theirs), flush=True)
            if "breakdown_s" in theirs:
                print(f"  torch per network (forward + supervised loss + backward): {theirs['breakdown_s']}")
            print(f"{setting}: jax {ours['median_step_s']:.3f} s/step, torch {theirs['median_step_s']:.3f} s/step, "
                  f"ratio={ours['median_step_s'] / theirs['median_step_s']:.2f}", flush=True)
        print(json.dumps(results), file=sys.stderr)


if __name__ == "__main__":
    main()
