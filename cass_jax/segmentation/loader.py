"""grain pipeline of cross-teaching batches: a labelled half and an unlabelled half, as SSL4MIS's TwoStreamBatchSampler.

Every batch is a pure function of (seed, step), so runs repeat exactly whatever the number of workers, and the
iterator's state (`get_state`/`set_state`, or orbax through grain's checkpoint handlers) resumes mid-epoch.
"""

from __future__ import annotations

import dataclasses
import math
import sys
from typing import Any, Callable, Sequence

import grain
import numpy as np

from cass_jax.data.loader import check_shard, derive_seed, prefetch
from cass_jax.segmentation.augment import RandomGenerator, ResizeOnly
from cass_jax.segmentation.data import SegmentationSource

Batch = dict[str, np.ndarray]

# Offsets deriving independent seeds from the one user seed (cass_jax.data.loader uses 0 and 1 for its streams).
_LABELED_STREAMS, _UNLABELED_STREAMS = (10, 11), (12, 13)  # (shuffle, augmentation)


def images_to_float(images: Sequence[np.ndarray]) -> np.ndarray:
    """Equal-shaped uint8 (H, W) or (H, W, C) images -> float32 (B, H, W, C) in [0, 1], as SSL4MIS feeds its networks.

    SSL4MIS min-max scales each volume to [0, 1] offline; 8-bit slices of such volumes divided by 255 match that.
    """
    batch = np.stack(images).astype(np.float32) * np.float32(1.0 / 255.0)
    return batch[..., None] if batch.ndim == 3 else batch


def _shuffled_stream(source: SegmentationSource, transform: Callable, seed: int, streams: tuple[int, int],
                     random: bool) -> grain.MapDataset:
    """Transformed examples in a fresh seeded order per pass; position q reads pass q // len, shuffled.

    A random transform draws from (seed, pass, example), so an example is augmented afresh on every pass.
    """
    shuffle_stream, augment_stream = streams
    dataset = grain.MapDataset.source(source)
    if random:
        dataset = dataset.random_map(transform, seed=derive_seed(seed, augment_stream))
    else:
        dataset = dataset.map(transform)
    return dataset.shuffle(seed=derive_seed(seed, shuffle_stream))


@dataclasses.dataclass(frozen=True)
class TwoStreamBatch:
    """Step t -> this process's part of global batch t, by index arithmetic on two endless shuffled streams.

    SSL4MIS's TwoStreamBatchSampler: an epoch is one pass over the labelled slices in a fresh random order, cut into
    `steps_per_epoch` = N_l // labeled_batch groups (the rest dropped); each epoch restarts the unlabelled stream with
    fresh permutations, chained back to back, read in groups of unlabeled_batch (a group may span two permutations).
    """

    labeled: grain.MapDataset
    unlabeled: grain.MapDataset | None
    labeled_count: int
    unlabeled_count: int
    labeled_batch: int
    unlabeled_batch: int
    steps_per_epoch: int
    unlabeled_passes_per_epoch: int
    shard_index: int
    shard_count: int

    def __call__(self, step: int) -> Batch:
        epoch, within = divmod(int(step), self.steps_per_epoch)
        labeled_start = epoch * self.labeled_count + within * self.labeled_batch
        records = [self.labeled[labeled_start + j]
                   for j in range(self.shard_index, self.labeled_batch, self.shard_count)]
        batch = {"labeled_image": images_to_float([r["image"] for r in records]),
                 "labeled_mask": np.stack([r["mask"] for r in records]).astype(np.int32)}
        if self.unlabeled is not None:
            unlabeled_start = (epoch * self.unlabeled_passes_per_epoch * self.unlabeled_count
                               + within * self.unlabeled_batch)
            records = [self.unlabeled[unlabeled_start + j]
                       for j in range(self.shard_index, self.unlabeled_batch, self.shard_count)]
            batch["unlabeled_image"] = images_to_float([r["image"] for r in records])
        return batch


def two_stream_iterator(
    source: SegmentationSource,
    labeled_indices: Sequence[int] | np.ndarray,
    unlabeled_indices: Sequence[int] | np.ndarray,
    *,
    image_size: int,
    seed: int,
    labeled_batch_size: int = 8,
    unlabeled_batch_size: int = 8,
    augment: bool = True,
    shard_index: int = 0,
    shard_count: int = 1,
    data_config: Any = None,
) -> grain.DatasetIterator:
    """Endless batches {"labeled_image" float32 (b_l, S, S, C), "labeled_mask" int32 (b_l, S, S), "unlabeled_image"}.

    Batch sizes are global (SSL4MIS: 8 + 8); process `shard_index` of `shard_count` gets every shard_count-th example
    of each half. `unlabeled_batch_size=0` gives labelled batches only (the supervised baselines). `augment` applies
    SSL4MIS's RandomGenerator, else a plain order-0 zoom to image_size. `data_config` may set read_threads,
    prefetch_batches and workers (grain multiprocessing), as cass_jax.data.loader reads them.
    """
    check_shard(shard_index, shard_count)
    labeled_indices, unlabeled_indices = np.asarray(labeled_indices), np.asarray(unlabeled_indices)
    for name, size in (("labeled_batch_size", labeled_batch_size), ("unlabeled_batch_size", unlabeled_batch_size)):
        if size % shard_count:
            raise ValueError(f"{name}={size} does not split over {shard_count} processes; use a multiple of "
                             f"{shard_count}.")
    if labeled_batch_size <= 0 or len(labeled_indices) < labeled_batch_size:
        raise ValueError(f"{len(labeled_indices)} labelled images cannot fill one labelled batch of "
                         f"{labeled_batch_size}; label more images or lower the labelled batch size.")
    if unlabeled_batch_size > 0 and len(unlabeled_indices) < unlabeled_batch_size:
        raise ValueError(f"{len(unlabeled_indices)} unlabelled images cannot fill one unlabelled batch of "
                         f"{unlabeled_batch_size}; lower the unlabelled batch size or label fewer images.")
    transform = RandomGenerator(image_size) if augment else ResizeOnly(image_size)
    steps_per_epoch = len(labeled_indices) // labeled_batch_size
    unlabeled = None
    if unlabeled_batch_size > 0:
        unlabeled = _shuffled_stream(source.subset(unlabeled_indices), transform, seed, _UNLABELED_STREAMS, augment)
    batches = TwoStreamBatch(
        labeled=_shuffled_stream(source.subset(labeled_indices), transform, seed, _LABELED_STREAMS, augment),
        unlabeled=unlabeled,
        labeled_count=len(labeled_indices),
        unlabeled_count=len(unlabeled_indices),
        labeled_batch=labeled_batch_size,
        unlabeled_batch=unlabeled_batch_size,
        steps_per_epoch=steps_per_epoch,
        unlabeled_passes_per_epoch=max(1, math.ceil(steps_per_epoch * unlabeled_batch_size /
                                                    max(1, len(unlabeled_indices)))),
        shard_index=shard_index,
        shard_count=shard_count,
    )
    dataset = grain.MapDataset.range(sys.maxsize).map(batches)
    return iter(prefetch(dataset, data_config if data_config is not None else {}))
