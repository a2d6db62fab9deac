"""Saliency pictures: a map as a heat-map overlay on its image, and the comparison figure of the S4MI paper's
Figure 2 (rows = images; columns = the input, then one labelled column per model) as a PNG or a TensorBoard array.

Colours come from matplotlib's perceptually uniform colormaps; drawing and labels use PIL.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from typing import Any

import matplotlib
import numpy as np
from PIL import Image, ImageDraw, ImageFont

from cass_jax.data.config import IMAGENET_MEAN, IMAGENET_STD

DEFAULT_COLORMAP = "inferno"
# Figure layout in pixels: gaps between and around the tiles, the band above the columns for their labels, and the
# band left of the rows for theirs (only when rows are labelled).
PADDING = 4
LABEL_HEIGHT = 22
ROW_LABEL_WIDTH = 96
LABEL_FONT_SIZE = 14
BACKGROUND = 255


def images_to_uint8(images: Any, mean: Sequence[float] = IMAGENET_MEAN,
                    std: Sequence[float] = IMAGENET_STD) -> np.ndarray:
    """Normalised float NHWC images back to uint8 RGB for display: (x * std + mean) * 255."""
    images = np.asarray(images, np.float32) * np.asarray(std, np.float32) + np.asarray(mean, np.float32)
    return np.clip(np.rint(images * 255.0), 0, 255).astype(np.uint8)


def normalise_map(saliency_map: Any, clip_percentile: float = 99.0) -> np.ndarray:
    """A map scaled to [0, 1] by its `clip_percentile`-th percentile (gradient maps have a few extreme pixels that
    would otherwise darken the rest), or by its maximum where that percentile is 0."""
    saliency_map = np.maximum(np.asarray(saliency_map, np.float32), 0.0)
    scale = np.percentile(saliency_map, clip_percentile) if saliency_map.size else 0.0
    scale = scale if scale > 0 else saliency_map.max(initial=0.0)
    return np.clip(saliency_map / scale, 0.0, 1.0) if scale > 0 else np.zeros_like(saliency_map)


def _rgb_uint8(image: Any) -> np.ndarray:
    image = np.asarray(image)
    if image.dtype != np.uint8:
        raise ValueError(f"Images for saliency pictures must be uint8 (use images_to_uint8), got {image.dtype}.")
    if image.ndim == 2 or (image.ndim == 3 and image.shape[-1] == 1):
        image = np.repeat(image.reshape(*image.shape[:2], 1), 3, axis=-1)
    if image.ndim != 3 or image.shape[-1] != 3:
        raise ValueError(f"An image must be (H, W), (H, W, 1) or (H, W, 3), got shape {image.shape}.")
    return image


def _resized_map(saliency_map: Any, height: int, width: int) -> np.ndarray:
    """The map at the image's size (bilinear), so maps from models with other input sizes overlay too."""
    saliency_map = np.asarray(saliency_map, np.float32)
    if saliency_map.ndim != 2:
        raise ValueError(f"A saliency map must be (H, W), got shape {saliency_map.shape}.")
    if saliency_map.shape == (height, width):
        return saliency_map
    return np.asarray(Image.fromarray(saliency_map).resize((width, height), Image.Resampling.BILINEAR))


def heatmap_overlay(image_uint8: Any, saliency_map: Any, colormap: str = DEFAULT_COLORMAP, opacity: float = 0.7,
                    clip_percentile: float = 99.0) -> np.ndarray:
    """uint8 RGB (H, W, 3): the image with the map's colours blended in, each pixel's colour weighted by its
    normalised saliency x `opacity`, so pixels without saliency show the image unchanged."""
    image = _rgb_uint8(image_uint8)
    values = normalise_map(_resized_map(saliency_map, *image.shape[:2]), clip_percentile)
    colours = matplotlib.colormaps[colormap](values)[..., :3] * 255.0
    weight = (opacity * values)[..., None]
    return np.clip(np.rint((1.0 - weight) * image + weight * colours), 0, 255).astype(np.uint8)


def _write_png(path: str | os.PathLike, picture: np.ndarray) -> None:
    parent = os.path.dirname(os.fspath(path))
    if parent:
        os.makedirs(parent, exist_ok=True)
    Image.fromarray(picture).save(path, format="PNG")


def write_saliency_png(path: str | os.PathLike, image_uint8: Any, saliency_map: Any, **overlay_options: Any) -> None:
    """Writes `heatmap_overlay(image_uint8, saliency_map, **overlay_options)` as an RGB PNG."""
    _write_png(path, heatmap_overlay(image_uint8, saliency_map, **overlay_options))


def comparison_figure_size(num_images: int, num_models: int, image_height: int, image_width: int,
                           row_labels: bool = False) -> tuple[int, int]:
    """(height, width) in pixels of a comparison figure."""
    return (LABEL_HEIGHT + PADDING + num_images * (image_height + PADDING),
            (ROW_LABEL_WIDTH if row_labels else 0) + PADDING + (1 + num_models) * (image_width + PADDING))


def _fitted_label(draw: ImageDraw.ImageDraw, text: str, font: Any, width: int) -> str:
    """`text`, shortened with an ellipsis until it fits in `width` pixels."""
    fitted = text
    while fitted and draw.textlength(fitted, font=font) > width:
        fitted = fitted[:-1]
    return fitted if fitted == text else (fitted[:-1] + "…" if len(fitted) > 1 else "")


def comparison_figure(images_uint8: Any, maps_by_model: Mapping[str, Any], input_label: str = "input",
                      row_labels: Sequence[str] | None = None, **overlay_options: Any) -> np.ndarray:
    """uint8 RGB figure: one row per image (labelled with `row_labels` if given), the input in the first column,
    then each model's overlay in a column labelled with its name (the mapping's order). `maps_by_model[name]` is
    (N, h, w), resized to the images."""
    images = np.asarray(images_uint8)
    if images.ndim not in (3, 4) or len(images) == 0:
        raise ValueError(f"Comparison figure needs a non-empty batch of uint8 images (N, H, W[, C]), "
                         f"got shape {images.shape}.")
    rgb_images = [_rgb_uint8(image) for image in images]
    height, width = rgb_images[0].shape[:2]
    for name, maps in maps_by_model.items():
        if len(maps) != len(images):
            raise ValueError(f"Model {name!r} has {len(maps)} saliency maps for {len(images)} images.")
    if row_labels is not None and len(row_labels) != len(images):
        raise ValueError(f"{len(row_labels)} row labels for {len(images)} images; give one per image or none.")
    size = comparison_figure_size(len(images), len(maps_by_model), height, width, row_labels is not None)
    figure = np.full((*size, 3), BACKGROUND, np.uint8)
    first_left = (0 if row_labels is None else ROW_LABEL_WIDTH) + PADDING
    columns = [(input_label, None)] + list(maps_by_model.items())
    for column, (_, maps) in enumerate(columns):
        left = first_left + column * (width + PADDING)
        for row, image in enumerate(rgb_images):
            top = LABEL_HEIGHT + PADDING + row * (height + PADDING)
            tile = image if maps is None else heatmap_overlay(image, maps[row], **overlay_options)
            figure[top:top + height, left:left + width] = tile
    canvas = Image.fromarray(figure)
    draw = ImageDraw.Draw(canvas)
    font = ImageFont.load_default(size=LABEL_FONT_SIZE)
    for column, (label, _) in enumerate(columns):
        text = _fitted_label(draw, label, font, width)
        left = first_left + column * (width + PADDING) + (width - draw.textlength(text, font=font)) / 2
        draw.text((left, LABEL_HEIGHT / 2 + PADDING / 2), text, fill=(0, 0, 0), font=font, anchor="lm")
    for row, label in enumerate(row_labels or ()):
        top = LABEL_HEIGHT + PADDING + row * (height + PADDING) + height / 2
        draw.text((PADDING, top), _fitted_label(draw, label, font, ROW_LABEL_WIDTH - PADDING), fill=(0, 0, 0),
                  font=font, anchor="lm")
    return np.asarray(canvas)


def comparison_figure_array(images_uint8: Any, maps_by_model: Mapping[str, Any], **options: Any) -> np.ndarray:
    """The comparison figure as float32 (H, W, 3) in [0, 1], as TensorBoard image summaries take it."""
    return comparison_figure(images_uint8, maps_by_model, **options).astype(np.float32) / 255.0


def write_comparison_png(path: str | os.PathLike, images_uint8: Any, maps_by_model: Mapping[str, Any],
                         **options: Any) -> np.ndarray:
    """Writes `comparison_figure(images_uint8, maps_by_model, **options)` as one RGB PNG; returns the figure."""
    figure = comparison_figure(images_uint8, maps_by_model, **options)
    _write_png(path, figure)
    return figure
