"""Segmentation losses of SSL4MIS's cross teaching: pixel cross-entropy, its soft Dice loss, the sigmoid ramp-up.

Pure jnp functions on NHWC logits / probabilities and integer masks; tests check them against NumPy renderings of
SSL4MIS's `code/utils/losses.py` (`DiceLoss`) and `code/utils/ramps.py` (`sigmoid_rampup`).
"""

import jax
import jax.numpy as jnp
import optax

# SSL4MIS's DiceLoss smoothing constant, added to numerator and denominator of every class's Dice.
DICE_SMOOTH = 1e-5


def cross_entropy(logits: jax.Array, labels: jax.Array) -> jax.Array:
    """Mean over every pixel of -log softmax(logits)[label]: torch's CrossEntropyLoss() on (B, C, H, W) logits.

    logits (B, H, W, C), labels (B, H, W) integer class indices; computed in float32. The one-hot form keeps the
    backward pass elementwise (the integer-label form gathers, and its scatter-add transpose is slow to compile).
    """
    one_hot = jax.nn.one_hot(labels, logits.shape[-1], dtype=jnp.float32)
    return optax.softmax_cross_entropy(logits.astype(jnp.float32), one_hot).mean()


def dice_loss(probabilities: jax.Array, labels: jax.Array, num_classes: int) -> jax.Array:
    """SSL4MIS's `DiceLoss(num_classes)(probabilities, labels)`: the mean over all classes, background included.

    Per class c, over the whole batch and every pixel: 1 - (2 sum(p_c t_c) + 1e-5) / (sum(p_c^2) + sum(t_c^2) + 1e-5)
    with t_c the one-hot target; the class losses are summed and divided by num_classes. `probabilities` are the
    softmax outputs (B, H, W, C) (SSL4MIS calls it with softmax=False on already-softmaxed outputs).
    """
    probabilities = probabilities.astype(jnp.float32)
    target = jax.nn.one_hot(labels, num_classes, dtype=jnp.float32)
    axes = tuple(range(probabilities.ndim - 1))
    intersection = jnp.sum(probabilities * target, axis=axes)
    prediction_sum = jnp.sum(probabilities * probabilities, axis=axes)
    target_sum = jnp.sum(target * target, axis=axes)
    dice = (2.0 * intersection + DICE_SMOOTH) / (prediction_sum + target_sum + DICE_SMOOTH)
    return jnp.sum(1.0 - dice) / num_classes


def sigmoid_rampup(current: jax.Array | float, rampup_length: float) -> jax.Array:
    """exp(-5 (1 - clip(current, 0, L) / L)^2), 1 when L == 0 (Laine & Aila 2017; SSL4MIS's ramps.sigmoid_rampup)."""
    if rampup_length == 0:
        return jnp.ones((), jnp.float32)
    current = jnp.clip(jnp.asarray(current, jnp.float32), 0.0, rampup_length)
    phase = 1.0 - current / rampup_length
    return jnp.exp(-5.0 * phase * phase)


def consistency_weight(step: jax.Array | int, consistency: float = 0.1, rampup_length: float = 200.0,
                       rampup_every: int = 150) -> jax.Array:
    """The pseudo-label loss weight at `step` completed iterations: consistency * sigmoid_rampup(step // 150, 200).

    SSL4MIS's cross-teaching script ramps on `iter_num // 150` over 200, so the weight reaches 0.1 at 30,000 steps.
    """
    return consistency * sigmoid_rampup(jnp.asarray(step) // rampup_every, rampup_length)
