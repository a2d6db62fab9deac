"""Our DINO and Barlow Twins training steps next to PyTorch + timm references, and CASS's time per epoch against DINO's.

python bench/method_step.py [--settings dino:vit_tiny_patch16_224,dino:resnet18,barlow_twins:resnet18]
    [--kernel-grad auto|onednn|matmul|xla] [--batch 16] [--global-size 224] [--local-size 96] [--local-crops 8] [--out-dim 65536]
    [--crop-size 224] [--projector 8192-8192-8192] [--epoch-ratio small|big|none]
    [--iters 5] [--warmup 1] [--threads 2] [--device cpu|gpu] [--xla-flags "..."] [--skip-reference]
    [--ours-host-memory inherit|main]

A setting is METHOD:BACKBONE (timm / our registry name). Defaults are the official recipes at a CPU-sized batch:
DINO with 2 global crops at 224 px + 8 local crops at 96 px and out_dim 65536 (main_dino.py), Barlow Twins with two
224 px views and projector 8192-8192-8192 (barlowtwins main.py). Ours: the method's jitted `train_step`, built by
`cass_jax.pretrain.build_method` from configs/common.py's `base_config()`, in the data-parallel layout of
`pretrain()` (state replicated and donated, batch split over the devices). Reference: bench/torch_methods.py, the
same step in eager PyTorch over timm backbones (its docstring says where it follows and departs from the official
code). Both sides: random weights and data, fp32, train mode, the same backbone, head, crops, batch and optimiser;
DINO's last layer trains from the first step (`freeze_last_layer=0`: the state of every epoch after the first). Each
side runs in a fresh process, one after the other, with the same thread count (OMP_NUM_THREADS,
torch.set_num_threads, XLA's intra-op threads), pinned with taskset to that many cores when fewer than the machine
has, and in this process's environment, so host memory settings set before it (GLIBC_TUNABLES, which `python main.py`
sets itself: cass_jax/host_allocator.py; LD_PRELOAD) apply to both sides alike (`--ours-host-memory main`: ours
as `python main.py` runs it, the reference as is); median of --iters steps after --warmup. Per side: s/step,
images/s (images, not crops), peak RSS, minor page faults and kernel CPU seconds per step, (ours) compile seconds and
XLA's FLOP count; then one line ending in `ratio=<our median / torch median>`.
Our peak RSS includes the ~0.55 GiB of TensorFlow that configs/common.py's imports load (through the data package),
as bench/cass_step.py's does.

--epoch-ratio (default small): CASS's time per epoch over DINO's, the paper's 0.27. With the same batch size both
take the same steps per epoch, so the ratio is that of their step times. CASS trains a CNN and a ViT together in
one step on one view per image (bench/cass_step.py's step; small = resnet18 + vit_tiny_patch16_224, big = resnet50 +
vit_base_patch16_224, on the global crop size). DINO trains one backbone per run, so getting both backbones
self-supervised takes a DINO run for each: "DINO for the same two backbones" is DINO(ViT) + DINO(CNN), each on the
same images with DINO's multi-crop. Printed: CASS / (DINO ViT + DINO CNN), the like-for-like figure, and CASS / DINO
ViT alone (a paper comparing against one DINO run of the ViT would report that one), for our steps and for the
PyTorch ones. DINO settings already run with the same flags are reused, not re-measured.
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

from bench.cass_step import ARMS as CASS_ARMS  # noqa: E402
from bench.cass_step import run_child  # noqa: E402
from cass_jax.host_allocator import glibc_version, hugepage_environment, transparent_hugepage_mode  # noqa: E402

METHODS = ("dino", "barlow_twins")
EPOCHS, STEPS_PER_EPOCH = 100, 100  # schedule length (both sides); the values read, not the steps run
PAPER_EPOCH_RATIO = 0.27


def arm_of(backbone: str) -> str:
    """The config arm a backbone name belongs in."""
    return "vit" if backbone.startswith("vit") else "cnn"


def method_config(method: str, backbone: str, args: argparse.Namespace):
    """configs/common.py's base_config() with this benchmark's backbone, batch, crops and head."""
    from configs.common import base_config

    config = base_config()
    config.method, config.batch_size, config.num_epochs, config.dtype = method, args.batch, EPOCHS, "float32"
    arm = arm_of(backbone)
    config[arm].name, config[arm].init = backbone, "random"
    config.cnn.kernel_grad = config.vit.kernel_grad = args.kernel_grad
    if method == "dino":
        config.dino.update(arm=arm, out_dim=args.out_dim, global_crop_size=args.global_size,
                           local_crop_size=args.local_size, local_crops_number=args.local_crops, freeze_last_layer=0)
    else:
        config.barlow_twins.update(arm=arm, crop_size=args.crop_size, projector=parse_widths(args.projector))
    return config


def parse_widths(text: str) -> tuple[int, ...]:
    return tuple(int(width) for width in text.split("-"))


def crop_sizes(views) -> dict[str, int]:
    """{batch key: crop side} of a method's views (DinoMultiCrop or BarlowTwinsViews)."""
    if hasattr(views, "num_global_crops"):
        keys = views.image_keys
        return {key: views.global_crop_size if index < views.num_global_crops else views.local_crop_size
                for index, key in enumerate(keys)}
    return {key: views.image_size for key in views.image_keys}


def timed_steps(run_step, args: argparse.Namespace) -> dict:
    """Median wall time of `run_step()` (which must return only once the step has finished) over --iters steps
    after --warmup, and per step over those: the process's kernel CPU seconds and minor page faults (memory the step
    maps afresh: a fault is one 4 KiB page the kernel hands out and zeroes)."""
    times = []
    for index in range(args.warmup + args.iters):
        if index == args.warmup:
            before = resource.getrusage(resource.RUSAGE_SELF)
        t0 = time.perf_counter()
        run_step()
        if index >= args.warmup:
            times.append(time.perf_counter() - t0)
    after = resource.getrusage(resource.RUSAGE_SELF)
    median = statistics.median(times)
    return dict(step_times_s=[round(t, 4) for t in times], median_step_s=round(median, 4),
                img_per_s=round(args.batch / median, 3), peak_rss_GiB=round(after.ru_maxrss / 2**20, 2),
                sys_s_per_step=round((after.ru_stime - before.ru_stime) / len(times), 3),
                minor_faults_per_step=round((after.ru_minflt - before.ru_minflt) / len(times)))


def measure_jax(method: str, backbone: str, args: argparse.Namespace) -> dict:
    """Median step time of our jitted `method.train_step` in pretrain()'s data-parallel layout."""
    import jax
    import numpy as np

    from cass_jax import parallel
    from cass_jax.pretrain import build_method

    model = build_method(method_config(method, backbone, args), EPOCHS * STEPS_PER_EPOCH, STEPS_PER_EPOCH)
    mesh = parallel.data_mesh()
    replicated, batch_sharding = parallel.replicated(mesh), parallel.batch_sharding(mesh)
    state = jax.device_put(model.initial_state(), replicated)
    step = jax.jit(model.train_step, in_shardings=(replicated, batch_sharding), out_shardings=(replicated, replicated),
                   donate_argnums=0)
    rng = np.random.default_rng(0)
    batch = {key: rng.normal(size=(args.batch, size, size, 3)).astype(np.float32)
             for key, size in crop_sizes(model.views).items()}
    batch = jax.device_put(batch, batch_sharding)
    params = sum(leaf.size for leaf in jax.tree_util.tree_leaves(state.params))

    t0 = time.perf_counter()
    compiled = step.lower(state, batch).compile()
    compile_s = time.perf_counter() - t0
    flops = (compiled.cost_analysis() or {}).get("flops", float("nan"))
    holder = {"state": state}

    def run_step():  # the step donates its state: feed each call the state the last one returned
        holder["state"], holder["metrics"] = compiled(holder["state"], batch)
        jax.block_until_ready(holder)

    timing = timed_steps(run_step, args)
    return dict(framework="jax", jax=jax.__version__, device=str(jax.devices()[0]), devices=jax.device_count(),
                compile_s=round(compile_s, 1), step_gflop=round(flops / 1e9, 1), params=int(params),
                loss=round(float(holder["metrics"]["loss"]), 4), **timing)


def measure_torch(method: str, backbone: str, args: argparse.Namespace) -> dict:
    """Median step time of the PyTorch reference (bench/torch_methods.py)."""
    import timm
    import torch

    from bench import torch_methods

    torch.set_num_threads(args.threads)
    device = "cuda" if args.device == "gpu" else "cpu"
    if method == "dino":
        reference = torch_methods.DinoReference(
            backbone, args.batch, global_crop_size=args.global_size, local_crop_size=args.local_size,
            local_crops_number=args.local_crops, out_dim=args.out_dim, freeze_last_layer=0, device=device)
    else:
        reference = torch_methods.BarlowTwinsReference(backbone, args.batch, crop_size=args.crop_size,
                                                       projector=parse_widths(args.projector), device=device)
    losses = []

    def run_step():
        losses.append(reference.step())  # ends in loss.item(): the step has finished
        if device == "cuda":
            torch.cuda.synchronize()

    timing = timed_steps(run_step, args)
    return dict(framework="torch", torch=torch.__version__, timm=timm.__version__, threads=torch.get_num_threads(),
                params=reference.parameter_count(), loss=round(losses[-1], 4), **timing)


def describe(method: str, backbone: str, args: argparse.Namespace) -> str:
    if method == "dino":
        return (f"dino ({backbone}) bs {args.batch}, 2x{args.global_size} + {args.local_crops}x{args.local_size} px "
                f"crops, out_dim {args.out_dim}")
    return f"barlow_twins ({backbone}) bs {args.batch}, 2 views @{args.crop_size} px, projector {args.projector}"


def side_line(name: str, result: dict) -> str:
    extra = f", compile {result['compile_s']:.1f} s, {result['step_gflop']} GFLOP" if "compile_s" in result else ""
    faults = (f", {result['minor_faults_per_step']:,} page faults and {result['sys_s_per_step']:.2f} s kernel CPU "
              f"per step" if "minor_faults_per_step" in result else "")
    return (f"  {name:5s} {result['median_step_s']:.3f} s/step (steps {result['step_times_s']}), "
            f"{result['img_per_s']:.2f} img/s, peak RSS {result['peak_rss_GiB']} GiB{faults}{extra}")


def pin(threads: int) -> list[str]:
    """taskset onto `threads` cores when fewer than the machine has, so an idle core cannot help either side."""
    return ["taskset", "-c", f"0-{threads - 1}"] if threads < (os.cpu_count() or 1) else []


def child_env(threads: int, device: str, xla_flags: str) -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    if device == "cpu":
        env["JAX_PLATFORMS"] = "cpu"
        env["XLA_FLAGS"] = (f"{os.environ.get('XLA_FLAGS', '')} --xla_cpu_multi_thread_eigen=true "
                            f"intra_op_parallelism_threads={threads} {xla_flags}").strip()
    elif xla_flags:
        env["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} {xla_flags}".strip()
    return env


def measure_cass(variant: str, args: argparse.Namespace, envs: dict[str, dict]) -> dict:
    """bench/cass_step.py's two sides (our CASS step, ../shared/reference/torch_cass_step.py) at the DINO global crop
    size, each in its environment from `envs`; cass_step takes one warm-up step, then --iters."""
    setting = f"{variant}:{args.batch}:{args.global_size}"
    results = {"jax": run_child(pin(args.threads) + [sys.executable, str(REPO / "bench" / "cass_step.py"),
                                                     "--worker", setting, "--iters", str(args.iters)],
                                 envs["jax"])}
    if not args.skip_reference:
        results["torch"] = run_child(pin(args.threads) + [
            sys.executable, args.cass_reference, variant, str(args.batch), str(args.global_size),
            "--iters", str(args.iters), "--threads", str(args.threads),
            "--device", "cuda" if args.device == "gpu" else "cpu"], envs["torch"])
    return results


def epoch_ratio_lines(variant: str, cass: dict, dino: dict[str, dict], args: argparse.Namespace) -> list[str]:
    """CASS's per-image step time over DINO's (both backbones, and the ViT alone), per side."""
    cnn, vit = CASS_ARMS[variant]
    lines = [f"CASS / DINO time per epoch ({variant}: CASS {cnn} + {vit}, one view @{args.global_size} px; DINO "
             f"2x{args.global_size} + {args.local_crops}x{args.local_size} px crops, out_dim {args.out_dim}; "
             f"bs {args.batch} both; paper {PAPER_EPOCH_RATIO}):"]
    for side in cass:
        cass_s = cass[side]["median_step_s"]
        dino_vit, dino_cnn = dino[vit][side]["median_step_s"], dino[cnn][side]["median_step_s"]
        lines.append(f"  {side:5s} CASS {cass_s:.3f} s/step; DINO {vit} {dino_vit:.3f} + DINO {cnn} {dino_cnn:.3f} "
                     f"= {dino_vit + dino_cnn:.3f} s/step; epoch_ratio={cass_s / (dino_vit + dino_cnn):.2f} "
                     f"(both backbones), epoch_ratio_vit_only={cass_s / dino_vit:.2f}")
    return lines


def parser() -> argparse.ArgumentParser:
    """The command line (also read by bench/profile_step.py for the default settings)."""
    command_line = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    command_line.add_argument("--settings", default="dino:vit_tiny_patch16_224,dino:resnet18,barlow_twins:resnet18",
                        help="comma-separated METHOD:BACKBONE, METHOD one of dino, barlow_twins; empty: none")
    command_line.add_argument("--batch", type=int, default=16)
    command_line.add_argument("--global-size", type=int, default=224, help="DINO global crops (and CASS's view)")
    command_line.add_argument("--local-size", type=int, default=96, help="DINO local crops")
    command_line.add_argument("--local-crops", type=int, default=8, help="DINO local crops per image")
    command_line.add_argument("--out-dim", type=int, default=65536, help="DINO head output width")
    command_line.add_argument("--crop-size", type=int, default=224, help="Barlow Twins views")
    command_line.add_argument("--projector", default="8192-8192-8192", help="Barlow Twins projector widths")
    command_line.add_argument("--epoch-ratio", default="small", choices=("small", "big", "none"),
                        help="CASS arms for the CASS/DINO per-epoch ratio (see above); none: skip it")
    command_line.add_argument("--cass-reference",
                              default=str(REPO.parent / "shared" / "reference" / "torch_cass_step.py"))
    command_line.add_argument("--iters", type=int, default=5)
    command_line.add_argument("--warmup", type=int, default=1)
    command_line.add_argument("--threads", type=int, default=2)
    command_line.add_argument("--device", default="cpu", choices=("cpu", "gpu"))
    command_line.add_argument("--xla-flags", default="", help="extra XLA_FLAGS for our steps")
    command_line.add_argument("--kernel-grad", default="auto", choices=("auto", "xla", "matmul", "onednn"),
                              help="our models' kernels (cass_jax/models/kernel_grad.py)")
    command_line.add_argument("--skip-reference", action="store_true", help="time our steps only")
    command_line.add_argument("--ours-host-memory", default="inherit", choices=("inherit", "main"),
                              help="inherit: both sides in this process's environment; main: ours under the glibc "
                                   "tunable `python main.py` restarts itself with (cass_jax/host_allocator.py)")
    command_line.add_argument("--worker", help=argparse.SUPPRESS)
    return command_line


def main() -> None:
    args = parser().parse_args()

    if args.worker:
        framework, method, backbone = args.worker.split(":")
        measure = measure_jax if framework == "jax" else measure_torch
        print("RESULT " + json.dumps(measure(method, backbone, args)), flush=True)
        return

    env = child_env(args.threads, args.device, args.xla_flags)
    forwarded = [f"--{name}={getattr(args, name.replace('-', '_'))}" for name in (
        "batch", "global-size", "local-size", "local-crops", "out-dim", "crop-size", "projector", "iters", "warmup",
        "threads", "device", "kernel-grad")]
    worker = pin(args.threads) + [sys.executable, __file__, *forwarded]
    sides = ("jax",) if args.skip_reference else ("jax", "torch")
    allocator = " ".join(f"{name}={os.environ[name]}" for name in sorted(os.environ)
                         if name == "LD_PRELOAD" or name.startswith(("MALLOC_", "TCMALLOC_", "GLIBC_TUNABLES")))
    envs = {"torch": env, "jax": env}
    if args.ours_host_memory == "main":
        envs["jax"] = hugepage_environment(env, glibc_version(), transparent_hugepage_mode()) or env
        allocator = (f"{allocator or 'glibc defaults'}; ours as `python main.py` sets itself: "
                     f"GLIBC_TUNABLES={envs['jax'].get('GLIBC_TUNABLES', '(unchanged)')}")
    print(f"{args.threads} threads, median of {args.iters} steps after {args.warmup} warm-up, device {args.device}, "
          f"allocator: {allocator or 'glibc defaults'}", flush=True)
    results: dict[tuple[str, str], dict] = {}

    def run_setting(method: str, backbone: str) -> dict:
        if (method, backbone) in results:
            return results[method, backbone]
        if method not in METHODS:
            raise SystemExit(f"unknown method {method!r} in --settings; use one of {', '.join(METHODS)}")
        print(describe(method, backbone, args), flush=True)
        result = {}
        for side in sides:
            result[side] = run_child(worker + ["--worker", f"{side}:{method}:{backbone}"], envs[side])
            print(side_line(side, result[side]), flush=True)
        if "torch" in result:
            ours, theirs = result["jax"], result["torch"]
            if ours["params"] != theirs["params"]:
                print(f"  WARNING: parameter counts differ: jax {ours['params']:,}, torch {theirs['params']:,}")
            print(f"{method}:{backbone}: jax {ours['median_step_s']:.3f} s/step, torch {theirs['median_step_s']:.3f} "
                  f"s/step, ratio={ours['median_step_s'] / theirs['median_step_s']:.2f}", flush=True)
        print(json.dumps({f"{method}:{backbone}": result}), file=sys.stderr)
        results[method, backbone] = result
        return result

    for setting in filter(None, args.settings.split(",")):
        run_setting(*setting.split(":"))

    if args.epoch_ratio != "none":
        cnn, vit = CASS_ARMS[args.epoch_ratio]
        dino = {backbone: run_setting("dino", backbone) for backbone in (vit, cnn)}
        cass = measure_cass(args.epoch_ratio, args, envs)
        print(json.dumps({f"cass:{args.epoch_ratio}": cass}), file=sys.stderr)
        for side, result in cass.items():
            print(side_line(f"CASS {side}", result), flush=True)
        print("\n".join(epoch_ratio_lines(args.epoch_ratio, cass, dino, args)), flush=True)


if __name__ == "__main__":
    main()
