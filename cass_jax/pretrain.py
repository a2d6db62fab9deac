"""CASS pretraining: the train state, the jitted two-arm step, and the loop. Start reading here.

One augmented batch goes through a CNN and a ViT; the loss pulls their L2-normalised logits together
(`cass_loss`); both arms take an Adam step in the same jitted function. No labels are used.
"""

import dataclasses
import functools
import json
from pathlib import Path
from typing import Any

import flax
import jax
import jax.numpy as jnp
import ml_collections
import optax
from absl import logging

from cass_jax import data as data_lib
from cass_jax import parallel
from cass_jax.collapse import collapse_indicators, cross_arm_cosine
from cass_jax.models import create_model, init_variables
from cass_jax.port import load_pretrained_variables, save_variables
from cass_jax.reporting import create_writer, flat_hparams, image_grid
from cass_jax.schedules import make_schedule
from cass_jax.stabilisers import stabilised_cass_loss, update_centres
from cass_jax.training_loop import LoopHooks, LoopSettings, run_loop
from cass_jax.weight_averaging import recompute_batch_stats, running_mean_update

ARMS = ("cnn", "vit")


@flax.struct.dataclass
class TrainState:
    """Everything a resumed run needs, as one pytree (checkpointed whole by orbax)."""
    step: jnp.ndarray
    params: dict[str, Any]            # {"cnn": ..., "vit": ...}
    batch_stats: dict[str, Any]       # {"cnn": ...}: the ViT has none
    opt_state: dict[str, Any]         # {"cnn": ..., "vit": ...}
    swa_params: dict[str, Any]        # running mean of params, per arm
    swa_count: jnp.ndarray            # snapshots in the mean
    centres: dict[str, jnp.ndarray]   # running mean output per arm (used by the centring stabiliser only)
    initial_spread: dict[str, jnp.ndarray]  # each arm's collapse/*_std at the first step, the collapse yardstick
    rng: jnp.ndarray                  # base key; each step folds in its number


@dataclasses.dataclass(frozen=True)
class Arms:
    """The two modules and their optimizers; static, closed over by the jitted step."""
    cnn: flax.linen.Module
    vit: flax.linen.Module
    optimizers: dict[str, optax.GradientTransformation]
    loss: ml_collections.ConfigDict   # term weights: the paper's cosine, and opt-in stabilisers


def train_step(state: TrainState, batch: dict[str, jax.Array], arms: Arms) -> tuple[TrainState, dict]:
    """One CASS step: same images through both arms, cosine loss between logits, Adam update of both.

    With the default `config.loss` the loss is exactly `cass_loss`; stabiliser terms join it when weighted.
    """
    rng = jax.random.fold_in(state.rng, state.step)
    images = batch["image"]

    def loss_fn(params):
        cnn_logits, cnn_updates = arms.cnn.apply(
            {"params": params["cnn"], "batch_stats": state.batch_stats["cnn"]},
            images, train=True, mutable=["batch_stats"])
        vit_logits = arms.vit.apply({"params": params["vit"]}, images, train=True, rngs={"dropout": rng})
        loss, terms = stabilised_cass_loss(cnn_logits, vit_logits, state.centres, arms.loss)
        return loss, (cnn_updates["batch_stats"], cnn_logits, vit_logits, terms)

    (loss, (cnn_batch_stats, cnn_logits, vit_logits, terms)), grads = jax.value_and_grad(
        loss_fn, has_aux=True)(state.params)

    params, opt_state = {}, {}
    for arm in ARMS:
        updates, opt_state[arm] = arms.optimizers[arm].update(grads[arm], state.opt_state[arm], state.params[arm])
        params[arm] = optax.apply_updates(state.params[arm], updates)

    metrics = {"loss": loss, "cosine": cross_arm_cosine(cnn_logits, vit_logits),
               **{f"loss/{name}": value for name, value in terms.items()}}
    for arm, logits in (("cnn", cnn_logits), ("vit", vit_logits)):
        metrics[f"grad_norm/{arm}"] = optax.tree.norm(grads[arm])
        metrics[f"param_norm/{arm}"] = optax.tree.norm(params[arm])
        for name, value in collapse_indicators(logits).items():
            metrics[f"collapse/{arm}_{name}"] = value
    new_state = state.replace(step=state.step + 1, params=params, opt_state=opt_state,
                              batch_stats={"cnn": cnn_batch_stats},
                              centres=update_centres(state.centres, cnn_logits, vit_logits,
                                                     arms.loss.centring_momentum),
                              initial_spread={arm: jnp.where(state.step == 0, metrics[f"collapse/{arm}_std"],
                                                             state.initial_spread[arm]) for arm in ARMS})
    return new_state, metrics


def update_weight_average(state: TrainState) -> TrainState:
    """Adds the current parameters to the running mean (called once per epoch in the averaging window)."""
    return state.replace(swa_params=running_mean_update(state.swa_params, state.params, state.swa_count),
                         swa_count=state.swa_count + 1)


def build_arms(config: ml_collections.ConfigDict, total_steps: int, steps_per_epoch: int) -> Arms:
    """The CNN and ViT modules named in the config, and one Adam per arm with its own lr schedule."""
    dtype = jnp.dtype(config.dtype)
    cnn = create_model(config.cnn.name, num_classes=config.cnn.num_classes, dtype=dtype,
                       kernel_grad=config.cnn.kernel_grad)
    vit = create_model(config.vit.name, num_classes=config.vit.num_classes, dtype=dtype,
                       img_size=config.data.image_size, kernel_grad=config.vit.kernel_grad,
                       last_block_class_token_only=config.vit.last_block_class_token_only)
    if cnn.num_classes != vit.num_classes:
        raise ValueError(f"config.cnn.num_classes={config.cnn.num_classes} and config.vit.num_classes="
                         f"{config.vit.num_classes} differ: CASS compares the two arms' outputs, so make them equal.")
    optimizers = {}
    for arm in ARMS:
        schedule = make_schedule(
            config.optim.schedule, config.optim[f"{arm}_lr"], total_steps, min_lr=config.optim.min_lr,
            warmup_steps=int(config.optim.warmup_epochs * steps_per_epoch),
            reference_t_max=config.optim.reference_t_max)
        optimizers[arm] = optax.inject_hyperparams(optax.adam)(learning_rate=schedule)
    return Arms(cnn=cnn, vit=vit, optimizers=optimizers, loss=config.loss)


def initial_state(config: ml_collections.ConfigDict, arms: Arms) -> TrainState:
    """Fresh state: each arm random or loaded from a ported/exported weights file (`cnn.init`, `vit.init`)."""
    rng = jax.random.PRNGKey(config.seed)
    rng, cnn_rng, vit_rng = jax.random.split(rng, 3)
    size = config.data.image_size
    variables = {}
    for arm, model, arm_rng in (("cnn", arms.cnn, cnn_rng), ("vit", arms.vit, vit_rng)):
        init = config[arm].init
        variables[arm] = (init_variables(model, arm_rng, size) if init == "random"
                          else load_pretrained_variables(init, model, size, arm_rng))
    params = {arm: variables[arm]["params"] for arm in ARMS}
    return TrainState(
        step=jnp.zeros((), jnp.int32),
        params=params,
        batch_stats={"cnn": variables["cnn"].get("batch_stats", {})},
        opt_state={arm: arms.optimizers[arm].init(params[arm]) for arm in ARMS},
        swa_params=jax.tree.map(jnp.copy, params),
        swa_count=jnp.zeros((), jnp.int32),
        centres={arm: jnp.zeros((arms.cnn.num_classes or arms.cnn.num_features,), jnp.float32) for arm in ARMS},
        initial_spread={arm: jnp.zeros((), jnp.float32) for arm in ARMS},
        rng=rng)


def check_inputs_exist(config: ml_collections.ConfigDict) -> None:
    """Fails before anything compiles when a weights file named in the config is missing."""
    for arm in ARMS:
        init = config[arm].init
        if init != "random" and not Path(init).is_file():
            raise FileNotFoundError(
                f"config.{arm}.init={init!r}: no such file. Port ImageNet weights first, e.g. "
                f"`python -m cass_jax.port --model {config[arm].name} --source PATH --out {init}` "
                f"(see the README), or set --config.{arm}.init=random.")


class CassHooks(LoopHooks):
    """CASS's additions to the shared loop: the input picture, weight averaging per epoch, per-arm learning
    rates and the collapse yardstick in TensorBoard, and the collapse monitor."""

    def __init__(self, config: ml_collections.ConfigDict, steps_per_epoch: int, average_fn):
        self.config, self.steps_per_epoch, self.average_fn = config, steps_per_epoch, average_fn
        self.swa_start_epoch = int(config.swa.start_fraction * config.num_epochs)
        self.collapse_monitor = CollapseMonitor(config.collapse_warning_fraction, config.stop_on_collapse)

    def first_batch(self, batch, writer) -> None:
        writer.write_images(0, {"augmented_inputs": image_grid(
            batch["image"], self.config.data.mean, self.config.data.std)[None]})

    def after_step(self, step: int, state: TrainState) -> TrainState:
        epoch_done = step % self.steps_per_epoch == 0
        if self.config.swa.enabled and epoch_done and step // self.steps_per_epoch > self.swa_start_epoch:
            state = self.average_fn(state)
        return state

    def scalars(self, step: int, state: TrainState) -> dict[str, float]:
        scalars = {f"lr/{arm}": float(state.opt_state[arm].hyperparams["learning_rate"]) for arm in ARMS}
        scalars["epoch"] = step / self.steps_per_epoch
        scalars.update({f"collapse/{arm}_initial_std": float(value)
                        for arm, value in jax.device_get(state.initial_spread).items()})
        return scalars

    def after_log(self, step: int, scalars) -> None:
        self.collapse_monitor.check(step, scalars, {arm: scalars[f"collapse/{arm}_initial_std"] for arm in ARMS})


def pretrain(config: ml_collections.ConfigDict, workdir: str | Path) -> dict | None:
    """Runs (or resumes) CASS pretraining in `workdir` and exports both arms.

    Returns the export description (`export/arms.json` with absolute paths), or None when the run halted
    early on `config.halt_after_steps` (rerun the same command to continue).
    """
    workdir = Path(workdir).absolute()
    check_inputs_exist(config)
    splits = data_lib.load_splits(config.data)
    train_source = splits.train_full  # pretraining uses every training image, labelled or not
    steps_per_epoch = data_lib.steps_per_epoch(len(train_source), config.batch_size)
    if steps_per_epoch == 0:
        raise ValueError(f"The training split has {len(train_source)} images, fewer than one batch "
                         f"(batch_size={config.batch_size}); lower --config.batch_size.")
    total_steps = steps_per_epoch * config.num_epochs

    mesh = parallel.data_mesh()
    replicated, batch_sharding = parallel.replicated(mesh), parallel.batch_sharding(mesh)
    arms = build_arms(config, total_steps, steps_per_epoch)
    state = jax.device_put(initial_state(config, arms), replicated)
    step_fn = jax.jit(functools.partial(train_step, arms=arms), in_shardings=(replicated, batch_sharding),
                      out_shardings=(replicated, replicated), donate_argnums=0)
    hooks = CassHooks(config, steps_per_epoch, jax.jit(update_weight_average, donate_argnums=0))

    local_batch_size = parallel.per_process_batch_size(config.batch_size)
    logging.info("process %d of %d reads %d images of each global batch of %d", jax.process_index(),
                 jax.process_count(), local_batch_size, config.batch_size)
    iterator = data_lib.train_iterator(
        train_source, config.data, batch_size=local_batch_size, seed=config.seed,
        augment=config.data.augment != "none", shard_index=jax.process_index(), shard_count=jax.process_count())
    writer = create_writer(workdir)
    if not (workdir / "checkpoints").is_dir():
        writer.write_hparams(flat_hparams(config))
    logging.info("CASS pretraining: %s + %s, %d images, %d steps/epoch, %d epochs, weight averaging from epoch %d.",
                 config.cnn.name, config.vit.name, len(train_source), steps_per_epoch, config.num_epochs,
                 hooks.swa_start_epoch + 1 if config.swa.enabled else -1)
    settings = LoopSettings.from_config(
        config, total_steps=total_steps, batch_size=config.batch_size,
        finite_metrics=("loss", *(f"grad_norm/{arm}" for arm in ARMS)),
        console_metrics=("loss", "cosine", "lr/cnn", "collapse/cnn_std", "collapse/vit_std"))
    state, finished = run_loop(state, iterator, step_fn, workdir=workdir, settings=settings, writer=writer,
                               hooks=hooks, to_device=lambda batch: parallel.to_global_batch(batch, batch_sharding))
    if not finished:
        return None
    exports = export_arms(config, workdir, arms, state, train_source, steps_per_epoch)
    writer.flush()
    return exports


class CollapseMonitor:
    """Warns (first time, then every 10th check) when an arm's output spread falls below `fraction` of its
    value at the first step; with `stop=True` it raises instead (the last checkpoint stays)."""

    def __init__(self, fraction: float, stop: bool = False, repeat_every: int = 10):
        self.fraction, self.stop, self.repeat_every = fraction, stop, repeat_every
        self.warnings = 0

    def check(self, step: int, scalars: dict, initial_spread: dict) -> bool:
        """True when collapse is detected at this check."""
        current = {arm: scalars[f"collapse/{arm}_std"] for arm in ARMS}
        reference = {arm: float(initial_spread[arm]) for arm in ARMS}
        collapsed = [arm for arm in ARMS if current[arm] < self.fraction * reference[arm]]
        if not collapsed:
            return False
        message = "; ".join(
            f"the {arm} arm's output std is {current[arm]:.3g}, below {100 * self.fraction:.0f}% of its first "
            f"value {reference[arm]:.3g}" for arm in collapsed)
        message = (f"Possible collapse at step {step}: {message}. Every image is getting nearly the same "
                   "output; see the README section on collapse.")
        if self.stop:
            raise FloatingPointError(message + " Stopped (config.stop_on_collapse).")
        if self.warnings % self.repeat_every == 0:
            logging.warning("%s", message)
        self.warnings += 1
        return True


def export_arms(config: ml_collections.ConfigDict, workdir: Path, arms: Arms, state: TrainState,
                train_source: Any, steps_per_epoch: int) -> dict:
    """Writes `export/{cnn,vit}.msgpack` (final weights) and `*_swa.msgpack` (averaged), plus arms.json.

    Each file is a `{"params", "batch_stats"}` variables dict: `create_model(name)` plus
    `cass_jax.port.load_variables(path)` restores an arm. The averaged CNN gets BatchNorm statistics measured
    for its own weights, over one pass of the training split without augmentation (the statistics
    downstream evaluation sees).
    """
    export_dir = workdir / "export"
    state = jax.device_get(state)
    description = {}
    for arm, model in (("cnn", arms.cnn), ("vit", arms.vit)):
        description[arm] = {"name": config[arm].name, "num_classes": config[arm].num_classes,
                            "image_size": config.data.image_size, "mean": list(config.data.mean),
                            "std": list(config.data.std), "raw": f"{arm}.msgpack"}
        variables = {"params": state.params[arm]}
        if arm == "cnn":
            variables["batch_stats"] = state.batch_stats["cnn"]
        if jax.process_index() == 0:
            save_variables(export_dir / f"{arm}.msgpack", variables)
        if config.swa.enabled and int(state.swa_count) > 0:
            averaged = {"params": state.swa_params[arm]}
            if arm == "cnn":
                averaged["batch_stats"] = measure_batch_stats(model, config, state.swa_params["cnn"],
                                                              state.batch_stats["cnn"], train_source,
                                                              steps_per_epoch)
            if jax.process_index() == 0:
                save_variables(export_dir / f"{arm}_swa.msgpack", averaged)
            description[arm]["swa"] = f"{arm}_swa.msgpack"
            description[arm]["swa_snapshots"] = int(state.swa_count)
    if jax.process_index() == 0:
        (export_dir / "arms.json").write_text(json.dumps(description, indent=2))
    logging.info("Exported both arms to %s", export_dir)
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
