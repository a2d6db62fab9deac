"""CASS (cross-architectural self-supervision): the train state, the jitted two-arm step, and what it exports.

One augmented batch goes through a CNN and a ViT; the loss pulls their L2-normalised logits together
(`cass_loss`); both arms take an Adam step in the same jitted function. No labels are used.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping

import flax
import jax
import jax.numpy as jnp
import ml_collections
import optax

from cass_jax.collapse import cross_arm_cosine
from cass_jax.methods.base import Backbone, MethodState, driver_fields, initial_backbone_variables, track_collapse
from cass_jax.models import create_model
from cass_jax.schedules import make_schedule
from cass_jax.stabilisers import stabilised_cass_loss, update_centres

ARMS = ("cnn", "vit")


@flax.struct.dataclass
class TrainState(MethodState):
    """Everything a resumed run needs, as one pytree (checkpointed whole by orbax); MethodState adds the
    step, the weight average (`swa_params`, per arm), the collapse yardstick and the rng."""
    params: dict[str, Any]            # {"cnn": ..., "vit": ...}
    batch_stats: dict[str, Any]       # {"cnn": ...}: the ViT has none
    opt_state: dict[str, Any]         # {"cnn": ..., "vit": ...}
    centres: dict[str, jnp.ndarray]   # running mean output per arm (used by the centring stabiliser only)


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
    for arm in ARMS:
        metrics[f"grad_norm/{arm}"] = optax.tree.norm(grads[arm])
        metrics[f"param_norm/{arm}"] = optax.tree.norm(params[arm])
    new_state = state.replace(step=state.step + 1, params=params, opt_state=opt_state,
                              batch_stats={"cnn": cnn_batch_stats},
                              centres=update_centres(state.centres, cnn_logits, vit_logits,
                                                     arms.loss.centring_momentum))
    return track_collapse(state, new_state, metrics, {"cnn": cnn_logits, "vit": vit_logits})


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
    variables = {arm: initial_backbone_variables(config, arm, model, config.data.image_size, arm_rng)
                 for arm, model, arm_rng in (("cnn", arms.cnn, cnn_rng), ("vit", arms.vit, vit_rng))}
    params = {arm: variables[arm]["params"] for arm in ARMS}
    return TrainState(
        params=params,
        batch_stats={"cnn": variables["cnn"].get("batch_stats", {})},
        opt_state={arm: arms.optimizers[arm].init(params[arm]) for arm in ARMS},
        centres={arm: jnp.zeros((arms.cnn.num_classes or arms.cnn.num_features,), jnp.float32) for arm in ARMS},
        **driver_fields(params, ARMS, rng))


@dataclasses.dataclass(frozen=True, eq=False)
class Cass:
    """CASS as the pretraining driver sees it (`methods.base.Method`): both arms exported, with their heads."""

    config: ml_collections.ConfigDict
    arms: Arms

    name = "cass"
    views = None  # the CASS augmentation of config.data (one view, "image")
    finite_metrics = ("loss", *(f"grad_norm/{arm}" for arm in ARMS))
    console_metrics = ("loss", "cosine", "lr/cnn", "collapse/cnn_std", "collapse/vit_std")

    @property
    def backbones(self) -> dict[str, Backbone]:
        return {arm: Backbone(getattr(self.arms, arm), self.config[arm].name, self.config[arm].num_classes,
                              self.config.data.image_size) for arm in ARMS}

    def initial_state(self) -> TrainState:
        return initial_state(self.config, self.arms)

    def train_step(self, state: TrainState, batch: Mapping[str, jax.Array]) -> tuple[TrainState, dict]:
        return train_step(state, dict(batch), self.arms)

    def backbone_variables(self, state: TrainState) -> dict[str, dict[str, Any]]:
        return {"cnn": {"params": state.params["cnn"], "batch_stats": state.batch_stats["cnn"]},
                "vit": {"params": state.params["vit"]}}

    def scalars(self, state: TrainState) -> dict[str, float]:
        return {f"lr/{arm}": float(state.opt_state[arm].hyperparams["learning_rate"]) for arm in ARMS}


def build(config: ml_collections.ConfigDict, total_steps: int, steps_per_epoch: int) -> Cass:
    """CASS from `config.cnn`, `config.vit`, `config.optim` and `config.loss`."""
    return Cass(config, build_arms(config, total_steps, steps_per_epoch))

