"""Barlow Twins building blocks against NumPy transcriptions of the official code, and the further-pretraining masks."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from cass_jax.data import transforms
from cass_jax.data.two_views import BarlowTwinsViews
from cass_jax.methods import barlow_twins_parts as bt
from cass_jax.models import create_model


# ---------------------------------------------------------------- loss


def _official_loss(z1: np.ndarray, z2: np.ndarray, lambd: float) -> float:
    """main.py BarlowTwins.forward in float64 NumPy: BatchNorm1d(affine=False) in train mode, off_diagonal view."""

    def bn(z):
        return (z - z.mean(0)) / np.sqrt(z.var(0) + 1e-5)

    c = bn(z1).T @ bn(z2) / z1.shape[0]
    n = c.shape[0]
    off = c.flatten()[:-1].reshape(n - 1, n + 1)[:, 1:].flatten()
    return float(((np.diagonal(c) - 1) ** 2).sum() + lambd * (off**2).sum())


def test_loss_matches_official_formula():
    rng = np.random.default_rng(0)
    z1 = rng.normal(size=(16, 24)).astype(np.float32) * 3 + 1
    z2 = (z1 + rng.normal(size=z1.shape)).astype(np.float32)
    loss, parts = jax.jit(bt.barlow_twins_loss)(z1, z2)
    expected = _official_loss(z1.astype(np.float64), z2.astype(np.float64), bt.LAMBDA)
    assert abs(float(loss) - expected) <= 1e-5 * abs(expected)
    np.testing.assert_allclose(float(parts["on_diagonal"] + bt.LAMBDA * parts["off_diagonal"]), float(loss), rtol=1e-6)


def test_loss_is_zero_for_identical_standardised_decorrelated_embeddings():
    n, d = 32, 8
    a = np.random.default_rng(1).normal(size=(n, d))
    q, _ = np.linalg.qr(a - a.mean(0))  # orthonormal columns, each with zero mean
    z = (math.sqrt(n) * q).astype(np.float32)  # per-feature variance 1, bn(z).T @ bn(z) / n = I
    loss, parts = bt.barlow_twins_loss(z, z)
    assert float(loss) < 1e-5
    assert float(parts["off_diagonal"]) < 1e-5


def test_projector_shapes_and_layers():
    projector = bt.BarlowTwinsProjector(sizes=(32, 32, 16))
    x = jnp.asarray(np.random.default_rng(0).normal(size=(8, 20)), jnp.float32)
    variables = projector.init(jax.random.PRNGKey(0), x, train=False)
    shapes = jax.tree.map(jnp.shape, variables["params"])
    assert shapes == {
        "linear_0": {"kernel": (20, 32)}, "bn_0": {"scale": (32,), "bias": (32,)},
        "linear_1": {"kernel": (32, 32)}, "bn_1": {"scale": (32,), "bias": (32,)},
        "linear_2": {"kernel": (32, 16)},
    }
    out, updates = projector.apply(variables, x, train=True, mutable=["batch_stats"])
    assert out.shape == (8, 16)
    assert set(updates["batch_stats"]) == {"bn_0", "bn_1"}


# ---------------------------------------------------------------- LARS and its schedule


def _official_lars(params, grads, mus, lr_weights, lr_biases, weight_decay, momentum, eta):
    """main.py LARS.step (weight_decay_filter and lars_adaptation_filter on), with the two parameter groups."""
    new_params, new_mus = {}, {}
    for name, p in params.items():
        dp = grads[name]
        if p.ndim != 1:
            dp = dp + weight_decay * p
            param_norm, update_norm = np.linalg.norm(p), np.linalg.norm(dp)
            q = eta * param_norm / update_norm if param_norm > 0 and update_norm > 0 else 1.0
            dp = dp * q
        new_mus[name] = momentum * mus[name] + dp
        new_params[name] = p - (lr_weights if p.ndim != 1 else lr_biases) * new_mus[name]
    return new_params, new_mus


def _lars_tree(seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {"kernel": rng.normal(size=(4, 3)), "bias": rng.normal(size=(3,)), "scale": 1 + rng.normal(size=(3,))}


def test_lars_matches_official_step_under_a_changing_learning_rate():
    params = _lars_tree(0)
    grads = [_lars_tree(1), _lars_tree(2)]
    lr_w, lr_b = (0.5, 2.0), (0.01, 0.03)
    optimizer = bt.lars(lambda step: jnp.where(step == 0, lr_w[0], lr_w[1]), weight_decay=0.1,
                        bias_learning_rate=lambda step: jnp.where(step == 0, lr_b[0], lr_b[1]))
    ours = jax.tree.map(lambda x: jnp.asarray(x, jnp.float32), params)
    state = optimizer.init(ours)
    expected, mus = params, jax.tree.map(np.zeros_like, params)
    for step in range(2):
        updates, state = optimizer.update(jax.tree.map(jnp.asarray, grads[step]), state, ours)
        ours = optax.apply_updates(ours, updates)
        expected, mus = _official_lars(expected, grads[step], mus, lr_w[step], lr_b[step], 0.1, 0.9, 0.001)
        for name in params:
            np.testing.assert_allclose(np.asarray(ours[name]), expected[name], rtol=1e-5, atol=1e-7)

    # optax.lars scales by the learning rate before the momentum trace, so its second step differs.
    reference = optax.lars(lambda step: jnp.where(step == 0, lr_w[0], lr_w[1]), weight_decay=0.1,
                           weight_decay_mask=bt._is_weight, trust_ratio_mask=bt._is_weight)
    theirs = jax.tree.map(lambda x: jnp.asarray(x, jnp.float32), params)
    state = reference.init(theirs)
    for step in range(2):
        updates, state = reference.update(jax.tree.map(jnp.asarray, grads[step]), state, theirs)
        theirs = optax.apply_updates(theirs, updates)
    assert not np.allclose(np.asarray(theirs["kernel"]), expected["kernel"], rtol=1e-3)


def test_lars_leaves_biases_and_norms_undecayed_and_unadapted():
    params = jax.tree.map(lambda x: jnp.asarray(x, jnp.float32), _lars_tree(0))
    grads = jax.tree.map(lambda x: jnp.asarray(x, jnp.float32), _lars_tree(1))
    optimizer = bt.lars(0.3, weight_decay=0.5)
    updates, _ = optimizer.update(grads, optimizer.init(params), params)
    for name in ("bias", "scale"):  # plain SGD on the first step: -lr * g
        np.testing.assert_allclose(np.asarray(updates[name]), -0.3 * np.asarray(grads[name]), rtol=1e-6)
    decayed = np.asarray(grads["kernel"]) + 0.5 * np.asarray(params["kernel"])
    trust = 0.001 * np.linalg.norm(params["kernel"]) / np.linalg.norm(decayed)
    np.testing.assert_allclose(np.asarray(updates["kernel"]), -0.3 * trust * decayed, rtol=1e-5)


def _official_lr(step: int, batch_size: int, steps_per_epoch: int, epochs: int, base: float) -> float:
    """main.py adjust_learning_rate for one parameter group."""
    max_steps = epochs * steps_per_epoch
    warmup_steps = 10 * steps_per_epoch
    base_lr = batch_size / 256
    if step < warmup_steps:
        lr = base_lr * step / warmup_steps
    else:
        step -= warmup_steps
        max_steps -= warmup_steps
        q = 0.5 * (1 + math.cos(math.pi * step / max_steps))
        lr = base_lr * q + base_lr * 0.001 * (1 - q)
    return lr * base


@pytest.mark.parametrize("base", [bt.WEIGHTS_LEARNING_RATE, bt.BIASES_LEARNING_RATE])
def test_lr_schedule_matches_official(base):
    schedule = bt.barlow_twins_lr_schedule(512, steps_per_epoch=3, num_epochs=20, base_learning_rate=base)
    steps = np.arange(61)
    ours = np.asarray(jax.vmap(schedule)(steps))
    expected = np.array([_official_lr(int(s), 512, 3, 20, base) for s in steps])
    np.testing.assert_allclose(ours, expected, rtol=1e-5, atol=1e-9)
    assert ours[0] == 0.0 and ours[30] == pytest.approx(2 * base)
    assert ours[60] == pytest.approx(2 * base * 0.001)


# ---------------------------------------------------------------- further pretraining


@pytest.fixture(scope="module")
def tiny_model():
    encoder = create_model("resnet_tiny", num_classes=0)
    projector = bt.BarlowTwinsProjector(sizes=(32, 32, 32))
    images = jnp.asarray(np.random.default_rng(0).normal(size=(2, 4, 32, 32, 3)), jnp.float32)
    encoder_variables = encoder.init(jax.random.PRNGKey(0), images[0])
    projector_variables = projector.init(jax.random.PRNGKey(1), jnp.zeros((4, encoder.num_features)), train=False)
    params = {"encoder": encoder_variables["params"], "projector": projector_variables["params"]}
    stats = {"encoder": encoder_variables["batch_stats"], "projector": projector_variables["batch_stats"]}

    @jax.jit
    def grads_of(params):
        def loss_fn(params):
            embeddings = []
            for view in images:
                features, _ = encoder.apply({"params": params["encoder"], "batch_stats": stats["encoder"]}, view,
                                            train=True, mutable=["batch_stats"])
                z, _ = projector.apply({"params": params["projector"], "batch_stats": stats["projector"]}, features,
                                       train=True, mutable=["batch_stats"])
                embeddings.append(z)
            loss, _ = bt.barlow_twins_loss(*embeddings)
            return loss + bt.l1_penalty(params["projector"], 0.01)

        return jax.grad(loss_fn)(params)

    return params, grads_of(params)


def _step(params, grads, mode, **mask_options):
    mask = bt.trainable_mask(params, mode, **mask_options)
    optimizer = bt.further_pretraining_optimizer(mask, bt.one_cycle_schedule(100, 1e-2))
    updates, _ = optimizer.update(grads, optimizer.init(params), params)
    return optax.apply_updates(params, updates)


def _changed(before, after) -> dict[str, bool]:
    flat_before = dict(jax.tree_util.tree_flatten_with_path(before)[0])
    flat_after = dict(jax.tree_util.tree_flatten_with_path(after)[0])
    return {jax.tree_util.keystr(path): not np.array_equal(np.asarray(value).view(np.uint32),
                                                           np.asarray(flat_after[path]).view(np.uint32))
            for path, value in flat_before.items()}


def test_projector_only_step_leaves_the_encoder_bitwise_unchanged(tiny_model):
    params, grads = tiny_model
    assert all(float(jnp.abs(g).sum()) > 0 for g in jax.tree.leaves(grads["encoder"]["conv1"]))
    new = _step(params, grads, "projector_only")
    assert not any(_changed(params["encoder"], new["encoder"]).values())
    assert all(_changed(params["projector"], new["projector"]).values())


def test_partial_step_trains_only_the_final_block_and_the_projector(tiny_model):
    params, _ = tiny_model
    ones = jax.tree.map(jnp.ones_like, params)  # a gradient on every leaf, frozen or not
    assert bt.final_resnet_block(params["encoder"]) == "layer4_0"
    new = _step(params, ones, "partial")
    changed = _changed(params["encoder"], new["encoder"])
    assert {path for path, moved in changed.items() if moved} == {p for p in changed if p.startswith("['layer4_0']")}
    assert all(_changed(params["projector"], new["projector"]).values())
    assert all(_changed(params, _step(params, ones, "full")).values())


def test_train_batch_norm_option_unfreezes_only_encoder_norms(tiny_model):
    params, _ = tiny_model
    new = _step(params, jax.tree.map(jnp.ones_like, params), "projector_only", train_batch_norm=True)
    flat = dict(jax.tree_util.tree_flatten_with_path(params["encoder"])[0])
    for path, moved in _changed(params["encoder"], new["encoder"]).items():
        leaf = next(v for p, v in flat.items() if jax.tree_util.keystr(p) == path)
        assert moved == (leaf.ndim == 1), path


def test_final_block_of_resnet50_and_bad_modes():
    shapes = jax.eval_shape(create_model("resnet50", num_classes=0).init, jax.random.PRNGKey(0),
                            jnp.zeros((1, 64, 64, 3)))
    assert bt.final_resnet_block(shapes["params"]) == "layer4_2"
    with pytest.raises(ValueError, match="mode"):
        bt.trainable_mask({"encoder": {}, "projector": {}}, "last_block")


def test_one_cycle_endpoints():
    schedule = bt.one_cycle_schedule(200, 1e-3)
    assert float(schedule(0)) == pytest.approx(1e-3 / 25)
    assert float(schedule(50)) == pytest.approx(1e-3)
    assert float(schedule(200)) == pytest.approx(1e-3 / 1e5)
    assert float(schedule(20)) < float(schedule(40)) and float(schedule(100)) > float(schedule(150))
    momentum = bt.one_cycle_momentum_schedule(200)
    assert [float(momentum(s)) for s in (0, 50, 200)] == pytest.approx([0.95, 0.85, 0.95])


def test_sparsity_penalties_match_numpy():
    rng = np.random.default_rng(0)
    projector = {"linear_0": {"kernel": rng.normal(size=(5, 6))}, "bn_0": {"scale": np.ones(6), "bias": np.zeros(6)},
                 "linear_1": {"kernel": rng.normal(size=(6, 7))}}
    last = projector["linear_1"]["kernel"]
    assert float(bt.l1_penalty(projector, 0.01)) == pytest.approx(0.01 * np.abs(last).sum(), rel=1e-6)
    torch_weight = last.T  # (out, in): torch.linalg.norm(weight, ord=2, dim=0).sum()
    expected = 0.01 * np.linalg.norm(torch_weight, ord=2, axis=0).sum()
    assert float(bt.group_sparsity_penalty(projector, 0.01)) == pytest.approx(expected, rel=1e-6)


# ---------------------------------------------------------------- two views


def _record(seed: int = 0, gray: bool = False) -> dict:
    rng = np.random.default_rng(seed)
    image = rng.integers(0, 256, (64, 64, 1 if gray else 3), dtype=np.uint8)
    return {"image": np.repeat(image, 3, axis=2) if gray else image, "label": 2}


def test_two_views_keys_shapes_determinism_and_asymmetry():
    views = BarlowTwinsViews(image_size=32)
    out = views(_record(), np.random.default_rng(5))
    assert set(out) == {"view_0", "view_1", "label"}
    for key in ("view_0", "view_1"):
        assert out[key].shape == (32, 32, 3) and out[key].dtype == np.uint8
    again = views(_record(), np.random.default_rng(5))
    np.testing.assert_array_equal(out["view_0"], again["view_0"])
    np.testing.assert_array_equal(out["view_1"], again["view_1"])
    assert not np.array_equal(out["view_0"], out["view_1"])
    assert not np.array_equal(out["view_0"], views(_record(), np.random.default_rng(6))["view_0"])
    gray = views(_record(gray=True), np.random.default_rng(5))["view_1"]
    assert np.array_equal(gray[..., 0], gray[..., 1]) and np.array_equal(gray[..., 0], gray[..., 2])


def test_two_views_in_a_grain_pipeline():
    grain = pytest.importorskip("grain")
    dataset = grain.MapDataset.source([_record(i) for i in range(3)]).random_map(BarlowTwinsViews(image_size=32),
                                                                                 seed=0)
    np.testing.assert_array_equal(dataset[1]["view_0"], dataset[1]["view_0"])
    assert dataset[2]["view_1"].shape == (32, 32, 3)


def test_crop_boxes_stay_inside_the_image():
    rng = np.random.default_rng(0)
    for width, height in ((64, 64), (80, 30), (20, 90)):
        for _ in range(200):
            top, left, h, w = transforms.random_resized_crop_box(width, height, (0.08, 1.0), rng, (3 / 4, 4 / 3))
            assert 0 < h and 0 < w and top >= 0 and left >= 0 and top + h <= height and left + w <= width


def test_crop_and_hue_match_torchvision():
    functional = pytest.importorskip("torchvision.transforms.functional")
    from PIL import Image

    image = Image.fromarray(_record(3)["image"])
    ours = transforms.resized_crop(image, (5, 9, 40, 30), 32)
    theirs = functional.resized_crop(image, 5, 9, 40, 30, [32, 32], functional.InterpolationMode.BICUBIC)
    np.testing.assert_array_equal(np.asarray(ours), np.asarray(theirs))
    for factor in (-0.1, -0.03, 0.07):
        np.testing.assert_array_equal(np.asarray(transforms.adjust_hue(image, factor)),
                                      np.asarray(functional.adjust_hue(image, factor)))
