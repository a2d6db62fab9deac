"""Saliency maps, mask scores, the randomisation check and figures, on tiny real models and hand-built ones."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import linen as nn
from PIL import Image

from cass_jax import saliency
from cass_jax import saliency_figures as figures
from cass_jax.data.config import IMAGENET_MEAN, IMAGENET_STD
from cass_jax.models import VisionTransformer, create_model, init_variables


@pytest.fixture(scope="module")
def tiny_resnet():
    model = create_model("resnet_tiny", num_classes=3)
    return model, init_variables(model, jax.random.key(0), 128)


@pytest.fixture(scope="module")
def micro_vit():
    model = create_model("vit_micro_patch16", num_classes=3, img_size=64)
    return model, init_variables(model, jax.random.key(0), 64)


def normal_images(seed: int, count: int, size: int) -> jax.Array:
    return jax.random.normal(jax.random.key(seed), (count, size, size, 3))


@pytest.mark.parametrize("fixture, size, steps, baselines", [("micro_vit", 64, 64, ("black", "gray")),
                                                              ("tiny_resnet", 128, 128, ("black",))])
def test_integrated_gradients_sum_to_the_score_difference(request, fixture, size, steps, baselines):
    """Completeness within 1%. The ViT is smooth (0.01% at 64 steps); the ResNet's path crosses ReLU kinks, where the
    integrand jumps and the quadrature error falls only as 1/steps (up to 0.8% at 64 steps, 0.7% at 128)."""
    model, variables = request.getfixturevalue(fixture)
    images, targets = normal_images(1, 2, size), np.array([0, 2])
    # The default baseline (the normalised black image) and a given one, mid-gray. A zero image would be a poor test:
    # at random initialisation it puts the ResNet's ReLUs on their kinks and the ViT's tokens near LayerNorm's
    # singularity (patch embeddings 0, position embeddings ~0.02), so its path integral needs thousands of steps.
    gray = np.broadcast_to((0.5 - np.array(IMAGENET_MEAN)) / np.array(IMAGENET_STD), (size, size, 3))
    cases = {"black": (None, saliency.black_baseline(images.shape)), "gray": (gray, gray)}
    for given, baseline in (cases[name] for name in baselines):
        attributions = saliency.integrated_gradients(model, variables, images, targets, baseline=given, steps=steps,
                                                     points_per_pass=4)
        expected = (saliency.class_scores(model, variables, images, targets)
                    - saliency.class_scores(model, variables, np.broadcast_to(baseline, images.shape), targets))
        assert np.all(np.abs(expected) > 1e-2)
        np.testing.assert_allclose(np.asarray(attributions.sum(axis=(1, 2, 3))), expected, rtol=0.01)


def test_batched_integration_equals_one_image_at_a_time(micro_vit):
    model, variables = micro_vit
    images, targets = normal_images(1, 2, 64), np.array([0, 2])
    batched = saliency.integrated_gradients(model, variables, images, targets, steps=64, points_per_pass=4)
    for index in range(2):
        alone = saliency.integrated_gradients(model, variables, images[index:index + 1], targets[index:index + 1],
                                              steps=64, points_per_pass=1)
        np.testing.assert_allclose(batched[index:index + 1], alone, rtol=1e-4, atol=1e-7)


def test_default_targets_are_each_images_top_class(micro_vit):
    model, variables = micro_vit
    images = normal_images(3, 2, 64)
    top_classes = np.argmax(model.apply(variables, images), axis=-1)
    maps = saliency.saliency_maps(model, variables, images, None, "vanilla")
    assert maps.dtype == np.float32 and maps.shape == (2, 64, 64) and maps.min() >= 0 and maps.max() > 0
    np.testing.assert_array_equal(maps, saliency.saliency_maps(model, variables, images, top_classes, "vanilla"))


def test_resnet_grad_cam_is_class_activation_mapping_of_the_last_stage(tiny_resnet):
    """Before a global-average pool and a linear head, d score / d A is head weight / (h w) everywhere, so Grad-CAM
    must equal CAM (Zhou et al. 2016) on the last stage's output, read here through capture_intermediates."""
    model, variables = tiny_resnet
    images, targets = normal_images(4, 2, 128), np.array([2, 1])
    _, state = model.apply(variables, images, capture_intermediates=True, mutable=["intermediates"])
    activation = state["intermediates"]["layer4_0"]["__call__"][0]
    head_columns = variables["params"]["head"]["kernel"][:, targets].T
    cam = nn.relu(jnp.einsum("bhwc,bc->bhw", activation, head_columns)) / (activation.shape[1] * activation.shape[2])
    expected = jnp.maximum(jax.image.resize(cam, (2, 128, 128), "bilinear"), 0)
    np.testing.assert_allclose(saliency.grad_cam_map(model, variables, images, targets), expected,
                               rtol=1e-4, atol=1e-6)


def test_vit_attention_weights_reproduce_the_attention_output(micro_vit):
    """The weights recomputed from the captured qkv projections, applied to the values and `proj`, must give the
    attention module's own output (capture_intermediates): this pins the head layout and the scaling."""
    model, variables = micro_vit
    images = normal_images(5, 2, 64)
    weights = saliency.vit_attention_weights(model, variables, images)
    assert weights.shape == (2, 2, 2, 17, 17)
    np.testing.assert_allclose(weights.sum(axis=-1), 1.0, rtol=1e-5)
    _, state = model.apply(variables, images, capture_intermediates=True, mutable=["intermediates"])
    block = state["intermediates"]["blocks_0"]["attn"]
    qkv = block["qkv"]["__call__"][0].reshape(2, 17, 3, 2, 32)
    mixed = jnp.einsum("bhqk,bkhd->bqhd", weights[0], qkv[:, :, 2]).reshape(2, 17, 64)
    proj = variables["params"]["blocks_0"]["attn"]["proj"]
    np.testing.assert_allclose(mixed @ proj["kernel"] + proj["bias"], block["__call__"][0], rtol=1e-4, atol=1e-5)


def test_vit_maps_do_not_depend_on_last_block_class_token_only(micro_vit):
    model, variables = micro_vit
    images, targets = normal_images(6, 2, 64), np.array([0, 1])
    all_tokens = model.clone(last_block_class_token_only=False)
    for method in ("grad_cam", "attention_rollout"):
        maps = saliency.saliency_maps(model, variables, images, targets, method)
        assert maps.dtype == np.float32 and maps.shape == (2, 64, 64) and maps.min() >= 0 and maps.max() > 0
        np.testing.assert_allclose(maps, saliency.saliency_maps(all_tokens, variables, images, targets, method),
                                   rtol=1e-4, atol=1e-7)


class PositiveFeatures(nn.Module):
    """1x1 bias-free convolution and ReLU: the Grad-CAM layer of RegionCNN."""

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        return nn.relu(nn.Conv(8, (1, 1), use_bias=False)(x))


class RegionCNN(nn.Module):
    """Reads only the columns left of `region_width`: a fixed input mask, then bias-free convolutions, so its
    features are exactly zero where the masked input is, up to the 3x3 convolution's one-pixel margin. A
    feature-summing head (all-ones weights) makes every Grad-CAM channel weight positive."""

    region_width: int

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        x = x * (jnp.arange(x.shape[2]) < self.region_width).astype(x.dtype)[None, None, :, None]
        y = nn.relu(nn.Conv(8, (3, 3), padding="SAME", use_bias=False)(x))
        y = PositiveFeatures(name="features")(nn.avg_pool(y, (4, 4), (4, 4)))
        return nn.Dense(1, kernel_init=nn.initializers.ones)(jnp.mean(y, axis=(1, 2)))


def region_reading_vit(rng: jax.Array, region_patch_columns: int) -> tuple[VisionTransformer, dict]:
    """A ViT (8x8 patches of 8 px, two blocks) whose every query attends only to the class token and the patches
    in the first `region_patch_columns` columns.

    Those tokens carry a large marker in embedding channel 0 (position embedding 50); in each head one query
    dimension is a constant 20 (qkv bias) and one key dimension reads the normed marker x 20, so their scores beat
    the unmarked tokens' by hundreds and the softmax gives the others exactly 0. The patch embedding never writes
    channel 0. Block 0's output projections are zero, so the last block reads the embeddings: zero outside the
    region for images that are black (0) there, as Grad-CAM needs, because it weights activations, not gradients.
    """
    model = VisionTransformer(img_size=64, patch_size=8, embed_dim=32, depth=2, num_heads=2, num_classes=2)
    params = jax.tree.map(np.array, init_variables(model, rng, 64)["params"])
    params["patch_embed"]["bias"][:] = 0
    params["patch_embed"]["kernel"][..., 0] = 0
    inside = (np.arange(64) % 8 < region_patch_columns)
    params["pos_embed"][0, 1:][~inside] = 0
    params["pos_embed"][0, np.concatenate([[True], inside]), 0] = 50.0
    head_dim = 16
    for block in ("blocks_0", "blocks_1"):
        qkv = params[block]["attn"]["qkv"]
        for head in range(2):
            query, key = head * head_dim, 32 + head * head_dim
            qkv["kernel"][:, query], qkv["bias"][query] = 0, 20.0
            qkv["kernel"][:, key], qkv["bias"][key] = 0, 0
            qkv["kernel"][0, key] = 20.0
    for layer in (params["blocks_0"]["attn"]["proj"], params["blocks_0"]["mlp"]["fc2"]):
        layer["kernel"][:], layer["bias"][:] = 0, 0
    params["head"]["kernel"][:, 1] = -params["head"]["kernel"][:, 0]
    params["head"]["bias"][:] = 0
    return model, {"params": params}


def left_columns_mask(count: int, size: int, width: int) -> np.ndarray:
    return np.broadcast_to(np.arange(size) < width, (count, size, size))


def test_a_model_reading_one_region_puts_its_saliency_there():
    """>= 90% of the mass in the region the model reads, for every method that applies. Input-gradient methods
    need only that the output ignore the rest. Grad-CAM weights activations, so its layer's activations must also
    vanish outside (bias-free CNN on a masked input; ViT embeddings of black pixels); rollout needs zero attention to
    the patches outside. Bilinear upsampling of Grad-CAM and rollout spills a little over the region's edge."""
    cnn = RegionCNN(region_width=32)
    cnn_variables = cnn.init(jax.random.key(0), jnp.zeros((1, 64, 64, 3)))
    vit, vit_variables = region_reading_vit(jax.random.key(1), region_patch_columns=4)
    images = np.array(normal_images(7, 2, 64))
    images[:, :, 32:] = 0
    mask = left_columns_mask(2, 64, 32)
    options = {"smoothgrad": {"samples": 8}, "integrated_gradients": {"steps": 16},
               "grad_cam": {"layer": "features"}}
    for method in saliency.applicable_methods(cnn, grad_cam_layer="features"):
        maps = saliency.saliency_maps(cnn, cnn_variables, images, [0, 0], method, **options.get(method, {}))
        assert maps.dtype == np.float32 and maps.shape == (2, 64, 64) and maps.min() >= 0, method
        assert saliency.mass_in_mask(maps, mask).min() >= 0.9, method
    del options["grad_cam"]
    for method in saliency.applicable_methods(vit):
        maps = [saliency.saliency_maps(vit, vit_variables, images, [target] * 2, method, **options.get(method, {}))
                for target in (0, 1)]
        assert all(m.dtype == np.float32 and m.shape == (2, 64, 64) and m.min() >= 0 for m in maps), method
        shares = np.stack([saliency.mass_in_mask(target_maps, mask) for target_maps in maps])
        # The classes' head rows are opposite: where Grad-CAM's ReLU empties one class's map (NaN share), the other
        # class's map is not empty.
        assert not np.isnan(shares).all(axis=0).any() and np.nanmin(shares) >= 0.9, (method, shares)
    # The ViT ignores the other patches through attention alone, whatever their pixels: the gradient there is 0.
    unmasked_maps = saliency.vanilla_gradient_map(vit, vit_variables, normal_images(7, 2, 64), [0, 0])
    assert saliency.mass_in_mask(unmasked_maps, mask).min() == 1.0


def blob_images(seed: int, count: int) -> tuple[np.ndarray, np.ndarray]:
    """Noise with one 16 px square, bright for class 1 and dark for class 0, anywhere in the image."""
    rng = np.random.default_rng(seed)
    images = rng.normal(0, 0.5, (count, 64, 64, 3)).astype(np.float32)
    labels = rng.integers(0, 2, count)
    for image, label in zip(images, labels):
        top, left = rng.integers(0, 48, 2)
        image[top:top + 16, left:left + 16] += 2.0 if label else -2.0
    return images, labels


def test_randomisation_check_separates_a_trained_model_from_a_random_one(micro_vit):
    model, variables = micro_vit
    optimizer = optax.adam(1e-3)

    @jax.jit
    def train_step(params, optimizer_state, images, labels):
        def loss(params):
            logits = model.apply({"params": params}, images)
            return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()

        gradients = jax.grad(loss)(params)
        updates, optimizer_state = optimizer.update(gradients, optimizer_state)
        return optax.apply_updates(params, updates), optimizer_state

    params, optimizer_state = variables["params"], optimizer.init(variables["params"])
    for step in range(40):
        params, optimizer_state = train_step(params, optimizer_state, *blob_images(step, 32))
    trained = {"params": params}
    held_out, held_out_labels = blob_images(1000, 64)
    assert np.mean(np.argmax(model.apply(trained, held_out), axis=-1) == held_out_labels) >= 0.9
    random_variables = init_variables(model, jax.random.key(7), 64)
    images, labels = blob_images(2000, 2)
    methods = ["vanilla", "grad_cam", "attention_rollout"]
    correlations = saliency.randomisation_check(model, trained, random_variables, images, labels, methods)
    assert set(correlations) == set(methods)
    assert all(value < 0.5 for value in correlations.values()), correlations
    same = saliency.randomisation_check(model, trained, trained, images, labels, methods)
    np.testing.assert_allclose(list(same.values()), 1.0, rtol=1e-9)


def test_mask_scores_against_hand_computed_values():
    maps = np.zeros((3, 4, 4), np.float32)
    maps[0, 0, 0], maps[0, 3, 3], maps[0, 1, 1] = 3.0, 1.0, 4.0
    maps[1, 0, 3] = 2.0
    masks = np.zeros((3, 4, 4), bool)
    masks[0, :2, :2] = True
    masks[1, 2, 3] = True
    masks[2, 1, 1] = True
    np.testing.assert_allclose(saliency.mass_in_mask(maps, masks), [7 / 8, 0.0, np.nan])
    np.testing.assert_array_equal(saliency.pointing_game_hits(maps, masks), [1.0, 0.0, 0.0])
    np.testing.assert_array_equal(saliency.pointing_game_hits(maps, masks, tolerance=1.9), [1.0, 0.0, 0.0])
    np.testing.assert_array_equal(saliency.pointing_game_hits(maps, masks, tolerance=2.0), [1.0, 1.0, 0.0])
    masks[0] = False
    scores = saliency.mask_scores(maps, masks, tolerance=2.0)
    np.testing.assert_array_equal(scores["pointing_game"], [np.nan, 1.0, 0.0])
    assert scores["mean_pointing_game"] == 0.5 and scores["mean_mass_in_mask"] == 0.0
    with pytest.raises(ValueError, match=r"Masks must match the maps.*\(3, 4, 4\).*\(3, 4, 5\)"):
        saliency.mass_in_mask(maps, np.zeros((3, 4, 5)))


def test_bad_methods_and_inputs_raise_one_line_errors(tiny_resnet, micro_vit):
    resnet, resnet_variables = tiny_resnet
    images = normal_images(3, 2, 128)
    with pytest.raises(ValueError, match="Unknown saliency method 'gradcam'; choose one of vanilla,") as error:
        saliency.saliency_maps(resnet, resnet_variables, images, [0, 1], "gradcam")
    assert "\n" not in str(error.value)
    with pytest.raises(ValueError, match="'attention_rollout' does not apply to ResNet; methods for it: vanilla, "
                                         "smoothgrad, integrated_gradients, grad_cam."):
        saliency.randomisation_check(resnet, resnet_variables, resnet_variables, images, [0, 1],
                                     ["vanilla", "attention_rollout"])
    with pytest.raises(ValueError, match="grad_cam.*applies to|does not apply to RegionCNN"):
        saliency.saliency_maps(RegionCNN(32), {}, normal_images(3, 2, 64), [0, 0], "grad_cam")
    with pytest.raises(ValueError, match=r"targets \[0, 3\] out of range for a model with 3 outputs"):
        saliency.vanilla_gradient_map(resnet, resnet_variables, images, [0, 3])
    with pytest.raises(ValueError, match="one integer class index per image"):
        saliency.vanilla_gradient_map(resnet, resnet_variables, images, [0])
    with pytest.raises(ValueError, match="Unknown Integrated Gradients rule 'simpson'; choose one of riemann_left"):
        saliency.integrated_gradients(resnet, resnet_variables, images, [0, 1], rule="simpson")
    with pytest.raises(ValueError, match="Grad-CAM layer 'nothing' ran 0 times"):
        saliency.grad_cam_map(micro_vit[0], micro_vit[1], normal_images(3, 2, 64), [0, 1], layer="nothing")


def test_integration_rules_integrate_exactly_where_they_should():
    for rule in saliency.IG_RULES:
        alphas, weights = saliency.integration_points(4, rule)
        assert np.isclose(weights.sum(), 1.0) and alphas.min() >= 0 and alphas.max() <= 1, rule
    alphas, weights = saliency.integration_points(4, "riemann_trapezoid")
    assert np.isclose((weights * alphas).sum(), 0.5) and len(alphas) == 5
    alphas, weights = saliency.integration_points(4, "riemann_middle")
    assert np.isclose((weights * alphas).sum(), 0.5) and np.isclose((weights * alphas**2).sum(), 1 / 3 - 1 / 192)


def test_overlay_and_comparison_figure_pngs(tmp_path):
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (2, 48, 40, 3), dtype=np.uint8)
    maps = {"CASS ResNet-50": rng.random((2, 48, 40)), "DINO ViT-B/16": rng.random((2, 24, 20))}
    np.testing.assert_array_equal(figures.heatmap_overlay(images[0], np.zeros((48, 40))), images[0])
    hot = figures.heatmap_overlay(images[0], np.ones((48, 40)), opacity=1.0)
    assert hot.dtype == np.uint8 and len(np.unique(hot.reshape(-1, 3), axis=0)) == 1
    figures.write_saliency_png(tmp_path / "one.png", images[0], maps["CASS ResNet-50"][0])
    with Image.open(tmp_path / "one.png") as written:
        assert written.mode == "RGB" and written.size == (40, 48)
    figures.write_comparison_png(tmp_path / "figures" / "compare.png", images, maps)
    height, width = figures.comparison_figure_size(2, 2, 48, 40)
    with Image.open(tmp_path / "figures" / "compare.png") as written:
        assert written.mode == "RGB" and written.size == (width, height)
        pixels = np.asarray(written)
    top, left = figures.LABEL_HEIGHT + figures.PADDING, figures.PADDING
    np.testing.assert_array_equal(pixels[top:top + 48, left:left + 40], images[0])
    assert (pixels[:figures.LABEL_HEIGHT] < 128).any(), "column labels are drawn"
    array = figures.comparison_figure_array(images, maps, row_labels=["case_001", "case_002"])
    assert array.dtype == np.float32 and 0 <= array.min() <= array.max() <= 1
    assert array.shape == (height, width + figures.ROW_LABEL_WIDTH, 3)
    assert (array[top:, :figures.ROW_LABEL_WIDTH] < 0.5).any(), "row labels are drawn"
    np.testing.assert_array_equal(np.rint(array[top:top + 48, figures.ROW_LABEL_WIDTH + left:][:, :40] * 255),
                                  images[0])
    with pytest.raises(ValueError, match="'DINO ViT-B/16' has 1 saliency maps for 2 images"):
        figures.comparison_figure(images, {**maps, "DINO ViT-B/16": maps["DINO ViT-B/16"][:1]})
