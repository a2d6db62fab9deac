"""SSL4MIS's segmentation augmentation (`RandomGenerator`), applied identically to an image and its mask.

Geometry only, with SciPy's ndimage as SSL4MIS calls it: a random 90-degree rotation and flip, or a random rotation,
then a zoom to the network size; every resampling is nearest-neighbour (order 0), for the image as for the mask.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np
from scipy import ndimage

Record = dict[str, Any]


def zoom_to(array: np.ndarray, height: int, width: int, order: int = 0) -> np.ndarray:
    """scipy.ndimage.zoom of the first two axes to height x width: nearest-neighbour (order 0) or a spline of `order`.

    uint8 in, uint8 out (spline results rounded and clipped to 0..255).
    """
    factors = (height / array.shape[0], width / array.shape[1]) + (1.0,) * (array.ndim - 2)
    if order == 0:
        out = ndimage.zoom(array, factors, order=0)
    else:
        out = np.clip(np.rint(ndimage.zoom(array.astype(np.float32), factors, order=order)), 0, 255).astype(np.uint8)
    if out.shape[:2] != (height, width):  # zoom rounds each output side; guard against an off-by-one
        raise ValueError(f"zoom of a {array.shape[:2]} array gave {out.shape[:2]}, expected {(height, width)}.")
    return out


def rot90_flip(image: np.ndarray, mask: np.ndarray, turns: int, axis: int) -> tuple[np.ndarray, np.ndarray]:
    """`turns` quarter turns in the image plane, then a flip along `axis` (0 rows, 1 columns), on both arrays."""
    image = np.flip(np.rot90(image, turns, axes=(0, 1)), axis=axis)
    mask = np.flip(np.rot90(mask, turns, axes=(0, 1)), axis=axis)
    return np.ascontiguousarray(image), np.ascontiguousarray(mask)


def rotate(image: np.ndarray, mask: np.ndarray, degrees: float) -> tuple[np.ndarray, np.ndarray]:
    """Rotation about the centre keeping the size, nearest-neighbour, zero outside (ndimage.rotate order 0)."""
    image = ndimage.rotate(image, degrees, axes=(1, 0), order=0, reshape=False, mode="constant", cval=0)
    mask = ndimage.rotate(mask, degrees, axes=(1, 0), order=0, reshape=False, mode="constant", cval=0)
    return image, mask


@dataclasses.dataclass(frozen=True)
class RandomGenerator:
    """SSL4MIS's `RandomGenerator(output_size)` as a grain random map: (record, rng) -> record.

    With probability 1/2: `rot90` by k ~ U{0..3} quarter turns and a flip along a random axis; otherwise with
    probability 1/2 (so 1/4 overall): a rotation by an integer angle ~ U{-20..19} degrees (numpy's randint(-20, 20)),
    nearest-neighbour, zero fill; then zoom (order 0) of image and mask to `output_size` square. The draws come from
    the generator grain derives from (seed, epoch, example index), not from Python's global `random`.
    `image_order=1` zooms the image bilinearly instead (masks stay nearest); SSL4MIS uses 0.
    """

    output_size: int
    image_order: int = 0

    def __call__(self, record: Record, rng: np.random.Generator) -> Record:
        image, mask = record["image"], record["mask"]
        if rng.random() > 0.5:
            image, mask = rot90_flip(image, mask, int(rng.integers(0, 4)), int(rng.integers(0, 2)))
        elif rng.random() > 0.5:
            image, mask = rotate(image, mask, float(rng.integers(-20, 20)))
        return {**record, **resize_pair(image, mask, self.output_size, self.image_order)}


def resize_pair(image: np.ndarray, mask: np.ndarray, size: int, image_order: int = 0) -> Record:
    """{"image", "mask"} zoomed to size x size: the mask nearest-neighbour, the image with spline `image_order`."""
    return {"image": zoom_to(image, size, size, image_order), "mask": zoom_to(mask, size, size)}


@dataclasses.dataclass(frozen=True)
class ResizeOnly:
    """No augmentation: image and mask zoomed (order 0) to `output_size` square, as SSL4MIS's evaluation does."""

    output_size: int

    def __call__(self, record: Record) -> Record:
        return {**record, **resize_pair(record["image"], record["mask"], self.output_size)}
