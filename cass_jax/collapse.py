"""Collapse indicators for two-arm self-supervision: is every image mapped to the same output?

CASS has no negatives, predictor or stop-gradient, so a loss near 0 can mean collapse; these numbers tell.
"""

import jax.numpy as jnp

from cass_jax.losses import l2_normalize


def collapse_indicators(outputs: jnp.ndarray) -> dict[str, jnp.ndarray]:
    """For one arm's (B, D) outputs, after L2 normalisation.

    `std`: the across-batch standard deviation of each dimension, averaged over dimensions (0 when collapsed;
    about 1/sqrt(D) for well-spread outputs). `pairwise_cosine`: the mean cosine between different images
    (1 when collapsed).
    """
    z = l2_normalize(outputs.astype(jnp.float32))
    batch = z.shape[0]
    std = jnp.mean(jnp.std(z, axis=0))
    gram = z @ z.T
    off_diagonal_sum = jnp.sum(gram) - jnp.trace(gram)
    pairwise_cosine = off_diagonal_sum / jnp.maximum(batch * (batch - 1), 1)
    return {"std": std, "pairwise_cosine": pairwise_cosine}


def cross_arm_cosine(cnn_outputs: jnp.ndarray, vit_outputs: jnp.ndarray) -> jnp.ndarray:
    """Mean cosine between the two arms' outputs for the same image (1 - loss / 2 for the CASS loss)."""
    r = l2_normalize(cnn_outputs.astype(jnp.float32))
    t = l2_normalize(vit_outputs.astype(jnp.float32))
    return jnp.mean(jnp.sum(r * t, axis=-1))
