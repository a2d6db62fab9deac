"""DINO's building blocks against NumPy transcriptions of the official code, and against PyTorch where installed."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from PIL import Image

from cass_jax.data import multicrop as M
from cass_jax.data import transforms as T
from cass_jax.methods import dino_parts as D

OUT, HIDDEN, BOTTLENECK, IN = 64, 32, 16, 8


def _softmax(x, axis=-1):
    e = np.exp(x - x.max(axis=axis, keepdims=True))
    return e / e.sum(axis=axis, keepdims=True)


def _reference_dino_loss(student_output, teacher_output, center, student_temp, teacher_temp, ncrops):
    """DINOLoss.forward, line by line in NumPy (float64)."""
    student_out = np.split(student_output / student_temp, ncrops)
    teacher_out = np.split(_softmax((teacher_output - center) / teacher_temp), 2)
    total_loss, n_loss_terms = 0.0, 0
    for iq, q in enumerate(teacher_out):
        for v in range(len(student_out)):
            if v == iq:
                continue
            log_p = student_out[v] - np.log(np.exp(student_out[v]).sum(-1, keepdims=True))
            total_loss += np.sum(-q * log_p, axis=-1).mean()
            n_loss_terms += 1
    return total_loss / n_loss_terms


def _reference_cosine_scheduler(base_value, final_value, epochs, niter_per_ep, warmup_epochs=0,
                                start_warmup_value=0):
    """utils.cosine_scheduler, transcribed."""
    warmup_schedule = np.array([])
    warmup_iters = warmup_epochs * niter_per_ep
    if warmup_epochs > 0:
        warmup_schedule = np.linspace(start_warmup_value, base_value, warmup_iters)
    iters = np.arange(epochs * niter_per_ep - warmup_iters)
    schedule = final_value + 0.5 * (base_value - final_value) * (1 + np.cos(np.pi * iters / len(iters)))
    return np.concatenate((warmup_schedule, schedule))


def _head_params(norm_last_layer=True, seed=0):
    head = D.DINOHead(out_dim=OUT, hidden_dim=HIDDEN, bottleneck_dim=BOTTLENECK, norm_last_layer=norm_last_layer)
    return head, head.init(jax.random.key(seed), jnp.zeros((2, IN)))["params"]


def test_dino_loss_matches_official_formula():
    rng = np.random.default_rng(0)
    batch, global_crops, local_crops = 3, 2, 4
    ncrops = global_crops + local_crops
    student = rng.normal(size=(ncrops * batch, OUT)).astype(np.float32)
    teacher = rng.normal(size=(global_crops * batch, OUT)).astype(np.float32)
    center = rng.normal(scale=0.1, size=(1, OUT)).astype(np.float32)
    loss = D.dino_loss(jnp.asarray(student), jnp.asarray(teacher), jnp.asarray(center), student_temp=0.1,
                       teacher_temp=0.04, num_global_crops=global_crops, num_crops=ncrops)
    expected = _reference_dino_loss(student.astype(np.float64), teacher.astype(np.float64),
                                    center.astype(np.float64), 0.1, 0.04, ncrops)
    assert loss.shape == ()
    assert abs(float(loss) - expected) <= 1e-5 * abs(expected)


@pytest.mark.parametrize("global_crops, local_crops", [(2, 4), (2, 0), (3, 2)])
def test_dino_loss_gradient_matches_the_official_formulas(global_crops, local_crops):
    """d/ds_v of the pair mean of -sum q_i log_softmax(s_v / T): -(sum_{i != v} (q_i - p_v)) / (T B n_terms)."""
    rng = np.random.default_rng(3)
    batch, temp = 3, 0.1
    ncrops = global_crops + local_crops
    student = rng.normal(size=(ncrops * batch, OUT)).astype(np.float32)
    teacher = rng.normal(size=(global_crops * batch, OUT)).astype(np.float32)
    center = rng.normal(scale=0.1, size=(1, OUT)).astype(np.float32)
    grad = jax.grad(lambda s: D.dino_loss(s, jnp.asarray(teacher), jnp.asarray(center), student_temp=temp,
                                          teacher_temp=0.04, num_global_crops=global_crops, num_crops=ncrops))(
        jnp.asarray(student))
    q = np.split(_softmax((teacher.astype(np.float64) - center) / 0.04), global_crops)
    p = np.split(_softmax(student.astype(np.float64) / temp), ncrops)
    n_terms = global_crops * ncrops - global_crops
    expected = np.concatenate([-sum(q[i] - p[v] for i in range(global_crops) if i != v) / (temp * batch * n_terms)
                               for v in range(ncrops)])
    np.testing.assert_allclose(np.asarray(grad), expected, rtol=1e-5, atol=1e-5 * np.abs(expected).max())
    loss = D.dino_loss(jnp.asarray(student), jnp.asarray(teacher), jnp.asarray(center), student_temp=temp,
                       teacher_temp=0.04, num_global_crops=global_crops, num_crops=ncrops)
    reference = _reference_dino_loss(student.astype(np.float64), teacher.astype(np.float64),
                                     center.astype(np.float64), temp, 0.04, ncrops) if global_crops == 2 else None
    assert reference is None or abs(float(loss) - reference) <= 1e-5 * abs(reference)


def test_weight_normalized_kernel_and_its_gradient_match_the_plain_formula():
    rng = np.random.default_rng(4)
    v = jnp.asarray(rng.normal(size=(BOTTLENECK, OUT)), jnp.float32)
    g = jnp.asarray(rng.normal(size=(OUT,)), jnp.float32)
    x = jnp.asarray(rng.normal(size=(5, BOTTLENECK)), jnp.float32)

    def plain(v, g):
        return v * g / jnp.linalg.norm(v, axis=0)

    np.testing.assert_allclose(D.weight_normalized_kernel(v, g), plain(v, g), rtol=1e-6, atol=1e-7)
    ours = jax.grad(lambda v, g: jnp.sum(jnp.sin(x @ D.weight_normalized_kernel(v, g))), (0, 1))(v, g)
    expected = jax.grad(lambda v, g: jnp.sum(jnp.sin(x @ plain(v, g))), (0, 1))(v, g)
    for a, b in zip(ours, expected):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


def test_dino_loss_sends_no_gradient_to_the_teacher():
    rng = np.random.default_rng(1)
    student = jnp.asarray(rng.normal(size=(4 * 2, OUT)), jnp.float32)
    teacher = jnp.asarray(rng.normal(size=(2 * 2, OUT)), jnp.float32)
    grad = jax.grad(lambda t: D.dino_loss(student, t, jnp.zeros((1, OUT)), teacher_temp=0.04, num_crops=4))(teacher)
    np.testing.assert_array_equal(grad, 0.0)


def test_update_center_matches_official():
    rng = np.random.default_rng(2)
    center = rng.normal(size=(1, OUT)).astype(np.float32)
    teacher = rng.normal(size=(6, OUT)).astype(np.float32)
    expected = center * 0.9 + teacher.sum(0, keepdims=True) / len(teacher) * (1 - 0.9)
    np.testing.assert_allclose(D.update_center(jnp.asarray(center), jnp.asarray(teacher)), expected, rtol=1e-6,
                               atol=1e-7)


@pytest.mark.parametrize("warmup_epochs", [0, 2])
def test_cosine_scheduler_matches_official(warmup_epochs):
    args = (5e-4 * 64 / 256, 1e-6, 7, 5)
    schedule = D.cosine_scheduler(*args, warmup_epochs=warmup_epochs, start_warmup_value=1e-5)
    np.testing.assert_array_equal(schedule, _reference_cosine_scheduler(*args, warmup_epochs, 1e-5))
    assert schedule.shape == (35,)
    as_optax = D.schedule_from_array(schedule)
    np.testing.assert_allclose([as_optax(jnp.asarray(s)) for s in (0, 12, 34, 99)], schedule[[0, 12, 34, 34]],
                               rtol=1e-6)


def test_momentum_schedule_goes_from_base_towards_one():
    momentum = D.cosine_scheduler(0.996, 1.0, 3, 4)
    assert momentum[0] == 0.996 and np.all(np.diff(momentum) > 0) and momentum[-1] < 1.0


def test_teacher_temperature_schedule():
    np.testing.assert_array_equal(D.teacher_temperature_schedule(3), [0.04, 0.04, 0.04])
    schedule = D.teacher_temperature_schedule(6, warmup_teacher_temp=0.04, teacher_temp=0.07,
                                              warmup_teacher_temp_epochs=4)
    np.testing.assert_allclose(schedule, [0.04, 0.05, 0.06, 0.07, 0.07, 0.07])


def test_ema_update():
    teacher = {"a": jnp.ones((2, 3)), "b": {"c": jnp.full((4,), 2.0)}}
    student = {"a": jnp.zeros((2, 3)), "b": {"c": jnp.full((4,), 4.0)}}
    out = D.ema_update(teacher, student, 0.9)
    np.testing.assert_allclose(out["a"], 0.9)
    np.testing.assert_allclose(out["b"]["c"], 2.2, rtol=1e-6)


def test_clip_gradients_per_tensor_matches_official():
    small = np.array([0.3, -0.4], np.float32)  # norm 0.5: left alone
    large = np.arange(6, dtype=np.float32).reshape(2, 3)  # norm sqrt(55): clipped to 3
    tx = D.clip_gradients_per_tensor(3.0)
    grads = {"small": jnp.asarray(small), "large": jnp.asarray(large)}
    out, _ = tx.update(grads, tx.init(grads))
    np.testing.assert_array_equal(out["small"], small)
    np.testing.assert_allclose(out["large"], large * 3.0 / (math.sqrt(55.0) + 1e-6), rtol=1e-6)
    assert abs(float(jnp.linalg.norm(out["large"])) - 3.0) < 1e-5


def test_freeze_last_layer_zeroes_only_last_layer_during_the_first_epoch():
    _, params = _head_params()
    grads = jax.tree.map(jnp.ones_like, params)
    for step, frozen in ((0, True), (3, True), (4, False), (9, False)):
        out = D.freeze_last_layer(grads, step, steps_per_epoch=4)
        for name in ("last_layer_v", "last_layer_g"):
            np.testing.assert_array_equal(out[name], 0.0 if frozen else 1.0)
        np.testing.assert_array_equal(out["mlp_0"]["kernel"], 1.0)
        np.testing.assert_array_equal(out["mlp_2"]["bias"], 1.0)


def test_adamw_dino_decays_only_matrices_and_keeps_the_frozen_scale():
    _, params = _head_params()
    tx = D.adamw_dino(jnp.asarray(1e-2), 0.5)
    zero_grads = jax.tree.map(jnp.zeros_like, params)
    updates, _ = tx.update(zero_grads, tx.init(params), params)
    new = optax.apply_updates(params, updates)
    np.testing.assert_allclose(new["mlp_0"]["kernel"], params["mlp_0"]["kernel"] * (1 - 1e-2 * 0.5), rtol=1e-6)
    np.testing.assert_allclose(new["last_layer_v"], params["last_layer_v"] * (1 - 1e-2 * 0.5), rtol=1e-6)
    for name in ("mlp_0", "mlp_1", "mlp_2"):
        np.testing.assert_array_equal(new[name]["bias"], params[name]["bias"])
    state = tx.init(params)
    ones = jax.tree.map(jnp.ones_like, params)
    for _ in range(3):
        updates, state = tx.update(ones, state, params)
        params = optax.apply_updates(params, updates)
    np.testing.assert_array_equal(params["last_layer_g"], 1.0)


def test_adamw_dino_trains_the_scale_without_norm_last_layer():
    _, params = _head_params(norm_last_layer=False)
    tx = D.adamw_dino(1e-2, 0.5, norm_last_layer=False, freeze_last_layer_steps=1)
    state = tx.init(params)
    ones = jax.tree.map(jnp.ones_like, params)
    frozen, state = tx.update(ones, state, params)
    np.testing.assert_array_equal(frozen["last_layer_g"], 0.0)
    np.testing.assert_array_equal(frozen["last_layer_v"], 0.0)
    assert float(jnp.abs(frozen["mlp_0"]["bias"]).min()) > 0
    trained, _ = tx.update(ones, state, params)
    np.testing.assert_allclose(trained["last_layer_g"], -1e-2, rtol=1e-4)  # Adam's first step: -lr * sign(g)


def test_dino_head_shapes_and_unit_norm_columns():
    head, params = _head_params()
    assert params["last_layer_v"].shape == (BOTTLENECK, OUT)
    assert params["last_layer_g"].shape == (OUT,)
    np.testing.assert_array_equal(params["last_layer_g"], 1.0)
    np.testing.assert_array_equal(params["mlp_0"]["bias"], 0.0)
    assert abs(float(params["mlp_1"]["kernel"].std()) - 0.02) < 0.004
    x = jax.random.normal(jax.random.key(1), (5, IN))
    assert head.apply({"params": params}, x).shape == (5, OUT)
    effective = params["last_layer_v"] / jnp.linalg.norm(params["last_layer_v"], axis=0) * params["last_layer_g"]
    np.testing.assert_allclose(jnp.linalg.norm(effective, axis=0), 1.0, rtol=1e-5)
    # A unit-norm bottleneck times unit-norm columns: every logit is a cosine, so |logit| <= 1.
    assert float(jnp.abs(head.apply({"params": params}, x)).max()) <= 1.0 + 1e-5


def test_dino_head_with_batch_norm_and_one_layer():
    head = D.DINOHead(out_dim=OUT, hidden_dim=HIDDEN, bottleneck_dim=BOTTLENECK, use_bn=True)
    variables = head.init(jax.random.key(0), jnp.ones((4, IN)), train=False)
    out, updates = head.apply(variables, jnp.ones((4, IN)), mutable=["batch_stats"])
    assert out.shape == (4, OUT) and "bn_0" in updates["batch_stats"]
    single = D.DINOHead(out_dim=OUT, bottleneck_dim=BOTTLENECK, nlayers=1)
    params = single.init(jax.random.key(0), jnp.ones((2, IN)))["params"]
    assert set(params) == {"mlp_0", "last_layer_v", "last_layer_g"}
    assert params["mlp_0"]["kernel"].shape == (IN, BOTTLENECK)


def test_sgd_dino_adds_decay_to_the_gradient_of_matrices_only_and_keeps_momentum():
    """torch SGD: buf = g + wd * p on the first step, then buf = 0.9 buf + g + wd * p; p -= lr * buf."""
    _, params = _head_params()
    lr, wd = 1e-2, 0.5
    tx = D.sgd_dino(lr, wd)
    state = tx.init(params)
    ones = jax.tree.map(jnp.ones_like, params)
    first, state = tx.update(ones, state, params)
    kernel = np.asarray(params["mlp_0"]["kernel"])
    np.testing.assert_allclose(first["mlp_0"]["kernel"], -lr * (1 + wd * kernel), rtol=1e-6)
    np.testing.assert_allclose(first["mlp_0"]["bias"], -lr, rtol=1e-6)
    np.testing.assert_array_equal(first["last_layer_g"], 0.0)
    second, _ = tx.update(ones, state, params)
    np.testing.assert_allclose(second["mlp_0"]["bias"], -lr * (0.9 + 1), rtol=1e-6)
    np.testing.assert_allclose(second["mlp_0"]["kernel"], -lr * 1.9 * (1 + wd * kernel), rtol=1e-5)


@pytest.mark.parametrize("optimizer", ["adamw", "sgd"])
def test_training_steps_match_pytorch(optimizer):
    """Loss, per-tensor clipping, last-layer freeze and the AdamW / SGD groups over two epochs, against eager
    torch (main_dino.py's `--optimizer adamw` and `--optimizer sgd`)."""
    torch = pytest.importorskip("torch")
    head, params = _head_params()
    steps_per_epoch, epochs, ncrops, batch = 2, 2, 4, 3
    lr = D.cosine_scheduler(1e-2, 1e-4, epochs, steps_per_epoch, warmup_epochs=1)
    wd = D.cosine_scheduler(0.04, 0.4, epochs, steps_per_epoch)
    ours = {"adamw": D.adamw_dino, "sgd": D.sgd_dino}[optimizer]
    tx = optax.chain(D.clip_gradients_per_tensor(0.05), ours(lr, wd, freeze_last_layer_steps=steps_per_epoch))
    state = tx.init(params)
    rng = np.random.default_rng(3)
    inputs = rng.normal(size=(epochs * steps_per_epoch, ncrops * batch, IN)).astype(np.float32)
    teachers = rng.normal(size=(epochs * steps_per_epoch, 2 * batch, OUT)).astype(np.float32)

    def loss_fn(p, x, t):
        return D.dino_loss(head.apply({"params": p}, x), t, jnp.zeros((1, OUT)), teacher_temp=0.04, num_crops=ncrops)

    torch_params = {f"{name}.{k}": torch.tensor(np.asarray(v), requires_grad=True)
                    for name, leaf in params.items() if isinstance(leaf, dict) for k, v in leaf.items()}
    torch_params["last_layer_v"] = torch.tensor(np.asarray(params["last_layer_v"]), requires_grad=True)
    g = torch.tensor(np.asarray(params["last_layer_g"]))  # requires_grad=False: norm_last_layer

    def torch_forward(x):
        for i in range(3):
            x = x @ torch_params[f"mlp_{i}.kernel"] + torch_params[f"mlp_{i}.bias"]
            x = torch.nn.functional.gelu(x) if i < 2 else x
        x = torch.nn.functional.normalize(x, dim=-1, p=2)
        v = torch_params["last_layer_v"]
        return x @ (g * v / v.norm(dim=0, keepdim=True))

    regularized = [p for n, p in torch_params.items() if not (n.endswith(".bias") or p.ndim == 1)]
    not_regularized = [p for n, p in torch_params.items() if n.endswith(".bias") or p.ndim == 1]
    groups = [{"params": regularized}, {"params": not_regularized, "weight_decay": 0.0}]
    if optimizer == "adamw":
        optimizer = torch.optim.AdamW(groups)
    else:
        optimizer = torch.optim.SGD(groups, lr=0, momentum=0.9)
    for it in range(epochs * steps_per_epoch):
        epoch = it // steps_per_epoch
        grads = jax.grad(loss_fn)(params, jnp.asarray(inputs[it]), jnp.asarray(teachers[it]))
        updates, state = tx.update(grads, state, params)
        params = optax.apply_updates(params, updates)

        for i, group in enumerate(optimizer.param_groups):
            group["lr"] = lr[it]
            if i == 0:
                group["weight_decay"] = wd[it]
        teacher = torch.softmax(torch.tensor(teachers[it]) / 0.04, dim=-1).chunk(2)
        student = (torch_forward(torch.tensor(inputs[it])) / 0.1).chunk(ncrops)
        terms = [torch.sum(-q * torch.log_softmax(student[v], dim=-1), dim=-1).mean()
                 for iq, q in enumerate(teacher) for v in range(ncrops) if v != iq]
        optimizer.zero_grad()
        (sum(terms) / len(terms)).backward()
        for p in torch_params.values():
            clip_coef = 0.05 / (p.grad.data.norm(2) + 1e-6)
            if clip_coef < 1:
                p.grad.data.mul_(clip_coef)
        if epoch < 1:
            torch_params["last_layer_v"].grad = None
        optimizer.step()
        np.testing.assert_allclose(params["last_layer_v"], torch_params["last_layer_v"].detach().numpy(),
                                   rtol=1e-4, atol=1e-6)
        for name in ("mlp_0", "mlp_2"):
            for k in ("kernel", "bias"):
                np.testing.assert_allclose(params[name][k], torch_params[f"{name}.{k}"].detach().numpy(),
                                           rtol=1e-4, atol=1e-6)
        np.testing.assert_array_equal(params["last_layer_g"], 1.0)


def _record(seed=0, size=64, gray=False):
    rng = np.random.default_rng(seed)
    image = rng.integers(0, 256, (size, size + 8, 1 if gray else 3), dtype=np.uint8)
    return {"image": np.repeat(image, 3, axis=2) if gray else image, "label": 3}


_SMALL = dict(global_crop_size=32, local_crop_size=16, local_crops_number=3)


@pytest.mark.parametrize("gray", [False, True])
def test_multicrop_keys_shapes_and_dtypes(gray):
    transform = M.DinoMultiCrop(**_SMALL)
    out = transform(_record(gray=gray), np.random.default_rng(0))
    assert set(out) == {"global_0", "global_1", "local_0", "local_1", "local_2", "label"}
    assert transform.num_crops == 5 and out["label"] == 3
    for key in ("global_0", "global_1"):
        assert out[key].shape == (32, 32, 3) and out[key].dtype == np.uint8
    for i in range(3):
        assert out[f"local_{i}"].shape == (16, 16, 3) and out[f"local_{i}"].dtype == np.uint8


def test_multicrop_is_deterministic_per_seed_and_varies_across_seeds():
    transform = M.DinoMultiCrop(**_SMALL)
    first = transform(_record(), np.random.default_rng(7))
    again = transform(_record(), np.random.default_rng(7))
    other = transform(_record(), np.random.default_rng(8))
    for key in ("global_0", "global_1", "local_0", "local_2"):
        np.testing.assert_array_equal(first[key], again[key])
    assert any(not np.array_equal(first[key], other[key]) for key in first if key != "label")
    assert not np.array_equal(first["local_0"], first["local_1"])


def test_multicrop_through_grain_is_reproducible():
    grain = pytest.importorskip("grain")
    records = [_record(seed=i) for i in range(3)]
    transform = M.DinoMultiCrop(**_SMALL)
    a = grain.MapDataset.source(records).random_map(transform, seed=11)
    b = grain.MapDataset.source(records).random_map(transform, seed=11)
    c = grain.MapDataset.source(records).random_map(transform, seed=12)
    np.testing.assert_array_equal(a[1]["global_0"], b[1]["global_0"])
    assert not np.array_equal(a[1]["global_0"], c[1]["global_0"])


def test_multicrop_without_random_steps_is_a_bicubic_resized_crop():
    transform = M.DinoMultiCrop(**_SMALL, flip_probability=0.0, jitter_probability=0.0, grayscale_probability=0.0,
                                global_blur_probabilities=(0.0, 0.0), local_blur_probability=0.0)
    record = _record()
    out = transform(record, np.random.default_rng(3))
    image = Image.fromarray(record["image"])
    box = T.random_resized_crop_box(image.width, image.height, (0.4, 1.0), np.random.default_rng(3))
    np.testing.assert_array_equal(out["global_0"], np.asarray(T.resized_crop(image, box, 32)))


def test_crop_and_hue_match_torchvision():
    F = pytest.importorskip("torchvision.transforms.functional")
    image = Image.fromarray(_record()["image"])
    box = (5, 7, 30, 41)
    expected = F.resized_crop(image, *box, [32, 32], interpolation=F.InterpolationMode.BICUBIC)
    np.testing.assert_array_equal(np.asarray(T.resized_crop(image, box, 32)), np.asarray(expected))
    for factor in (0.07, -0.05, 0.0):
        np.testing.assert_array_equal(np.asarray(T.adjust_hue(image, factor)), np.asarray(F.adjust_hue(image, factor)))
    gray = image.convert("L")
    assert T.adjust_hue(gray, 0.1) is gray


def test_dino_brain_mri_resnet50_variant_is_the_official_resnet_recipe():
    from configs.dino_brain_mri import get_config

    c = get_config("resnet50")
    assert (c.dino.arm, c.cnn.name, tuple(c.downstream.arms)) == ("cnn", "resnet50", ("cnn",))
    assert (c.dino.optimizer, c.dino.lr, c.dino.weight_decay, c.dino.weight_decay_end) == ("sgd", 0.03, 1e-4, 1e-4)
    assert tuple(c.dino.global_crops_scale) == (0.14, 1.0) and tuple(c.dino.local_crops_scale) == (0.05, 0.14)
    assert get_config().dino.optimizer == "adamw"
    smoke = get_config("resnet50+smoke")
    assert smoke.dino.optimizer == "sgd" and smoke.num_epochs == 1
    with pytest.raises(ValueError, match="resnet50"):
        get_config("resnet5")
