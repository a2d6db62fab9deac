"""Where one training step spends its time on XLA:CPU: a jax.profiler trace, summed by HLO op shape.

python bench/profile_step.py [--setting small:16:224] [--kernel-grad auto] [--top 30] [--trace-dir DIR]
Runs `bench/cass_step.py`'s step (same arms, batch and size), or with `--setting seg:full` / `seg:small`
`bench/cross_teaching_step.py`'s cross-teaching step (8 + 8 images; `seg:full:cnn` the U-Net's step alone), or with
`--setting dino:resnet18` / `barlow_twins:resnet18` bench/method_step.py's step (its defaults), once to compile,
traces one more step, and prints the ops (XLA:CPU emits one trace event per thunk) grouped by what they compute: the
op kind (`fusion:ynn`: a fusion handed to a library, here YNNPACK), the fused ops inside, the output shape and, for
products and convolutions, their dimensions; for ops with products, the rate of those products (their FLOPs over the
op's time). Reading the trace needs tensorflow (requirements-dev.txt) for the XSpace protobuf. Run it on one core
(`taskset -c 0`, with XLA_FLAGS="--xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1") for the
steadiest numbers.
"""

import argparse
import collections
import functools
import re
import sys
import tempfile
from pathlib import Path

import jax
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from cass_jax.methods.cass import build_arms, initial_state, train_step
from cass_jax.pretrain import build_method
from configs.common import base_config

ARMS = {"big": ("resnet50", "vit_base_patch16_224"), "small": ("resnet18", "vit_tiny_patch16_224")}
INSTRUCTION = re.compile(r"^\s*(?:ROOT )?%?([\w.\-]+) = (\S+) ([\w\-]+)\((.*)$")


def product_flops(line: str, shapes: dict[str, list[int]]) -> int:
    """2 x output elements x the multiply-adds per output of one `dot` (its contracted size) or `convolution`
    (kernel window x input features per group, read from the kernel's shape and `dim_labels`, over the input's
    dilation, as a strided convolution's input gradient inserts zeros); operand shapes come from `shapes`."""
    _, shape, opcode, rest = INSTRUCTION.match(line).groups()
    lhs, rhs = re.match(r"\s*%?([\w.\-]+),\s*%?([\w.\-]+)", rest).groups()
    if opcode == "dot":
        contracting = re.search(r"lhs_contracting_dims=\{([\d,]*)\}", rest).group(1)
        per_output = np.prod([shapes[lhs][int(d)] for d in contracting.split(",") if d])
    else:
        kernel_labels = re.search(r"dim_labels=\w+_(\w+)->", rest).group(1)
        per_output = np.prod([size for size, label in zip(shapes[rhs], kernel_labels)
                              if label.isdigit() or label == "i"])
        dilation = re.search(r"lhs_dilate=([\dx]+)", rest)  # zeros between input pixels: not multiplied
        per_output /= np.prod([int(d) for d in dilation.group(1).split("x")]) if dilation else 1
    return 2 * int(np.prod(dimensions(shape))) * int(per_output)


def dimensions(shape: str) -> list[int]:
    """f32[6304,192]{1,0} -> [6304, 192]."""
    inside = re.match(r"\w+\[([\d,]*)\]", shape)
    return [int(d) for d in inside.group(1).split(",") if d] if inside else []


def onednn_flops(target: str, output: list[int], operands: list[list[int]], settings: str) -> int:
    """2 x multiply-adds of a cass_jax/onednn call: a matmul's output x contracted size; a convolution's (any of
    its three calls) output positions x kernel window x input channels x output channels."""
    first, second = operands
    if target == "cass_onednn_matmul":
        return 2 * int(np.prod(output)) * (first[-2] if "transpose_a = true" in settings else first[-1])
    if target == "cass_onednn_conv_forward":  # (input, kernel) -> output
        return 2 * int(np.prod(output)) * int(np.prod(second[:3]))
    if target == "cass_onednn_conv_input_grad":  # (output gradient, kernel) -> input
        return 2 * int(np.prod(first)) * int(np.prod(second[:3]))
    return 2 * int(np.prod(second)) * int(np.prod(output[:3]))  # (input, output gradient) -> kernel


def hlo_signatures(hlo_text: str) -> tuple[dict[str, str], dict[str, int]]:
    """Instruction name -> a description that is the same for every op computing the same thing, and instruction
    name -> the FLOPs of the products it computes (for ops with a `dot` or a `convolution`)."""
    computations: dict[str, list[str]] = {}
    current = None
    for line in hlo_text.splitlines():
        header = re.match(r"^(?:ENTRY )?%?([\w.\-]+) .*\{$", line)
        if header and not line.startswith(" "):
            current = computations.setdefault(header.group(1), [])
        elif current is not None and INSTRUCTION.match(line):
            current.append(line)
    shapes = {computation: {INSTRUCTION.match(line).group(1): dimensions(INSTRUCTION.match(line).group(2))
                            for line in lines} for computation, lines in computations.items()}  # name -> dims
    signatures, flops = {}, {}
    for computation, lines in computations.items():
        for line in lines:
            name, shape, opcode, rest = INSTRUCTION.match(line).groups()
            called = re.search(r"calls=%?([\w.\-]+)", rest)
            inner = computations.get(called.group(1), []) if called else [line]
            inner_shapes = shapes.get(called.group(1), {}) if called else shapes[computation]
            kinds = sorted({INSTRUCTION.match(i).group(3) for i in inner} - {
                "parameter", "constant", "bitcast", "broadcast", "reshape"})
            products = [re.sub(r"%[\w.\-]+", "", i.split(" = ", 1)[1].split(" ", 1)[1]).split(", metadata")[0]
                        for i in inner if " dot(" in i or " convolution(" in i]
            library = re.search(r'"kind":"__(\w+)_fusion"', rest)
            tag = f"{opcode}:{library.group(1)}" if library else opcode
            target = re.search(r'custom_call_target="(\w+)"', rest)
            if target:  # an FFI call (cass_jax/onednn): its operands and attributes say what it computes
                operands = [shapes[computation][operand] for operand in re.findall(r"%([\w.\-]+)", rest.split(")")[0])]
                settings = re.search(r"backend_config=\{(.*?)\}", rest)
                products = [" x ".join(str(dims) for dims in operands) + (f" {{{settings.group(1)}}}" if settings else "")]
                tag = f"custom-call:{target.group(1)}"
                if target.group(1).startswith("cass_onednn_"):
                    flops[name] = onednn_flops(target.group(1), dimensions(shape), operands,
                                               settings.group(1) if settings else "")
            signatures[name] = f"{tag}[{' '.join(kinds)}] -> {shape} {' '.join(products)}"[:200]
            multiplying = [i for i in inner if INSTRUCTION.match(i).group(3) in ("dot", "convolution")]
            if multiplying:
                flops[name] = sum(product_flops(i, inner_shapes) for i in multiplying)
    return signatures, flops


def cass_step(setting: str, kernel_grad: str):
    """The compiled CASS step of bench/cass_step.py and a function that runs it once."""
    variant, batch, size = setting.split(":")
    config = base_config()
    config.cnn.name, config.vit.name = ARMS[variant]
    config.cnn.init = config.vit.init = "random"
    config.cnn.kernel_grad = config.vit.kernel_grad = kernel_grad
    config.data.image_size, config.optim.schedule = int(size), "constant"
    arms = build_arms(config, total_steps=1000, steps_per_epoch=100)
    state = initial_state(config, arms)
    step = jax.jit(functools.partial(train_step, arms=arms))
    images = {"image": np.random.default_rng(0).normal(size=(int(batch), int(size), int(size), 3)).astype(np.float32)}
    compiled = step.lower(state, images).compile()
    return compiled, lambda: compiled(state, images)


def cross_teaching_step(setting: str):
    """The compiled cross-teaching step of bench/cross_teaching_step.py (8 + 8 images) and a function that runs it;
    `SETTING:cnn` is the CNN's supervised step alone (the same batch, no Transformer)."""
    import dataclasses

    from bench.cross_teaching_step import SETTINGS, config_for, make_batch
    from cass_jax import parallel
    from cass_jax.segmentation.cross_teaching import CrossTeaching

    setting, _, only = setting.partition(":")
    size = SETTINGS[setting][2]
    config = config_for(setting, size, 8, 8)
    if only == "cnn":
        config = dataclasses.replace(config, transformer="", cross_teaching=False)
    method = CrossTeaching(config)
    state = method.init(jax.random.key(0))
    batch = jax.device_put(make_batch(8, 8, size), parallel.batch_sharding(method.mesh))
    rng = jax.random.fold_in(state.rng, state.step)
    compiled = method.jitted_step.lower(state, batch, rng).compile()
    holder = {"state": state}

    def run():  # the step donates its state: feed each call the state the last one returned
        holder["state"], metrics = compiled(holder["state"], batch, rng)
        return metrics

    return compiled, run


def method_step(method: str, backbone: str, method_args: str = "", kernel_grad: str = "auto"):
    """The compiled DINO or Barlow Twins step of bench/method_step.py (its crops, heads and batch: its defaults,
    or its command-line options in `method_args`, e.g. "--batch 64 --global-size 96 --local-size 48")."""
    from bench.method_step import crop_sizes, method_config, parser

    model_args = parser().parse_args(method_args.split() + ["--kernel-grad", kernel_grad])
    model = build_method(method_config(method, backbone, model_args), 10_000, 100)
    state = model.initial_state()
    rng = np.random.default_rng(0)
    batch = {key: rng.normal(size=(model_args.batch, size, size, 3)).astype(np.float32)
             for key, size in crop_sizes(model.views).items()}
    compiled = jax.jit(model.train_step, donate_argnums=0).lower(state, batch).compile()
    holder = {"state": state}

    def run():
        holder["state"], metrics = compiled(holder["state"], batch)
        return metrics

    return compiled, run


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--setting", default="small:16:224",
                        help="big|small:BATCH:SIZE, seg:full|small, dino|barlow_twins:BACKBONE")
    parser.add_argument("--kernel-grad", default="auto")
    parser.add_argument("--top", type=int, default=30)
    parser.add_argument("--trace-dir", default="", help="keep the trace here (default: a temporary folder)")
    parser.add_argument("--method-args", default="", help="dino/barlow_twins: bench/method_step.py's options")
    args = parser.parse_args()
    from tensorflow.tsl.profiler.protobuf import xplane_pb2

    kind, _, rest = args.setting.partition(":")
    if kind == "seg":
        compiled, run_step = cross_teaching_step(rest)
    elif kind in ("dino", "barlow_twins"):
        compiled, run_step = method_step(kind, rest, args.method_args, args.kernel_grad)
    else:
        compiled, run_step = cass_step(args.setting, args.kernel_grad)
    jax.block_until_ready(run_step())
    trace_dir = args.trace_dir or tempfile.mkdtemp(prefix="cass_profile_")
    with jax.profiler.trace(trace_dir):
        jax.block_until_ready(run_step())

    signatures, flops = hlo_signatures(compiled.as_text())
    space = xplane_pb2.XSpace()
    space.ParseFromString(next(Path(trace_dir).rglob("*.xplane.pb")).read_bytes())
    total_ms, count, total_flops = collections.Counter(), collections.Counter(), collections.Counter()
    for plane in space.planes:
        names = {key: meta.name for key, meta in plane.event_metadata.items()}
        for line in plane.lines:
            for event in line.events:
                name = names.get(event.metadata_id, "")
                if name in signatures:
                    total_ms[signatures[name]] += event.duration_ps / 1e9
                    count[signatures[name]] += 1
                    total_flops[signatures[name]] += flops.get(name, 0)
    step_ms = sum(total_ms.values())
    print(f"{args.setting} kernel_grad={args.kernel_grad}: {step_ms:.0f} ms in {sum(count.values())} ops")
    for signature, ms in total_ms.most_common(args.top):
        rate = f"{total_flops[signature] / ms / 1e6:6.1f} GFLOP/s" if total_flops[signature] else " " * 14
        print(f"{ms:8.1f} ms {100 * ms / step_ms:5.1f}% x{count[signature]:<4d} {rate} {signature}")


if __name__ == "__main__":
    main()
