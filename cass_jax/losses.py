"""Loss functions, as pure jnp functions checked against NumPy references in tests.

`cass_loss` is the CASS objective; downstream and stabiliser losses live beside it.
"""

import jax.numpy as jnp


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
