"""DINO (self-distillation with no labels, facebookresearch/dino main_dino.py) as a method of the one driver.

A student and an EMA teacher share one backbone architecture; the student's multi-crop outputs learn the
teacher's centred, sharpened outputs on the global crops. The teacher backbone is what gets exported.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping

import flax
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from cass_jax.data.multicrop import DinoMultiCrop
from cass_jax.methods import dino_parts as parts
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
from cass_jax.models import create_model, is_vit

EMBEDDINGS = ("student", "teacher")


def default_dino_config() -> ml_collections.ConfigDict:
    """The `config.dino` block: main_dino.py's defaults (its ViT recipe), departures noted in the README."""
    c = ml_collections.ConfigDict()
    # Which of the config's arms is the backbone ("vit" or "cnn"): its name, init and kernel_grad come from
    # config.<arm>, and it is exported under that arm name.
    c.arm = "vit"
    # Head: 3-layer MLP (hidden 2048, GELU) -> bottleneck 256 -> weight-normalised Linear to out_dim.
    c.out_dim = 65536
    c.hidden_dim = 2048
    c.bottleneck_dim = 256
    c.use_bn_in_head = False
    c.norm_last_layer = True
    # Multi-crop: 2 global crops (blur 1.0 / 0.1, solarisation 0 / 0.2), local_crops_number local ones.
    c.global_crop_size = 224
    c.local_crop_size = 96
    c.local_crops_number = 8
    c.global_crops_scale = (0.4, 1.0)
    c.local_crops_scale = (0.05, 0.4)
    # Teacher: EMA of the student, momentum cosine from momentum_teacher to 1; output centring EMA.
    c.momentum_teacher = 0.996
    c.center_momentum = 0.9
    # Temperatures: student fixed; teacher linear from warmup_teacher_temp to teacher_temp over its warm-up epochs.
    c.student_temp = 0.1
    c.warmup_teacher_temp = 0.04
    c.teacher_temp = 0.04
    c.warmup_teacher_temp_epochs = 0
    # Optimiser: "adamw" (main_dino.py's default, its ViT recipe) or "sgd" (momentum 0.9, the README's ResNet-50
    # recipe with lr 0.03 and weight decay 1e-4 -> 1e-4). lr * batch_size / 256 after a linear warm-up, cosine to
    # min_lr; weight decay cosine 0.04 -> 0.4 (not on biases and norms); per-tensor gradient clipping; the head's
    # last layer frozen for freeze_last_layer epochs. Warm-ups longer than the run are shortened to
    # num_epochs - 1 (logged).
    c.optimizer = "adamw"
    c.lr = 0.0005
    c.min_lr = 1e-6
    c.warmup_epochs = 10
    c.weight_decay = 0.04
    c.weight_decay_end = 0.4
    c.clip_grad = 3.0
    c.freeze_last_layer = 1
    return c


@flax.struct.dataclass
class DinoState(MethodState):
    """Student and teacher ({"backbone", "head"} each), the student's optimiser state and the output centre."""
    params: dict[str, Any]               # student
    batch_stats: dict[str, Any]          # student (empty for a ViT without BN in the head)
    teacher_params: dict[str, Any]
    teacher_batch_stats: dict[str, Any]  # updated by the teacher's own train-mode forward, as upstream
    opt_state: Any
    center: jnp.ndarray                  # (1, out_dim)


@dataclasses.dataclass(frozen=True, eq=False)
class Dino:
    """DINO as the pretraining driver sees it (`methods.base.Method`)."""

    config: ml_collections.ConfigDict
    arm: str
    backbone: flax.linen.Module
    head: parts.DINOHead
    optimizer: optax.GradientTransformation
    views: DinoMultiCrop
    steps_per_epoch: int
    learning_rates: np.ndarray           # per step
    weight_decays: np.ndarray            # per step
    teacher_momentums: np.ndarray        # per step
    teacher_temperatures: np.ndarray     # per epoch

    name = "dino"
    finite_metrics = ("loss", "grad_norm/student")
    console_metrics = ("loss", "lr", "collapse/teacher_std")

    @property
    def backbones(self) -> dict[str, Backbone]:
        return {self.arm: Backbone(self.backbone, self.config[self.arm].name, 0, self.views.global_crop_size)}

    def initial_state(self) -> DinoState:
        """Student random or from config.<arm>.init; the teacher starts as its copy, as upstream."""
        rng, backbone_rng, head_rng = jax.random.split(jax.random.PRNGKey(self.config.seed), 3)
        backbone = initial_backbone_variables(self.config, self.arm, self.backbone, self.views.global_crop_size,
                                              backbone_rng)
        head = flax.core.unfreeze(self.head.init(head_rng, jnp.zeros((2, self.backbone.num_features)), train=False))
        params = {"backbone": backbone["params"], "head": head["params"]}
        batch_stats = {"backbone": backbone.get("batch_stats", {}), "head": head.get("batch_stats", {})}
        return DinoState(params=params, batch_stats=batch_stats, teacher_params=jax.tree.map(jnp.copy, params),
                         teacher_batch_stats=jax.tree.map(jnp.copy, batch_stats),
                         opt_state=self.optimizer.init(params),
                         center=jnp.zeros((1, self.head.out_dim), jnp.float32),
                         **driver_fields({self.arm: params["backbone"]}, EMBEDDINGS, rng))

    def forward(self, params: Any, batch_stats: Any, crop_groups: list[jax.Array]) -> tuple[jax.Array, Any, jax.Array]:
        """MultiCropWrapper: the backbone once per resolution group (crops concatenated), the head once on all.

        Returns (head outputs, crop-major; updated batch_stats; backbone features of the first group).
        """
        features, backbone_stats = [], batch_stats["backbone"]
        for crops in crop_groups:
            group_features, backbone_stats = apply_in_train_mode(self.backbone, params["backbone"], backbone_stats,
                                                                 crops)
            features.append(group_features)
        outputs, head_stats = apply_in_train_mode(self.head, params["head"], batch_stats["head"],
                                                  jnp.concatenate(features))
        return outputs, {"backbone": backbone_stats, "head": head_stats}, features[0]

    def train_step(self, state: DinoState, batch: Mapping[str, jax.Array]) -> tuple[DinoState, dict]:
        """main_dino.py's iteration: teacher on the global crops, student on all, loss, clipped AdamW step of
        the student (last layer frozen in the first epochs), then the teacher's EMA towards the new student."""
        keys = self.views.image_keys
        num_global = self.views.num_global_crops
        global_crops = jnp.concatenate([batch[key] for key in keys[:num_global]])
        groups = [global_crops] + ([jnp.concatenate([batch[key] for key in keys[num_global:]])]
                                   if len(keys) > num_global else [])
        teacher_outputs, teacher_batch_stats, teacher_features = self.forward(
            state.teacher_params, state.teacher_batch_stats, [global_crops])
        epoch = jnp.minimum(state.step // self.steps_per_epoch, len(self.teacher_temperatures) - 1)
        teacher_temp = jnp.asarray(self.teacher_temperatures, jnp.float32)[epoch]
        d = self.config.dino

        def loss_fn(params):
            outputs, batch_stats, features = self.forward(params, state.batch_stats, groups)
            loss = parts.dino_loss(outputs, teacher_outputs, state.center, student_temp=d.student_temp,
                                   teacher_temp=teacher_temp, num_global_crops=num_global, num_crops=len(keys))
            return loss, (batch_stats, features)

        (loss, (batch_stats, student_features)), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
        updates, opt_state = self.optimizer.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        momentum = parts.schedule_from_array(self.teacher_momentums)(state.step)
        teacher_params = parts.ema_update(state.teacher_params, params, momentum)
        metrics = {"loss": loss, "teacher_temp": teacher_temp, "grad_norm/student": optax.tree.norm(grads),
                   "param_norm/teacher": optax.tree.norm(teacher_params["backbone"])}
        new_state = state.replace(step=state.step + 1, params=params, batch_stats=batch_stats,
                                  teacher_params=teacher_params, teacher_batch_stats=teacher_batch_stats,
                                  opt_state=opt_state,
                                  center=parts.update_center(state.center, teacher_outputs, d.center_momentum))
        return track_collapse(state, new_state, metrics, {"student": student_features, "teacher": teacher_features})

    def backbone_variables(self, state: DinoState) -> dict[str, dict[str, Any]]:
        """The teacher's backbone, without the DINO head."""
        variables = {"params": state.teacher_params["backbone"]}
        if state.teacher_batch_stats["backbone"]:
            variables["batch_stats"] = state.teacher_batch_stats["backbone"]
        return {self.arm: variables}

    def scalars(self, state: DinoState) -> dict[str, float]:
        """The schedules' values at the last step taken."""
        last = min(max(int(jax.device_get(state.step)) - 1, 0), len(self.learning_rates) - 1)
        return {"lr": float(self.learning_rates[last]), "weight_decay": float(self.weight_decays[last]),
                "teacher_momentum": float(self.teacher_momentums[last])}


def build(config: ml_collections.ConfigDict, total_steps: int, steps_per_epoch: int) -> Dino:
    """DINO from `config.dino` and the backbone arm it names; schedules span `config.num_epochs` epochs."""
    d = config_block(config, "dino")
    if d.arm not in ("cnn", "vit"):
        raise ValueError(f"config.dino.arm={d.arm!r}; use 'vit' or 'cnn' (the config block naming the backbone).")
    arm_config = config[d.arm]
    kwargs = {"kernel_grad": arm_config.kernel_grad}
    if arm_config.name.startswith("vit"):
        kwargs.update(img_size=d.global_crop_size, interpolate_pos_encoding=True,
                      last_block_class_token_only=arm_config.last_block_class_token_only)
    backbone = create_model(arm_config.name, num_classes=0, dtype=jnp.dtype(config.dtype), **kwargs)
    if is_vit(backbone) and (d.global_crop_size % backbone.patch_size or d.local_crop_size % backbone.patch_size):
        raise ValueError(f"DINO crop sizes {d.global_crop_size} and {d.local_crop_size} must be multiples of the "
                         f"ViT patch size {backbone.patch_size}.")
    head = parts.DINOHead(out_dim=d.out_dim, use_bn=d.use_bn_in_head, norm_last_layer=d.norm_last_layer,
                          hidden_dim=d.hidden_dim, bottleneck_dim=d.bottleneck_dim,
                          kernel_grad=arm_config.kernel_grad)
    epochs = config.num_epochs
    learning_rates = parts.cosine_scheduler(
        d.lr * config.batch_size / 256.0, d.min_lr, epochs, steps_per_epoch,
        warmup_epochs=clamp_warmup_epochs(d.warmup_epochs, epochs, "DINO learning-rate"))
    weight_decays = parts.cosine_scheduler(d.weight_decay, d.weight_decay_end, epochs, steps_per_epoch)
    optimizers = {"adamw": parts.adamw_dino, "sgd": parts.sgd_dino}
    if d.optimizer not in optimizers:
        raise ValueError(f"config.dino.optimizer={d.optimizer!r}; use 'adamw' (main_dino.py's default) or 'sgd' "
                         "(its ResNet-50 recipe).")
    optimizer = optax.chain(
        parts.clip_gradients_per_tensor(d.clip_grad),
        optimizers[d.optimizer](learning_rates, weight_decays, norm_last_layer=d.norm_last_layer,
                                freeze_last_layer_steps=d.freeze_last_layer * steps_per_epoch))
    views = DinoMultiCrop(
        global_crop_size=d.global_crop_size, local_crop_size=d.local_crop_size,
        global_crops_scale=tuple(d.global_crops_scale), local_crops_scale=tuple(d.local_crops_scale),
        local_crops_number=d.local_crops_number, gray_fast_path=bool(config.data.get("gray_fast_path", True)))
    return Dino(
        config=config, arm=d.arm, backbone=backbone, head=head, optimizer=optimizer, views=views,
        steps_per_epoch=steps_per_epoch, learning_rates=learning_rates, weight_decays=weight_decays,
        teacher_momentums=parts.cosine_scheduler(d.momentum_teacher, 1.0, epochs, steps_per_epoch),
        teacher_temperatures=parts.teacher_temperature_schedule(
            epochs, d.warmup_teacher_temp, d.teacher_temp,
            clamp_warmup_epochs(d.warmup_teacher_temp_epochs, epochs, "DINO teacher-temperature")))
