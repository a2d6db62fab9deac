"""Focal loss, cross-entropy and class weights against NumPy references."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from cass_jax.losses import class_weights, cross_entropy_loss, focal_loss


def _numpy_softmax_focal(logits, labels, alpha, gamma, weights):
    logits = logits.astype(np.float64)
    shifted = logits - logits.max(axis=1, keepdims=True)
    log_p = shifted - np.log(np.exp(shifted).sum(axis=1, keepdims=True))
    log_pt = log_p[np.arange(len(labels)), labels]
    pt = np.exp(log_pt)
    return alpha * (1 - pt) ** gamma * -log_pt * weights[labels]


def _numpy_sigmoid_focal(logits, targets, alpha, gamma, weights):
    p = 1.0 / (1.0 + np.exp(-logits.astype(np.float64)))
    ce = -(targets * np.log(p) + (1 - targets) * np.log(1 - p))
    pt = np.where(targets > 0.5, p, 1 - p)
    return (alpha * (1 - pt) ** gamma * ce * weights[None, :]).mean(axis=1)


@pytest.fixture
def batch():
    rng = np.random.default_rng(0)
    logits = rng.normal(scale=2.0, size=(32, 4)).astype(np.float32)
    labels = rng.integers(0, 4, size=32)
    multi_hot = (rng.random((32, 4)) < 0.4).astype(np.float32)
    return logits, labels, multi_hot


@pytest.mark.parametrize("gamma,alpha", [(2.0, 1.0), (0.5, 0.25), (0.0, 1.0)])
def test_softmax_focal_matches_numpy(batch, gamma, alpha):
    logits, labels, _ = batch
    weights = np.array([0.2, 0.6, 1.0, 0.3], np.float32)
    got = focal_loss(jnp.asarray(logits), jnp.asarray(labels), multi_label=False, alpha=alpha, gamma=gamma,
                     weights=jnp.asarray(weights))
    np.testing.assert_allclose(got, _numpy_softmax_focal(logits, labels, alpha, gamma, weights), rtol=1e-5)


@pytest.mark.parametrize("gamma,alpha", [(2.0, 1.0), (1.5, 0.5)])
def test_sigmoid_focal_matches_numpy(batch, gamma, alpha):
    logits, _, multi_hot = batch
    weights = np.array([1.0, 0.5, 0.2, 2.0], np.float32)
    got = focal_loss(jnp.asarray(logits), jnp.asarray(multi_hot), multi_label=True, alpha=alpha, gamma=gamma,
                     weights=jnp.asarray(weights))
    np.testing.assert_allclose(got, _numpy_sigmoid_focal(logits, multi_hot, alpha, gamma, weights), rtol=1e-5)


def test_gamma_zero_without_weights_is_cross_entropy(batch):
    logits, labels, multi_hot = batch
    softmax_ce = optax.softmax_cross_entropy_with_integer_labels(jnp.asarray(logits), jnp.asarray(labels))
    np.testing.assert_allclose(
        focal_loss(jnp.asarray(logits), jnp.asarray(labels), multi_label=False, gamma=0.0), softmax_ce, rtol=1e-6
    )
    np.testing.assert_allclose(cross_entropy_loss(logits, labels, multi_label=False), softmax_ce, rtol=1e-6)
    sigmoid_ce = optax.sigmoid_binary_cross_entropy(jnp.asarray(logits), jnp.asarray(multi_hot)).mean(axis=1)
    np.testing.assert_allclose(
        focal_loss(jnp.asarray(logits), jnp.asarray(multi_hot), multi_label=True, gamma=0.0), sigmoid_ce, rtol=1e-6
    )


def test_focal_down_weights_easy_examples():
    logits = jnp.array([[6.0, 0.0], [0.2, 0.0]])
    labels = jnp.array([0, 0])
    ce = cross_entropy_loss(logits, labels, multi_label=False)
    focal = focal_loss(logits, labels, multi_label=False)
    ratio = focal / ce
    assert ratio[0] < 1e-4 and 0.2 < ratio[1] < 0.3


def test_focal_gradient_is_finite_when_confident():
    logits = jnp.array([[80.0, -80.0, 0.0]])
    grad = jax.grad(lambda z: focal_loss(z, jnp.array([0]), multi_label=False).sum())(logits)
    assert np.all(np.isfinite(grad))


def test_class_weights_paper_reproduces_official_brain_mri_values():
    weights = class_weights([1321, 1457, 1595, 1339], "paper")
    np.testing.assert_allclose(weights, [0.2, 0.597, 1.0, 0.2526], atol=5e-4)


def test_class_weights_inverse_and_none():
    counts = np.array([10, 30, 60, 0])
    inverse = class_weights(counts, "inverse")
    np.testing.assert_allclose(inverse[:3], 100 / (4 * counts[:3]), rtol=1e-6)
    assert inverse[3] == pytest.approx(100 / 4)
    np.testing.assert_array_equal(class_weights(counts, "none"), np.ones(4, np.float32))
    np.testing.assert_array_equal(class_weights([5, 5, 5], "paper"), np.ones(3, np.float32))


def test_class_weights_bad_input():
    with pytest.raises(ValueError, match="'balanced' is unknown"):
        class_weights([1, 2], "balanced")
    with pytest.raises(ValueError, match="not all 0"):
        class_weights([0, 0], "inverse")
