"""Saliency maps of trained classifiers (vanilla gradient, SmoothGrad, Integrated Gradients, Grad-CAM, attention
rollout), their overlap with lesion masks, and the model-randomisation sanity check of Adebayo et al. (2018).

Every method is a pure function of (flax module, variables, normalised float32 NHWC images, target class indices)
and returns non-negative float32 maps (B, H, W) at input resolution; the class score is the target's logit.
Gradients are batched under jax.jit: SmoothGrad samples and Integrated-Gradients steps run `points_per_pass` at a
time as one batch, passes in a lax.scan, so memory stays that of one batch. PAIR's `saliency` package was not used:
its core methods take one image per call, loop SmoothGrad samples in Python with NumPy's global random state, fix the
IG quadrature, and its Grad-CAM pulls in scikit-image. Model internals are read without changing the models:
`flax.linen.intercept_methods` adds a zero offset to a submodule's activation (its gradient is the activation's
gradient) and captures the attention `qkv` projections.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping, Sequence
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
import scipy.stats
from flax import linen as nn

from cass_jax.data.config import IMAGENET_MEAN, IMAGENET_STD
from cass_jax.models.resnet import ResNet
from cass_jax.models.vit import VisionTransformer

METHODS = ("vanilla", "smoothgrad", "integrated_gradients", "grad_cam", "attention_rollout")
# Quadrature rules for the Integrated-Gradients path integral, named as in Captum.
IG_RULES = ("riemann_left", "riemann_right", "riemann_middle", "riemann_trapezoid")


def applicable_methods(model: nn.Module, grad_cam_layer: str | None = None) -> tuple[str, ...]:
    """The methods that fit `model`: input gradients for any model, Grad-CAM for ResNets, ViTs or a named layer,
    attention rollout for ViTs."""
    methods = ["vanilla", "smoothgrad", "integrated_gradients"]
    if grad_cam_layer is not None or isinstance(model, (ResNet, VisionTransformer)):
        methods.append("grad_cam")
    if isinstance(model, VisionTransformer):
        methods.append("attention_rollout")
    return tuple(methods)


def check_method(model: nn.Module, method: str, grad_cam_layer: str | None = None) -> None:
    """Raises a one-line ValueError for an unknown method or one that does not fit the model."""
    if method not in METHODS:
        raise ValueError(f"Unknown saliency method {method!r}; choose one of {', '.join(METHODS)}.")
    valid = applicable_methods(model, grad_cam_layer)
    if method not in valid:
        raise ValueError(f"Saliency method {method!r} does not apply to {type(model).__name__}; "
                         f"methods for it: {', '.join(valid)}.")


def saliency_maps(model: nn.Module, variables: Mapping[str, Any], images: jax.Array, targets: Any,
                  method: str, **options: Any) -> np.ndarray:
    """Maps (B, H, W) of `method` (one of METHODS); `options` are the keyword arguments of that method's function.

    `targets`: class index per image, or None for each image's top class.
    """
    check_method(model, method, options.get("layer"))
    functions: dict[str, Callable[..., jax.Array]] = {
        "vanilla": vanilla_gradient_map, "smoothgrad": smoothgrad_map, "integrated_gradients": integrated_gradients_map,
        "grad_cam": grad_cam_map, "attention_rollout": attention_rollout_map,
    }
    return np.asarray(functions[method](model, variables, images, targets, **options), np.float32)


def _checked_inputs(model: nn.Module, variables: Mapping[str, Any], images: Any,
                    targets: Any) -> tuple[jax.Array, jax.Array]:
    images = jnp.asarray(images, jnp.float32)
    if images.ndim != 4:
        raise ValueError(f"Saliency needs normalised NHWC images (B, H, W, C), got shape {images.shape}.")
    if targets is None:
        return images, jnp.argmax(_logits(model, variables, images), axis=-1)
    targets = np.asarray(targets)
    if targets.shape != images.shape[:1] or not np.issubdtype(targets.dtype, np.integer):
        raise ValueError(f"targets must be one integer class index per image, shape ({images.shape[0]},); "
                         f"got {targets.dtype} of shape {targets.shape}.")
    if isinstance(model, (ResNet, VisionTransformer)):
        num_classes = model.num_classes or model.num_features
    else:
        num_classes = jax.eval_shape(functools.partial(model.apply, train=False), variables, images).shape[-1]
    if targets.size and (targets.min() < 0 or targets.max() >= num_classes):
        raise ValueError(f"targets {targets.tolist()} out of range for a model with {num_classes} outputs.")
    return images, jnp.asarray(targets, jnp.int32)


@functools.partial(jax.jit, static_argnames="model")
def _logits(model: nn.Module, variables: Mapping[str, Any], images: jax.Array) -> jax.Array:
    return model.apply(variables, images, train=False)


def _summed_target_score(model: nn.Module, variables: Mapping[str, Any], images: jax.Array,
                         targets: jax.Array) -> jax.Array:
    """Sum over the batch of each image's target logit: its gradient holds every image's own gradient."""
    logits = model.apply(variables, images, train=False).astype(jnp.float32)
    return jnp.take_along_axis(logits, targets[:, None], axis=-1).sum()


def class_scores(model: nn.Module, variables: Mapping[str, Any], images: Any, targets: Any) -> np.ndarray:
    """Each image's target logit, the score every method explains."""
    images, targets = _checked_inputs(model, variables, images, targets)
    logits = _logits(model, variables, images)
    return np.asarray(jnp.take_along_axis(logits, targets[:, None], axis=-1)[:, 0], np.float32)


def _channel_max_abs(attributions: jax.Array) -> jax.Array:
    """|attribution| maximised over colour channels, the paper's reduction (Simonyan et al. 2014)."""
    return jnp.max(jnp.abs(attributions), axis=-1).astype(jnp.float32)


@functools.partial(jax.jit, static_argnames="model")
def _input_gradients(model: nn.Module, variables: Mapping[str, Any], images: jax.Array,
                     targets: jax.Array) -> jax.Array:
    return jax.grad(lambda x: _summed_target_score(model, variables, x, targets))(images)


def input_gradients(model: nn.Module, variables: Mapping[str, Any], images: Any, targets: Any) -> jax.Array:
    """Signed d score / d image, (B, H, W, C)."""
    images, targets = _checked_inputs(model, variables, images, targets)
    return _input_gradients(model, variables, images, targets)


def vanilla_gradient_map(model: nn.Module, variables: Mapping[str, Any], images: Any, targets: Any) -> jax.Array:
    """Vanilla gradient saliency: |d score / d x|, max over channels (the map the S4MI paper shows)."""
    return _channel_max_abs(input_gradients(model, variables, images, targets))


def _weighted_gradient_sum(model: nn.Module, variables: Mapping[str, Any], targets: jax.Array,
                           image_shape: tuple[int, ...], point: Callable[[jax.Array], jax.Array],
                           coefficients: jax.Array, points_per_pass: int) -> jax.Array:
    """sum_k coefficients[k] * grad score(point(k)), computing `points_per_pass` points (each a whole image batch)
    as one batch per pass; passes run in a lax.scan. Padding points get coefficient 0."""
    num_points = coefficients.shape[0]
    per_pass = max(1, min(points_per_pass, num_points))
    padded = -(-num_points // per_pass) * per_pass
    indices = jnp.arange(padded).reshape(-1, per_pass)
    coefficients = jnp.pad(coefficients, (0, padded - num_points)).reshape(-1, per_pass)
    batch = image_shape[0]

    def one_pass(total: jax.Array, pass_inputs: tuple[jax.Array, jax.Array]) -> tuple[jax.Array, None]:
        pass_indices, pass_coefficients = pass_inputs
        points = jax.vmap(point)(pass_indices).reshape(per_pass * batch, *image_shape[1:])
        pass_targets = jnp.tile(targets, per_pass)
        gradients = jax.grad(lambda x: _summed_target_score(model, variables, x, pass_targets))(points)
        gradients = gradients.reshape(per_pass, *image_shape)
        return total + jnp.tensordot(pass_coefficients, gradients, axes=1), None

    total, _ = jax.lax.scan(one_pass, jnp.zeros(image_shape, jnp.float32), (indices, coefficients))
    return total


@functools.partial(jax.jit, static_argnames=("model", "samples", "points_per_pass"))
def _smoothgrad(model: nn.Module, variables: Mapping[str, Any], images: jax.Array, targets: jax.Array,
                rng: jax.Array, noise_level: float, samples: int, points_per_pass: int) -> jax.Array:
    spread = jnp.max(images, axis=(1, 2, 3), keepdims=True) - jnp.min(images, axis=(1, 2, 3), keepdims=True)
    sigma = noise_level * spread

    def noisy_images(index: jax.Array) -> jax.Array:
        return images + sigma * jax.random.normal(jax.random.fold_in(rng, index), images.shape, images.dtype)

    coefficients = jnp.full((samples,), 1.0 / samples, jnp.float32)
    return _weighted_gradient_sum(model, variables, targets, images.shape, noisy_images, coefficients, points_per_pass)


def smoothgrad_map(model: nn.Module, variables: Mapping[str, Any], images: Any, targets: Any, *,
                   samples: int = 25, noise_level: float = 0.15, rng: jax.Array | None = None,
                   points_per_pass: int = 1) -> jax.Array:
    """SmoothGrad (Smilkov et al. 2017): the input gradient averaged over `samples` copies of each image with
    Gaussian noise of std `noise_level` x (max - min of that image), then |.| and max over channels."""
    if samples < 1 or noise_level < 0:
        raise ValueError(f"SmoothGrad needs samples >= 1 and noise_level >= 0, got {samples} and {noise_level}.")
    images, targets = _checked_inputs(model, variables, images, targets)
    rng = jax.random.PRNGKey(0) if rng is None else rng
    mean_gradient = _smoothgrad(model, variables, images, targets, rng, noise_level, samples, points_per_pass)
    return _channel_max_abs(mean_gradient)


def black_baseline(image_shape: Sequence[int], mean: Sequence[float] = IMAGENET_MEAN,
                   std: Sequence[float] = IMAGENET_STD) -> jax.Array:
    """The black image (pixel value 0) after normalisation with `mean`/`std`: (0 - mean) / std per channel."""
    channel_values = -jnp.asarray(mean, jnp.float32) / jnp.asarray(std, jnp.float32)
    return jnp.broadcast_to(channel_values, tuple(image_shape))


def integration_points(steps: int, rule: str) -> tuple[np.ndarray, np.ndarray]:
    """Path positions alpha in [0, 1] and their weights for `rule` with `steps` intervals."""
    if steps < 1:
        raise ValueError(f"Integrated Gradients needs steps >= 1, got {steps}.")
    if rule == "riemann_left":
        alphas, weights = np.arange(steps) / steps, np.full(steps, 1.0 / steps)
    elif rule == "riemann_right":
        alphas, weights = np.arange(1, steps + 1) / steps, np.full(steps, 1.0 / steps)
    elif rule == "riemann_middle":
        alphas, weights = (np.arange(steps) + 0.5) / steps, np.full(steps, 1.0 / steps)
    elif rule == "riemann_trapezoid":
        alphas, weights = np.arange(steps + 1) / steps, np.full(steps + 1, 1.0 / steps)
        weights[[0, -1]] = 0.5 / steps
    else:
        raise ValueError(f"Unknown Integrated Gradients rule {rule!r}; choose one of {', '.join(IG_RULES)}.")
    return alphas.astype(np.float32), weights.astype(np.float32)


@functools.partial(jax.jit, static_argnames=("model", "points_per_pass"))
def _integrated_gradients(model: nn.Module, variables: Mapping[str, Any], images: jax.Array, targets: jax.Array,
                          baseline: jax.Array, alphas: jax.Array, weights: jax.Array,
                          points_per_pass: int) -> jax.Array:
    difference = images - baseline

    def path_point(index: jax.Array) -> jax.Array:
        return baseline + alphas[index] * difference

    mean_gradient = _weighted_gradient_sum(model, variables, targets, images.shape, path_point, weights,
                                           points_per_pass)
    return difference * mean_gradient


def integrated_gradients(model: nn.Module, variables: Mapping[str, Any], images: Any, targets: Any, *,
                         baseline: Any = None, steps: int = 50, rule: str = "riemann_middle",
                         mean: Sequence[float] = IMAGENET_MEAN, std: Sequence[float] = IMAGENET_STD,
                         points_per_pass: int = 1) -> jax.Array:
    """Signed Integrated Gradients (Sundararajan et al. 2017), (B, H, W, C); they sum to about
    score(images) - score(baseline). The default baseline is the black image normalised with `mean`/`std`.

    The default midpoint rule never evaluates the baseline itself, where a black or zero image can sit exactly on
    ReLU kinks whose gradient is not the path's limit; its error falls as 1/steps^2 on smooth stretches."""
    images, targets = _checked_inputs(model, variables, images, targets)
    baseline = black_baseline(images.shape, mean, std) if baseline is None else jnp.asarray(baseline, jnp.float32)
    if jnp.broadcast_shapes(baseline.shape, images.shape) != images.shape:
        raise ValueError(f"IG baseline of shape {baseline.shape} does not broadcast to the images {images.shape}.")
    baseline = jnp.broadcast_to(baseline, images.shape)
    alphas, weights = integration_points(steps, rule)
    return _integrated_gradients(model, variables, images, targets, baseline, jnp.asarray(alphas),
                                 jnp.asarray(weights), points_per_pass)


def integrated_gradients_map(model: nn.Module, variables: Mapping[str, Any], images: Any, targets: Any,
                             **options: Any) -> jax.Array:
    """|Integrated Gradients|, max over channels (the gradient map's reduction, so the columns compare)."""
    return _channel_max_abs(integrated_gradients(model, variables, images, targets, **options))


def _grad_cam_layer(model: nn.Module, layer: str | None) -> tuple[tuple[str, ...], bool]:
    """(submodule path, whether its input rather than its output is the activation).

    ResNet: the last stage's last block output, before pooling. ViT: the last block's *input* tokens: the last
    block's output patch tokens never reach the class token (their gradient is exactly zero, or they are not
    computed with `last_block_class_token_only`), so the token grid entering it is the last one the score reads.
    """
    if layer is not None:
        return tuple(part for part in layer.split("/") if part), False
    if isinstance(model, ResNet):
        return (f"layer{len(model.stage_sizes)}_{model.stage_sizes[-1] - 1}",), False
    if isinstance(model, VisionTransformer):
        return (f"blocks_{model.depth - 1}",), True
    raise ValueError(f"grad_cam needs a ResNet, a VisionTransformer or layer='path/to/submodule' for "
                     f"{type(model).__name__}.")


@functools.partial(jax.jit, static_argnames=("model", "path", "use_input"))
def _activation_and_gradient(model: nn.Module, variables: Mapping[str, Any], images: jax.Array, targets: jax.Array,
                             path: tuple[str, ...], use_input: bool) -> tuple[jax.Array, jax.Array]:
    def score_and_activation(offset: jax.Array) -> tuple[jax.Array, jax.Array]:
        captured = []

        def add_offset(next_fun: Callable, args: tuple, kwargs: dict, context: Any) -> Any:
            if context.method_name != "__call__" or context.module.path != path:
                return next_fun(*args, **kwargs)
            if use_input:
                captured.append(args[0] + offset)
                return next_fun(captured[-1], *args[1:], **kwargs)
            captured.append(next_fun(*args, **kwargs) + offset)
            return captured[-1]

        with nn.intercept_methods(add_offset):
            score = _summed_target_score(model, variables, images, targets)
        if len(captured) != 1:
            raise ValueError(f"Grad-CAM layer {'/'.join(path)!r} ran {len(captured)} times in "
                             f"{type(model).__name__}; name a submodule called once, e.g. one of "
                             f"{', '.join(sorted(variables['params']))}.")
        return score, captured[0]

    # A first trace with a scalar offset finds the activation's shape; XLA drops its unused computation.
    shape = score_and_activation(jnp.float32(0))[1].shape
    gradient, activation = jax.grad(score_and_activation, has_aux=True)(jnp.zeros(shape, jnp.float32))
    return activation, gradient


def _token_grid(tokens: jax.Array) -> jax.Array:
    """(B, 1 + g*g, D) tokens -> (B, g, g, D) patch grid, class token dropped."""
    side = int(round((tokens.shape[1] - 1) ** 0.5))
    if side * side != tokens.shape[1] - 1:
        raise ValueError(f"Grad-CAM layer gives {tokens.shape[1]} tokens, not a class token plus a square grid.")
    return tokens[:, 1:].reshape(tokens.shape[0], side, side, tokens.shape[2])


def _upsample(maps: jax.Array, height: int, width: int) -> jax.Array:
    """Bilinear resize (B, h, w) -> (B, H, W), clipped at 0 against rounding."""
    resized = jax.image.resize(maps.astype(jnp.float32), (maps.shape[0], height, width), method="bilinear")
    return jnp.maximum(resized, 0.0)


def grad_cam_map(model: nn.Module, variables: Mapping[str, Any], images: Any, targets: Any, *,
                 layer: str | None = None) -> jax.Array:
    """Grad-CAM (Selvaraju et al. 2017): ReLU(sum_k alpha_k A_k), alpha_k the spatial mean of d score / d A_k,
    upsampled bilinearly. `layer` ("a/b") names a submodule whose NHWC or token output to use instead of the
    default (_grad_cam_layer)."""
    images, targets = _checked_inputs(model, variables, images, targets)
    path, use_input = _grad_cam_layer(model, layer)
    activation, gradient = _activation_and_gradient(model, variables, images, targets, path, use_input)
    if activation.ndim == 3:
        activation, gradient = _token_grid(activation), _token_grid(gradient)
    if activation.ndim != 4:
        raise ValueError(f"Grad-CAM layer {'/'.join(path)!r} output has shape {activation.shape}; "
                         f"it needs a (B, h, w, C) map or (B, tokens, C) tokens.")
    channel_weights = jnp.mean(gradient.astype(jnp.float32), axis=(1, 2), keepdims=True)
    cam = nn.relu(jnp.sum(channel_weights * activation.astype(jnp.float32), axis=-1))
    return _upsample(cam, images.shape[1], images.shape[2])


@functools.partial(jax.jit, static_argnames="model")
def _attention_weights(model: VisionTransformer, variables: Mapping[str, Any], images: jax.Array) -> jax.Array:
    projections = []

    def capture_qkv(next_fun: Callable, args: tuple, kwargs: dict, context: Any) -> Any:
        output = next_fun(*args, **kwargs)
        if context.method_name == "__call__" and context.module.path[1:] == ("attn", "qkv"):
            projections.append(output)
        return output

    with nn.intercept_methods(capture_qkv):
        model.apply(variables, images, train=False)
    batch, tokens, _ = projections[0].shape
    head_dim = model.embed_dim // model.num_heads
    layers = []
    for qkv in projections:
        # The Attention module's layout: (batch, tokens, 3, heads, head_dim), queries scaled by head_dim ** -0.5.
        qkv = qkv.astype(jnp.float32).reshape(batch, tokens, 3, model.num_heads, head_dim).transpose(2, 0, 3, 1, 4)
        scores = jnp.einsum("bhqd,bhkd->bhqk", qkv[0] * head_dim**-0.5, qkv[1])
        layers.append(jax.nn.softmax(scores, axis=-1))
    return jnp.stack(layers)


def vit_attention_weights(model: nn.Module, variables: Mapping[str, Any], images: Any) -> jax.Array:
    """Every block's attention weights (depth, B, heads, tokens, tokens), recomputed from the captured `qkv`
    projections; full rows for every token even when the last block computes only the class token's."""
    if not isinstance(model, VisionTransformer):
        raise ValueError(f"Attention weights need a VisionTransformer, got {type(model).__name__}.")
    images, _ = _checked_inputs(model, variables, images, np.zeros(np.shape(images)[:1], np.int32))
    return _attention_weights(model, variables, images)


def attention_rollout_map(model: nn.Module, variables: Mapping[str, Any], images: Any,
                          targets: Any = None) -> jax.Array:
    """Attention rollout (Abnar & Zuidema 2020): heads averaged, identity added, rows renormalised, layers
    multiplied; the class token's row over the patches, upsampled bilinearly. Class-agnostic: `targets` is unused."""
    weights = vit_attention_weights(model, variables, images).mean(axis=2)
    identity = jnp.eye(weights.shape[-1], dtype=jnp.float32)
    rollout = identity
    for layer_weights in weights:
        residual_weights = layer_weights + identity
        rollout = (residual_weights / residual_weights.sum(axis=-1, keepdims=True)) @ rollout
    grid = _token_grid(rollout[:, :1, :].transpose(0, 2, 1))[..., 0]
    return _upsample(grid, images.shape[1], images.shape[2])


def _checked_maps_and_masks(maps: Any, masks: Any) -> tuple[np.ndarray, np.ndarray]:
    maps, masks = np.asarray(maps, np.float64), np.asarray(masks)
    if maps.ndim != 3 or maps.shape != masks.shape:
        raise ValueError(f"Masks must match the maps, (B, H, W) each; got maps {maps.shape} and masks {masks.shape}.")
    return maps, masks.astype(bool)


def mass_in_mask(maps: Any, masks: Any) -> np.ndarray:
    """Per image, the share of saliency mass inside the mask; NaN for a map with no mass."""
    maps, masks = _checked_maps_and_masks(maps, masks)
    total = maps.sum(axis=(1, 2))
    inside = np.where(masks, maps, 0.0).sum(axis=(1, 2))
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(total > 0, inside / total, np.nan)


def pointing_game_hits(maps: Any, masks: Any, tolerance: float = 0.0) -> np.ndarray:
    """Per image, 1.0 if the map's maximum lies within `tolerance` pixels of the mask (Zhang et al. 2018 use 15),
    0.0 if not or if the map has no positive value, NaN for an empty mask. Ties: the first maximum in raster order."""
    maps, masks = _checked_maps_and_masks(maps, masks)
    hits = np.full(len(maps), np.nan)
    for index, (saliency_map, mask) in enumerate(zip(maps, masks)):
        if not mask.any():
            continue
        if not (saliency_map > 0).any():
            hits[index] = 0.0
            continue
        peak = np.array(np.unravel_index(np.argmax(saliency_map), saliency_map.shape))
        distance = np.sqrt(((np.argwhere(mask) - peak) ** 2).sum(axis=1)).min()
        hits[index] = float(distance <= tolerance)
    return hits


def mask_scores(maps: Any, masks: Any, tolerance: float = 0.0) -> dict[str, Any]:
    """Per-image `mass_in_mask` and `pointing_game` arrays and their means over images where they are defined."""
    mass, hits = mass_in_mask(maps, masks), pointing_game_hits(maps, masks, tolerance)
    return {"mass_in_mask": mass, "pointing_game": hits,
            "mean_mass_in_mask": _mean_defined(mass), "mean_pointing_game": _mean_defined(hits)}


def _mean_defined(values: np.ndarray) -> float:
    defined = values[~np.isnan(values)]
    return float(defined.mean()) if defined.size else float("nan")


def rank_correlations(maps_a: Any, maps_b: Any) -> np.ndarray:
    """Spearman rank correlation between paired maps, one per image."""
    maps_a, maps_b = np.asarray(maps_a), np.asarray(maps_b)
    if maps_a.shape != maps_b.shape:
        raise ValueError(f"Paired maps must have one shape, got {maps_a.shape} and {maps_b.shape}.")
    # A constant map (e.g. an all-zero Grad-CAM of a random model) has no ranking: NaN, left out of the means.
    return np.array([scipy.stats.spearmanr(a.ravel(), b.ravel()).statistic if np.ptp(a) > 0 and np.ptp(b) > 0
                     else np.nan for a, b in zip(maps_a, maps_b)])


def randomisation_check(model: nn.Module, trained_variables: Mapping[str, Any], random_variables: Mapping[str, Any],
                        images: Any, targets: Any, methods: Sequence[str],
                        options: Mapping[str, Mapping[str, Any]] | None = None) -> dict[str, float]:
    """Model-randomisation sanity check (Adebayo et al. 2018): per method, the mean over images of the Spearman
    rank correlation between the trained model's maps and those of the same architecture with re-initialised
    parameters (e.g. `cass_jax.models.init_variables`). A method whose maps survive randomisation (near 1) does not
    explain what the model learned. `options` maps a method to its keyword arguments."""
    options = options or {}
    images, targets = _checked_inputs(model, trained_variables, images, targets)
    for method in methods:
        check_method(model, method, options.get(method, {}).get("layer"))
    results = {}
    for method in methods:
        trained = saliency_maps(model, trained_variables, images, targets, method, **options.get(method, {}))
        randomised = saliency_maps(model, random_variables, images, targets, method, **options.get(method, {}))
        results[method] = _mean_defined(rank_correlations(trained, randomised))
    return results
