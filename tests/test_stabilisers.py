"""Anti-collapse stabilisers against NumPy references; with zero weights the loss is the paper's."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cass_jax.losses import cass_loss
from cass_jax.stabilisers import (barlow_twins_loss, centred_distillation_loss, covariance_loss,
                                  default_loss_config, stabilised_cass_loss, update_centres, variance_loss)

RNG = np.random.default_rng(0)
R, T = RNG.normal(size=(12, 20)).astype(np.float32), RNG.normal(size=(12, 20)).astype(np.float32)
ZERO_CENTRES = {"cnn": jnp.zeros(20), "vit": jnp.zeros(20)}


def numpy_barlow_twins(a, b, lam):
    a = (a - a.mean(0)) / np.sqrt(a.var(0) + 1e-5)
    b = (b - b.mean(0)) / np.sqrt(b.var(0) + 1e-5)
    c = a.T @ b / a.shape[0]
    return sum((1 - c[i, i]) ** 2 for i in range(c.shape[0])) + lam * sum(
        c[i, j] ** 2 for i in range(c.shape[0]) for j in range(c.shape[1]) if i != j)


def test_barlow_twins_matches_numpy():
    np.testing.assert_allclose(barlow_twins_loss(R, T, 5e-3), numpy_barlow_twins(R, T, 5e-3), rtol=1e-4)
    # Identical, decorrelated inputs give C = I: zero loss.
    q, _ = np.linalg.qr(RNG.normal(size=(64, 8)))
    z = (q - q.mean(0)).astype(np.float32)
    assert float(barlow_twins_loss(z, z, 5e-3)) < float(barlow_twins_loss(z[:, :1].repeat(8, 1), z, 5e-3))


def test_variance_and_covariance_match_numpy():
    std = np.sqrt(R.var(0, ddof=1) + 1e-4)
    np.testing.assert_allclose(variance_loss(R, 1.0), np.mean(np.maximum(0, 1 - std)), rtol=1e-5)
    cov = np.cov(R, rowvar=False)
    np.testing.assert_allclose(covariance_loss(R), (np.sum(cov**2) - np.sum(np.diag(cov) ** 2)) / 20, rtol=1e-4)
    collapsed = np.tile(R[:1], (12, 1))
    assert float(variance_loss(collapsed)) == pytest.approx(1 - np.sqrt(1e-4), rel=1e-4)


def test_centred_distillation_matches_numpy():
    centre = RNG.normal(size=20).astype(np.float32)

    def softmax(x):
        e = np.exp(x - x.max(-1, keepdims=True))
        return e / e.sum(-1, keepdims=True)

    expected = np.mean(-np.sum(softmax((T - centre) / 0.04) * np.log(softmax(R / 0.1)), -1))
    np.testing.assert_allclose(centred_distillation_loss(R, T, centre, 0.1, 0.04), expected, rtol=1e-4)
    grads = jax.grad(lambda t: centred_distillation_loss(R, t, centre, 0.1, 0.04))(jnp.asarray(T))
    assert float(jnp.abs(grads).max()) == 0.0          # the teacher gets no gradient


def test_update_centres_is_a_running_mean():
    centres = update_centres({"cnn": jnp.ones(20), "vit": jnp.zeros(20)}, R, T, momentum=0.9)
    np.testing.assert_allclose(centres["cnn"], 0.9 + 0.1 * R.mean(0), rtol=1e-5)
    np.testing.assert_allclose(centres["vit"], 0.1 * T.mean(0), rtol=1e-5, atol=1e-7)


def test_zero_weights_give_the_papers_loss():
    total, terms = stabilised_cass_loss(R, T, ZERO_CENTRES, default_loss_config())
    assert float(total) == float(cass_loss(R, T))
    assert set(terms) == {"cosine"}


@pytest.mark.parametrize("weight_key", ["barlow_twins_weight", "variance_weight", "covariance_weight",
                                        "centring_weight"])
def test_each_stabiliser_adds_its_weighted_term(weight_key):
    config = default_loss_config()
    config[weight_key] = 0.5
    total, terms = stabilised_cass_loss(R, T, ZERO_CENTRES, config)
    extra = float(total) - float(cass_loss(R, T))
    term = {"barlow_twins_weight": "barlow_twins", "variance_weight": "variance",
            "covariance_weight": "covariance", "centring_weight": "centring"}[weight_key]
    assert extra == pytest.approx(0.5 * float(terms[term]), rel=1e-4)
    assert float(terms[term]) > 0
