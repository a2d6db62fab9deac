"""Train/val/test splits without leakage, and seeded label fractions.

`load_splits` is the one entry point: it reads the configured source, drops corrupt files and exact
duplicates, carves validation (and test) sets, and subsamples training labels.
"""

from __future__ import annotations

import collections
import dataclasses
import logging

import numpy as np

from cass_jax.data.sources import DataError, ImageSource, scan_rows, source_splits_from_config

# When duplicates sit in several splits, the copy in the first split listed here is kept.
_KEEP_PRIORITY = ("test", "val", "train")


@dataclasses.dataclass
class DatasetSplits:
    """The three splits of a dataset. `train` holds the labelled fraction; `train_full` all of it.

    Pretraining uses `train_full` (the whole unlabelled training split); supervised training uses `train`.
    """

    train: ImageSource
    val: ImageSource
    test: ImageSource
    class_names: list[str]
    multi_label: bool
    train_full: ImageSource

    @property
    def num_classes(self) -> int:
        return len(self.class_names)


def label_fraction_indices(labels: np.ndarray, fraction: float, seed: int, mode: str = "random") -> np.ndarray:
    """Sorted positions of the labelled subset: round(fraction * N) examples (at least 1), seeded.

    "random" draws uniformly (the paper). "stratified" keeps class proportions (largest remainder
    rounding) and at least one example of every class present; for multi-label (N, C) labels it first
    picks one example per present class, then fills up at random.
    """
    labels = np.asarray(labels)
    n = len(labels)
    if not 0.0 < fraction <= 1.0:
        raise ValueError(f"label_fraction must be in (0, 1], got {fraction}.")
    if mode not in ("random", "stratified"):
        raise ValueError(f"label_fraction_mode must be 'random' or 'stratified', got {mode!r}.")
    if fraction == 1.0:
        return np.arange(n)
    rng = np.random.default_rng(seed)
    k = max(1, int(round(fraction * n)))
    if mode == "random":
        return np.sort(rng.choice(n, size=k, replace=False))
    if labels.ndim == 2:
        chosen: set[int] = set()
        for c in rng.permutation(labels.shape[1]):
            members = np.flatnonzero(labels[:, c] > 0)
            if len(members) and not any(labels[i, c] > 0 for i in chosen):
                chosen.add(int(rng.choice(members)))
        rest = np.setdiff1d(np.arange(n), np.fromiter(chosen, np.int64, len(chosen)))
        extra = rng.choice(rest, size=max(0, k - len(chosen)), replace=False)
        return np.sort(np.concatenate([np.fromiter(chosen, np.int64, len(chosen)), extra]).astype(np.int64))
    classes, counts = np.unique(labels, return_counts=True)
    quotas = fraction * counts
    take = np.maximum(1, np.floor(quotas).astype(np.int64))
    remainder_order = np.argsort(-(quotas - np.floor(quotas)), kind="stable")
    for c in remainder_order:
        if take.sum() >= k:
            break
        if take[c] < counts[c]:
            take[c] += 1
    picked = [rng.choice(np.flatnonzero(labels == cls), size=t, replace=False) for cls, t in zip(classes, take)]
    return np.sort(np.concatenate(picked))


def _random_partition(n: int, fractions: tuple[float, ...], seed: int) -> list[np.ndarray]:
    """Splits range(n) at random into parts of round(f * n) for each fraction; the rest comes first."""
    perm = np.random.default_rng(seed).permutation(n)
    sizes = [int(round(f * n)) for f in fractions]
    if sum(sizes) >= n:
        raise DataError(f"Cannot hold out fractions {fractions} of only {n} examples; lower them or add data.")
    parts, start = [], n - sum(sizes)
    parts.append(np.sort(perm[:start]))
    for size in sizes:
        parts.append(np.sort(perm[start : start + size]))
        start += size
    return parts


def _stratified_partition(labels: np.ndarray, fractions: tuple[float, ...], seed: int) -> list[np.ndarray]:
    """As _random_partition, but each class gives round(f * its count) examples to each held-out part."""
    if labels.ndim != 1:
        raise DataError("data.split_mode='stratified' needs single-label data (one class index per image); "
                        "use split_mode='random' for multi-label data.")
    rng = np.random.default_rng(seed)
    parts: list[list[np.ndarray]] = [[] for _ in range(len(fractions) + 1)]
    for cls in np.unique(labels):
        members = rng.permutation(np.flatnonzero(labels == cls))
        sizes = [int(round(f * len(members))) for f in fractions]
        if sum(sizes) >= len(members):
            raise DataError(f"Cannot hold out fractions {fractions} of the {len(members)} examples of class {cls} "
                            "and keep some for training; lower the fractions, add data or use split_mode='random'.")
        start = len(members) - sum(sizes)
        parts[0].append(members[:start])
        for index, size in enumerate(sizes, start=1):
            parts[index].append(members[start:start + size])
            start += size
    return [np.sort(np.concatenate(part)) for part in parts]


def _holdout_partition(labels: np.ndarray, fractions: tuple[float, ...], seed: int, mode: str) -> list[np.ndarray]:
    """Training positions first, then one array of positions per held-out fraction (data.split_mode)."""
    if mode == "random":
        return _random_partition(len(labels), fractions, seed)
    if mode == "stratified":
        return _stratified_partition(np.asarray(labels), fractions, seed)
    raise DataError(f"data.split_mode must be 'random' or 'stratified', got {mode!r}.")


def _drop_corrupt_and_duplicates(splits: dict[str, ImageSource], skip_corrupt: bool) -> dict[str, ImageSource]:
    """Removes unreadable/truncated files (error unless skip_corrupt) and exact duplicates (logged).

    Of a group of identical files one copy is kept, in the test split if any copy is there, else val,
    else train; a group whose copies carry different labels is dropped whole, since its label is unknown.
    """
    keep: dict[str, list[int]] = {}
    groups: dict[str, list[tuple[str, int]]] = collections.defaultdict(list)
    corrupt_total = 0
    for split, source in splits.items():
        scan = scan_rows(source, [int(r) for r in source.rows])
        if scan.corrupt:
            examples = [f"{source.describe(r)}: {why}" for r, why in list(scan.corrupt.items())[:5]]
            if not skip_corrupt:
                raise DataError(
                    f"{len(scan.corrupt)} corrupt image(s) in the {split} split, e.g. {examples}. Replace or delete "
                    "them, or set data.skip_corrupt=True to drop them."
                )
            logging.warning(
                "Dropped %d corrupt image(s) from the %s split, e.g. %s", len(scan.corrupt), split, examples
            )
            corrupt_total += len(scan.corrupt)
        keep[split] = []
        for position, (row, digest) in enumerate(zip(source.rows, scan.digests)):
            if int(row) in scan.corrupt:
                continue
            if digest is None:
                keep[split].append(position)
            else:
                groups[digest].append((split, position))
    dropped = conflicting = duplicate_groups = 0
    for members in groups.values():
        if len(members) > 1:
            duplicate_groups += 1
            labels = {np.asarray(splits[s].labels[p]).tobytes() for s, p in members}
            if len(labels) > 1:
                conflicting += 1
                dropped += len(members)
                continue
            members = sorted(members, key=lambda m: (_KEEP_PRIORITY.index(m[0]), m[1]))
            dropped += len(members) - 1
        split, position = members[0]
        keep[split].append(position)
    if duplicate_groups:
        logging.warning(
            "Found %d groups of identical image files; dropped %d files (%d groups had conflicting labels and "
            "were dropped whole), so no image is in two splits.",
            duplicate_groups,
            dropped,
            conflicting,
        )
    return {split: source.subset(sorted(keep[split])) for split, source in splits.items()}


def load_splits(data_config, *, label_fraction_seed: int | None = None) -> DatasetSplits:
    """Reads `data_config` (see `default_data_config`) and returns the deduplicated, seeded splits.

    Own train/test splits are kept; validation is carved from train (val_fraction, split_seed) unless
    the dataset has its own; with no test split the data are split (1 - val - test) / val / test.
    `train` holds `label_fraction` of the training examples, drawn with `label_fraction_seed`
    (argument, else data.label_fraction_seed, else split_seed). Every stored file is hashed and
    checked first (synthetic phantoms, unique by construction, are not).
    """
    own = source_splits_from_config(data_config)
    if data_config.source != "synthetic":
        own = _drop_corrupt_and_duplicates(own, bool(data_config.skip_corrupt))
    train = own["train"]
    seed = int(data_config.split_seed)
    split_mode = str(data_config.get("split_mode", "random"))
    if "test" in own and "val" in own:
        val, test = own["val"], own["test"]
    elif "test" in own:
        rest, val_idx = _holdout_partition(train.labels, (data_config.val_fraction,), seed, split_mode)
        train, val, test = train.subset(rest), train.subset(val_idx), own["test"]
    else:
        rest, val_idx, test_idx = _holdout_partition(
            train.labels, (data_config.val_fraction, data_config.test_fraction), seed, split_mode
        )
        train, val, test = train.subset(rest), train.subset(val_idx), train.subset(test_idx)
    for name, split in (("train", train), ("val", val), ("test", test)):
        if len(split) == 0:
            raise DataError(f"The {name} split of {data_config.source} data at {data_config.path!r} is empty.")
    if label_fraction_seed is None:
        label_fraction_seed = data_config.get("label_fraction_seed", None)
    if label_fraction_seed is None:
        label_fraction_seed = seed
    labelled = label_fraction_indices(
        train.labels, float(data_config.label_fraction), int(label_fraction_seed), data_config.label_fraction_mode
    )
    logging.info(
        "Splits: train %d (labelled %d), val %d, test %d; classes %s",
        len(train),
        len(labelled),
        len(val),
        len(test),
        train.class_names,
    )
    return DatasetSplits(
        train=train.subset(labelled),
        val=val,
        test=test,
        class_names=list(train.class_names),
        multi_label=bool(train.multi_label),
        train_full=train,
    )
