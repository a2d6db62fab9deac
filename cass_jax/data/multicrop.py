"""DINO's multi-crop augmentation (main_dino.py DataAugmentationDINO) as a grain random map.

Two global crops and N local crops per image, each one `transforms.ViewAugmentation` with the official numbers.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from cass_jax.data.transforms import Record, ViewAugmentation, to_pil


@dataclasses.dataclass(frozen=True)
class DinoMultiCrop:
    """DataAugmentationDINO as a grain random map (record, rng) -> record, like `CassAugment`.

    Replaces record["image"] (uint8 H x W x 3) with "global_0", "global_1", "local_0", ... : uint8
    (size, size, 3) arrays, normalised later per batch (ImageNet mean/std as the official Normalize); other
    keys pass through. Per crop, as the official pipeline (see `ViewAugmentation`):
      RandomResizedCrop(size, scale, bicubic); RandomHorizontalFlip(.5);
      RandomApply([ColorJitter(.4, .4, .2, .1)], p=.8); RandomGrayscale(.2);
      GaussianBlur(p, radius U(.1, 2)); global crop 2 only: Solarization(.2).
    Blur probabilities are 1.0 and 0.1 for the two global crops and 0.5 for local ones. The number of
    global crops is len(global_blur_probabilities). Gray images (three equal channels) are processed as one
    channel (`gray_fast_path`, see `transforms.to_pil`).
    """

    global_crop_size: int = 224
    local_crop_size: int = 96
    global_crops_scale: tuple[float, float] = (0.4, 1.0)
    local_crops_scale: tuple[float, float] = (0.05, 0.4)
    local_crops_number: int = 8
    flip_probability: float = 0.5
    jitter_probability: float = 0.8
    jitter: tuple[float, float, float, float] = (0.4, 0.4, 0.2, 0.1)
    grayscale_probability: float = 0.2
    global_blur_probabilities: tuple[float, ...] = (1.0, 0.1)
    global_solarization_probabilities: tuple[float, ...] = (0.0, 0.2)
    local_blur_probability: float = 0.5
    blur_radius: tuple[float, float] = (0.1, 2.0)
    gray_fast_path: bool = True

    def __post_init__(self) -> None:
        if len(self.global_blur_probabilities) != len(self.global_solarization_probabilities):
            raise ValueError("global_blur_probabilities and global_solarization_probabilities need one entry "
                             "per global crop")

    @property
    def num_global_crops(self) -> int:
        return len(self.global_blur_probabilities)

    @property
    def num_crops(self) -> int:
        return self.num_global_crops + self.local_crops_number

    @property
    def image_keys(self) -> tuple[str, ...]:
        """The record keys of the crops, global first: the order the student sees them in."""
        return (*(f"global_{i}" for i in range(self.num_global_crops)),
                *(f"local_{i}" for i in range(self.local_crops_number)))

    def _view(self, size: int, scale: tuple[float, float], blur: float, solarization: float) -> ViewAugmentation:
        return ViewAugmentation(
            size=size, scale=scale, flip_probability=self.flip_probability,
            jitter_probability=self.jitter_probability, jitter=self.jitter,
            grayscale_probability=self.grayscale_probability, blur_probability=blur, blur_radius=self.blur_radius,
            solarization_probability=solarization)

    def __call__(self, record: Record, rng: np.random.Generator) -> Record:
        image = to_pil(record["image"], self.gray_fast_path)
        out = {key: value for key, value in record.items() if key != "image"}
        for i, (blur, solarization) in enumerate(zip(self.global_blur_probabilities,
                                                     self.global_solarization_probabilities)):
            out[f"global_{i}"] = self._view(self.global_crop_size, self.global_crops_scale, blur, solarization)(
                image, rng)
        local = self._view(self.local_crop_size, self.local_crops_scale, self.local_blur_probability, 0.0)
        for i in range(self.local_crops_number):
            out[f"local_{i}"] = local(image, rng)
        return out
