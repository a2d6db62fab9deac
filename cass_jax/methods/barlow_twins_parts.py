"""Barlow Twins' building blocks (facebookresearch/barlowtwins main.py) and the skin-cancer study's further pretraining.

Projector, loss, LARS and its learning-rate schedule match the official defaults; `trainable_mask`,
`further_pretraining_optimizer`, `one_cycle_schedule` and the projector sparsity penalties reproduce the
further-pretraining protocol of Haggerty & Chandra. `methods/barlow_twins.py` wires them into the loop.

Sources for the further-pretraining protocol:
- H. Haggerty, R. Chandra, "Self-supervised learning for skin cancer diagnosis with limited training data",
  arXiv:2401.00692 (https://arxiv.org/abs/2401.00692): a ResNet-50 pretrained on ImageNet (supervised or with
  Barlow Twins) is further pretrained with Barlow Twins on the task's images, then fine-tuned.
- Its code, github.com/hamish-haggerty/base_rbt (base_rbt/base_model.py, configs/isic/bt_isic*.yaml) and
  github.com/hamish-haggerty/cancer-proj, built on fastai: `BarlowTrainer.bt_transfer_learning` freezes the
  encoder and fits the new projector for `freeze_epochs: 1` epoch (fastai `Learner.fit`: Adam, constant lr
  1e-3), then unfreezes the whole encoder ("SSLf") or only `encoder[-3][-1]`, the last bottleneck of
  ResNet-50's last stage (`splitter_str: my_splitter_bt_last_block_resnet50`, "SSLp"), and runs
  `fit_one_cycle(epochs, lr_find().valley)`. Configs: batch 128, 256 px, projector 8192-8192-8192, lambda
  1/8192, weight decay 1.5e-6, `model_type: sparse_head_barlow_twins` with `sparsity_level: 0.01`, whose loss
  adds 0.01 * sum_j ||W[:, j]||_2 over the last projector Linear's (out, in) weight W (`lf_bt_sparse_head`):
  a group-lasso (L2,1) norm. `l1_penalty` is the element-wise L1 norm; `group_sparsity_penalty` is the norm
  that code computes.
The paper's full text was not available to check the wording against; the code above is the reference.
"""

from __future__ import annotations

import math
import re
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import optax
from flax import linen as nn

from cass_jax.models.kernel_grad import dense_function
from cass_jax.models.resnet import BatchNorm, linear_kernel_init

PyTree = Any

LAMBDA = 0.0051  # official --lambd: weight of the off-diagonal (redundancy) term
WEIGHTS_LEARNING_RATE = 0.2  # official --learning-rate-weights, per 256 images of batch
BIASES_LEARNING_RATE = 0.0048  # official --learning-rate-biases (biases and BatchNorm parameters)
WEIGHT_DECAY = 1.5e-6  # the paper's value; main.py's --weight-decay default is 1e-6
FURTHER_PRETRAINING_MODES = ("projector_only", "full", "partial")
_RESNET_BLOCK = re.compile(r"layer(\d+)_(\d+)")


class BarlowTwinsProjector(nn.Module):
    """The official projector: (Linear without bias -> BatchNorm1d -> ReLU) per hidden size, then a Linear.

    `sizes` is the official `--projector` without the encoder width (the input width is inferred).
    Parameters are named `linear_<i>` and `bn_<i>`; BatchNorm has PyTorch semantics (momentum 0.1 in
    torch terms, eps 1e-5, unbiased running variance) and the kernels torch's default Linear init.
    """

    sizes: Sequence[int] = (8192, 8192, 8192)
    dtype: Any = jnp.float32
    kernel_grad: str = "auto"  # which kernels the products use (cass_jax/models/kernel_grad.py)

    @nn.compact
    def __call__(self, x: jax.Array, train: bool) -> jax.Array:
        for i, features in enumerate(self.sizes[:-1]):
            x = nn.Dense(features, use_bias=False, dtype=self.dtype, param_dtype=jnp.float32,
                         kernel_init=linear_kernel_init, dot_general=dense_function(self.kernel_grad),
                         name=f"linear_{i}")(x)
            x = nn.relu(BatchNorm(momentum=0.9, epsilon=1e-5, dtype=self.dtype, name=f"bn_{i}")(x, train))
        return nn.Dense(self.sizes[-1], use_bias=False, dtype=self.dtype, param_dtype=jnp.float32,
                        kernel_init=linear_kernel_init, dot_general=dense_function(self.kernel_grad),
                        name=f"linear_{len(self.sizes) - 1}")(x)


def _standardise(z: jax.Array, epsilon: float) -> jax.Array:
    """BatchNorm1d(affine=False) in training mode: per-feature (z - mean) / sqrt(biased var + eps)."""
    mean = jnp.mean(z, axis=0)
    variance = jnp.mean(jnp.square(z - mean), axis=0)
    return (z - mean) * jax.lax.rsqrt(variance + epsilon)


def barlow_twins_loss(
    z1: jax.Array, z2: jax.Array, lambd: float = LAMBDA, epsilon: float = 1e-5
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Barlow Twins loss of two (N, D) embedding batches: sum_i (1 - C_ii)^2 + lambd * sum_{i!=j} C_ij^2.

    C = bn(z1).T @ bn(z2) / N is the cross-correlation of the standardised embeddings (the official
    code divides by the global batch and all-reduces over GPUs; under jit the batch is already global).
    Computed in float32 with a full-precision matmul. Returns (loss, {"on_diagonal", "off_diagonal"}),
    the off-diagonal sum not yet weighted by lambd.
    """
    z1 = _standardise(z1.astype(jnp.float32), epsilon)
    z2 = _standardise(z2.astype(jnp.float32), epsilon)
    c = jnp.matmul(z1.T, z2, precision=jax.lax.Precision.HIGHEST) / z1.shape[0]
    on_diagonal = jnp.sum(jnp.square(jnp.diagonal(c) - 1.0))
    rows = jnp.arange(c.shape[0])[:, None]
    columns = jnp.arange(c.shape[1])[None, :]
    off_diagonal = jnp.sum(jnp.square(jnp.where(rows == columns, 0.0, c)))
    loss = on_diagonal + lambd * off_diagonal
    return loss, {"on_diagonal": on_diagonal, "off_diagonal": off_diagonal}


def _is_weight(params: PyTree) -> PyTree:
    """True for the leaves LARS adapts and decays: everything but 1-D ones (biases, BatchNorm scale/bias)."""
    return jax.tree.map(lambda p: p.ndim != 1, params)


def _is_bias_or_norm(params: PyTree) -> PyTree:
    return jax.tree.map(lambda p: p.ndim == 1, params)


def lars(
    learning_rate: optax.ScalarOrSchedule,
    weight_decay: float = WEIGHT_DECAY,
    momentum: float = 0.9,
    eta: float = 0.001,
    bias_learning_rate: optax.ScalarOrSchedule | None = None,
) -> optax.GradientTransformation:
    """The official LARS: dp = g + wd * p; dp *= eta * ||p|| / ||dp||; mu = momentum * mu + dp; p -= lr * mu.

    Biases and BatchNorm parameters (ndim == 1) get neither weight decay nor the trust ratio, and use
    `bias_learning_rate` (the official second parameter group; defaults to `learning_rate`). The trust
    ratio is 1 where ||p|| or ||dp|| is 0.

    Not `optax.lars`: it scales by the learning rate *before* the momentum trace (mu = m * mu - lr * dp),
    so each step's lr stays baked into the buffer, while the official code multiplies the whole buffer by
    the current lr. The two agree only for a constant lr, not under the warm-up/cosine schedule. It also
    has one learning rate for all leaves.
    """
    bias_learning_rate = learning_rate if bias_learning_rate is None else bias_learning_rate
    return optax.chain(
        optax.add_decayed_weights(weight_decay, mask=_is_weight),
        optax.masked(optax.scale_by_trust_ratio(trust_coefficient=eta), _is_weight),
        optax.trace(decay=momentum),
        optax.masked(optax.scale_by_learning_rate(learning_rate), _is_weight),
        optax.masked(optax.scale_by_learning_rate(bias_learning_rate), _is_bias_or_norm),
    )


def barlow_twins_lr_schedule(
    batch_size: int,
    steps_per_epoch: int,
    num_epochs: int,
    base_learning_rate: float = WEIGHTS_LEARNING_RATE,
    warmup_epochs: int = 10,
) -> optax.Schedule:
    """The official `adjust_learning_rate`, per step: lr = base_learning_rate * batch_size / 256 * f(step).

    f rises linearly from 0 over `warmup_epochs`, then follows a cosine from 1 to 0.001 at the last step.
    Use WEIGHTS_LEARNING_RATE (0.2) for the weights and BIASES_LEARNING_RATE (0.0048) for biases and
    BatchNorm parameters (`lars(..., bias_learning_rate=...)`).
    """
    scale = base_learning_rate * batch_size / 256
    warmup_steps = warmup_epochs * steps_per_epoch
    decay_steps = max(num_epochs * steps_per_epoch - warmup_steps, 1)

    def schedule(step: jax.Array | int) -> jax.Array:
        step = jnp.asarray(step, jnp.float32)
        warmup = step / max(warmup_steps, 1)
        q = 0.5 * (1.0 + jnp.cos(math.pi * (step - warmup_steps) / decay_steps))
        cosine = q + 0.001 * (1.0 - q)
        return scale * jnp.where(step < warmup_steps, warmup, cosine)

    return schedule


def final_resnet_block(encoder_params: PyTree) -> str:
    """Name of the last block of the last stage in this repo's ResNet naming (`layer4_2` in ResNet-50).

    The skin-cancer study's "partial" further pretraining (SSLp) trains only this bottleneck block.
    """
    blocks = [tuple(map(int, match.groups())) for name in encoder_params
              if (match := _RESNET_BLOCK.fullmatch(str(name)))]
    if not blocks:
        raise ValueError(f"No ResNet blocks (layer<stage>_<index>) among the encoder parameters "
                         f"{list(encoder_params)}.")
    stage, index = max(blocks)
    return f"layer{stage}_{index}"


def trainable_mask(params: PyTree, mode: str, train_batch_norm: bool = False) -> PyTree:
    """Booleans, shaped like `params` = {"encoder": ..., "projector": ...}: which leaves further pretraining updates.

    mode "projector_only" (the first epoch, encoder frozen), "full" (SSLf, everything) or "partial" (SSLp:
    the projector and the encoder's final bottleneck block, `final_resnet_block`). fastai, which the study
    used, keeps BatchNorm layers trainable inside frozen groups (Learner's train_bn=True); pass
    `train_batch_norm=True` to reproduce that (every 1-D encoder leaf, i.e. ResNet BatchNorm scale and bias,
    becomes trainable). BatchNorm running statistics are not parameters: whether they update is the train
    step's choice (fastai updates them in the whole encoder, since the model runs in train mode).
    """
    if mode not in FURTHER_PRETRAINING_MODES:
        raise ValueError(f"Unknown further-pretraining mode {mode!r}; expected one of {FURTHER_PRETRAINING_MODES}.")
    if set(params) != {"encoder", "projector"}:
        raise ValueError(f"Expected parameters {{'encoder', 'projector'}}, got {sorted(params)}.")
    encoder = params["encoder"]
    final_block = final_resnet_block(encoder) if mode == "partial" else None

    def encoder_leaf(path: tuple[Any, ...], leaf: jax.Array) -> bool:
        if mode == "full":
            return True
        if train_batch_norm and leaf.ndim == 1:
            return True
        return final_block is not None and getattr(path[0], "key", None) == final_block

    return {
        "encoder": jax.tree_util.tree_map_with_path(encoder_leaf, encoder),
        "projector": jax.tree.map(lambda _: True, params["projector"]),
    }


def further_pretraining_optimizer(
    mask: PyTree,
    learning_rate: optax.ScalarOrSchedule,
    weight_decay: float = WEIGHT_DECAY,
    b1: optax.ScalarOrSchedule = 0.9,
    b2: float = 0.99,
    eps: float = 1e-5,
) -> optax.GradientTransformation:
    """fastai's Adam (the study's optimiser) on the leaves where `mask` is True; exactly zero updates elsewhere.

    fastai Adam: b1 0.9 (its `mom`), b2 0.99 (`sqr_mom`), eps 1e-5 outside the square root, decoupled
    weight decay (`decouple_wd=True`, as optax.adamw), none on biases and BatchNorm parameters
    (`wd_bn_bias=False`). fastai's `fit_one_cycle` also cycles b1 between 0.95 and 0.85: pass
    `b1=one_cycle_momentum_schedule(...)`. Frozen leaves go through `optax.set_to_zero`, so
    `optax.apply_updates` leaves them bitwise unchanged and they keep no optimiser state. The learning rate
    and b1 are in the state (`optax.inject_hyperparams`) for logging.
    """
    adam = optax.inject_hyperparams(optax.adamw, static_args=("mask",))(
        learning_rate=learning_rate, b1=b1, b2=b2, eps=eps, weight_decay=weight_decay, mask=_is_weight,
    )
    labels = jax.tree.map(lambda trainable: "trainable" if trainable else "frozen", mask)
    return optax.multi_transform({"trainable": adam, "frozen": optax.set_to_zero()}, labels)


def one_cycle_schedule(
    total_steps: int,
    max_lr: float,
    pct_start: float = 0.25,
    div_factor: float = 25.0,
    final_div_factor: float = 4e3,
) -> optax.Schedule:
    """fastai's `fit_one_cycle` learning rate: cosine from max_lr / 25 up to max_lr, then down to max_lr / 1e5.

    Defaults are fastai's (pct_start 0.25, div 25, div_final 1e5), which the study used, not PyTorch
    OneCycleLR's (pct_start 0.3, final lr = max_lr / 25 / 1e4). `final_div_factor` has optax's (and
    PyTorch's) meaning, final = max_lr / (div_factor * final_div_factor), so fastai's div_final 1e5 is
    4e3 here. optax puts the peak at step int(pct_start * total_steps), fastai at the fraction itself.
    """
    return optax.cosine_onecycle_schedule(total_steps, max_lr, pct_start=pct_start, div_factor=div_factor,
                                          final_div_factor=final_div_factor)


def one_cycle_momentum_schedule(
    total_steps: int, pct_start: float = 0.25, max_momentum: float = 0.95, min_momentum: float = 0.85
) -> optax.Schedule:
    """fastai's `fit_one_cycle` momentum (Adam's b1): cosine 0.95 -> 0.85 while the lr rises, back to 0.95."""
    return optax.piecewise_interpolate_schedule("cosine", max_momentum, {
        int(pct_start * total_steps): min_momentum / max_momentum,
        int(total_steps): max_momentum / min_momentum,
    })


def _last_linear_kernel(projector_params: PyTree) -> jax.Array:
    """Kernel (in, out) of the projector's last Dense (`linear_<highest i>`)."""
    indices = [int(name.split("_")[1]) for name in projector_params if str(name).startswith("linear_")]
    if not indices:
        raise ValueError(f"No linear_<i> layers among the projector parameters {list(projector_params)}.")
    return projector_params[f"linear_{max(indices)}"]["kernel"]


def l1_penalty(projector_params: PyTree, weight: float) -> jax.Array:
    """weight * sum |W| over the last projector Dense kernel: pushes the projection head towards sparsity."""
    return weight * jnp.sum(jnp.abs(_last_linear_kernel(projector_params).astype(jnp.float32)))


def group_sparsity_penalty(projector_params: PyTree, weight: float) -> jax.Array:
    """weight * sum_i ||W[i, :]||_2 over the last projector Dense kernel W (in, out): the study's code.

    `lf_bt_sparse_head` adds `torch.linalg.norm(projector[-1].weight, ord=2, dim=0).sum()`: one L2 norm
    per input feature (a column of torch's (out, in) weight, a row of the flax kernel), summed, so whole
    input features of the last layer are switched off.
    """
    kernel = _last_linear_kernel(projector_params).astype(jnp.float32)
    return weight * jnp.sum(jnp.sqrt(jnp.sum(jnp.square(kernel), axis=1)))
