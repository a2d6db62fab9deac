"""Loss functions, as pure jnp functions checked against NumPy references in tests.

`cass_loss` is the CASS objective; downstream and stabiliser losses live beside it.
"""

import jax
import jax.numpy as jnp
import numpy as np
import optax


def l2_normalize(x: jnp.ndarray, axis: int = -1, eps: float = 1e-12) -> jnp.ndarray:
    """Divides by the L2 norm along `axis`, like torch.nn.functional.normalize (norm clamped at eps)."""
    norm = jnp.sqrt(jnp.sum(jnp.square(x), axis=axis, keepdims=True))
    return x / jnp.maximum(norm, eps)


def cass_loss(cnn_logits: jnp.ndarray, vit_logits: jnp.ndarray) -> jnp.ndarray:
    """CASS loss: 2 - 2 * cos(cnn, vit) per image, averaged over the batch.

    Computed in float32 whatever the compute dtype of the arms.
    """
    r = l2_normalize(cnn_logits.astype(jnp.float32))
    t = l2_normalize(vit_logits.astype(jnp.float32))
    return jnp.mean(2.0 - 2.0 * jnp.sum(r * t, axis=-1))


CLASS_WEIGHT_SCHEMES = ("paper", "inverse", "none")


def class_weights(counts, scheme: str) -> np.ndarray:
    """Per-class loss weights from training-set class counts (positives per label when multi-label).

    - "paper": counts min-max normalised into [0.2, 1], as the official CASS code does (the commonest
      class gets 1.0, the rarest 0.2: proportional to frequency); all ones when every count is equal.
    - "inverse": inverse frequency, total / (num_classes * count), so the mean weight over training
      examples is 1; a class with no example is weighted as if it had one.
    - "none": all ones.
    """
    counts = np.asarray(counts, dtype=np.float64)
    if counts.ndim != 1 or counts.size == 0:
        raise ValueError(f"class counts must be a non-empty 1-D array; got shape {counts.shape}")
    if np.any(counts < 0) or counts.sum() == 0:
        raise ValueError(f"class counts must be >= 0 and not all 0; got {counts.tolist()}")
    if scheme == "none":
        weights = np.ones_like(counts)
    elif scheme == "paper":
        spread = counts.max() - counts.min()
        weights = np.ones_like(counts) if spread == 0 else 0.2 + 0.8 * (counts - counts.min()) / spread
    elif scheme == "inverse":
        weights = counts.sum() / (counts.size * np.maximum(counts, 1.0))
    else:
        raise ValueError(f"class_weights scheme {scheme!r} is unknown; use one of {CLASS_WEIGHT_SCHEMES}")
    return weights.astype(np.float32)


def focal_loss(
    logits: jnp.ndarray,
    labels: jnp.ndarray,
    *,
    multi_label: bool,
    alpha: float = 1.0,
    gamma: float = 2.0,
    weights: jnp.ndarray | None = None,
) -> jnp.ndarray:
    """Focal loss alpha * (1 - p_t)^gamma * CE per example, shape (batch,); the caller takes the mean.

    Multi-class (`multi_label=False`, int labels): softmax-based; the example's loss is multiplied by
    the weight of its true class. Multi-label (multi-hot float labels): sigmoid-based per label,
    multiplied by the label's weight, averaged over labels (the official code's form; pass one-hot
    labels here to reproduce its sigmoid loss on multi-class data). With gamma 0, alpha 1 and no
    weights this is plain softmax / sigmoid cross-entropy.
    """
    logits = logits.astype(jnp.float32)
    if multi_label:
        targets = labels.astype(jnp.float32)
        ce = optax.sigmoid_binary_cross_entropy(logits, targets)
        p = jax.nn.sigmoid(logits)
        one_minus_pt = p * (1.0 - targets) + (1.0 - p) * targets
        loss = ce if gamma == 0 else ce * jnp.power(one_minus_pt, gamma)
        if weights is not None:
            loss = loss * weights[None, :]
        return alpha * jnp.mean(loss, axis=-1)
    labels = labels.astype(jnp.int32)
    log_pt = jnp.take_along_axis(jax.nn.log_softmax(logits), labels[:, None], axis=-1)[:, 0]
    loss = -log_pt if gamma == 0 else -log_pt * jnp.power(-jnp.expm1(log_pt), gamma)
    if weights is not None:
        loss = loss * weights[labels]
    return alpha * loss


def cross_entropy_loss(
    logits: jnp.ndarray, labels: jnp.ndarray, *, multi_label: bool, weights: jnp.ndarray | None = None
) -> jnp.ndarray:
    """Softmax (multi-class) or sigmoid (multi-label) cross-entropy per example, optionally class-weighted."""
    return focal_loss(logits, labels, multi_label=multi_label, alpha=1.0, gamma=0.0, weights=weights)
