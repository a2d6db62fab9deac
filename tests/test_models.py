"""Model contract tests (no torch needed): shapes, features, BatchNorm semantics, dtype, errors, sizes."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cass_jax.models import BatchNorm, create_model, init_variables, list_models
from cass_jax.models.resnet import max_pool_3x3_stride2


def param_count(model, image_size: int) -> int:
    shapes = jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros((1, image_size, image_size, 3))))
    return sum(int(np.prod(leaf.shape)) for leaf in jax.tree_util.tree_leaves(shapes["params"]))


def jit_apply(model):
    return jax.jit(model.apply, static_argnames=("train", "return_features", "mutable"))


@pytest.fixture(scope="module")
def tiny_resnet():
    model = create_model("resnet_tiny", num_classes=5)
    return model, init_variables(model, jax.random.key(0), 128, batch_size=2)


@pytest.fixture(scope="module")
def micro_vit():
    model = create_model("vit_micro_patch16", num_classes=5, img_size=32)
    return model, init_variables(model, jax.random.key(0), 32)


def test_names_follow_timm_and_unknown_name_lists_known_ones():
    names = list_models()
    for name in ("resnet18", "resnet34", "resnet50", "resnet101", "resnet152", "resnet200",
                 "vit_tiny_patch16_224", "vit_small_patch32_384", "vit_base_patch16_384", "vit_large_patch16_224",
                 "resnet_tiny", "vit_micro_patch16"):
        assert name in names
    with pytest.raises(ValueError, match="resnet50.*vit_base_patch16_384|known names"):
        create_model("resnet51")
    with pytest.raises(ValueError, match="img_size"):
        create_model("resnet50", img_size=224)


def test_parameter_counts_equal_timm():
    assert param_count(create_model("resnet50"), 64) == 25_557_032
    assert param_count(create_model("vit_base_patch16_384"), 384) == 86_859_496
    assert param_count(create_model("resnet18"), 64) == 11_689_512
    assert param_count(create_model("vit_tiny_patch16_224"), 224) == 5_717_416


def test_resnet_outputs_features_and_head(tiny_resnet):
    model, variables = tiny_resnet
    assert set(variables) == {"params", "batch_stats"} and type(variables["params"]) is dict
    assert "head" in variables["params"] and model.num_features == 128
    x = jax.random.normal(jax.random.key(1), (2, 128, 128, 3))
    logits, features = jit_apply(model)(variables, x, return_features=True)
    assert logits.shape == (2, 5) and features.shape == (2, 128)
    head = variables["params"]["head"]
    np.testing.assert_allclose(logits, features @ head["kernel"] + head["bias"], rtol=1e-5, atol=1e-5)
    headless = create_model("resnet_tiny", num_classes=0)
    headless_vars = {"params": {k: v for k, v in variables["params"].items() if k != "head"},
                     "batch_stats": variables["batch_stats"]}
    np.testing.assert_allclose(jit_apply(headless)(headless_vars, x), features, rtol=1e-6)


def test_resnet_train_mode_uses_batch_stats_and_updates_running_stats(tiny_resnet):
    model, variables = tiny_resnet
    x = 3.0 + 2.0 * jax.random.normal(jax.random.key(2), (2, 128, 128, 3))
    apply = jit_apply(model)
    train_logits, updates = apply(variables, x, train=True, mutable=("batch_stats",))
    stem = jax.lax.conv_general_dilated(
        x, variables["params"]["conv1"]["kernel"], (2, 2), ((3, 3), (3, 3)),
        dimension_numbers=("NHWC", "HWIO", "NHWC"), precision="highest",
    )
    n = stem.shape[0] * stem.shape[1] * stem.shape[2]
    expected_mean = 0.1 * np.mean(stem, axis=(0, 1, 2))
    expected_var = 0.9 * 1.0 + 0.1 * np.var(np.asarray(stem), axis=(0, 1, 2)) * n / (n - 1)
    np.testing.assert_allclose(updates["batch_stats"]["bn1"]["mean"], expected_mean, rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(updates["batch_stats"]["bn1"]["var"], expected_var, rtol=1e-4)
    assert not np.allclose(train_logits, apply(variables, x, train=False), atol=1e-3)


def test_batchnorm_normalises_with_biased_and_tracks_unbiased_variance():
    x = jax.random.normal(jax.random.key(3), (4, 3, 3, 2)) * jnp.array([1.0, 5.0]) + jnp.array([0.0, 7.0])
    bn = BatchNorm()
    variables = bn.init(jax.random.key(0), x, train=False)
    y, updates = bn.apply(variables, x, train=True, mutable=["batch_stats"])
    xn = np.asarray(x).reshape(-1, 2)
    expected = (xn - xn.mean(0)) / np.sqrt(xn.var(0) + 1e-5)
    np.testing.assert_allclose(np.asarray(y).reshape(-1, 2), expected, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(updates["batch_stats"]["var"], 0.9 + 0.1 * xn.var(0, ddof=1), rtol=1e-6)
    with pytest.raises(ValueError, match="more than 1 value per channel"):
        bn.apply(variables, x[:1, :1, :1], train=True, mutable=["batch_stats"])


@pytest.mark.parametrize("size", [8, 9])
def test_slice_max_pool_equals_flax_max_pool_with_torch_padding(size):
    from flax import linen as nn

    x = jax.random.normal(jax.random.key(4), (2, size, size, 3))

    def reference(x):
        return nn.max_pool(x, (3, 3), strides=(2, 2), padding=((1, 1), (1, 1)))

    np.testing.assert_array_equal(max_pool_3x3_stride2(x), reference(x))
    cotangent = jax.random.normal(jax.random.key(5), reference(x).shape)
    grad = jax.grad(lambda x: jnp.sum(max_pool_3x3_stride2(x) * cotangent))(x)
    np.testing.assert_allclose(grad, jax.grad(lambda x: jnp.sum(reference(x) * cotangent))(x), rtol=1e-6)


def test_vit_outputs_and_size_errors(micro_vit):
    model, variables = micro_vit
    assert set(variables) == {"params"} and model.num_features == 64
    assert variables["params"]["pos_embed"].shape == (1, 5, 64)
    x = jax.random.normal(jax.random.key(4), (3, 32, 32, 3))
    logits, features = jit_apply(model)(variables, x, train=True, return_features=True)
    assert logits.shape == (3, 5) and features.shape == (3, 64)
    with pytest.raises(ValueError, match="img_size=48"):
        model.apply(variables, jnp.zeros((1, 48, 48, 3)))
    odd = create_model("vit_micro_patch16", img_size=40)
    with pytest.raises(ValueError, match="multiple of patch_size"):
        init_variables(odd, jax.random.key(0), 40)


def test_vit_last_block_class_token_only_keeps_outputs_and_gradients_with_fewer_flops():
    """Pruning the last block to the class token changes nothing the output depends on, only the work done."""
    # XLA's own kernels: its cost analysis counts no FLOPs inside oneDNN's calls.
    pruned = create_model("vit_micro_patch16", num_classes=5, img_size=64, kernel_grad="xla")
    full = create_model("vit_micro_patch16", num_classes=5, img_size=64, last_block_class_token_only=False,
                        kernel_grad="xla")
    assert pruned.last_block_class_token_only and not full.last_block_class_token_only
    variables = init_variables(full, jax.random.key(0), 64)
    x = jax.random.normal(jax.random.key(1), (2, 64, 64, 3))
    cotangent = jax.random.normal(jax.random.key(2), (2, 5))

    def loss(model):
        return lambda params: jnp.sum(model.apply({"params": params}, x) * cotangent)

    for out_pruned, out_full in zip(jit_apply(pruned)(variables, x, return_features=True),
                                    jit_apply(full)(variables, x, return_features=True), strict=True):
        np.testing.assert_allclose(out_pruned, out_full, rtol=1e-5, atol=1e-6)
    grads = [jax.jit(jax.grad(loss(model)))(variables["params"]) for model in (pruned, full)]
    jax.tree_util.tree_map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6), *grads)
    flops = [jax.jit(jax.grad(loss(model))).lower(variables["params"]).compile().cost_analysis()["flops"]
             for model in (pruned, full)]
    # 17 tokens, 2 blocks: the pruned last block skips 16 tokens' queries, proj and MLP: 27% fewer FLOPs here.
    assert flops[0] < 0.75 * flops[1], flops


def test_default_vit_size_comes_from_the_name():
    assert create_model("vit_base_patch16_384").img_size == 384
    assert create_model("vit_base_patch16_384", img_size=224).img_size == 224
    assert create_model("vit_small_patch32_224").patch_size == 32
    assert create_model("vit_micro_patch16").img_size == 224


def test_vit_uses_exact_gelu(micro_vit, monkeypatch):
    """The MLP activation is the exact (erf) GELU: swapping in tanh-GELU changes the output, Flax's exact one does not."""
    from flax import linen as nn

    from cass_jax.models import vit

    model, variables = micro_vit
    x = jax.random.normal(jax.random.key(5), (1, 32, 32, 3))
    ours = np.asarray(jit_apply(model)(variables, x))
    monkeypatch.setattr(vit, "exact_gelu", lambda y: nn.gelu(y, approximate=False))
    np.testing.assert_allclose(np.asarray(jit_apply(model)(variables, x)), ours, rtol=1e-5, atol=1e-6)
    monkeypatch.setattr(vit, "exact_gelu", lambda y: nn.gelu(y, approximate=True))
    assert np.max(np.abs(np.asarray(jit_apply(model)(variables, x)) - ours)) > 1e-6


@pytest.mark.parametrize("name,size", [("resnet_tiny", 128), ("vit_micro_patch16", 32)])
def test_bfloat16_compute_keeps_float32_params(name, size):
    kwargs = {"img_size": size} if "vit" in name else {}
    model32 = create_model(name, num_classes=4, **kwargs)
    model16 = create_model(name, num_classes=4, dtype=jnp.bfloat16, **kwargs)
    variables = init_variables(model16, jax.random.key(0), size, batch_size=2)
    assert all(leaf.dtype == jnp.float32 for leaf in jax.tree_util.tree_leaves(variables))
    if "batch_stats" in variables:  # make the last BN scales non-zero so every layer matters
        variables = jax.tree_util.tree_map(lambda p: p + 0.5, variables)
    x = jax.random.normal(jax.random.key(6), (2, size, size, 3))
    out16, out32 = jit_apply(model16)(variables, x), jit_apply(model32)(variables, x)
    assert out16.dtype == jnp.bfloat16
    rel = np.linalg.norm(np.asarray(out16, np.float32) - out32) / np.linalg.norm(out32)
    assert rel < 0.05


def test_init_is_reproducible():
    model = create_model("vit_micro_patch16", img_size=32)
    a = init_variables(model, jax.random.key(7), 32)
    b = init_variables(model, jax.random.key(7), 32)
    c = init_variables(model, jax.random.key(8), 32)
    leaves = zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b), jax.tree_util.tree_leaves(c))
    differs = False
    for x, y, z in leaves:
        np.testing.assert_array_equal(x, y)
        differs |= not np.array_equal(x, z)
    assert differs


def test_vit_interpolates_position_embeddings_for_other_crop_sizes_and_keeps_its_native_outputs():
    """DINO's local crops: the same ViT reads 32 px crops with interpolated embeddings; 64 px is unchanged."""
    fixed = create_model("vit_micro_patch16", num_classes=0, img_size=64)
    flexible = create_model("vit_micro_patch16", num_classes=0, img_size=64, interpolate_pos_encoding=True)
    variables = init_variables(fixed, jax.random.key(0), 64)
    x = jax.random.normal(jax.random.key(1), (2, 64, 64, 3))
    np.testing.assert_array_equal(fixed.apply(variables, x), flexible.apply(variables, x))
    small = flexible.apply(variables, x[:, :32, :32])
    assert small.shape == (2, 64) and np.isfinite(np.asarray(small)).all()
    with pytest.raises(ValueError, match="multiple of patch_size"):
        flexible.apply(variables, x[:, :40, :40])
    with pytest.raises(ValueError, match="img_size=32"):
        fixed.apply(variables, x[:, :32, :32])


@pytest.mark.parametrize("grid", [(2, 2), (6, 6), (3, 5)])
def test_position_embedding_interpolation_matches_dino_and_torch(grid):
    torch = pytest.importorskip("torch")
    from cass_jax.models.vit import interpolate_position_embeddings

    side, dim = 4, 5
    pos_embed = np.random.default_rng(0).normal(size=(1, 1 + side * side, dim)).astype(np.float32)
    ours = interpolate_position_embeddings(jnp.asarray(pos_embed), *grid)
    # vision_transformer.py interpolate_pos_encoding (facebookresearch/dino), with h and w in their own axes.
    patches = torch.tensor(pos_embed[:, 1:]).reshape(1, side, side, dim).permute(0, 3, 1, 2)
    resized = torch.nn.functional.interpolate(
        patches, scale_factor=((grid[0] + 0.1) / side, (grid[1] + 0.1) / side), mode="bicubic")
    assert tuple(resized.shape[-2:]) == grid
    expected = np.concatenate([pos_embed[:, :1], resized.permute(0, 2, 3, 1).reshape(1, -1, dim).numpy()], axis=1)
    np.testing.assert_allclose(np.asarray(ours), expected, rtol=1e-5, atol=1e-6)
