"""Downstream evaluation of one arm: fine-tuning or a linear probe, then the test split; keeps the classifiers.

`mode=finetune` trains every weight (BatchNorm in train mode) with Adam and a cosine-decayed learning rate,
stops after `patience` epochs without a lower mean validation loss and tests the best epoch. `mode=linear_probe`
keeps the encoder frozen (eval mode: parameters and BatchNorm statistics bit-identical) and, by default, fits a
logistic regression on its standardised features (`cass_jax.probe`); `downstream.probe=gradient` trains the
`head` Dense like fine-tuning instead, on every augmented batch as the official code does.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import shutil
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any, Generic, TypeVar

import flax
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from absl import logging
from flax import linen as nn

from cass_jax import data as data_lib
from cass_jax import finished_runs
from cass_jax import metrics as metrics_lib
from cass_jax import probe as probe_lib
from cass_jax.classifier import save_classifier
from cass_jax.losses import class_weights, focal_loss
from cass_jax.models import create_model
from cass_jax.port import merge_variables, read_and_port
from cass_jax.port.pretrained import check_architecture
from cass_jax.reporting import create_writer

PROTOCOLS = ("finetune", "linear_probe")
SAVE_MODELS = ("best", "all", "none")
PROBES = ("logistic_regression", "gradient")
ARMS = ("cnn", "vit")
LOSSES = ("focal", "sigmoid_focal", "cross_entropy")
PRETRAINED_INITS = ("cass", "cass_raw")  # a pretraining export (of any method, despite the names)
NAMED_INITS = (*PRETRAINED_INITS, "random", "arm_init")


def default_downstream_config() -> ml_collections.ConfigDict:
    """The `config.downstream` block: the papers' protocol (Adam 3e-4, <= 50 epochs, patience 5, focal loss)."""
    c = ml_collections.ConfigDict()
    # Arms and protocols the pipeline evaluates; `arm` is the one a single finetune/linear_probe run uses.
    c.arms = ARMS
    c.protocols = ("linear_probe", "finetune")
    c.arm = "cnn"
    # Fractions of the training labels (seeded random subsets) and the seeds each setting is repeated with;
    # the seed sets the label subset, the head initialisation and the data order.
    c.label_fractions = (1.0, 0.1, 0.01)
    c.seeds = (0, 1, 2, 3, 4)
    # Starting weights of the arm: "cass" (this workdir's pretraining export, of whichever config.method, weight-
    # averaged if use_swa), "cass_raw" (its final, non-averaged weights), "random", "arm_init" (the file in
    # config.<arm>.init, e.g. ported ImageNet weights), or a weights file path. Several, comma-separated
    # ("cass,random"), give one table row each. An export's rows are labelled with its method ("dino",
    # "dino_raw"). With config.methods, "cass"/"cass_raw" stand for every compared method's export.
    c.init = "cass"
    c.use_swa = True
    # Where to find the pretraining export for "cass"/"cass_raw"; empty means the workdir itself.
    c.pretrain_workdir = ""
    # Pipeline with config.methods: also evaluate the arms without self-supervision (config.<arm>.init). False
    # leaves them to another invocation, when a long comparison is run one method at a time.
    c.evaluate_baseline = True
    # Adam with a cosine decay from lr to 0 over max_epochs; early stopping on the mean validation loss.
    c.lr = 3e-4
    c.max_epochs = 50
    c.patience = 5
    c.batch_size = 16
    c.eval_batch_size = 64
    # "focal" (softmax for multi-class, sigmoid for multi-label), "sigmoid_focal" (sigmoid on one-hot
    # targets, as the official code does for multi-class too) or "cross_entropy".
    c.loss = "focal"
    c.focal_alpha = 1.0
    c.focal_gamma = 2.0
    # Linear probe: "logistic_regression" (frozen features standardised with the labelled set's statistics, an L2
    # logistic regression whose C is chosen on validation, folded into the head; scikit-learn) or "gradient" (the
    # official code's: the head trained with Adam on augmented batches under the loss above, early stopping).
    c.probe = "logistic_regression"
    c.probe_c_values = probe_lib.DEFAULT_C_VALUES
    # Per-class loss weights from training label counts: "paper" (min-max into [0.2, 1], as the official
    # code), "inverse" (inverse frequency) or "none".
    c.class_weights = "paper"
    # Training augmentation (config.data.augment's recipe) for both protocols, as the official code.
    c.augment = True
    # Also report the mean of the two fine-tuned arms' probabilities (pipeline only).
    c.ensemble = True
    # Which trained classifiers to keep under <workdir>/models/ (listed in models.json): "best" (per arm, init,
    # protocol and label fraction, the seed with the lowest validation loss), "all" or "none".
    c.save_models = "best"
    # Pipeline: saliency maps (comma-separated methods, see cass_jax.saliency) of the first test images through
    # each arm's saved fine-tuned classifier at the largest label fraction, side by side, in <workdir>/saliency/.
    c.saliency = "vanilla"
    c.saliency_images = 4
    return c


@dataclasses.dataclass(frozen=True)
class EarlyStopping:
    """Tracks the best validation loss; stops after `patience` consecutive epochs without a lower one.

    (flax.training.early_stopping stops one epoch later than this for the same patience.) A NaN loss
    never counts as an improvement.
    """

    patience: int
    best_loss: float = math.inf
    best_epoch: int = -1
    epochs_without_improvement: int = 0

    def update(self, epoch: int, loss: float) -> EarlyStopping:
        if loss < self.best_loss:
            return dataclasses.replace(self, best_loss=float(loss), best_epoch=epoch, epochs_without_improvement=0)
        return dataclasses.replace(self, epochs_without_improvement=self.epochs_without_improvement + 1)

    @property
    def improved(self) -> bool:
        return self.epochs_without_improvement == 0 and self.best_epoch >= 0

    @property
    def should_stop(self) -> bool:
        return self.epochs_without_improvement >= self.patience


S = TypeVar("S")


@dataclasses.dataclass
class FitResult(Generic[S]):
    best_state: S
    best_epoch: int
    best_val_loss: float
    epochs_run: int
    history: list[dict[str, float]]


def fit_with_early_stopping(
    state: S,
    train_epoch: Callable[[S, int], tuple[S, dict[str, float]]],
    validate: Callable[[S, int], tuple[float, dict[str, float]]],
    max_epochs: int,
    patience: int,
    on_epoch: Callable[[dict[str, float]], None] | None = None,
) -> FitResult[S]:
    """Runs up to `max_epochs` epochs (numbered from 1), keeping a host copy of the best-validating state.

    `train_epoch(state, epoch) -> (state, scalars)`; `validate(state, epoch) -> (mean val loss, scalars)`;
    `on_epoch(row)` sees each epoch's merged scalars (for logging).
    """
    stopper = EarlyStopping(patience)
    best_state = jax.device_get(state)
    history = []
    epoch = 0
    for epoch in range(1, max_epochs + 1):
        state, train_scalars = train_epoch(state, epoch)
        val_loss, val_scalars = validate(state, epoch)
        stopper = stopper.update(epoch, val_loss)
        if stopper.improved:
            best_state = jax.device_get(state)
        history.append({"epoch": epoch, **train_scalars, "val_loss": float(val_loss), **val_scalars})
        if on_epoch is not None:
            on_epoch(history[-1])
        if stopper.should_stop:
            break
    if stopper.best_epoch < 0:
        raise FloatingPointError(
            f"The validation loss was never finite in {epoch} epochs (last: {history[-1]['val_loss'] if history else None}); "
            "lower downstream.lr or check the data.")
    return FitResult(best_state, stopper.best_epoch, stopper.best_loss, epoch, history)


@dataclasses.dataclass(frozen=True)
class LossSpec:
    """What the jitted steps need to know about the loss (hashable: a static argument)."""

    kind: str
    multi_label: bool
    alpha: float
    gamma: float


def per_example_loss(logits: jax.Array, labels: jax.Array, weights: jax.Array, spec: LossSpec) -> jax.Array:
    """The configured loss per example, shape (batch,)."""
    if spec.kind == "cross_entropy":
        return focal_loss(logits, labels, multi_label=spec.multi_label, alpha=1.0, gamma=0.0, weights=weights)
    if spec.kind == "sigmoid_focal" and not spec.multi_label:
        labels = jax.nn.one_hot(labels, logits.shape[-1])
        return focal_loss(logits, labels, multi_label=True, alpha=spec.alpha, gamma=spec.gamma, weights=weights)
    return focal_loss(logits, labels, multi_label=spec.multi_label, alpha=spec.alpha, gamma=spec.gamma,
                      weights=weights)


def probabilities(logits: jax.Array, multi_label: bool) -> jax.Array:
    """Sigmoid per label (multi-label) or softmax over classes."""
    logits = logits.astype(jnp.float32)
    return jax.nn.sigmoid(logits) if multi_label else jax.nn.softmax(logits, axis=-1)


@flax.struct.dataclass
class DownstreamState:
    """Parameters, BatchNorm statistics and Adam state of one arm (the probe's Adam state covers the head only)."""

    step: jax.Array
    params: dict[str, Any]
    batch_stats: dict[str, Any]
    opt_state: Any


def trainable_params(params: Mapping[str, Any], protocol: str) -> Any:
    """The parameters the protocol trains: all of them, or only the `head` Dense for a linear probe."""
    return params["head"] if protocol == "linear_probe" else params


def initial_state(variables: Mapping[str, Any], protocol: str) -> DownstreamState:
    params = variables["params"]
    return DownstreamState(
        step=jnp.zeros((), jnp.int32),
        params=params,
        batch_stats=variables.get("batch_stats", {}),
        opt_state=optax.scale_by_adam().init(trainable_params(params, protocol)),
    )


@functools.partial(jax.jit, static_argnames=("model", "protocol", "spec"), donate_argnums=0)
def train_step(state: DownstreamState, batch: Mapping[str, jax.Array], lr: jax.Array, weights: jax.Array, *,
               model: nn.Module, protocol: str, spec: LossSpec) -> tuple[DownstreamState, dict[str, jax.Array]]:
    """One Adam step on the mean batch loss. Linear probe: encoder in eval mode, only `head` gets gradients.

    Adam is optax's `scale_by_adam` times the step's `lr`, passed in, so one compiled step serves every
    run of a model whatever its schedule length (seeds and label fractions differ only in data).
    """
    has_batch_stats = bool(state.batch_stats)

    def loss_fn(trainable):
        if protocol == "linear_probe":
            variables = {"params": {**state.params, "head": trainable}}
            if has_batch_stats:
                variables["batch_stats"] = state.batch_stats
            logits = model.apply(variables, batch["image"], train=False)
            new_batch_stats = state.batch_stats
        elif has_batch_stats:
            logits, updates = model.apply({"params": trainable, "batch_stats": state.batch_stats}, batch["image"],
                                          train=True, mutable=["batch_stats"])
            new_batch_stats = updates["batch_stats"]
        else:
            logits = model.apply({"params": trainable}, batch["image"], train=True)
            new_batch_stats = state.batch_stats
        loss = jnp.mean(per_example_loss(logits, batch["label"], weights, spec))
        return loss, new_batch_stats

    trainable = trainable_params(state.params, protocol)
    (loss, new_batch_stats), grads = jax.value_and_grad(loss_fn, has_aux=True)(trainable)
    updates, opt_state = optax.scale_by_adam().update(grads, state.opt_state, trainable)
    trainable = optax.apply_updates(trainable, jax.tree.map(lambda u: -lr * u, updates))
    params = {**state.params, "head": trainable} if protocol == "linear_probe" else trainable
    new_state = state.replace(step=state.step + 1, params=params, batch_stats=new_batch_stats, opt_state=opt_state)
    return new_state, {"loss": loss, "grad_norm": optax.tree.norm(grads)}


@functools.partial(jax.jit, static_argnames=("model", "spec"))
def eval_step(variables: Mapping[str, Any], batch: Mapping[str, jax.Array], weights: jax.Array, *,
              model: nn.Module, spec: LossSpec) -> tuple[jax.Array, jax.Array]:
    """Per-example loss and probabilities in eval mode (BatchNorm running statistics)."""
    logits = model.apply(variables, batch["image"], train=False)
    return per_example_loss(logits, batch["label"], weights, spec), probabilities(logits, spec.multi_label)


@dataclasses.dataclass
class Evaluation:
    """One pass over a split: mean loss over its examples, and their labels and probabilities in order."""

    loss: float
    labels: np.ndarray
    probabilities: np.ndarray


def evaluate(model: nn.Module, variables: Mapping[str, Any], source: Any, data_config: ml_collections.ConfigDict,
             batch_size: int, weights: jax.Array, spec: LossSpec) -> Evaluation:
    """Evaluates on every example of `source` once (padding rows masked out of the loss and the outputs)."""
    losses, labels, probs = [], [], []
    for batch in data_lib.eval_iterator(source, data_config, batch_size=min(batch_size, len(source))):
        mask = np.asarray(batch["mask"]).astype(bool)
        inputs = {"image": batch["image"], "label": batch["label"]}
        loss, prob = eval_step(variables, inputs, weights, model=model, spec=spec)
        losses.append(np.asarray(loss)[mask])
        labels.append(np.asarray(batch["label"])[mask])
        probs.append(np.asarray(prob)[mask])
    if not losses:
        raise ValueError("The evaluation split is empty; it needs at least one example.")
    return Evaluation(float(np.concatenate(losses).mean()), np.concatenate(labels), np.concatenate(probs))


def confusion_image(confusion: np.ndarray, cell_pixels: int = 24) -> np.ndarray:
    """Row-normalised confusion matrix as a (1, H, W, 3) float image: white = 0, dark blue = all of the row."""
    confusion = np.asarray(confusion, np.float64)
    rows = np.maximum(confusion.sum(axis=1, keepdims=True), 1.0)
    share = np.kron(confusion / rows, np.ones((cell_pixels, cell_pixels)))
    white, blue = np.array([1.0, 1.0, 1.0]), np.array([0.03, 0.19, 0.42])
    image = white + share[..., None] * (blue - white)
    image[::cell_pixels, :] = image[:, ::cell_pixels] = 0.6
    return image[None].astype(np.float32)


@dataclasses.dataclass(frozen=True)
class ArmInit:
    """Where one arm's starting weights come from: the model name and a weights file (None = random), and the
    self-supervised method that produced the file ("none" for random, ImageNet or other given weights)."""

    label: str
    model_name: str
    weights_path: str | None
    method: str = "none"


def parse_inits(init: str) -> list[str]:
    """`downstream.init` split on commas ("cass,random" -> ["cass", "random"])."""
    inits = [part.strip() for part in str(init).split(",") if part.strip()]
    if not inits:
        raise ValueError(f"downstream.init={init!r} is empty; use one of {NAMED_INITS} or a weights file path.")
    return inits


def resolve_init(config: ml_collections.ConfigDict, arm: str, init: str, workdir: str | Path) -> ArmInit:
    """Turns one `downstream.init` value into a model name and weights file for `arm`."""
    if init == "random":
        return ArmInit(init, config[arm].name, None)
    if init == "arm_init":
        path = config[arm].init
        return ArmInit(init, config[arm].name, None if path == "random" else _existing_file(path, f"config.{arm}.init"))
    if init in PRETRAINED_INITS:
        return pretrained_init(config, arm, init, Path(config.downstream.pretrain_workdir or workdir))
    return ArmInit(Path(init).stem, config[arm].name, _existing_file(init, "downstream.init"))


def pretrained_init(config: ml_collections.ConfigDict, arm: str, init: str, export_root: Path) -> ArmInit:
    """`arm`'s backbone from the pretraining export in `export_root/export` (init "cass": weight-averaged if
    downstream.use_swa; "cass_raw": final weights), labelled with the export's method ("dino", "dino_raw")."""
    from cass_jax.pretrain import exported_method, read_exports

    exports = read_exports(export_root)
    if exports is None:
        raise FileNotFoundError(
            f"downstream.init={init!r} needs a finished pretraining: {export_root / 'export' / 'arms.json'} "
            "does not exist. Run mode=pretrain (or mode=pipeline) with this workdir first, point "
            "downstream.pretrain_workdir at one, or set downstream.init=random.")
    method = exported_method(exports)
    if arm not in exports:
        raise ValueError(
            f"downstream.init={init!r} for the {arm!r} arm, but the pretraining export in {export_root} holds "
            f"{', '.join(exports)} (method {method}); set --config.downstream.arms to the exported arms.")
    entry = exports[arm]
    use_average = init == "cass" and config.downstream.use_swa
    if use_average and "swa" not in entry:
        logging.warning("No weight-averaged %s export in %s; using its final weights.", arm, export_root)
    path = entry["swa"] if use_average and "swa" in entry else entry["raw"]
    label = method if init == "cass" else f"{method}_raw"
    return ArmInit(label, entry["name"], _existing_file(path, f"export/arms.json ({arm})"), method)


def _existing_file(path: str, what: str) -> str:
    if not Path(path).is_file():
        raise FileNotFoundError(
            f"{what}={path!r}: no such weights file. Give an existing file, or one of {NAMED_INITS}.")
    return str(path)


def build_model(model_name: str, num_classes: int, config: ml_collections.ConfigDict) -> nn.Module:
    kwargs = ({"img_size": config.data.image_size, "kernel_grad": config.vit.kernel_grad,
               "last_block_class_token_only": config.vit.last_block_class_token_only}
              if model_name.startswith("vit") else {"kernel_grad": config.cnn.kernel_grad})
    return create_model(model_name, num_classes=num_classes, dtype=jnp.dtype(config.dtype), **kwargs)


@functools.lru_cache(maxsize=None)
def _jitted_init(model: nn.Module) -> Callable:
    """One compiled initialiser per model configuration, reused by every seed."""
    return jax.jit(functools.partial(model.init, train=False))


def fresh_variables(model: nn.Module, rng: jax.Array, image_size: int) -> dict:
    """Randomly initialised variables (as `cass_jax.models.init_variables`, compiled once per model)."""
    variables = _jitted_init(model)(rng, jnp.zeros((1, image_size, image_size, 3), jnp.float32))
    return flax.core.unfreeze(variables)


class InitialVariables:
    """Starting variables per run: the arm's weights (each file read once) with a new head seeded per run.

    Downstream always trains a new `head` for the task's classes, so the seed varies the head's
    initialisation (and, for random init, every weight). This is `cass_jax.port.load_pretrained_variables`
    with the file and the compiled initialiser reused across runs.
    """

    def __init__(self, image_size: int):
        self.image_size = image_size
        self._files: dict[str, dict] = {}

    def __call__(self, model: nn.Module, arm_init: ArmInit, rng: jax.Array) -> dict:
        fresh = fresh_variables(model, rng, self.image_size)
        path = arm_init.weights_path
        if path is None:
            return fresh
        if path not in self._files:
            self._files[path] = read_and_port(path)
        architecture, content = self._files[path]
        check_architecture(architecture, model, path)
        merged = merge_variables(fresh, content, source=path)
        return {**merged, "params": {**merged["params"], "head": fresh["params"]["head"]}}


def label_counts(labels: np.ndarray, num_classes: int, multi_label: bool) -> np.ndarray:
    """Examples per class (positives per label when multi-label)."""
    labels = np.asarray(labels)
    if multi_label:
        return (labels > 0.5).sum(axis=0).astype(np.int64)
    return np.bincount(labels.astype(np.int64), minlength=num_classes)


def check_downstream_config(config: ml_collections.ConfigDict) -> None:
    """Rejects misspelt or impossible downstream settings before anything is loaded or compiled."""
    d = config.downstream
    checks = [
        (all(arm in ARMS for arm in d.arms), "downstream.arms", d.arms, f"a subset of {ARMS}"),
        (d.arm in ARMS, "downstream.arm", d.arm, f"one of {ARMS}"),
        (all(p in PROTOCOLS for p in d.protocols), "downstream.protocols", d.protocols, f"a subset of {PROTOCOLS}"),
        (d.loss in LOSSES, "downstream.loss", d.loss, f"one of {LOSSES}"),
        (d.save_models in SAVE_MODELS, "downstream.save_models", d.save_models, f"one of {SAVE_MODELS}"),
        (d.probe in PROBES, "downstream.probe", d.probe, f"one of {PROBES}"),
        (len(d.probe_c_values) > 0 and all(c > 0 for c in d.probe_c_values), "downstream.probe_c_values",
         d.probe_c_values, "positive inverse L2 strengths"),
        (all(0 < f <= 1 for f in d.label_fractions), "downstream.label_fractions", d.label_fractions,
         "fractions in (0, 1]"),
        (len(d.seeds) > 0, "downstream.seeds", d.seeds, "at least one seed"),
        (d.max_epochs >= 1, "downstream.max_epochs", d.max_epochs, "at least 1"),
        (d.patience >= 1, "downstream.patience", d.patience, "at least 1"),
        (d.batch_size >= 1 and d.eval_batch_size >= 1, "downstream.batch_size/eval_batch_size",
         (d.batch_size, d.eval_batch_size), "positive"),
    ]
    for ok, key, value, expected in checks:
        if not ok:
            raise ValueError(f"{key}={value!r} is invalid; it must be {expected}.")
    parse_inits(d.init)
    from cass_jax.saliency_report import parse_methods

    parse_methods(d.saliency)


def load_downstream_data(config: ml_collections.ConfigDict) -> Any:
    """Loads train/val/test once; each run draws its own labelled subset of `train_full`."""
    return data_lib.load_splits(config.data)


@dataclasses.dataclass
class RunSpec:
    arm: str
    protocol: str
    init: ArmInit
    label_fraction: float
    seed: int

    @property
    def name(self) -> str:
        return (f"{self.arm}_{self.protocol}_{self.init.label}_f{self.label_fraction:g}_s{self.seed}")


def fit_logistic_probe(config: ml_collections.ConfigDict, splits: Any, run: RunSpec, model: nn.Module,
                       variables: dict, indices: np.ndarray, feature_cache: dict) -> tuple[dict, FitResult]:
    """`downstream.probe=logistic_regression`: the regression on frozen features, folded into `head`.

    Features depend only on the backbone, so they are extracted once per backbone and split (`feature_cache`) and
    shared by every label fraction and seed; a random backbone differs per seed.
    """
    d = config.downstream
    backbone = run.init.weights_path or f"random seed {run.seed}"

    def features(split: str) -> np.ndarray:
        key = (backbone, run.init.model_name, split)
        if key not in feature_cache:
            source = splits.train_full if split == "train_full" else getattr(splits, split)
            feature_cache[key] = probe_lib.extract_features(model, variables, source, config.data,
                                                            d.eval_batch_size)
        return feature_cache[key]

    labels = np.asarray(splits.train_full.labels)
    fit = probe_lib.fit_probe(features("train_full")[indices], labels[indices], features("val"),
                              np.asarray(splits.val.labels), splits.num_classes, bool(splits.multi_label),
                              tuple(d.probe_c_values), run.seed)
    best = {**variables, "params": {**variables["params"], "head": jax.tree.map(jnp.asarray, fit.head)}}
    logging.info("[%s] logistic-regression probe: C=%g of %s (validation: %s)", run.name, fit.c,
                 list(d.probe_c_values), fit.history[[h["C"] for h in fit.history].index(fit.c)])
    history = [{**row, "chosen": row["C"] == fit.c} for row in fit.history]
    return best, FitResult(best_state=None, best_epoch=0, best_val_loss=fit.val_loss, epochs_run=0, history=history)


def train_and_evaluate(config: ml_collections.ConfigDict, splits: Any, run: RunSpec, run_dir: Path,
                       initial_variables: InitialVariables | None = None,
                       classifier_dir: Path | None = None, feature_cache: dict | None = None) -> dict[str, Any]:
    """Trains one arm under one protocol, label fraction and seed; tests the best epoch.

    Returns a JSON-ready record with the test metrics, plus `test_probabilities` / `test_labels` arrays.
    With `classifier_dir`, the best epoch's classifier is saved there (`cass_jax.classifier.load_classifier`).
    """
    d = config.downstream
    multi_label = bool(splits.multi_label)
    all_labels = np.asarray(splits.train_full.labels)
    indices = data_lib.label_fraction_indices(all_labels, run.label_fraction, run.seed,
                                              config.data.label_fraction_mode)
    train_source = splits.train_full.subset(indices)
    counts = label_counts(all_labels[indices], splits.num_classes, multi_label)
    weights = jnp.asarray(class_weights(counts, d.class_weights))
    batch_size = min(d.batch_size, len(indices))
    steps_per_epoch = data_lib.steps_per_epoch(len(indices), batch_size)
    total_steps = d.max_epochs * steps_per_epoch
    learning_rates = np.asarray(optax.cosine_decay_schedule(d.lr, decay_steps=total_steps)(np.arange(total_steps)),
                                np.float32)
    spec = LossSpec(d.loss, multi_label, float(d.focal_alpha), float(d.focal_gamma))

    model = build_model(run.init.model_name, splits.num_classes, config)
    rng = jax.random.fold_in(jax.random.PRNGKey(run.seed), ARMS.index(run.arm))
    initial_variables = initial_variables or InitialVariables(config.data.image_size)
    variables = initial_variables(model, run.init, rng)
    state = initial_state(variables, run.protocol)
    iterator = data_lib.train_iterator(train_source, config.data, batch_size=batch_size, seed=run.seed,
                                       augment=bool(d.augment))
    writer = create_writer(run_dir)
    tag = f"[{run.name}]"
    logging.info("%s %d labelled images, %d steps/epoch, class weights %s", tag, len(indices), steps_per_epoch,
                 np.round(np.asarray(weights), 3).tolist())

    def variables_of(s: DownstreamState) -> dict:
        out = {"params": s.params}
        if s.batch_stats:
            out["batch_stats"] = s.batch_stats
        return out

    def train_epoch(s: DownstreamState, epoch: int):
        start, losses = time.perf_counter(), []
        for step in range((epoch - 1) * steps_per_epoch, epoch * steps_per_epoch):
            batch = next(iterator)
            s, step_metrics = train_step(s, {"image": batch["image"], "label": batch["label"]},
                                         learning_rates[step], weights, model=model, protocol=run.protocol,
                                         spec=spec)
            losses.append(step_metrics["loss"])
        train_loss = float(np.mean(jax.device_get(losses)))
        rate = steps_per_epoch * batch_size / (time.perf_counter() - start)
        return s, {"train_loss": train_loss, "images_per_second": rate, "lr": float(learning_rates[step])}

    def validate(s: DownstreamState, epoch: int):
        val = evaluate(model, variables_of(s), splits.val, config.data, d.eval_batch_size, weights, spec)
        val_metrics = metrics_lib.classification_metrics(val.labels, val.probabilities, multi_label)
        if not multi_label:
            writer.write_images(epoch, {"val_confusion_matrix": confusion_image(val_metrics["confusion_matrix"])})
        return val.loss, {f"val_{k}": val_metrics[k] for k in metrics_lib.summary_names(multi_label)}

    main_metric = "micro_f1" if multi_label else "macro_f1"

    def log_epoch(row: dict[str, float]) -> None:
        writer.write_scalars(int(row["epoch"]), {k: v for k, v in row.items() if k != "epoch"})
        logging.info("%s epoch %d/%d | train_loss %.4f | val_loss %.4f | val_%s %.4f | %.1f img/s", tag,
                     row["epoch"], d.max_epochs, row["train_loss"], row["val_loss"], main_metric,
                     row[f"val_{main_metric}"], row["images_per_second"])

    start = time.perf_counter()
    if run.protocol == "linear_probe" and d.probe == "logistic_regression":
        best, result = fit_logistic_probe(config, splits, run, model, variables, indices,
                                          {} if feature_cache is None else feature_cache)
    else:
        result = fit_with_early_stopping(state, train_epoch, validate, d.max_epochs, d.patience, log_epoch)
        best = variables_of(result.best_state)
    train_seconds = time.perf_counter() - start
    test = evaluate(model, best, splits.test, config.data, d.eval_batch_size, weights, spec)
    test_metrics = metrics_lib.classification_metrics(test.labels, test.probabilities, multi_label)
    if not multi_label:
        writer.write_images(result.best_epoch, {"test_confusion_matrix": confusion_image(
            test_metrics["confusion_matrix"])})
    writer.write_scalars(result.best_epoch, {f"test_{k}": test_metrics[k]
                                             for k in metrics_lib.summary_names(multi_label)})
    writer.flush()
    logging.info("%s best epoch %d of %d | test_loss %.4f | test %s %.4f", tag, result.best_epoch,
                 result.epochs_run, test.loss, main_metric, test_metrics[main_metric])
    record = {
        "arm": run.arm, "method": run.init.method, "protocol": run.protocol,
        "probe": d.probe if run.protocol == "linear_probe" else None, "init": run.init.label,
        "model": run.init.model_name,
        "weights": run.init.weights_path, "label_fraction": run.label_fraction, "seed": run.seed,
        "num_labelled": int(len(indices)), "class_weights": np.asarray(weights).tolist(),
        "best_epoch": result.best_epoch, "epochs_run": result.epochs_run, "best_val_loss": result.best_val_loss,
        "test_loss": test.loss, "train_seconds": train_seconds, "test_metrics": test_metrics,
        "history": result.history,
    }
    if classifier_dir is not None:
        backbone = run.init.weights_path if run.protocol == "linear_probe" else None
        save_classifier(classifier_dir, model_name=run.init.model_name, variables=best,
                        class_names=splits.class_names, multi_label=multi_label, data_config=config.data,
                        dtype=config.dtype, backbone_path=backbone, config=config,
                        info={key: record[key] for key in ("arm", "method", "init", "protocol", "label_fraction",
                                                           "seed", "best_epoch", "best_val_loss")})
        record["classifier"] = str(classifier_dir)
    record["fingerprint"] = finished_runs.run_fingerprint(config, run)
    run_dir.mkdir(parents=True, exist_ok=True)
    test_ids = np.asarray(splits.test.ids, dtype=str)
    test_paths = np.asarray([splits.test.describe(int(row)) for row in splits.test.rows], dtype=str)
    np.savez(run_dir / "test_predictions.npz", probabilities=test.probabilities, labels=test.labels, ids=test_ids,
             paths=test_paths)
    dump_json(run_dir / "result.json", record)  # last: its presence marks the run finished (finished_runs)
    return {**record, "test_probabilities": test.probabilities, "test_labels": test.labels}


def run_settings(config: ml_collections.ConfigDict, workdir: str | Path, arms: Sequence[str],
                 protocols: Sequence[str], splits: Any = None) -> list[dict[str, Any]]:
    """Every (init, arm, protocol, label fraction, seed) combination of `downstream.init`; one record each."""
    check_downstream_config(config)
    workdir = Path(workdir).absolute()
    arm_inits = [(arm, resolve_init(config, arm, init, workdir))
                 for init in parse_inits(config.downstream.init) for arm in arms]
    return run_arm_inits(config, workdir, arm_inits, protocols, splits)


def run_arm_inits(config: ml_collections.ConfigDict, workdir: str | Path, arm_inits: Sequence[tuple[str, ArmInit]],
                  protocols: Sequence[str], splits: Any = None) -> list[dict[str, Any]]:
    """Every (arm, starting weights) pair under every protocol, label fraction and seed; one record each.

    The pipeline's comparison of methods gives each method's exported arms here, so an arm a method did not
    export is simply not listed. A run finished by an earlier invocation with the same settings and starting
    weights (`cass_jax.finished_runs`) is read back instead of trained again, so a killed pipeline resumes.
    """
    workdir = Path(workdir).absolute()
    d = config.downstream
    splits = splits if splits is not None else load_downstream_data(config)
    initial_variables = InitialVariables(config.data.image_size)
    feature_cache: dict = {}
    records = []
    for arm, arm_init in arm_inits:
        for protocol in protocols:
            for fraction in d.label_fractions:
                group = []
                for seed in d.seeds:
                    run = RunSpec(arm, protocol, arm_init, float(fraction), int(seed))
                    run_dir = workdir / "downstream" / run.name
                    record = finished_runs.load_finished_run(config, run, run_dir)
                    if record is None:
                        classifier_dir = None if d.save_models == "none" else workdir / "models" / run.name
                        record = train_and_evaluate(config, splits, run, run_dir, initial_variables, classifier_dir,
                                                    feature_cache)
                    group.append(record)
                if d.save_models == "best":
                    keep_best_classifier(group)
                records += group
    return records


def keep_best_classifier(group: list[dict[str, Any]]) -> None:
    """Of one setting's seeds, keeps the saved classifier with the lowest validation loss; deletes the others."""
    best = min(group, key=lambda r: (r["best_val_loss"], r["seed"]))
    for record in group:
        if record is not best and record.get("classifier"):
            shutil.rmtree(record["classifier"], ignore_errors=True)
            record["classifier"] = None


def write_models_index(workdir: str | Path, records: Iterable[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """models.json: one entry per saved classifier, with its setting and the test metrics results.json reports."""
    keys = ("arm", "method", "init", "label_fraction", "protocol", "seed", "model")
    entries = [{**{k: r[k] for k in keys}, "path": r["classifier"], "test_metrics": r["test_metrics"]}
               for r in records if r.get("classifier")]
    if entries:
        dump_json(Path(workdir) / "models.json", entries)
    return entries


def json_record(record: Mapping[str, Any]) -> dict[str, Any]:
    """The record without its NumPy arrays (those go to test_predictions.npz)."""
    return {k: v for k, v in record.items() if not isinstance(v, np.ndarray)}


def _strict_json(value: Any) -> Any:
    """NaN (an undefined AUROC, say) becomes null, so results.json is valid JSON for any reader."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, Mapping):
        return {k: _strict_json(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_strict_json(v) for v in value]
    return value


def dump_json(path: Path, value: Any) -> None:
    """Writes through a temporary file, so a kill mid-write never leaves a truncated file behind."""
    temporary = path.with_name(path.name + ".tmp")
    temporary.write_text(json.dumps(_strict_json(value), indent=2, allow_nan=False))
    temporary.replace(path)


def write_results(workdir: str | Path, records: Iterable[Mapping[str, Any]], multi_label: bool,
                  class_names: Sequence[str], pretraining: Sequence[Mapping[str, Any]] = ()) -> dict[str, Any]:
    """Writes results.json (every run, mean +- std and 95% CI per setting, and the `pretraining` runs' timings) and
    results.md (the tables, also printed)."""
    workdir = Path(workdir)
    records = [json_record(r) for r in records]
    names = metrics_lib.summary_names(multi_label)
    summary = metrics_lib.summarize_over_seeds(records, names)
    results = {"class_names": list(class_names), "multi_label": multi_label, "summary": summary,
               "pretraining": list(pretraining), "runs": records}
    workdir.mkdir(parents=True, exist_ok=True)
    dump_json(workdir / "results.json", results)
    markdown = ("# Downstream results\n\nTest split; mean ± sample std over seeds and the 95% confidence interval of "
                "the mean (Student t, n = seeds; none for one seed). Rows: arm and its model, self-supervised method "
                "(none: the starting weights without pretraining), protocol, initial weights; columns: fraction of "
                "training labels.\n\n" + metrics_lib.markdown_tables(summary, names))
    if pretraining:
        markdown += "\n" + metrics_lib.pretraining_table(pretraining)
    (workdir / "results.md").write_text(markdown)
    print(markdown, flush=True)
    logging.info("Wrote %s and %s", workdir / "results.md", workdir / "results.json")
    return results


def merge_results(result_files: Sequence[str | Path], out_dir: str | Path) -> dict[str, Any]:
    """One table from several pipeline invocations' results.json (a long comparison run one method at a time).

    Runs are keyed by arm, method, init, protocol, label fraction, seed and model: a run present in several files
    must have the same scores in each (the baseline of two invocations with the same seeds), else it is an error,
    as are files of different classes. Pretraining timings are kept once per method and backbones.
    """
    keys = ("arm", "method", "init", "protocol", "label_fraction", "seed", "model")
    runs: dict[tuple, dict[str, Any]] = {}
    pretraining: dict[tuple, dict[str, Any]] = {}
    class_names = multi_label = None
    for path in map(Path, result_files):
        results = json.loads(path.read_text())
        if class_names is not None and (results["class_names"], results["multi_label"]) != (class_names, multi_label):
            raise ValueError(f"{path} has classes {results['class_names']}, the files before it {class_names}: "
                             "merge only results of the same data.")
        class_names, multi_label = results["class_names"], results["multi_label"]
        for record in results["runs"]:
            key = tuple(json.dumps(record.get(name)) for name in keys)
            if key in runs and runs[key].get("test_metrics") != record.get("test_metrics"):
                raise ValueError(f"{path} has run {dict(zip(keys, key))} with other test scores than an earlier file; "
                                 "were they made with other settings?")
            runs.setdefault(key, record)
        for timing in results.get("pretraining", []):
            pretraining.setdefault((timing["method"], json.dumps(timing["backbones"], sort_keys=True)), timing)
    if class_names is None:
        raise ValueError("merge_results needs at least one results.json.")
    return write_results(out_dir, list(runs.values()), multi_label, class_names, list(pretraining.values()))


def run(config: ml_collections.ConfigDict, workdir: str | Path) -> dict[str, Any]:
    """`mode=finetune` or `mode=linear_probe`: `downstream.arm` over the label fractions and seeds."""
    if config.mode not in PROTOCOLS:
        raise ValueError(f"finetune.run handles config.mode in {PROTOCOLS}; got {config.mode!r}.")
    splits = load_downstream_data(config)
    records = run_settings(config, workdir, (config.downstream.arm,), (config.mode,), splits)
    write_models_index(workdir, records)
    return write_results(workdir, records, bool(splits.multi_label), splits.class_names)
