"""A saved segmentation network: a folder with `segmenter.json` and `variables.msgpack`, and what loads it back.

`load_segmenter(path)(images)` gives class-index masks at each image's own size, with the training run's resizing
(order-0 zoom to the network size and back), so predictions on new images match the evaluation of the run.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any, Sequence

import jax
import numpy as np
from flax import linen as nn

from cass_jax.port import load_variables, save_variables
from cass_jax.segmentation.cross_teaching import CrossTeachingConfig, build_module, predict_labels
from cass_jax.segmentation.evaluation import segment_slices

INFO_FILE, VARIABLES_FILE = "segmenter.json", "variables.msgpack"


@dataclasses.dataclass
class Segmenter:
    """A network with its variables and settings; call it on uint8 images (H, W) or (H, W, C) of any size."""

    model: nn.Module
    variables: dict[str, Any]
    info: dict[str, Any]
    batch_size: int = 1  # images of different sizes go one by one

    @property
    def image_size(self) -> int:
        return int(self.info["image_size"])

    @property
    def num_classes(self) -> int:
        return int(self.info["num_classes"])

    def _labels(self, inputs: np.ndarray) -> np.ndarray:
        return np.asarray(predict_labels(self.variables, inputs, model=self.model))

    def __call__(self, images: Sequence[np.ndarray]) -> list[np.ndarray]:
        """uint8 masks (H, W), one per image, each at its image's size (images as `read_image` gives them)."""
        channels = int(self.info.get("in_channels", 1))
        masks = []
        for image in images:
            image = np.asarray(image)
            if (image.ndim == 2) != (channels == 1) or (image.ndim == 3 and image.shape[-1] != channels):
                raise ValueError(f"{self.info['model']} takes {channels}-channel images, got shape {image.shape}; "
                                 f"read images with read_image(path, channels={channels}).")
            masks.append(segment_slices(self._labels, image[None], self.image_size, self.batch_size)[0])
        return masks


def save_segmenter(path: str | Path, variables: dict[str, Any], info: dict[str, Any]) -> Path:
    """Writes the folder `path` (variables + info: model, num_classes, image_size, in_channels, class names...)."""
    path = Path(path)
    save_variables(path / VARIABLES_FILE, jax.device_get(variables))
    (path / INFO_FILE).write_text(json.dumps(info, indent=2))
    return path


def load_segmenter(path: str | Path, batch_size: int = 1) -> Segmenter:
    """Loads a folder written by `save_segmenter` (a training run's `models/<network>/`)."""
    path = Path(path)
    info_path = path / INFO_FILE
    if not info_path.is_file():
        raise FileNotFoundError(f"{path} is not a saved segmentation model (no {INFO_FILE}); pass a folder such as "
                                "<workdir>/runs/<run>/models/cnn.")
    info = json.loads(info_path.read_text())
    config = CrossTeachingConfig(num_classes=int(info["num_classes"]), image_size=int(info["image_size"]),
                                 in_channels=int(info.get("in_channels", 1)), dtype=info.get("dtype", "float32"))
    return Segmenter(build_module(info["model"], config), load_variables(path / VARIABLES_FILE), info, batch_size)
