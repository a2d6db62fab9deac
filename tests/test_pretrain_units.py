"""Pure pieces of pretraining against NumPy/PyTorch references: loss, schedules, weight averaging, collapse."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cass_jax.collapse import collapse_indicators, cross_arm_cosine
from cass_jax.losses import cass_loss
from cass_jax.schedules import cosine_schedule, make_schedule, reference_cosine_schedule
from cass_jax.weight_averaging import recompute_batch_stats, running_mean_update


def numpy_cass_loss(r, t):
    r = r / np.maximum(np.linalg.norm(r, axis=-1, keepdims=True), 1e-12)
    t = t / np.maximum(np.linalg.norm(t, axis=-1, keepdims=True), 1e-12)
    return np.mean(2 - 2 * np.sum(r * t, axis=-1))


def test_cass_loss_matches_numpy():
    rng = np.random.default_rng(0)
    r, t = rng.normal(size=(16, 1000)) * 5, rng.normal(size=(16, 1000)) * 0.1
    np.testing.assert_allclose(cass_loss(jnp.asarray(r), jnp.asarray(t)), numpy_cass_loss(r, t), rtol=1e-5)


def test_cass_loss_extremes():
    x = jnp.asarray(np.random.default_rng(1).normal(size=(4, 10)), jnp.float32)
    assert float(cass_loss(x, 3.0 * x)) == pytest.approx(0.0, abs=1e-6)   # scale does not matter
    assert float(cass_loss(x, -x)) == pytest.approx(4.0, abs=1e-5)


def test_cass_loss_bfloat16_inputs_computed_in_float32():
    rng = np.random.default_rng(2)
    r, t = rng.normal(size=(8, 64)), rng.normal(size=(8, 64))
    loss = cass_loss(jnp.asarray(r, jnp.bfloat16), jnp.asarray(t, jnp.bfloat16))
    assert loss.dtype == jnp.float32
    np.testing.assert_allclose(loss, numpy_cass_loss(r, t), rtol=2e-2)


def test_reference_schedule_matches_pytorch_cosine_annealing():
    torch = pytest.importorskip("torch")
    param = torch.nn.Parameter(torch.zeros(1))
    optimizer = torch.optim.Adam([param], lr=1e-3)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=16, eta_min=1e-6)
    ours = reference_cosine_schedule(1e-3, t_max=16, min_lr=1e-6)
    for step in range(100):
        assert float(ours(step)) == pytest.approx(optimizer.param_groups[0]["lr"], rel=1e-5, abs=1e-9), step
        optimizer.step()
        scheduler.step()


def test_reference_schedule_closed_form_cycles_with_period_32():
    ours = reference_cosine_schedule(1e-3, t_max=16, min_lr=1e-6)
    for step in (0, 5, 16, 31, 77):
        expected = 1e-6 + (1e-3 - 1e-6) * (1 + math.cos(math.pi * step / 16)) / 2
        assert float(ours(step)) == pytest.approx(expected, rel=1e-5)
    assert float(ours(32)) == pytest.approx(1e-3, rel=1e-5)
    assert float(ours(48)) == pytest.approx(1e-6, rel=1e-3)


def test_cosine_schedule_decays_once_to_min():
    schedule = cosine_schedule(1e-3, total_steps=100, min_lr=1e-6)
    values = np.array([float(schedule(s)) for s in range(101)])
    assert values[0] == pytest.approx(1e-3)
    assert values[100] == pytest.approx(1e-6, rel=1e-4)
    assert np.all(np.diff(values) <= 1e-12)
    warm = cosine_schedule(1e-3, total_steps=100, min_lr=1e-6, warmup_steps=10)
    assert float(warm(0)) == 0.0 and float(warm(10)) == pytest.approx(1e-3)


def test_unknown_schedule_is_a_clear_error():
    with pytest.raises(ValueError, match="config.optim.schedule='cosin'"):
        make_schedule("cosin", 1e-3, 10)


def test_running_mean_equals_mean_of_snapshots():
    rng = np.random.default_rng(3)
    snapshots = [{"w": rng.normal(size=(3, 4)), "b": {"c": rng.normal(size=(2,))}} for _ in range(7)]
    average = jax.tree.map(jnp.asarray, snapshots[0])
    count = 0
    for snapshot in snapshots:
        average = running_mean_update(average, jax.tree.map(jnp.asarray, snapshot), count)
        count += 1
    expected = jax.tree.map(lambda *xs: np.mean(xs, axis=0), *snapshots)
    jax.tree.map(lambda a, e: np.testing.assert_allclose(a, e, rtol=1e-5, atol=1e-6), average, expected)


def test_recompute_batch_stats_is_mean_of_batch_statistics():
    """A toy BatchNorm with momentum 0.7 and unbiased variance: recovered stats are the plain batch means."""
    momentum = 0.7

    def apply_train(params, stats, x):
        n = x.shape[0]
        mean, var = x.mean(0), x.var(0) * n / (n - 1)
        return {"mean": momentum * stats["mean"] + (1 - momentum) * mean,
                "var": momentum * stats["var"] + (1 - momentum) * var}

    rng = np.random.default_rng(4)
    batches = [jnp.asarray(rng.normal(loc=i, size=(8, 5)), jnp.float32) for i in range(4)]
    stats = recompute_batch_stats(apply_train, None, {"mean": jnp.full(5, 9.0), "var": jnp.full(5, 9.0)}, batches)
    np.testing.assert_allclose(stats["mean"], np.mean([np.mean(b, 0) for b in batches], 0), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(stats["var"], np.mean([np.var(b, 0, ddof=1) for b in batches], 0), rtol=1e-4)


def test_collapse_indicators_identical_rows():
    rows = jnp.tile(jnp.asarray([[1.0, 2.0, 3.0]]), (6, 1))
    out = collapse_indicators(rows)
    assert float(out["std"]) == pytest.approx(0.0, abs=1e-6)
    assert float(out["pairwise_cosine"]) == pytest.approx(1.0, abs=1e-6)


def test_collapse_indicators_orthogonal_rows():
    d = 8
    out = collapse_indicators(jnp.eye(d) * 3.0)
    assert float(out["pairwise_cosine"]) == pytest.approx(0.0, abs=1e-6)
    # Each column holds one 1 among d rows: population std sqrt(1/d - 1/d^2).
    assert float(out["std"]) == pytest.approx(math.sqrt(1 / d - 1 / d**2), rel=1e-5)


def test_cross_arm_cosine():
    x = jnp.asarray(np.random.default_rng(5).normal(size=(5, 7)), jnp.float32)
    assert float(cross_arm_cosine(x, 2 * x)) == pytest.approx(1.0, abs=1e-6)
    assert float(cross_arm_cosine(x, -x)) == pytest.approx(-1.0, abs=1e-6)


def test_collapse_monitor_warns_then_stops():
    from cass_jax.pretrain import CollapseMonitor
    scalars = lambda cnn, vit: {"collapse/cnn_std": cnn, "collapse/vit_std": vit}
    initial = {"cnn": 0.01, "vit": 0.01}
    monitor = CollapseMonitor(fraction=0.1)
    assert not monitor.check(2, scalars(0.002, 0.005), initial)
    assert monitor.check(3, scalars(0.0009, 0.005), initial)
    with pytest.raises(FloatingPointError, match="step 7: the vit arm's output std is 1e-05"):
        CollapseMonitor(fraction=0.1, stop=True).check(7, scalars(0.01, 0.00001), initial)
