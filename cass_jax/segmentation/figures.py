"""Pictures of segmentations: class-index maps in fixed colours, and rows of image / mask / each network's prediction.

The same array goes to TensorBoard during training and to PNG files (README, predict mode).
"""

from __future__ import annotations

from pathlib import Path
from typing import Mapping, Sequence

import numpy as np
from PIL import Image

# Background black, then red, green, blue, yellow, magenta, cyan, ... (ACDC: RV red, myocardium green, LV blue).
PALETTE = np.asarray([[0, 0, 0], [230, 25, 75], [60, 180, 75], [0, 130, 200], [255, 225, 25], [240, 50, 230],
                      [70, 240, 240], [245, 130, 48], [145, 30, 180], [128, 128, 0]], np.float32) / 255.0


def colour_labels(labels: np.ndarray) -> np.ndarray:
    """Integer labels (H, W) -> RGB float32 (H, W, 3) in [0, 1]; classes beyond the palette wrap around."""
    return PALETTE[np.asarray(labels, np.int64) % len(PALETTE)]


def overlay(image: np.ndarray, labels: np.ndarray, opacity: float = 0.5) -> np.ndarray:
    """A grayscale or RGB image in [0, 1] with its foreground labels blended on top (background left as is)."""
    rgb = np.asarray(image, np.float32)
    rgb = rgb[..., None] if rgb.ndim == 2 else rgb
    rgb = rgb if rgb.shape[-1] == 3 else np.repeat(rgb[..., :1], 3, axis=-1)
    foreground = (np.asarray(labels) > 0)[..., None]
    return np.where(foreground, (1 - opacity) * rgb + opacity * colour_labels(labels), rgb)


def prediction_grid(images: np.ndarray, masks: np.ndarray | None, predictions: Mapping[str, np.ndarray],
                    gap: int = 2) -> np.ndarray:
    """One row per image: the image, its reference mask (if given), then each prediction, overlaid on the image.

    `images` float (N, H, W[, C]) in [0, 1]; `masks` and each prediction integer (N, H, W). Columns follow the
    order of `predictions`. Returns float32 (rows, cols, 3) with white gaps.
    """
    images = np.asarray(images, np.float32)
    columns = [lambda i: overlay(images[i], np.zeros(images.shape[1:3], np.int64))]
    if masks is not None:
        columns.append(lambda i: overlay(images[i], masks[i]))
    columns += [lambda i, p=p: overlay(images[i], p[i]) for p in predictions.values()]
    n, height, width = images.shape[:3]
    grid = np.ones((n * (height + gap) - gap, len(columns) * (width + gap) - gap, 3), np.float32)
    for row in range(n):
        for col, tile in enumerate(columns):
            grid[row * (height + gap):row * (height + gap) + height,
                 col * (width + gap):col * (width + gap) + width] = tile(row)
    return grid


def column_titles(predictions: Sequence[str], with_mask: bool = True) -> list[str]:
    """The titles of `prediction_grid`'s columns, for captions."""
    return ["image", *(["reference"] if with_mask else []), *predictions]


def write_png(path: str | Path, picture: np.ndarray) -> None:
    """A float [0, 1] RGB picture to an 8-bit PNG."""
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.clip(np.rint(picture * 255.0), 0, 255).astype(np.uint8)).save(path)


def write_mask_png(path: str | Path, labels: np.ndarray) -> None:
    """A class-index map as an 8-bit grayscale PNG whose pixel values are the class indices (the input format)."""
    labels = np.asarray(labels)
    if labels.max(initial=0) > 255:
        raise ValueError(f"{path}: class {int(labels.max())} does not fit an 8-bit mask PNG.")
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(labels.astype(np.uint8)).save(path)
