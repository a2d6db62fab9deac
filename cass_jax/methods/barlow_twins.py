"""Barlow Twins (facebookresearch/barlowtwins main.py) as a method of the one driver, with the further-pretraining
protocol of the skin-cancer study (Haggerty & Chandra, arXiv:2401.00692; see `barlow_twins_parts`).

Two asymmetric views of each image go through one encoder and projector; the loss drives the cross-correlation
of the two embeddings to the identity. The encoder (without projector) is what gets exported.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Mapping, NamedTuple

import flax
import jax
import jax.numpy as jnp
import ml_collections
import optax

from cass_jax.data.two_views import BarlowTwinsViews
from cass_jax.methods import barlow_twins_parts as parts
from cass_jax.methods.base import (
    Backbone,
    MethodState,
    apply_in_train_mode,
    clamp_warmup_epochs,
    config_block,
    driver_fields,
    initial_backbone_variables,
    track_collapse,
)
from cass_jax.models import create_model

PROTOCOLS = ("from_scratch", "further")
FURTHER_MODES = ("full", "partial")
SPARSITY_PENALTIES = {"l1": parts.l1_penalty, "group": parts.group_sparsity_penalty, "none": None}
EMBEDDINGS = ("encoder", "projector")


def default_barlow_twins_config() -> ml_collections.ConfigDict:
    """The `config.barlow_twins` block: main.py's defaults, plus the further-pretraining protocol's keys."""
    c = ml_collections.ConfigDict()
    # Which of the config's arms is the encoder ("cnn" or "vit"): its name, init and kernel_grad come from
    # config.<arm>, and it is exported under that arm name. "partial" further pretraining needs a ResNet.
    c.arm = "cnn"
    # Views: RandomResizedCrop to crop_size, the official asymmetric blur / solarisation.
    c.crop_size = 224
    # Projector widths (main.py --projector 8192-8192-8192) and the off-diagonal weight (--lambd).
    c.projector = (8192, 8192, 8192)
    c.lambd = parts.LAMBDA
    # "from_scratch": main.py's LARS, lr = learning_rate_{weights,biases} * batch_size / 256, warm-up then
    # cosine to 1/1000 (biases and norms: no decay, no trust ratio). "further": the study's protocol below.
    c.protocol = "from_scratch"
    c.learning_rate_weights = parts.WEIGHTS_LEARNING_RATE
    c.learning_rate_biases = parts.BIASES_LEARNING_RATE
    c.warmup_epochs = 10
    # main.py's default; the paper and the study's configs use 1.5e-6. Also the further protocol's (decoupled) decay.
    c.weight_decay = 1e-6
    # Further pretraining, starting from config.<arm>.init (ImageNet weights or any export of this project):
    # projector_epochs with only the projector trained (fastai Adam, constant projector_lr, encoder parameters
    # frozen bitwise; BatchNorm statistics still update, as in fastai's train mode), then "full" (SSLf: all) or
    # "partial" (SSLp: the projector and the encoder's final bottleneck block) with a one-cycle lr peaking at
    # further_lr (the study picks it with fastai's lr_find; here it is fixed) and fastai's cycled momentum.
    c.further_mode = "full"
    c.projector_epochs = 1
    c.projector_lr = 1e-3
    c.further_lr = 1e-3
    # Sparsity penalty on the last projector layer, further protocol only: "l1" (sum |W|, as the issue states),
    # "group" (sum of per-input-feature L2 norms, what the study's code computes) or "none".
    c.sparsity = "l1"
    c.sparsity_weight = 0.01
    return c


class TwoPhaseState(NamedTuple):
    count: jax.Array
    first: optax.OptState
    second: optax.OptState


def two_phase_optimizer(first: optax.GradientTransformation, second: optax.GradientTransformation,
                        first_steps: int) -> optax.GradientTransformation:
    """`first` for the first `first_steps` updates, then `second` (fastai's fit, then fit_one_cycle).

    Each keeps its own state and step count, so the second's schedules start at its own step 0; the idle one's
    state is left as it was.
    """

    def init(params: Any) -> TwoPhaseState:
        return TwoPhaseState(jnp.zeros((), jnp.int32), first.init(params), second.init(params))

    def update(updates: Any, state: TwoPhaseState, params: Any = None) -> tuple[Any, TwoPhaseState]:
        def run_first(_):
            new_updates, first_state = first.update(updates, state.first, params)
            return new_updates, first_state, state.second

        def run_second(_):
            new_updates, second_state = second.update(updates, state.second, params)
            return new_updates, state.first, second_state

        new_updates, first_state, second_state = jax.lax.cond(state.count < first_steps, run_first, run_second, None)
        return new_updates, TwoPhaseState(optax.safe_increment(state.count), first_state, second_state)

    return optax.GradientTransformation(init, update)


@flax.struct.dataclass
class BarlowTwinsState(MethodState):
    """Encoder and projector ({"encoder", "projector"}), their BatchNorm statistics and the optimiser state."""
    params: dict[str, Any]
    batch_stats: dict[str, Any]
    opt_state: Any


@dataclasses.dataclass(frozen=True, eq=False)
class BarlowTwins:
    """Barlow Twins as the pretraining driver sees it (`methods.base.Method`)."""

    config: ml_collections.ConfigDict
    arm: str
    encoder: flax.linen.Module
    projector: parts.BarlowTwinsProjector
    optimizer: optax.GradientTransformation
    views: BarlowTwinsViews
    learning_rate: Callable[[int], float]   # of the weights at a step, for TensorBoard
    penalty: Callable[[Any], jax.Array] | None

    name = "barlow_twins"
    finite_metrics = ("loss", "grad_norm/encoder")
    console_metrics = ("loss", "lr", "collapse/encoder_std")

    @property
    def backbones(self) -> dict[str, Backbone]:
        return {self.arm: Backbone(self.encoder, self.config[self.arm].name, 0, self.views.image_size)}

    def initial_state(self) -> BarlowTwinsState:
        """The encoder random or from config.<arm>.init (ImageNet, or any export of this project); a new projector."""
        rng, encoder_rng, projector_rng = jax.random.split(jax.random.PRNGKey(self.config.seed), 3)
        encoder = initial_backbone_variables(self.config, self.arm, self.encoder, self.views.image_size, encoder_rng)
        projector = flax.core.unfreeze(self.projector.init(
            projector_rng, jnp.zeros((2, self.encoder.num_features)), train=False))
        params = {"encoder": encoder["params"], "projector": projector["params"]}
        batch_stats = {"encoder": encoder.get("batch_stats", {}), "projector": projector["batch_stats"]}
        return BarlowTwinsState(params=params, batch_stats=batch_stats, opt_state=self.optimizer.init(params),
                                **driver_fields({self.arm: params["encoder"]}, EMBEDDINGS, rng))

    def train_step(self, state: BarlowTwinsState, batch: Mapping[str, jax.Array]) -> tuple[BarlowTwinsState, dict]:
        """main.py's step: both views through encoder and projector (one after the other, so BatchNorm sees each
        view's batch), the cross-correlation loss, (+ the sparsity penalty when further pretraining), one update."""

        def loss_fn(params):
            stats = dict(state.batch_stats)
            features, embeddings = [], []
            for key in self.views.image_keys:
                view_features, stats["encoder"] = apply_in_train_mode(
                    self.encoder, params["encoder"], stats["encoder"], batch[key])
                z, stats["projector"] = apply_in_train_mode(
                    self.projector, params["projector"], stats["projector"], view_features)
                features.append(view_features)
                embeddings.append(z)
            loss, terms = parts.barlow_twins_loss(*embeddings, lambd=self.config.barlow_twins.lambd)
            terms = {"barlow_twins": loss, **terms}
            if self.penalty is not None:
                terms["sparsity"] = self.penalty(params["projector"])
                loss = loss + terms["sparsity"]
            return loss, (stats, terms, features[0], embeddings[0])

        (loss, (batch_stats, terms, features, embeddings)), grads = jax.value_and_grad(
            loss_fn, has_aux=True)(state.params)
        updates, opt_state = self.optimizer.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        metrics = {"loss": loss, **{f"loss/{name}": value for name, value in terms.items()},
                   "grad_norm/encoder": optax.tree.norm(grads["encoder"]),
                   "grad_norm/projector": optax.tree.norm(grads["projector"]),
                   "param_norm/encoder": optax.tree.norm(params["encoder"])}
        new_state = state.replace(step=state.step + 1, params=params, batch_stats=batch_stats, opt_state=opt_state)
        return track_collapse(state, new_state, metrics, {"encoder": features, "projector": embeddings})

    def backbone_variables(self, state: BarlowTwinsState) -> dict[str, dict[str, Any]]:
        """The encoder, without the projector."""
        variables = {"params": state.params["encoder"]}
        if state.batch_stats["encoder"]:
            variables["batch_stats"] = state.batch_stats["encoder"]
        return {self.arm: variables}

    def scalars(self, state: BarlowTwinsState) -> dict[str, float]:
        return {"lr": self.learning_rate(max(int(jax.device_get(state.step)) - 1, 0))}


def _optimizer(config: ml_collections.ConfigDict, param_shapes: Any, steps_per_epoch: int
               ) -> tuple[optax.GradientTransformation, Callable[[int], float]]:
    """The protocol's optimiser over {"encoder", "projector"}, and its weights' learning rate per step."""
    b = config.barlow_twins
    epochs, total_steps = config.num_epochs, config.num_epochs * steps_per_epoch
    if b.protocol == "from_scratch":
        warmup = clamp_warmup_epochs(b.warmup_epochs, epochs, "Barlow Twins learning-rate")
        weights, biases = (parts.barlow_twins_lr_schedule(config.batch_size, steps_per_epoch, epochs, base, warmup)
                           for base in (b.learning_rate_weights, b.learning_rate_biases))
        return (parts.lars(weights, weight_decay=b.weight_decay, bias_learning_rate=biases),
                lambda step: float(weights(step)))
    first_steps = b.projector_epochs * steps_per_epoch
    cycle_steps = max(total_steps - first_steps, 1)
    one_cycle = parts.one_cycle_schedule(cycle_steps, b.further_lr)
    projector_only = parts.further_pretraining_optimizer(
        parts.trainable_mask(param_shapes, "projector_only"), b.projector_lr, weight_decay=b.weight_decay)
    further = parts.further_pretraining_optimizer(
        parts.trainable_mask(param_shapes, b.further_mode), one_cycle, weight_decay=b.weight_decay,
        b1=parts.one_cycle_momentum_schedule(cycle_steps))
    return (two_phase_optimizer(projector_only, further, first_steps),
            lambda step: float(b.projector_lr if step < first_steps else one_cycle(step - first_steps)))


def build(config: ml_collections.ConfigDict, total_steps: int, steps_per_epoch: int) -> BarlowTwins:
    """Barlow Twins from `config.barlow_twins` and the encoder arm it names."""
    b = config_block(config, "barlow_twins")
    for key, value, allowed in (("arm", b.arm, ("cnn", "vit")), ("protocol", b.protocol, PROTOCOLS),
                                ("further_mode", b.further_mode, FURTHER_MODES),
                                ("sparsity", b.sparsity, tuple(SPARSITY_PENALTIES))):
        if value not in allowed:
            raise ValueError(f"config.barlow_twins.{key}={value!r}; use one of {', '.join(allowed)}.")
    arm_config = config[b.arm]
    kwargs = {"kernel_grad": arm_config.kernel_grad}
    if arm_config.name.startswith("vit"):
        kwargs.update(img_size=b.crop_size, last_block_class_token_only=arm_config.last_block_class_token_only)
    dtype = jnp.dtype(config.dtype)
    encoder = create_model(arm_config.name, num_classes=0, dtype=dtype, **kwargs)
    projector = parts.BarlowTwinsProjector(sizes=tuple(b.projector), dtype=dtype, kernel_grad=arm_config.kernel_grad)
    views = BarlowTwinsViews(image_size=b.crop_size, gray_fast_path=bool(config.data.get("gray_fast_path", True)))
    penalty_fn = SPARSITY_PENALTIES[b.sparsity] if b.protocol == "further" else None
    penalty = (lambda projector_params: penalty_fn(projector_params, b.sparsity_weight)) if penalty_fn else None

    def fresh_params() -> dict[str, Any]:  # only the structure matters: which leaves the optimiser may move
        images = jnp.zeros((1, b.crop_size, b.crop_size, 3))
        return {"encoder": encoder.init(jax.random.PRNGKey(0), images, train=False)["params"],
                "projector": projector.init(jax.random.PRNGKey(0), jnp.zeros((2, encoder.num_features)),
                                            train=False)["params"]}

    optimizer, learning_rate = _optimizer(config, jax.eval_shape(fresh_params), steps_per_epoch)
    return BarlowTwins(config=config, arm=b.arm, encoder=encoder, projector=projector, optimizer=optimizer,
                       views=views, learning_rate=learning_rate, penalty=penalty)
