"""Stochastic weight averaging (SWA): a running mean of parameters, and BatchNorm statistics refreshed for it.

The official CASS code wraps its optimizer in SWA but never averages; here the weights really are averaged.
"""

from typing import Any, Callable, Iterable

import jax
import jax.numpy as jnp
import optax

PyTree = Any


def running_mean_update(average: PyTree, params: PyTree, count: jnp.ndarray) -> PyTree:
    """Adds one snapshot to a mean of `count` snapshots: avg + (params - avg) / (count + 1)."""
    step_size = 1.0 / (jnp.asarray(count, jnp.float32) + 1.0)
    return optax.incremental_update(params, average, step_size)


def recompute_batch_stats(
    apply_train: Callable[[PyTree, PyTree, jnp.ndarray], PyTree],
    params: PyTree,
    batch_stats: PyTree,
    batches: Iterable[jnp.ndarray],
) -> PyTree:
    """BatchNorm running statistics for `params`: the plain average of per-batch statistics over `batches`.

    This is what torch.optim.swa_utils.update_bn computes (momentum=None): averaged weights never produced
    the running statistics they inherit, so they are measured again. `apply_train(params, batch_stats, images)`
    runs the model in train mode and returns the updated batch_stats; since a BatchNorm update is affine in
    the old statistics (new = m * old + (1 - m) * batch), two calls with old = 0 and old = 1 recover the
    batch statistics whatever the momentum.
    """
    zeros = jax.tree.map(jnp.zeros_like, batch_stats)
    ones = jax.tree.map(jnp.ones_like, batch_stats)

    @jax.jit
    def batch_statistics(images):
        from_zeros = apply_train(params, zeros, images)
        from_ones = apply_train(params, ones, images)
        return jax.tree.map(lambda s0, s1: s0 / (1.0 - (s1 - s0)), from_zeros, from_ones)

    total, count = None, 0
    for images in batches:
        stats = batch_statistics(images)
        total = stats if total is None else jax.tree.map(jnp.add, total, stats)
        count += 1
    if count == 0:
        raise ValueError("recompute_batch_stats got no batches: the training split is smaller than one batch.")
    return jax.tree.map(lambda t: t / count, total)
