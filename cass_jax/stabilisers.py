"""Opt-in terms that keep the two CASS arms from collapsing to one output for every image.

The paper's loss (cosine between arms) is minimised by a constant output; each term here is zero-weighted
by default (`config.loss`), so the default stays the published method.
  - cross-architecture Barlow Twins (Zbontar et al. 2021): cross-correlation of the batch-standardised
    outputs of the two arms pushed to the identity;
  - VICReg-style variance and covariance terms (Bardes et al. 2022) on each arm's outputs;
  - DINO-style centring and sharpening (Caron et al. 2021): each arm is the other's teacher, its outputs
    centred by a running mean and sharpened, with a stop-gradient.
"""

import jax
import jax.numpy as jnp
import ml_collections

from cass_jax.losses import cass_loss, l2_normalize


def default_loss_config() -> ml_collections.ConfigDict:
    """`config.loss`: weights of the paper's cosine term and of each stabiliser (0 = off)."""
    return ml_collections.ConfigDict(dict(
        cosine_weight=1.0,
        # Barlow Twins between the arms; lambda weighs the off-diagonal (redundancy) terms.
        barlow_twins_weight=0.0, barlow_twins_lambda=5e-3,
        # VICReg terms on each arm's outputs scaled to the sphere of radius sqrt(D): a well-spread set of
        # outputs has per-dimension std near 1, a collapsed one near 0.
        variance_weight=0.0, variance_target=1.0, covariance_weight=0.0,
        # DINO-style: cross-entropy from the sharpened, centred other arm (teacher) to this arm (student).
        centring_weight=0.0, centring_momentum=0.9, student_temperature=0.1, teacher_temperature=0.04,
    ))


def standardize_over_batch(z: jnp.ndarray, eps: float = 1e-5) -> jnp.ndarray:
    """Zero mean, unit (population) std per dimension across the batch."""
    return (z - z.mean(0)) / jnp.sqrt(z.var(0) + eps)


def barlow_twins_loss(z1: jnp.ndarray, z2: jnp.ndarray, off_diagonal_weight: float = 5e-3) -> jnp.ndarray:
    """sum_i (1 - C_ii)^2 + lambda * sum_{i != j} C_ij^2, C the (D, D) cross-correlation over the batch."""
    batch = z1.shape[0]
    c = standardize_over_batch(z1.astype(jnp.float32)).T @ standardize_over_batch(z2.astype(jnp.float32)) / batch
    on_diagonal = jnp.sum(jnp.square(1.0 - jnp.diagonal(c)))
    off_diagonal = jnp.sum(jnp.square(c)) - jnp.sum(jnp.square(jnp.diagonal(c)))
    return on_diagonal + off_diagonal_weight * off_diagonal


def sphere_scaled(z: jnp.ndarray) -> jnp.ndarray:
    """L2-normalised outputs times sqrt(D): the geometry the cosine loss sees, at unit per-dimension scale."""
    return l2_normalize(z.astype(jnp.float32)) * jnp.sqrt(z.shape[-1])


def variance_loss(z: jnp.ndarray, target: float = 1.0, eps: float = 1e-4) -> jnp.ndarray:
    """VICReg variance term: mean over dimensions of relu(target - std), std with Bessel's correction."""
    std = jnp.sqrt(jnp.var(z, axis=0, ddof=1) + eps)
    return jnp.mean(jax.nn.relu(target - std))


def covariance_loss(z: jnp.ndarray) -> jnp.ndarray:
    """VICReg covariance term: sum of squared off-diagonal covariances, divided by D."""
    batch, dims = z.shape
    centred = z - z.mean(0)
    cov = centred.T @ centred / (batch - 1)
    return (jnp.sum(jnp.square(cov)) - jnp.sum(jnp.square(jnp.diagonal(cov)))) / dims


def centred_distillation_loss(student: jnp.ndarray, teacher: jnp.ndarray, centre: jnp.ndarray,
                              student_temperature: float, teacher_temperature: float) -> jnp.ndarray:
    """DINO's cross-entropy H(softmax((teacher - centre) / t_t), softmax(student / t_s)), teacher frozen.

    Centring stops one dimension from dominating; sharpening stops the uniform output; together they rule
    out the constant solutions that the plain cosine loss allows.
    """
    targets = jax.lax.stop_gradient(jax.nn.softmax((teacher.astype(jnp.float32) - centre) / teacher_temperature))
    log_probs = jax.nn.log_softmax(student.astype(jnp.float32) / student_temperature)
    return jnp.mean(-jnp.sum(targets * log_probs, axis=-1))


def stabilised_cass_loss(cnn_logits: jnp.ndarray, vit_logits: jnp.ndarray, centres: dict[str, jnp.ndarray],
                         loss_config: ml_collections.ConfigDict) -> tuple[jnp.ndarray, dict[str, jnp.ndarray]]:
    """The paper's loss times `cosine_weight`, plus each stabiliser with a non-zero weight.

    Returns the total and its named terms (for logging). `centres` holds the running mean of each arm's
    outputs (used only by the centring term).
    """
    c = loss_config
    terms = {"cosine": cass_loss(cnn_logits, vit_logits)}
    total = c.cosine_weight * terms["cosine"]
    if c.barlow_twins_weight:
        terms["barlow_twins"] = barlow_twins_loss(cnn_logits, vit_logits, c.barlow_twins_lambda)
        total += c.barlow_twins_weight * terms["barlow_twins"]
    if c.variance_weight or c.covariance_weight:
        scaled = [sphere_scaled(cnn_logits), sphere_scaled(vit_logits)]
        terms["variance"] = sum(variance_loss(z, c.variance_target) for z in scaled) / 2
        terms["covariance"] = sum(covariance_loss(z) for z in scaled) / 2
        total += c.variance_weight * terms["variance"] + c.covariance_weight * terms["covariance"]
    if c.centring_weight:
        terms["centring"] = (
            centred_distillation_loss(cnn_logits, vit_logits, centres["vit"], c.student_temperature,
                                      c.teacher_temperature)
            + centred_distillation_loss(vit_logits, cnn_logits, centres["cnn"], c.student_temperature,
                                        c.teacher_temperature)) / 2
        total += c.centring_weight * terms["centring"]
    return total, terms


def update_centres(centres: dict[str, jnp.ndarray], cnn_logits: jnp.ndarray, vit_logits: jnp.ndarray,
                   momentum: float) -> dict[str, jnp.ndarray]:
    """Running mean of each arm's batch-mean output (DINO's centre update)."""
    batch_means = {"cnn": cnn_logits.astype(jnp.float32).mean(0), "vit": vit_logits.astype(jnp.float32).mean(0)}
    return {arm: momentum * centres[arm] + (1.0 - momentum) * jax.lax.stop_gradient(batch_means[arm])
            for arm in centres}
