"""Scoring a segmentation network per volume, as SSL4MIS's val_2D does, and per 2D slice.

Each slice is zoomed (order 0) to the network size, segmented, and its label map zoomed (order 0) back to the slice's
own size; a volume's slices (one patient-phase, ordered by slice index) are stacked and scored in 3D.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import grain
import numpy as np

from cass_jax.data.sources import DataError
from cass_jax.segmentation.augment import zoom_to
from cass_jax.segmentation.data import SegmentationSource, volume_groups
from cass_jax.segmentation.loader import images_to_float
from cass_jax.segmentation.metrics import class_scores, mean_scores

# float32 (B, S, S, C) images in [0, 1] -> integer labels (B, S, S).
Predictor = Callable[[np.ndarray], Any]


@dataclasses.dataclass(frozen=True)
class VolumeSource:
    """Random access to whole volumes: {"volume", "image": (D, H, W[, C]) uint8, "mask": (D, H, W) uint8, "ids"}."""

    source: SegmentationSource
    volumes: tuple[str, ...]
    positions: tuple[np.ndarray, ...]

    @classmethod
    def of(cls, source: SegmentationSource) -> "VolumeSource":
        groups = volume_groups(source)
        return cls(source, tuple(groups), tuple(groups.values()))

    def __len__(self) -> int:
        return len(self.volumes)

    def __getitem__(self, index: int) -> dict[str, Any]:
        records = [self.source[int(i)] for i in self.positions[index]]
        shapes = {r["image"].shape for r in records}
        if len(shapes) > 1:
            raise DataError(f"Volume {self.volumes[index]} mixes slice sizes {sorted(shapes)}; the slices of one "
                            "volume must share a size (check the stem_pattern or the CSV's volume column).")
        return {"volume": self.volumes[index], "image": np.stack([r["image"] for r in records]),
                "mask": np.stack([r["mask"] for r in records]), "ids": [r["id"] for r in records]}


def segment_slices(predict: Predictor, images: np.ndarray, image_size: int, batch_size: int = 16) -> np.ndarray:
    """uint8 slices (D, H, W[, C]) -> uint8 label maps (D, H, W): zoom to the network, predict, zoom back (order 0).

    Batches are padded to `batch_size` so the predictor compiles once.
    """
    depth, height, width = images.shape[:3]
    inputs = images_to_float([zoom_to(image, image_size, image_size) for image in images])
    labels = np.empty((depth, image_size, image_size), np.uint8)
    for start in range(0, depth, batch_size):
        chunk = inputs[start:start + batch_size]
        padded = np.concatenate([chunk, np.zeros((batch_size - len(chunk),) + chunk.shape[1:], chunk.dtype)])
        labels[start:start + len(chunk)] = np.asarray(predict(padded))[:len(chunk)]
    return np.stack([zoom_to(label, height, width) for label in labels])


def evaluate_volumes(predict: Predictor, source: SegmentationSource, *, image_size: int, batch_size: int = 16,
                     spacing: tuple[float, ...] | None = None, empty_policy: str = "ssl4mis",
                     slice_empty_policy: str = "ignore_empty_reference", read_threads: int = 2,
                     keep_predictions: bool = False, slice_scores: bool = True) -> dict[str, Any]:
    """Scores `predict` on every volume of `source`, in 3D per volume and in 2D per slice.

    Returns {"summary": {"volume/dice/class_1", ..., "volume/hd95/mean", "slice/dice/mean", ...},
    "volumes": {volume id: {"dice", "iou", "hd95"}}, "slices": {slice id: {...}}}, per-class arrays over the
    foreground classes (`slice_scores=False` skips the per-slice part, for quick validation), and with
    `keep_predictions` "predictions": {slice id: uint8 label map at the slice's size}.
    Volume scores use `empty_policy` (SSL4MIS's by default); slice scores default to ignoring
    slices where a structure is absent (SSL4MIS has no slice-level convention; its rule would score an empty slice
    predicted empty as Dice 0), see metrics.structure_scores.
    """
    num_classes = source.num_classes
    volumes = grain.MapDataset.source(VolumeSource.of(source)).to_iter_dataset(
        grain.ReadOptions(num_threads=read_threads, prefetch_buffer_size=2))
    per_volume, per_slice, predictions = {}, {}, {}
    for volume in volumes:
        prediction = segment_slices(predict, volume["image"], image_size, batch_size)
        per_volume[volume["volume"]] = class_scores(prediction, volume["mask"], num_classes, spacing, empty_policy)
        slice_spacing = None if spacing is None else tuple(spacing)[1:]
        for slice_id, predicted, reference in zip(volume["ids"], prediction, volume["mask"]):
            if slice_scores:
                per_slice[slice_id] = class_scores(predicted, reference, num_classes, slice_spacing,
                                                   slice_empty_policy)
            if keep_predictions:
                predictions[slice_id] = predicted
    summary = mean_scores(list(per_volume.values()), "volume/")
    if slice_scores:
        summary.update(mean_scores(list(per_slice.values()), "slice/"))
    result = {"summary": summary, "volumes": per_volume, "slices": per_slice}
    return {**result, "predictions": predictions} if keep_predictions else result
