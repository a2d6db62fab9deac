"""What the one pretraining driver (`cass_jax.pretrain`) needs from a method, and the pieces every method shares.

A method module (`cass`, `dino`, `barlow_twins`) says only what differs: its state, its step, its views and
which backbones it exports. The driver owns the rest, through the fields of `MethodState`.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping, Protocol

import flax
import jax
import jax.numpy as jnp
import ml_collections
from absl import logging
from flax import linen as nn

from cass_jax.collapse import collapse_indicators
from cass_jax.models import init_variables
from cass_jax.port import load_pretrained_variables

PyTree = Any


@flax.struct.dataclass
class MethodState:
    """The fields every method's state carries for the driver; each method's state subclasses it.

    The driver checkpoints the whole state with orbax, so a resumed run repeats the killed one exactly.
    """

    step: jnp.ndarray                        # steps taken; the method's step increments it
    swa_params: dict[str, Any]               # running mean of each exported backbone's params, {arm: params}
    swa_count: jnp.ndarray                   # snapshots in that mean
    initial_spread: dict[str, jnp.ndarray]   # collapse/<name>_std at the first step, per reported embedding
    rng: jnp.ndarray                         # base key; each step folds in its number


def driver_fields(averaged_params: Mapping[str, PyTree], embedding_names: tuple[str, ...],
                  rng: jax.Array) -> dict[str, Any]:
    """The `MethodState` fields of a fresh run: step 0, the average seeded with the initial backbones."""
    return dict(step=jnp.zeros((), jnp.int32), swa_params=jax.tree.map(jnp.copy, dict(averaged_params)),
                swa_count=jnp.zeros((), jnp.int32),
                initial_spread={name: jnp.zeros((), jnp.float32) for name in embedding_names}, rng=rng)


def track_collapse(state: MethodState, new_state: MethodState, metrics: dict[str, jax.Array],
                   embeddings: Mapping[str, jax.Array]) -> tuple[MethodState, dict[str, jax.Array]]:
    """Adds `collapse/<name>_{std,pairwise_cosine}` for each (B, D) embedding a step reports, and keeps each
    std of the run's first step in `initial_spread` (the yardstick the driver's collapse monitor compares to).

    `state` is the state before the step, `new_state` after it. Every method's step ends with this call.
    """
    metrics = dict(metrics)
    for name, outputs in embeddings.items():
        for indicator, value in collapse_indicators(outputs).items():
            metrics[f"collapse/{name}_{indicator}"] = value
    spread = {name: jnp.where(state.step == 0, metrics[f"collapse/{name}_std"], state.initial_spread[name])
              for name in state.initial_spread}
    return new_state.replace(initial_spread=spread), metrics


def apply_in_train_mode(model: nn.Module, params: PyTree, batch_stats: PyTree, inputs: jax.Array,
                        **kwargs: Any) -> tuple[jax.Array, PyTree]:
    """`model` in train mode (batch statistics), returning (outputs, updated batch_stats).

    Modules without BatchNorm (ViTs, heads without BN) take and give back an empty `batch_stats`.
    """
    variables = {"params": params, **({"batch_stats": batch_stats} if batch_stats else {})}
    outputs, updates = model.apply(variables, inputs, train=True, mutable=["batch_stats"], **kwargs)
    return outputs, updates.get("batch_stats", batch_stats)


def initial_backbone_variables(config: ml_collections.ConfigDict, arm: str, model: nn.Module, image_size: int,
                               rng: jax.Array) -> dict[str, PyTree]:
    """A backbone's starting variables: random, or from the weights file in `config.<arm>.init` (ported ImageNet
    weights, or any export of this project; heads dropped or re-initialised, ViT position embeddings resampled)."""
    init = config[arm].init
    if init == "random":
        return init_variables(model, rng, image_size)
    return load_pretrained_variables(init, model, image_size, rng)


def clamp_warmup_epochs(warmup_epochs: int, num_epochs: int, what: str) -> int:
    """A warm-up no longer than the run allows (num_epochs - 1, at least 0), logged when shortened.

    The official recipes assume 100+ epochs; a short run (smoke tests, demos) would otherwise only warm up.
    """
    limit = max(num_epochs - 1, 0)
    if warmup_epochs > limit:
        logging.warning("%s warm-up of %d epochs does not fit a %d-epoch run; using %d.", what, warmup_epochs,
                        num_epochs, limit)
        return limit
    return warmup_epochs


@dataclasses.dataclass(frozen=True)
class Backbone:
    """One network a method exports: the module, and what `export/arms.json` records about it."""

    model: nn.Module
    name: str          # model registry name (create_model)
    num_classes: int   # 0: pooled features, no head
    image_size: int    # the size its variables were built for (a ViT's position embeddings)


class Method(Protocol):
    """A self-supervised method as the driver sees it. Built by `<module>.build(config, total_steps,
    steps_per_epoch)`; `backbones` keys are the config arms it reads (`config.<arm>.name/init/...`) and the
    arm names it exports under, so `downstream.init` finds them."""

    name: str                                  # "cass", "dino", "barlow_twins"
    views: Any                                 # grain random map with `image_keys`, or None: the CASS augmentation
    backbones: dict[str, Backbone]
    finite_metrics: tuple[str, ...]            # step metrics that must stay finite
    console_metrics: tuple[str, ...]           # shown on the progress line

    def initial_state(self) -> MethodState:
        """A fresh state (backbones random or from config.<arm>.init), seeded by config.seed."""

    def train_step(self, state: MethodState, batch: Mapping[str, jax.Array]) -> tuple[MethodState, dict]:
        """One jit-able step: returns the new state and scalar metrics (including those of `track_collapse`)."""

    def backbone_variables(self, state: MethodState) -> dict[str, dict[str, PyTree]]:
        """{arm: {"params"[, "batch_stats"]}}: what gets exported (and weight-averaged) now."""

    def scalars(self, state: MethodState) -> dict[str, float]:
        """Host-side scalars for TensorBoard at a log step (learning rates, schedules)."""


def config_block(config: ml_collections.ConfigDict, name: str) -> ml_collections.ConfigDict:
    """`config.<name>`, with an error naming the configs that define it when absent."""
    if name not in config:
        raise ValueError(f"config.method={config.method!r} needs a config.{name} block; start the config from "
                         "configs/common.py's base_config(), which defines every method's block.")
    return config[name]
