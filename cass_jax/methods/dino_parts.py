"""DINO's building blocks (facebookresearch/dino main_dino.py, utils.py, vision_transformer.py) as pure JAX.

Head, loss and centring, schedules, teacher EMA, per-tensor clipping, last-layer freezing and the AdamW / SGD
parameter groups, each matching the official defaults; `methods/dino.py` wires them into the loop.
"""

from __future__ import annotations

import functools
import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import linen as nn

from cass_jax import onednn
from cass_jax.models.kernel_grad import dense_function, resolve_kernel_grad
from cass_jax.models.vit import exact_gelu

PyTree = Any
LAST_LAYER_PREFIX = "last_layer"  # official: every parameter whose name contains "last_layer"
LAST_LAYER_SCALE = "last_layer_g"


def torch_trunc_normal(stddev: float = 0.02, lower: float = -2.0, upper: float = 2.0) -> nn.initializers.Initializer:
    """timm/DINO `trunc_normal_(std=.02)`: N(0, std) cut at the absolute values [-2, 2], not at +-2 std.

    Flax's `truncated_normal(stddev)` cuts at +-2 std and rescales; DINO's cut at +-2 is ~100 std away, so
    its weights are effectively plain N(0, .02). This reproduces it exactly.
    """

    def init(key: jax.Array, shape: tuple[int, ...], dtype: Any = jnp.float32) -> jax.Array:
        unit = jax.random.truncated_normal(key, lower / stddev, upper / stddev, shape, jnp.float32)
        return (unit * stddev).astype(dtype)

    return init


def _torch_linear_uniform(key: jax.Array, shape: tuple[int, ...], dtype: Any = jnp.float32) -> jax.Array:
    """torch nn.Linear's default weight init, U(-1/sqrt(fan_in), 1/sqrt(fan_in)), for a (in, out) kernel."""
    bound = 1.0 / math.sqrt(shape[0])
    return jax.random.uniform(key, shape, dtype, -bound, bound)


class DINOHead(nn.Module):
    """DINO projection head: MLP -> L2-normalised bottleneck -> weight-normalised Linear to `out_dim` logits.

    The last layer is torch's `weight_norm(Linear(bottleneck, out_dim, bias=False))` written out: parameters
    `last_layer_v` (bottleneck, out_dim) and `last_layer_g` (out_dim,), effective kernel column j =
    g_j * v[:, j] / ||v[:, j]|| (torch's norm over dim 0 of the (out, in) weight). g starts at 1; with
    `norm_last_layer` it is never trained (`adamw_dino` keeps it fixed), so every output unit has a unit-norm
    weight, which the DINO authors found stabilises training. `last_layer_v` keeps torch's default Linear
    init (the official `_init_weights` runs before the layer is built); the MLP uses trunc_normal(.02), bias 0.
    """

    out_dim: int = 65536
    use_bn: bool = False
    norm_last_layer: bool = True
    nlayers: int = 3
    hidden_dim: int = 2048
    bottleneck_dim: int = 256
    kernel_grad: str = "auto"  # which kernels the products use (cass_jax/models/kernel_grad.py)

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = True) -> jax.Array:
        """(batch, in_dim) features -> (batch, out_dim) logits. `train` only matters with `use_bn`."""
        nlayers = max(self.nlayers, 1)
        widths = [self.hidden_dim] * (nlayers - 1) + [self.bottleneck_dim]
        for i, width in enumerate(widths):
            x = nn.Dense(width, kernel_init=torch_trunc_normal(0.02), bias_init=nn.initializers.zeros,
                         dot_general=dense_function(self.kernel_grad), name=f"mlp_{i}")(x)
            if i < len(widths) - 1:
                if self.use_bn:
                    x = nn.BatchNorm(use_running_average=not train, momentum=0.9, epsilon=1e-5, name=f"bn_{i}")(x)
                x = exact_gelu(x)
        x = x / jnp.maximum(jnp.linalg.norm(x, axis=-1, keepdims=True), 1e-12)  # F.normalize(x, dim=-1)
        v = self.param("last_layer_v", _torch_linear_uniform, (self.bottleneck_dim, self.out_dim))
        g = self.param("last_layer_g", nn.initializers.ones, (self.out_dim,))
        product = dense_function(self.kernel_grad) or jax.lax.dot_general
        kernel = weight_normalized_kernel(v, g, self.kernel_grad)
        return product(x, kernel, (((x.ndim - 1,), (0,)), ((), ())))


def _column_sums(x: jax.Array, kernel_grad: str) -> jax.Array:
    """Sums over the rows of a (rows, columns) matrix as a vector-matrix product: XLA:CPU reduces the leading axis
    of a wide matrix (65,536 columns) one strided column at a time, about 3x slower than this. Under oneDNN
    kernels the product is oneDNN's: XLA fuses the multiply that makes `x` into its own product, which then runs
    as a plain loop (0.4 GFLOP/s, ~90 ms per DINO step on one core)."""
    if resolve_kernel_grad(kernel_grad) == "onednn" and x.dtype == jnp.float32:
        return onednn.matmul(jnp.ones((1, 1, x.shape[0]), x.dtype), x[None])[0, 0]
    return jnp.ones((x.shape[0],), x.dtype) @ x


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def weight_normalized_kernel(v: jax.Array, g: jax.Array, kernel_grad: str = "auto") -> jax.Array:
    """torch's weight_norm kernel, column j = g_j * v[:, j] / ||v[:, j]||, for a (in, out) `v` and (out,) `g`.

    The gradient is written out so that its per-column sums are products too (`_column_sums`): autodiff's
    leading-axis reductions made DINO's 65,536-wide last layer cost ~1 s per step on 2 CPU cores.
    """
    return v * (g / jnp.sqrt(_column_sums(v * v, kernel_grad)))


def _weight_normalized_kernel_forward(v, g, kernel_grad):
    norms = jnp.sqrt(_column_sums(v * v, kernel_grad))
    return v * (g / norms), (v, g, norms)


def _weight_normalized_kernel_backward(kernel_grad, residuals, grad_kernel):
    v, g, norms = residuals
    # kernel = v * g / n with n = ||v||: d/dv = grad * g / n - v * g * <grad, v> / n^3; d/dg = <grad, v> / n.
    along_v = _column_sums(grad_kernel * v, kernel_grad)
    return grad_kernel * (g / norms) - v * (g * along_v / norms ** 3), along_v / norms


weight_normalized_kernel.defvjp(_weight_normalized_kernel_forward, _weight_normalized_kernel_backward)


def dino_loss(
    student_outputs: jax.Array,
    teacher_outputs: jax.Array,
    center: jax.Array,
    *,
    student_temp: float = 0.1,
    teacher_temp: float | jax.Array,
    num_global_crops: int = 2,
    num_crops: int,
) -> jax.Array:
    """Cross-entropy between the centred, sharpened teacher softmax and the student's, over crop pairs.

    `student_outputs` is (num_crops * B, D), crop-major as the official MultiCropWrapper stacks it (all images'
    crop 0, then crop 1, ...), with the `num_global_crops` global crops first; `teacher_outputs` is
    (num_global_crops * B, D) for the same global crops. Each (teacher crop i, student crop v != i) pair
    contributes the batch mean of -sum(q * log p); the loss is the mean over pairs. The teacher side is a
    constant (stop_gradient). Pure: call `update_center` with the same `teacher_outputs` afterwards, as
    the official forward does after computing the loss.
    """
    dim = student_outputs.shape[-1]
    student = student_outputs.astype(jnp.float32).reshape(num_crops, -1, dim) / student_temp
    teacher = teacher_outputs.astype(jnp.float32).reshape(num_global_crops, -1, dim)
    q = jax.lax.stop_gradient(jax.nn.softmax((teacher - center.astype(jnp.float32)) / teacher_temp, axis=-1))
    # -sum_d q_i log_softmax(s_v) = logsumexp(s_v) * sum_d q_i - <q_i, s_v>: the pairs' sum needs no
    # (pairs x batch x dim) contraction (slow on XLA:CPU), its gradient is elementwise, and every local crop meets
    # the same teachers, so their sum meets the teachers' sum once. Same value as the official form up to rounding.
    log_normalizers = jax.nn.logsumexp(student, axis=-1)  # (num_crops, batch)
    masses = jnp.sum(q, axis=-1)                          # (num_global_crops, batch); 1 up to rounding
    total = 0.0
    for v in range(num_global_crops):
        for i in range(num_global_crops):
            if i != v:
                total += jnp.sum(log_normalizers[v] * masses[i]) - jnp.sum(q[i] * student[v])
    if num_crops > num_global_crops:
        total += (jnp.sum(log_normalizers[num_global_crops:] * jnp.sum(masses, axis=0))
                  - jnp.sum(jnp.sum(q, axis=0) * jnp.sum(student[num_global_crops:], axis=0)))
    num_terms = num_global_crops * num_crops - num_global_crops
    return total / (student.shape[1] * num_terms)


def update_center(center: jax.Array, teacher_outputs: jax.Array, momentum: float = 0.9) -> jax.Array:
    """EMA of the teacher's mean output over all global crops of the batch, the centre that prevents collapse.

    The official code all_reduces the per-GPU sums and divides by the global row count; under jit with a
    globally sharded `teacher_outputs` the plain mean below is that same global mean.
    """
    batch_center = jnp.mean(teacher_outputs.astype(jnp.float32), axis=0, keepdims=True).reshape(center.shape)
    return center * momentum + batch_center * (1.0 - momentum)


def cosine_scheduler(
    base_value: float,
    final_value: float,
    epochs: int,
    niter_per_ep: int,
    warmup_epochs: int = 0,
    start_warmup_value: float = 0,
) -> np.ndarray:
    """utils.cosine_scheduler: per-step values, linear warm-up then a half cosine from base to final.

    DINO uses it for the lr (base 0.0005 * batch / 256, final 1e-6, 10 warm-up epochs), the weight decay
    (0.04 -> 0.4) and the teacher momentum (0.996 -> 1). Index it with the global step.
    """
    warmup_schedule = np.array([])
    warmup_iters = warmup_epochs * niter_per_ep
    if warmup_epochs > 0:
        warmup_schedule = np.linspace(start_warmup_value, base_value, warmup_iters)
    iters = np.arange(epochs * niter_per_ep - warmup_iters)
    schedule = final_value + 0.5 * (base_value - final_value) * (1 + np.cos(np.pi * iters / len(iters)))
    schedule = np.concatenate((warmup_schedule, schedule))
    if len(schedule) != epochs * niter_per_ep:
        raise ValueError(f"schedule has {len(schedule)} steps, expected {epochs} x {niter_per_ep}")
    return schedule


def teacher_temperature_schedule(
    epochs: int,
    warmup_teacher_temp: float = 0.04,
    teacher_temp: float = 0.04,
    warmup_teacher_temp_epochs: int = 0,
) -> np.ndarray:
    """DINOLoss.teacher_temp_schedule: one temperature per epoch, linear warm-up then constant.

    A warm-up from a lower temperature guards against early instability; the official default is none.
    """
    return np.concatenate((
        np.linspace(warmup_teacher_temp, teacher_temp, warmup_teacher_temp_epochs),
        np.ones(epochs - warmup_teacher_temp_epochs) * teacher_temp,
    ))


def schedule_from_array(values: np.ndarray) -> optax.Schedule:
    """Turns a per-step array (e.g. `cosine_scheduler`'s) into an optax schedule; steps past the end hold."""
    table = jnp.asarray(values, jnp.float32)
    return lambda step: table[jnp.clip(step, 0, table.shape[0] - 1)]


def ema_update(teacher_params: PyTree, student_params: PyTree, momentum: float | jax.Array) -> PyTree:
    """Teacher <- m * teacher + (1 - m) * student, leaf by leaf (the official no_grad parameter loop)."""
    return jax.tree.map(lambda t, s: t * momentum + (1.0 - momentum) * s.astype(t.dtype),
                        teacher_params, student_params)


def clip_gradients_per_tensor(max_norm: float = 3.0) -> optax.GradientTransformation:
    """utils.clip_gradients: each gradient tensor alone is scaled by max_norm / (||g|| + 1e-6) when that is < 1.

    Unlike optax.clip_by_global_norm, one large tensor does not shrink the others. `max_norm <= 0` disables
    clipping, as `--clip_grad 0` does.
    """
    if max_norm <= 0:
        return optax.identity()

    def clip(gradient: jax.Array) -> jax.Array:
        coefficient = max_norm / (jnp.linalg.norm(gradient.astype(jnp.float32).ravel()) + 1e-6)
        return gradient * jnp.minimum(coefficient, 1.0).astype(gradient.dtype)

    def update_fn(updates: PyTree, state: optax.EmptyState, params: PyTree = None) -> tuple[PyTree, optax.EmptyState]:
        del params
        return jax.tree.map(clip, updates), state

    return optax.GradientTransformation(lambda params: optax.EmptyState(), update_fn)


def _leaf_name(path: tuple[Any, ...]) -> str:
    key = path[-1] if path else None
    return str(getattr(key, "key", getattr(key, "name", key)))


def _is_last_layer(path: tuple[Any, ...]) -> bool:
    return _leaf_name(path).startswith(LAST_LAYER_PREFIX)


def freeze_last_layer(grads: PyTree, step: int | jax.Array, steps_per_epoch: int, freeze_epochs: int = 1) -> PyTree:
    """utils.cancel_gradients_last_layer: zero the head's last-layer gradients while epoch < freeze_epochs.

    Holding the output layer still for the first epoch lets the rest of the network settle first. Zeroed
    gradients are not quite torch's `p.grad = None` under AdamW (decay still applies and Adam's shared step
    count runs on); `adamw_dino(freeze_last_layer_steps=...)` reproduces the official step exactly.
    """
    frozen = step // steps_per_epoch < freeze_epochs

    def cancel(path: tuple[Any, ...], gradient: jax.Array) -> jax.Array:
        if not _is_last_layer(path):
            return gradient
        return jnp.where(frozen, jnp.zeros_like(gradient), gradient)

    return jax.tree_util.tree_map_with_path(cancel, grads)


def _as_schedule(value: optax.ScalarOrSchedule | np.ndarray) -> optax.ScalarOrSchedule:
    is_table = isinstance(value, (np.ndarray, jax.Array)) and np.ndim(value) > 0
    return schedule_from_array(value) if is_table else value


def _parameter_groups(
    direction: optax.GradientTransformation,
    learning_rate_schedule: optax.ScalarOrSchedule | np.ndarray,
    weight_decay_schedule: optax.ScalarOrSchedule | np.ndarray,
    *,
    norm_last_layer: bool,
    freeze_last_layer_steps: int,
    coupled_decay: bool,
) -> optax.GradientTransformation:
    """DINO's parameter groups around one optimiser's update direction (Adam's moments, SGD's momentum).

    Decay applies only to tensors with ndim > 1 that are not biases (utils.get_params_groups): after the direction
    (decoupled, AdamW) or added to the gradient before it (coupled, torch SGD). `last_layer_g` never moves when
    `norm_last_layer` (requires_grad=False upstream). For the first `freeze_last_layer_steps` steps the
    `last_layer*` tensors get no update, no decay and no optimiser-state change, their state starting when they
    unfreeze: torch's behaviour for parameters whose grad is None.
    """

    def labels(params: PyTree) -> PyTree:
        def label(path: tuple[Any, ...], _: Any) -> str:
            if norm_last_layer and _leaf_name(path) == LAST_LAYER_SCALE:
                return "fixed"
            return "last_layer" if _is_last_layer(path) else "body"

        return jax.tree_util.tree_map_with_path(label, params)

    def decayed(params: PyTree) -> PyTree:
        return jax.tree_util.tree_map_with_path(lambda path, p: p.ndim > 1 and _leaf_name(path) != "bias", params)

    def last_layer(params: PyTree) -> PyTree:
        return jax.tree_util.tree_map_with_path(lambda path, _: _is_last_layer(path), params)

    def unfrozen(step: jax.Array) -> jax.Array:
        return step >= freeze_last_layer_steps

    grouped = optax.multi_transform(
        {"body": direction, "last_layer": optax.transforms.conditionally_mask(direction, unfrozen),
         "fixed": optax.set_to_zero()},
        labels,
    )
    decay = optax.masked(optax.inject_hyperparams(optax.add_decayed_weights)(
        weight_decay=_as_schedule(weight_decay_schedule)), decayed)
    return optax.chain(
        *((decay, grouped) if coupled_decay else (grouped, decay)),
        optax.scale_by_learning_rate(_as_schedule(learning_rate_schedule)),
        optax.masked(optax.transforms.conditionally_mask(optax.identity(), unfrozen), last_layer),
    )


def adamw_dino(
    learning_rate_schedule: optax.ScalarOrSchedule | np.ndarray,
    weight_decay_schedule: optax.ScalarOrSchedule | np.ndarray,
    *,
    norm_last_layer: bool = True,
    freeze_last_layer_steps: int = 0,
    b1: float = 0.9,
    b2: float = 0.999,
    eps: float = 1e-8,
) -> optax.GradientTransformation:
    """torch AdamW over DINO's parameter groups (`_parameter_groups`), with per-step lr and weight-decay schedules.

    main_dino.py's default optimiser (`--optimizer adamw`, its ViT recipe). Schedules may be optax schedules or
    per-step arrays (`cosine_scheduler`). Chain after `clip_gradients_per_tensor`, as the official step clips,
    cancels, then steps.
    """
    return _parameter_groups(optax.scale_by_adam(b1=b1, b2=b2, eps=eps), learning_rate_schedule,
                             weight_decay_schedule, norm_last_layer=norm_last_layer,
                             freeze_last_layer_steps=freeze_last_layer_steps, coupled_decay=False)


def sgd_dino(
    learning_rate_schedule: optax.ScalarOrSchedule | np.ndarray,
    weight_decay_schedule: optax.ScalarOrSchedule | np.ndarray,
    *,
    norm_last_layer: bool = True,
    freeze_last_layer_steps: int = 0,
    momentum: float = 0.9,
) -> optax.GradientTransformation:
    """torch SGD (momentum 0.9, L2 decay added to the gradient) over DINO's parameter groups.

    main_dino.py's `--optimizer sgd`, which its README uses for ResNet-50 (lr 0.03, weight decay 1e-4 throughout).
    Chain after `clip_gradients_per_tensor`, as `adamw_dino`.
    """
    return _parameter_groups(optax.trace(decay=momentum), learning_rate_schedule, weight_decay_schedule,
                             norm_last_layer=norm_last_layer, freeze_last_layer_steps=freeze_last_layer_steps,
                             coupled_decay=True)

