"""Learning-rate schedules for pretraining: the papers' one cosine decay, and the official code's cycling one.

Both are optax schedules (step -> lr), so they plug into any optax optimizer.
"""

import math

import jax.numpy as jnp
import optax


def cosine_schedule(peak_lr: float, total_steps: int, min_lr: float = 1e-6,
                    warmup_steps: int = 0) -> optax.Schedule:
    """One cosine decay from `peak_lr` to `min_lr` over the run, after an optional linear warm-up from 0.

    This is the papers' "cosine annealing to 1e-6" read as one decay over the whole run.
    """
    if total_steps <= 0:
        raise ValueError(f"total_steps must be positive, got {total_steps}.")
    warmup_steps = min(warmup_steps, total_steps - 1)
    if warmup_steps > 0:
        return optax.warmup_cosine_decay_schedule(
            init_value=0.0, peak_value=peak_lr, warmup_steps=warmup_steps,
            decay_steps=total_steps, end_value=min_lr)
    return optax.cosine_decay_schedule(peak_lr, decay_steps=total_steps, alpha=min_lr / peak_lr)


def reference_cosine_schedule(peak_lr: float, t_max: int = 16, min_lr: float = 1e-6) -> optax.Schedule:
    """PyTorch's CosineAnnealingLR(T_max=t_max, eta_min=min_lr) stepped every batch, as the official code does.

    Its closed form, min + (peak - min) * (1 + cos(pi * t / T_max)) / 2, never stops at T_max: the lr swings
    between peak and min with a period of 2 * T_max steps for the whole run.
    """
    def schedule(step):
        cos = jnp.cos(math.pi * jnp.asarray(step, jnp.float32) / t_max)
        return min_lr + (peak_lr - min_lr) * (1.0 + cos) / 2.0
    return schedule


def make_schedule(name: str, peak_lr: float, total_steps: int, *, min_lr: float = 1e-6,
                  warmup_steps: int = 0, reference_t_max: int = 16) -> optax.Schedule:
    """Builds the schedule named by `config.optim.schedule`: "cosine", "reference" or "constant"."""
    if name == "cosine":
        return cosine_schedule(peak_lr, total_steps, min_lr, warmup_steps)
    if name == "reference":
        return reference_cosine_schedule(peak_lr, reference_t_max, min_lr)
    if name == "constant":
        return optax.constant_schedule(peak_lr)
    raise ValueError(
        f"Unknown config.optim.schedule={name!r}; use 'cosine' (one decay over the run, the default), "
        "'reference' (the official code's per-batch CosineAnnealingLR) or 'constant'.")
