"""Barlow Twins' two asymmetric views of each image (facebookresearch/barlowtwins main.py `Transform`).

A grain random map: each view is one `transforms.ViewAugmentation` with the official numbers.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from cass_jax.data.transforms import Record, ViewAugmentation, to_pil


@dataclasses.dataclass(frozen=True)
class BarlowTwinsViews:
    """The official Barlow Twins augmentation as a grain random map (record, rng) -> record, like `CassAugment`.

    Replaces record["image"] (uint8 H x W x 3) with "view_0" and "view_1", uint8 (image_size, image_size, 3),
    normalised later per batch (ImageNet mean/std as the official Normalize); other keys pass through. Each
    view, as the official `Transform` (see `ViewAugmentation`):
      RandomResizedCrop(image_size, scale=(0.08, 1), bicubic); RandomHorizontalFlip(.5);
      RandomApply([ColorJitter(.4, .4, .2, .1)], p=.8); RandomGrayscale(.2);
      GaussianBlur(p, sigma U(.1, 2)); Solarization(p),
    with blur p = 1.0 / 0.1 and solarisation p = 0.0 / 0.2 for view 0 / view 1 (the asymmetry). Gray images
    (three equal channels) are processed as one channel (`gray_fast_path`, see `transforms.to_pil`).
    """

    image_size: int = 224
    scale: tuple[float, float] = (0.08, 1.0)
    ratio: tuple[float, float] = (3.0 / 4.0, 4.0 / 3.0)
    flip_probability: float = 0.5
    jitter_probability: float = 0.8
    jitter: tuple[float, float, float, float] = (0.4, 0.4, 0.2, 0.1)
    grayscale_probability: float = 0.2
    blur_probabilities: tuple[float, float] = (1.0, 0.1)
    solarization_probabilities: tuple[float, float] = (0.0, 0.2)
    blur_sigma: tuple[float, float] = (0.1, 2.0)
    gray_fast_path: bool = True

    image_keys = ("view_0", "view_1")

    def view(self, index: int) -> ViewAugmentation:
        """The augmentation of view `index` (0 or 1)."""
        return ViewAugmentation(
            size=self.image_size, scale=self.scale, ratio=self.ratio, flip_probability=self.flip_probability,
            jitter_probability=self.jitter_probability, jitter=self.jitter,
            grayscale_probability=self.grayscale_probability, blur_probability=self.blur_probabilities[index],
            blur_radius=self.blur_sigma, solarization_probability=self.solarization_probabilities[index])

    def __call__(self, record: Record, rng: np.random.Generator) -> Record:
        image = to_pil(record["image"], self.gray_fast_path)
        out = {key: value for key, value in record.items() if key != "image"}
        for index, key in enumerate(self.image_keys):
            out[key] = self.view(index)(image, rng)
        return out
