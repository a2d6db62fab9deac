"""Cross teaching between a CNN and a Transformer (Luo et al., MIDL 2022): the state, the jitted step, evaluation.

Each network learns from the labelled half of the batch (0.5 x (cross-entropy + Dice)) and, on the unlabelled half,
from the other network's argmax prediction (a Dice loss weighted by a sigmoid ramp-up); both take one SGD step in
the same jitted function, as SSL4MIS's `train_cross_teaching_between_cnn_transformer_2D.py`.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import flax
import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import linen as nn
from jax.sharding import Mesh

from cass_jax import parallel
from cass_jax.models import SwinUNet, UNet, create_model, init_variables
from cass_jax.port import load_pretrained_encoder
from cass_jax.segmentation.data import SegmentationSource
from cass_jax.segmentation.evaluation import evaluate_volumes
from cass_jax.segmentation.losses import consistency_weight, cross_entropy, dice_loss

NETWORKS = ("cnn", "transformer")


@dataclasses.dataclass(frozen=True)
class CrossTeachingConfig:
    """The networks and SSL4MIS's training settings (its argparse defaults); `*_init` "random" or a weights file."""

    cnn: str = "unet_ssl4mis"
    transformer: str = "swin_unet_tiny"  # "": the CNN alone (supervised baselines of one network)
    cnn_init: str = "random"
    transformer_init: str = "random"  # SSL4MIS loads ImageNet Swin-T (`load_from`): pass its ported file here
    num_classes: int = 4
    image_size: int = 224
    in_channels: int = 1
    dtype: str = "float32"
    base_lr: float = 0.01
    momentum: float = 0.9
    weight_decay: float = 1e-4
    poly_power: float = 0.9
    max_iterations: int = 30_000
    consistency: float = 0.1
    consistency_rampup: float = 200.0
    rampup_every: int = 150
    labeled_batch_size: int = 8
    unlabeled_batch_size: int = 8
    cross_teaching: bool = True  # False: each network trains on its labelled images only (the baselines)


@flax.struct.dataclass
class CrossTeachingState:
    """Everything a resumed run needs, as one pytree: both networks' variables and optimizer states."""

    step: jax.Array                 # completed iterations (SSL4MIS's iter_num)
    params: dict[str, Any]          # {"cnn": ..., "transformer": ...}
    batch_stats: dict[str, Any]     # {"cnn": ..., "transformer": {} for a Swin-UNet}
    opt_state: dict[str, Any]
    rng: jax.Array                  # base key; `train_step` folds in the step number


@dataclasses.dataclass(frozen=True)
class Networks:
    """The two modules, the optimizer and the settings; static, closed over by the jitted step."""

    cnn: nn.Module
    transformer: nn.Module | None
    optimizer: optax.GradientTransformation
    config: CrossTeachingConfig

    @property
    def names(self) -> tuple[str, ...]:
        """The networks trained: both, or the CNN alone when no transformer is configured."""
        return NETWORKS if self.transformer is not None else NETWORKS[:1]

    def module(self, name: str) -> nn.Module:
        return getattr(self, name)


def sgd_poly(config: CrossTeachingConfig) -> optax.GradientTransformation:
    """torch.optim.SGD(lr, momentum, weight_decay) with SSL4MIS's poly decay lr * (1 - t / max_iterations) ** 0.9.

    PyTorch adds weight_decay * p to the gradient before the momentum buffer (buf = m * buf + g), then steps by
    -lr_t * buf; optax's add_decayed_weights -> sgd(momentum) chain is that same order. Every parameter decays, as
    SSL4MIS passes model.parameters() whole. Step t (0-based) uses lr * (1 - t / max_iterations) ** 0.9.
    """
    schedule = optax.polynomial_schedule(init_value=config.base_lr, end_value=0.0, power=config.poly_power,
                                         transition_steps=config.max_iterations)
    return optax.chain(optax.add_decayed_weights(config.weight_decay),
                       optax.sgd(schedule, momentum=config.momentum))


def learning_rate(config: CrossTeachingConfig, step: jax.Array | int) -> jax.Array:
    """The learning rate `sgd_poly` applies at `step` completed iterations."""
    fraction = jnp.clip(jnp.asarray(step, jnp.float32) / config.max_iterations, 0.0, 1.0)
    return config.base_lr * (1.0 - fraction) ** config.poly_power


def build_module(name: str, config: CrossTeachingConfig) -> nn.Module:
    model = create_model(name, num_classes=config.num_classes, dtype=jnp.dtype(config.dtype))
    if isinstance(model, UNet) and model.in_channels != config.in_channels:
        model = model.clone(in_channels=config.in_channels)
    if isinstance(model, SwinUNet) and model.img_size != config.image_size:
        model = model.clone(img_size=config.image_size)
    return model


def build_networks(config: CrossTeachingConfig) -> Networks:
    """The CNN and Transformer named in the config (num_classes outputs) and SGD with poly decay."""
    if config.cross_teaching and not config.transformer:
        raise ValueError("Cross teaching needs two networks: set the transformer (e.g. swin_unet_tiny), or train the "
                         "CNN alone with cross_teaching=False.")
    transformer = build_module(config.transformer, config) if config.transformer else None
    return Networks(cnn=build_module(config.cnn, config), transformer=transformer, optimizer=sgd_poly(config),
                    config=config)


def init(config: CrossTeachingConfig, rng: jax.Array, networks: Networks | None = None) -> CrossTeachingState:
    """Fresh state: each network random (torch's default initialisers) or its encoder loaded from `*_init`."""
    networks = networks or build_networks(config)
    rng, *network_rngs = jax.random.split(rng, 1 + len(NETWORKS))
    variables = {}
    for name, network_rng in zip(networks.names, network_rngs):
        model, source = networks.module(name), getattr(config, f"{name}_init")
        variables[name] = (init_variables(model, network_rng, config.image_size) if source == "random"
                           else load_pretrained_encoder(source, model, network_rng, config.image_size))
    params = {name: variables[name]["params"] for name in networks.names}
    return CrossTeachingState(
        step=jnp.zeros((), jnp.int32),
        params=params,
        batch_stats={name: variables[name].get("batch_stats", {}) for name in networks.names},
        opt_state={name: jax.jit(networks.optimizer.init)(params[name]) for name in networks.names},
        rng=rng)


def _forward_train(model: nn.Module, params: Any, batch_stats: Any, images: jax.Array,
                   rng: jax.Array) -> tuple[jax.Array, Any]:
    """Training-mode logits (batch statistics, dropout / stochastic depth) and the updated BatchNorm statistics."""
    logits, updates = model.apply({"params": params, "batch_stats": batch_stats}, images, train=True,
                                  mutable=["batch_stats"], rngs={"dropout": rng})
    return logits.astype(jnp.float32), updates.get("batch_stats", {})


def segmentation_losses(params: dict, batch_stats: dict, batch: dict[str, jax.Array], rng: jax.Array,
                        weight: jax.Array, *, networks: Networks,
                        cross_teaching: bool = True) -> tuple[jax.Array, tuple[dict, dict]]:
    """Total loss of both networks, and (updated batch statistics, per-network loss terms).

    Each network: supervised = 0.5 * (CE + Dice) on the labelled images; with `cross_teaching`, both see the labelled
    and unlabelled images in one batch (BatchNorm statistics over all of them, as SSL4MIS's single forward) and add
    `weight` x Dice(own softmax on the unlabelled half, stop_gradient(argmax of the other network)).
    """
    num_classes = networks.config.num_classes
    labeled, masks = batch["labeled_image"], batch["labeled_mask"]
    images = jnp.concatenate([labeled, batch["unlabeled_image"]]) if cross_teaching else labeled
    count = labeled.shape[0]
    probabilities, new_batch_stats, terms = {}, {}, {}
    for name, network_rng in zip(networks.names, jax.random.split(rng, len(NETWORKS))):
        logits, new_batch_stats[name] = _forward_train(networks.module(name), params[name], batch_stats[name],
                                                       images, network_rng)
        probabilities[name] = jax.nn.softmax(logits, axis=-1)
        ce = cross_entropy(logits[:count], masks)
        dice = dice_loss(probabilities[name][:count], masks, num_classes)
        terms[name] = {"cross_entropy": ce, "dice_loss": dice, "supervised_loss": 0.5 * (ce + dice)}
    total = 0.0
    for name, other in zip(networks.names, reversed(networks.names)):
        loss = terms[name]["supervised_loss"]
        if cross_teaching:
            pseudo_labels = jax.lax.stop_gradient(jnp.argmax(probabilities[other][count:], axis=-1))
            terms[name]["pseudo_label_loss"] = dice_loss(probabilities[name][count:], pseudo_labels, num_classes)
            loss = loss + weight * terms[name]["pseudo_label_loss"]
        terms[name]["loss"] = loss
        total = total + loss
    if cross_teaching:
        agree = jnp.argmax(probabilities["cnn"][count:], -1) == jnp.argmax(probabilities["transformer"][count:], -1)
        terms["pseudo_label_agreement"] = jnp.mean(agree.astype(jnp.float32))
    return total, (new_batch_stats, terms)


def train_step(state: CrossTeachingState, batch: dict[str, jax.Array], rng: jax.Array, *, networks: Networks,
               cross_teaching: bool = True) -> tuple[CrossTeachingState, dict[str, jax.Array]]:
    """One SGD step of both networks on `batch`: cross teaching, or supervised only (`cross_teaching=False`)."""
    config = networks.config
    weight = consistency_weight(state.step, config.consistency, config.consistency_rampup, config.rampup_every)
    loss_fn = functools.partial(segmentation_losses, networks=networks, cross_teaching=cross_teaching)
    (loss, (batch_stats, terms)), grads = jax.value_and_grad(loss_fn, has_aux=True)(
        state.params, state.batch_stats, batch, rng, weight)
    params, opt_state = {}, {}
    for name in networks.names:
        updates, opt_state[name] = networks.optimizer.update(grads[name], state.opt_state[name], state.params[name])
        params[name] = optax.apply_updates(state.params[name], updates)
    metrics = {"loss": loss, "learning_rate": learning_rate(config, state.step)}
    if cross_teaching:
        metrics["consistency_weight"] = weight
        metrics["pseudo_label_agreement"] = terms.pop("pseudo_label_agreement")
    for name in networks.names:
        metrics.update({f"{name}/{term}": value for term, value in terms[name].items()})
        metrics[f"{name}/grad_norm"] = optax.tree.norm(grads[name])
    return state.replace(step=state.step + 1, params=params, batch_stats=batch_stats, opt_state=opt_state), metrics


def cross_teaching_step(state: CrossTeachingState, batch: dict[str, jax.Array], rng: jax.Array, *,
                        networks: Networks) -> tuple[CrossTeachingState, dict[str, jax.Array]]:
    """SSL4MIS's cross-teaching iteration (labelled + unlabelled halves); see `segmentation_losses`."""
    return train_step(state, batch, rng, networks=networks, cross_teaching=True)


def supervised_step(state: CrossTeachingState, batch: dict[str, jax.Array], rng: jax.Array, *,
                    networks: Networks) -> tuple[CrossTeachingState, dict[str, jax.Array]]:
    """Each network on its labelled images only (the supervised baselines); unlabelled images are ignored."""
    return train_step(state, batch, rng, networks=networks, cross_teaching=False)


def jit_train_step(networks: Networks, mesh: Mesh | None = None, cross_teaching: bool | None = None,
                   compiler_options: dict[str, Any] | None = None):
    """The step jitted once for data parallelism: state and rng replicated, every batch array split on its axis 0.

    `cross_teaching` defaults to the config's. The returned function is (state, batch, rng) -> (state, metrics);
    the input state is donated. Place the first state with `jax.device_put(state, parallel.replicated(mesh))`:
    a state of uncommitted arrays (fresh from `init`) compiles the step a second time on the next call.
    `compiler_options` go to XLA (tests use backend optimisation level 0 on CPU).
    """
    mesh = mesh or parallel.data_mesh()
    replicated, sharded = parallel.replicated(mesh), parallel.batch_sharding(mesh)
    mode = networks.config.cross_teaching if cross_teaching is None else cross_teaching
    return jax.jit(functools.partial(train_step, networks=networks, cross_teaching=mode),
                   in_shardings=(replicated, sharded, replicated), out_shardings=(replicated, replicated),
                   donate_argnums=0, compiler_options=compiler_options)


@functools.partial(jax.jit, static_argnames="model")
def predict_labels(variables: dict, images: jax.Array, *, model: nn.Module) -> jax.Array:
    """Evaluation-mode argmax labels (B, S, S) of float32 images (B, S, S, C) in [0, 1]; jitted once per model."""
    return jnp.argmax(model.apply(variables, images, train=False), axis=-1).astype(jnp.uint8)


def network_variables(state: CrossTeachingState, name: str) -> dict:
    """{"params"[, "batch_stats"]} of one network: what inference and export need."""
    variables = {"params": state.params[name]}
    if state.batch_stats[name]:
        variables["batch_stats"] = state.batch_stats[name]
    return variables


def evaluate(state: CrossTeachingState, source: SegmentationSource, networks: Networks, *, batch_size: int = 16,
             **kwargs: Any) -> dict[str, dict[str, Any]]:
    """Per-volume and per-slice Dice, IoU and HD95 of each network on `source` (evaluation.evaluate_volumes)."""
    results = {}
    for name in networks.names:
        variables, model = network_variables(state, name), networks.module(name)
        results[name] = evaluate_volumes(lambda images: np.asarray(predict_labels(variables, images, model=model)),
                                         source, image_size=networks.config.image_size, batch_size=batch_size,
                                         **kwargs)
    return results


@dataclasses.dataclass(frozen=True)
class CrossTeaching:
    """The method as the training loop sees it (shared/DESIGN.md): init, train_step, backbones, evaluate."""

    config: CrossTeachingConfig

    @functools.cached_property
    def networks(self) -> Networks:
        return build_networks(self.config)

    @functools.cached_property
    def mesh(self) -> Mesh:
        return parallel.data_mesh()

    def init(self, rng: jax.Array) -> CrossTeachingState:
        """A fresh state, replicated over the data mesh (as the jitted step returns it)."""
        return jax.device_put(init(self.config, rng, self.networks), parallel.replicated(self.mesh))

    @functools.cached_property
    def jitted_step(self):
        return jit_train_step(self.networks, self.mesh)

    def train_step(self, state: CrossTeachingState, batch: dict[str, Any]) -> tuple[CrossTeachingState, dict]:
        """One step with the key fold_in(state.rng, state.step), so a resumed run draws the same dropout."""
        return self.jitted_step(state, batch, jax.random.fold_in(state.rng, state.step))

    def backbones(self, state: CrossTeachingState) -> dict[str, dict]:
        return {name: network_variables(state, name) for name in self.networks.names}

    def evaluate(self, state: CrossTeachingState, source: SegmentationSource, **kwargs: Any) -> dict:
        return evaluate(state, source, self.networks, **kwargs)
