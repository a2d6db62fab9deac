"""Self-supervised pretraining, for every method: build the method, feed it its views, run the loop, export.

`config.method` picks the method ("cass", "dino" or "barlow_twins"; each a module of `cass_jax.methods`). This
driver owns what they share: data, multi-device sharding, `training_loop.run_loop` (checkpoint and exact resume,
TensorBoard, progress, NaN stop), the collapse monitor, weight averaging and the export to
`export/<arm>.msgpack` + `export/arms.json`, which `downstream.init`, the pipeline and `load_classifier` read, and
`export/pretraining.json` (wall time, images/s), which the pipeline's comparison of methods reports.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any, Callable

import flax
import jax
import ml_collections
import numpy as np
from absl import logging

from cass_jax import data as data_lib
from cass_jax import parallel
from cass_jax.methods import barlow_twins, cass, dino
from cass_jax.methods.base import Method, MethodState
from cass_jax.port import save_variables
from cass_jax.reporting import ProgressLine, create_writer, flat_hparams, image_grid
from cass_jax.training_loop import LoopHooks, LoopSettings, TrainingClock, run_loop
from cass_jax.weight_averaging import recompute_batch_stats, running_mean_update

METHODS: dict[str, Callable[[ml_collections.ConfigDict, int, int], Method]] = {
    "cass": cass.build,
    "dino": dino.build,
    "barlow_twins": barlow_twins.build,
}
TITLES = {"cass": "CASS", "dino": "DINO", "barlow_twins": "Barlow Twins"}


def method_name(config: ml_collections.ConfigDict) -> str:
    """`config.method` ("cass" when the config predates methods), checked."""
    name = config.get("method", "cass")
    if name not in METHODS:
        raise ValueError(f"Unknown config.method={name!r}; use one of {', '.join(METHODS)}.")
    return name


def build_method(config: ml_collections.ConfigDict, total_steps: int, steps_per_epoch: int) -> Method:
    """The method `config.method` names, built for a run of `total_steps`."""
    return METHODS[method_name(config)](config, total_steps, steps_per_epoch)


def update_weight_average(state: MethodState, method: Method) -> MethodState:
    """Adds the exported backbones' current parameters to the running mean (once per epoch in the window)."""
    current = {arm: variables["params"] for arm, variables in method.backbone_variables(state).items()}
    return state.replace(swa_params=running_mean_update(state.swa_params, current, state.swa_count),
                         swa_count=state.swa_count + 1)


def check_inputs_exist(config: ml_collections.ConfigDict, arms: tuple[str, ...]) -> None:
    """Fails before anything compiles when a weights file named in the config is missing."""
    for arm in arms:
        init = config[arm].init
        if init != "random" and not Path(init).is_file():
            raise FileNotFoundError(
                f"config.{arm}.init={init!r}: no such file. Port ImageNet weights first, e.g. "
                f"`python -m cass_jax.port --model {config[arm].name} --source PATH --out {init}` "
                f"(see the README), or set --config.{arm}.init=random.")


class PretrainHooks(LoopHooks):
    """The driver's additions to the shared loop: the input picture, weight averaging per epoch, the method's
    scalars (learning rates, schedules) and the collapse yardstick in TensorBoard, the collapse monitor, and the
    throughput of the steps after compilation (for `export/pretraining.json`)."""

    def __init__(self, config: ml_collections.ConfigDict, method: Method, steps_per_epoch: int, total_steps: int):
        self.config, self.method, self.steps_per_epoch = config, method, steps_per_epoch
        self.average_fn = jax.jit(lambda state: update_weight_average(state, method), donate_argnums=0)
        self.swa_start_epoch = int(config.swa.start_fraction * config.num_epochs)
        self.collapse_monitor = CollapseMonitor(config.collapse_warning_fraction, config.stop_on_collapse)
        self.throughput = ProgressLine(total_steps, config.batch_size)
        self.start_step: int | None = None  # the step this invocation resumed from (0: a fresh run)
        self.last_step = 0

    def first_batch(self, batch, writer) -> None:
        key = self.method.views.image_keys[0] if self.method.views is not None else "image"
        writer.write_images(0, {"augmented_inputs": image_grid(
            batch[key], self.config.data.mean, self.config.data.std)[None]})

    def after_step(self, step: int, state: MethodState) -> MethodState:
        if self.start_step is None:  # the first step of this invocation has compiled and been dispatched
            self.start_step = step - 1
            self.throughput.compiled(step)
        self.last_step = step
        epoch_done = step % self.steps_per_epoch == 0
        if self.config.swa.enabled and epoch_done and step // self.steps_per_epoch > self.swa_start_epoch:
            state = self.average_fn(state)
        return state

    def scalars(self, step: int, state: MethodState) -> dict[str, float]:
        scalars = self.method.scalars(state)
        scalars["epoch"] = step / self.steps_per_epoch
        scalars.update({f"collapse/{name}_initial_std": float(value)
                        for name, value in jax.device_get(state.initial_spread).items()})
        return scalars

    def after_log(self, step: int, scalars) -> None:
        names = [key.removeprefix("collapse/").removesuffix("_initial_std") for key in scalars
                 if key.startswith("collapse/") and key.endswith("_initial_std")]
        self.collapse_monitor.check(step, scalars, {name: scalars[f"collapse/{name}_initial_std"] for name in names})


def pretrain(config: ml_collections.ConfigDict, workdir: str | Path) -> dict | None:
    """Runs (or resumes) the pretraining `config.method` names in `workdir` and exports its backbones.

    Returns the export description (`export/arms.json` with absolute paths), or None when the run halted
    early on `config.halt_after_steps` (rerun the same command to continue).
    """
    started = time.perf_counter()
    workdir = Path(workdir).absolute()
    name = method_name(config)
    splits = data_lib.load_splits(config.data)
    train_source = splits.train_full  # pretraining uses every training image, labelled or not
    steps_per_epoch = data_lib.steps_per_epoch(len(train_source), config.batch_size)
    if steps_per_epoch == 0:
        raise ValueError(f"The training split has {len(train_source)} images, fewer than one batch "
                         f"(batch_size={config.batch_size}); lower --config.batch_size.")
    total_steps = steps_per_epoch * config.num_epochs
    method = build_method(config, total_steps, steps_per_epoch)
    check_inputs_exist(config, tuple(method.backbones))

    mesh = parallel.data_mesh()
    replicated, batch_sharding = parallel.replicated(mesh), parallel.batch_sharding(mesh)
    state = jax.device_put(method.initial_state(), replicated)
    step_fn = jax.jit(method.train_step, in_shardings=(replicated, batch_sharding),
                      out_shardings=(replicated, replicated), donate_argnums=0)
    hooks = PretrainHooks(config, method, steps_per_epoch, total_steps)

    local_batch_size = parallel.per_process_batch_size(config.batch_size)
    logging.info("process %d of %d reads %d images of each global batch of %d", jax.process_index(),
                 jax.process_count(), local_batch_size, config.batch_size)
    iterator = data_lib.train_iterator(
        train_source, config.data, batch_size=local_batch_size, seed=config.seed,
        augment=config.data.augment != "none", shard_index=jax.process_index(), shard_count=jax.process_count(),
        views=method.views)
    writer = create_writer(workdir)
    if not (workdir / "checkpoints").is_dir():
        writer.write_hparams(flat_hparams(config))
    logging.info("%s pretraining: %s, %d images, %d steps/epoch, %d epochs, weight averaging from epoch %d.",
                 TITLES[name], " + ".join(backbone.name for backbone in method.backbones.values()),
                 len(train_source), steps_per_epoch, config.num_epochs,
                 hooks.swa_start_epoch + 1 if config.swa.enabled else -1)
    settings = LoopSettings.from_config(config, total_steps=total_steps, batch_size=config.batch_size,
                                        finite_metrics=method.finite_metrics,
                                        console_metrics=method.console_metrics)
    clock = TrainingClock(started)
    state, finished = run_loop(state, iterator, step_fn, workdir=workdir, settings=settings, writer=writer,
                               hooks=hooks, to_device=lambda batch: parallel.to_global_batch(batch, batch_sharding),
                               clock=clock)
    rate = hooks.throughput.mean_images_per_second(hooks.last_step)
    if not finished:
        return None
    exports = export_backbones(config, workdir, method, state, train_source, steps_per_epoch)
    record = {"method": name, "backbones": {arm: backbone.name for arm, backbone in method.backbones.items()},
              "images": len(train_source), "epochs": config.num_epochs, "batch_size": config.batch_size,
              "steps": total_steps, "start_step": total_steps if hooks.start_step is None else hooks.start_step,
              # The whole run over all its invocations (TrainingClock); None if an earlier one predates the clock.
              "wall_seconds": clock.seconds(),
              "invocation_wall_seconds": time.perf_counter() - started,
              "images_per_second": None if np.isnan(rate) else rate}
    if jax.process_index() == 0:
        (workdir / "export" / "pretraining.json").write_text(json.dumps(record, indent=2))
    writer.flush()
    return exports


class CollapseMonitor:
    """Warns (first time, then every 10th check) when a reported embedding's spread falls below `fraction` of its
    value at the first step; with `stop=True` it raises instead (the last checkpoint stays)."""

    def __init__(self, fraction: float, stop: bool = False, repeat_every: int = 10):
        self.fraction, self.stop, self.repeat_every = fraction, stop, repeat_every
        self.warnings = 0

    def check(self, step: int, scalars: dict, initial_spread: dict) -> bool:
        """True when collapse is detected at this check; `initial_spread` names the embeddings to check."""
        current = {name: scalars[f"collapse/{name}_std"] for name in initial_spread}
        reference = {name: float(value) for name, value in initial_spread.items()}
        collapsed = [name for name in initial_spread if current[name] < self.fraction * reference[name]]
        if not collapsed:
            return False
        message = "; ".join(
            f"the {name} arm's output std is {current[name]:.3g}, below {100 * self.fraction:.0f}% of its first "
            f"value {reference[name]:.3g}" for name in collapsed)
        message = (f"Possible collapse at step {step}: {message}. Every image is getting nearly the same "
                   "output; see the README section on collapse.")
        if self.stop:
            raise FloatingPointError(message + " Stopped (config.stop_on_collapse).")
        if self.warnings % self.repeat_every == 0:
            logging.warning("%s", message)
        self.warnings += 1
        return True


def export_backbones(config: ml_collections.ConfigDict, workdir: Path, method: Method, state: MethodState,
                     train_source: Any, steps_per_epoch: int) -> dict:
    """Writes `export/<arm>.msgpack` (final weights) and `<arm>_swa.msgpack` (averaged) per backbone, plus arms.json.

    Each file is a `{"params"[, "batch_stats"]}` variables dict: `create_model(name, num_classes=...)` plus
    `cass_jax.port.load_variables(path)` restores a backbone. An averaged backbone with BatchNorm gets
    statistics measured for its own weights, over one pass of the training split without augmentation (the
    statistics downstream evaluation sees).
    """
    export_dir = workdir / "export"
    state = jax.device_get(state)
    current = method.backbone_variables(state)
    description = {}
    for arm, backbone in method.backbones.items():
        description[arm] = {"method": method.name, "name": backbone.name, "num_classes": backbone.num_classes,
                            "image_size": backbone.image_size, "mean": list(config.data.mean),
                            "std": list(config.data.std), "raw": f"{arm}.msgpack"}
        variables = current[arm]
        if jax.process_index() == 0:
            save_variables(export_dir / f"{arm}.msgpack", variables)
        if config.swa.enabled and int(state.swa_count) > 0:
            averaged = {"params": state.swa_params[arm]}
            if variables.get("batch_stats"):
                averaged["batch_stats"] = measure_batch_stats(backbone.model, config, state.swa_params[arm],
                                                              variables["batch_stats"], train_source,
                                                              steps_per_epoch)
            if jax.process_index() == 0:
                save_variables(export_dir / f"{arm}_swa.msgpack", averaged)
            description[arm]["swa"] = f"{arm}_swa.msgpack"
            description[arm]["swa_snapshots"] = int(state.swa_count)
    if jax.process_index() == 0:
        (export_dir / "arms.json").write_text(json.dumps(description, indent=2))
    logging.info("Exported %s to %s", ", ".join(description), export_dir)
    return resolve_exports(description, export_dir)


def resolve_exports(description: dict, export_dir: Path) -> dict:
    """arms.json with its file names made absolute paths."""
    resolved = json.loads(json.dumps(description))
    for arm in resolved.values():
        for key in ("raw", "swa"):
            if key in arm:
                arm[key] = str(export_dir / arm[key])
    return resolved


def read_exports(workdir: str | Path) -> dict | None:
    """The exports of a finished pretraining in `workdir`, or None when there is none."""
    path = Path(workdir).absolute() / "export" / "arms.json"
    return resolve_exports(json.loads(path.read_text()), path.parent) if path.is_file() else None


def exported_method(exports: dict) -> str:
    """The method behind `read_exports`' answer ("cass" for exports written before arms.json recorded it)."""
    return next(iter(exports.values())).get("method", "cass")


def read_pretraining_record(workdir: str | Path) -> dict | None:
    """`export/pretraining.json` of a finished pretraining in `workdir` (method, size, wall time, images/s), or
    None for a run exported before it was written."""
    path = Path(workdir).absolute() / "export" / "pretraining.json"
    return json.loads(path.read_text()) if path.is_file() else None


def measure_batch_stats(model: flax.linen.Module, config: ml_collections.ConfigDict, params: Any, batch_stats: Any,
                        train_source: Any, steps_per_epoch: int) -> Any:
    """BatchNorm statistics of `params` measured over one un-augmented epoch (recompute_batch_stats)."""
    def apply_train(p, stats, images):
        _, updates = model.apply({"params": p, "batch_stats": stats}, images, train=True, mutable=["batch_stats"])
        return updates["batch_stats"]

    iterator = data_lib.train_iterator(
        train_source, config.data, batch_size=parallel.per_process_batch_size(config.batch_size),
        seed=config.seed, augment=False, shard_index=jax.process_index(), shard_count=jax.process_count())
    mesh = parallel.data_mesh()
    batches = (parallel.to_global_batch(next(iterator), parallel.batch_sharding(mesh))["image"]
               for _ in range(steps_per_epoch))
    return jax.device_get(recompute_batch_stats(apply_train, params, batch_stats, batches))
