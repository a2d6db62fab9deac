"""Merging ported weights into a model's freshly initialised variables, failing loudly on any mismatch.

The fresh variables define what the model needs; the loaded ones must supply exactly that, except for
two deliberate adaptations: the classifier head (re-initialised or dropped when the class count differs)
and the ViT position embeddings (resampled when the image size differs).
"""

import logging
import math

import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

logger = logging.getLogger(__name__)

HEAD_PREFIX = ("params", "head")
POS_EMBED = ("params", "pos_embed")


def resample_pos_embed(pos_embed: np.ndarray, num_tokens: int, num_prefix_tokens: int = 1) -> np.ndarray:
    """Resizes (1, prefix + g*g, D) position embeddings to (1, num_tokens, D), bicubic over the grid.

    Prefix (class) token embeddings are kept unchanged. Like timm's resample_abs_pos_embed (bicubic,
    no antialiasing), though jax's cubic kernel (a=-0.5) differs slightly from PyTorch's (a=-0.75).
    """
    prefix, grid = pos_embed[:, :num_prefix_tokens], pos_embed[:, num_prefix_tokens:]
    old_side, new_side = math.isqrt(grid.shape[1]), math.isqrt(num_tokens - num_prefix_tokens)
    if old_side**2 != grid.shape[1] or new_side**2 != num_tokens - num_prefix_tokens:
        raise ValueError(
            f"Cannot resample position embeddings of {pos_embed.shape[1]} tokens to {num_tokens}: "
            f"the patch grids are not square."
        )
    dim = pos_embed.shape[-1]
    resized = jax.image.resize(
        jnp.asarray(grid[0].reshape(old_side, old_side, dim), jnp.float32),
        (new_side, new_side, dim), method="bicubic", antialias=False,
    )
    return np.concatenate([prefix, np.asarray(resized).reshape(1, new_side * new_side, dim)], axis=1)


def _format_path(path: tuple[str, ...]) -> str:
    return "/".join(path)


def _modules_of(paths) -> list[str]:
    """Collapses leaf paths ('params/layer1_1/bn1/scale', 'batch_stats/layer1_1/bn1/mean') to modules."""
    return sorted({"/".join(path[1:-1]) or path[-1] for path in paths})


def merge_variables(fresh: dict, loaded: dict, source: str) -> dict:
    """Returns `fresh` with every leaf replaced by the matching leaf of `loaded` (float32 jnp arrays).

    Raises one ValueError listing all missing keys, unexpected keys and shape mismatches.
    """
    fresh_flat = traverse_util.flatten_dict(fresh)
    loaded_flat = {path: np.asarray(value) for path, value in traverse_util.flatten_dict(loaded).items()}

    fresh_head = {p for p in fresh_flat if p[:2] == HEAD_PREFIX}
    loaded_head = {p for p in loaded_flat if p[:2] == HEAD_PREFIX}
    if loaded_head and not fresh_head:
        logger.info("%s: dropping the file's classifier head (model has num_classes=0).", source)
        for path in loaded_head:
            del loaded_flat[path]
    elif fresh_head and not loaded_head:
        logger.info("%s: file has no classifier head; the model's head stays freshly initialised.", source)
        loaded_flat.update({path: np.asarray(fresh_flat[path]) for path in fresh_head})
    elif fresh_head and any(loaded_flat[p].shape != fresh_flat[p].shape for p in fresh_head & loaded_head):
        shapes = {_format_path(p): (loaded_flat[p].shape, tuple(fresh_flat[p].shape)) for p in fresh_head & loaded_head}
        logger.info("%s: class count differs (file -> model %s); re-initialising the head.", source, shapes)
        for path in loaded_head:
            del loaded_flat[path]
        loaded_flat.update({path: np.asarray(fresh_flat[path]) for path in fresh_head})

    if POS_EMBED in fresh_flat and POS_EMBED in loaded_flat:
        want, have = tuple(fresh_flat[POS_EMBED].shape), loaded_flat[POS_EMBED].shape
        if have != want and have[0] == want[0] and have[2] == want[2]:
            logger.info("%s: resampling position embeddings %s -> %s (class token kept).", source, have, want)
            loaded_flat[POS_EMBED] = resample_pos_embed(loaded_flat[POS_EMBED], want[1])

    missing = fresh_flat.keys() - loaded_flat.keys()
    unexpected = loaded_flat.keys() - fresh_flat.keys()
    mismatched = sorted(
        f"{_format_path(p)}: file {loaded_flat[p].shape} vs model {tuple(fresh_flat[p].shape)}"
        for p in fresh_flat.keys() & loaded_flat.keys()
        if loaded_flat[p].shape != tuple(fresh_flat[p].shape)
    )
    if missing or unexpected or mismatched:
        problems = [
            f"{len(paths)} {title} in {len(modules)} module(s): {', '.join(modules)}"
            for title, paths in (("missing keys", missing), ("unexpected keys", unexpected))
            if paths
            for modules in [_modules_of(paths)]
        ]
        if mismatched:
            problems.append(f"{len(mismatched)} shape mismatches: {'; '.join(mismatched)}")
        raise ValueError(
            f"Weights in {source!r} do not fit the model. " + " | ".join(problems) + ". The file is most likely "
            f"for another architecture or depth; pick the matching model name (or re-port the file for it)."
        )
    merged = {path: jnp.asarray(loaded_flat[path], dtype=fresh_flat[path].dtype) for path in fresh_flat}
    return traverse_util.unflatten_dict(merged)
