"""Image + mask pairs for segmentation: folder, CSV and ACDC sources, the labelled subset, slices grouped into volumes.

A source is random-access like cass_jax.data.sources (`len`, `__getitem__`), returning {"image": uint8 (H, W) or
(H, W, C), "mask": uint8 (H, W) class indices, "id", "patient", "volume", "slice"}, so grain's MapDataset reads it.
"""

from __future__ import annotations

import csv
import json
import re
from pathlib import Path
from typing import Any, Sequence

import numpy as np
from PIL import Image

from cass_jax.data.dicom import DecodeOptions
from cass_jax.data.sources import IMAGE_EXTENSIONS, DataError
from cass_jax.data.splits import label_fraction_indices
from cass_jax.data.transforms import decode_image

# ACDC slice stems as SSL4MIS names them: <patient>_<frame>_slice<NN>; a volume is one patient-frame (ED or ES).
ACDC_STEM_PATTERN = r"^(?P<volume>(?P<patient>patient\d+)_frame\d+)_slice(?P<slice>\d+)$"
ACDC_NUM_CLASSES = 4
ACDC_CLASS_NAMES = ("background", "right_ventricle", "myocardium", "left_ventricle")
MASK_MODES = ("1", "L", "P", "I", "I;16", "I;16L", "I;16B", "I;16N")


def _stem_fields(stems: Sequence[str], stem_pattern: str | None, paths: Sequence[str]) -> tuple[list, list, list]:
    """(patients, volumes, slices) parsed from file stems; without a pattern each image is its own patient/volume."""
    if stem_pattern is None:
        return list(stems), list(stems), [0] * len(stems)
    pattern = re.compile(stem_pattern)
    missing = [group for group in ("patient", "volume", "slice") if group not in pattern.groupindex]
    if missing:
        raise ValueError(f"stem_pattern {stem_pattern!r} lacks the named groups {missing}; it needs (?P<patient>...), "
                         "(?P<volume>...) and (?P<slice>...).")
    patients, volumes, slices = [], [], []
    for stem, path in zip(stems, paths):
        match = pattern.match(stem)
        if match is None:
            raise DataError(f"Image {path}: its name {stem!r} does not match stem_pattern {stem_pattern!r}; rename it "
                            "or fix the pattern.")
        patients.append(match["patient"])
        volumes.append(match["volume"])
        slices.append(int(match["slice"]))
    return patients, volumes, slices


def read_mask(path: str, num_classes: int) -> np.ndarray:
    """A class-index mask file -> uint8 (H, W); a colour mask or a value >= num_classes is a one-line DataError."""
    try:
        with Image.open(path) as image:
            mode = image.mode
            if mode not in MASK_MODES:
                raise DataError(f"Mask {path} has PIL mode {mode}; masks must be single-channel class-index images "
                                "(8-bit gray or palette PNG whose values are class indices).")
            values = np.asarray(image)
    except OSError as error:
        raise DataError(f"Cannot read mask {path}: {error}. Restore the file or remove its image.") from error
    if values.ndim != 2:
        raise DataError(f"Mask {path} has shape {values.shape}; masks must be 2-D class-index images.")
    top = int(values.max()) if values.size else 0
    if top >= num_classes or int(values.min()) < 0:
        raise DataError(f"Mask {path} holds class value {top}, above the configured num_classes={num_classes} "
                        f"(values 0..{num_classes - 1}); fix the mask or raise num_classes.")
    return values.astype(np.uint8)


def read_image(path: str | Path, channels: int = 1, decode_options: DecodeOptions = DecodeOptions()) -> np.ndarray:
    """An image file -> uint8 gray (H, W) (`channels=1`, PIL's luma) or RGB (H, W, 3); DataError naming the file."""
    try:
        data = Path(path).read_bytes()
    except OSError as error:
        raise DataError(f"Cannot read image {path}: {error}. Restore the file or remove its pair.") from error
    rgb = decode_image(data, str(path), decode_options)
    return np.asarray(Image.fromarray(rgb).convert("L")) if channels == 1 else rgb


class SegmentationSource:
    """Image/mask file pairs addressable by position, with patient, volume and slice of each.

    `channels=1` reads images as gray (H, W) (PIL's luma for colour files), `channels=3` as RGB (H, W, 3); 16-bit,
    float and DICOM images decode as cass_jax.data.decode_image does. A mask of another size than its image, or
    with a class value >= num_classes, raises a DataError naming the file when the pair is read (`check()` reads
    them all up front).
    """

    def __init__(self, image_paths: Sequence[str], mask_paths: Sequence[str], num_classes: int, *,
                 ids: Sequence[str] | None = None, patients: Sequence[str] | None = None,
                 volumes: Sequence[str] | None = None, slices: Sequence[int] | None = None, channels: int = 1,
                 decode_options: DecodeOptions = DecodeOptions()):
        if len(image_paths) != len(mask_paths):
            raise ValueError(f"{len(image_paths)} images but {len(mask_paths)} masks.")
        if num_classes < 2:
            raise ValueError(f"num_classes must be >= 2 (background + structures), got {num_classes}.")
        if channels not in (1, 3):
            raise ValueError(f"channels must be 1 (gray) or 3 (RGB), got {channels}.")
        count = len(image_paths)
        ids = [Path(p).stem for p in image_paths] if ids is None else list(ids)
        self._image_paths = np.asarray([str(p) for p in image_paths], dtype=object)
        self._mask_paths = np.asarray([str(p) for p in mask_paths], dtype=object)
        self._ids = np.asarray(ids, dtype=object)
        self._patients = np.asarray(ids if patients is None else list(patients), dtype=object)
        self._volumes = np.asarray(ids if volumes is None else list(volumes), dtype=object)
        self._slices = np.asarray([0] * count if slices is None else list(slices), dtype=np.int64)
        self.num_classes = int(num_classes)
        self.channels = channels
        self.decode_options = decode_options
        self.rows = np.arange(count)

    def __len__(self) -> int:
        return len(self.rows)

    @property
    def ids(self) -> list[str]:
        return list(self._ids[self.rows])

    @property
    def patients(self) -> list[str]:
        return list(self._patients[self.rows])

    @property
    def volumes(self) -> list[str]:
        return list(self._volumes[self.rows])

    @property
    def slices(self) -> np.ndarray:
        return self._slices[self.rows]

    @property
    def image_paths(self) -> list[str]:
        return list(self._image_paths[self.rows])

    def patient_ids(self) -> list[str]:
        """Distinct patients, in order of first appearance."""
        return list(dict.fromkeys(self.patients))

    def subset(self, indices: Sequence[int] | np.ndarray) -> "SegmentationSource":
        """The pairs at `indices` (positions in this source), in that order."""
        other = object.__new__(type(self))
        other.__dict__.update(self.__dict__)
        other.rows = self.rows[np.asarray(indices, dtype=np.int64)]
        return other

    def load_image(self, row: int) -> np.ndarray:
        return read_image(str(self._image_paths[row]), self.channels, self.decode_options)

    def load_pair(self, row: int) -> tuple[np.ndarray, np.ndarray]:
        image = self.load_image(row)
        mask_path = str(self._mask_paths[row])
        mask = read_mask(mask_path, self.num_classes)
        if mask.shape != image.shape[:2]:
            raise DataError(f"Mask {mask_path} is {mask.shape[0]}x{mask.shape[1]} but its image "
                            f"{self._image_paths[row]} is {image.shape[0]}x{image.shape[1]}; a mask must have its "
                            "image's size.")
        return image, mask

    def __getitem__(self, index: int) -> dict[str, Any]:
        row = int(self.rows[index])
        image, mask = self.load_pair(row)
        return {"image": image, "mask": mask, "id": str(self._ids[row]), "patient": str(self._patients[row]),
                "volume": str(self._volumes[row]), "slice": int(self._slices[row])}

    def check(self) -> None:
        """Reads every pair once, so a bad file fails before training rather than mid-run."""
        for index in range(len(self)):
            self.load_pair(int(self.rows[index]))


def folder_pairs(root: str | Path, num_classes: int, *, stem_pattern: str | None = None, channels: int = 1,
                 decode_options: DecodeOptions = DecodeOptions()) -> SegmentationSource:
    """Pairs from `root/images/<stem>.<ext>` and `root/masks/<stem>.png` (same stem), sorted by stem.

    `stem_pattern` is a regex with named groups patient, volume and slice (e.g. ACDC_STEM_PATTERN) read from each
    stem; without it every image is its own patient and volume. An image without a mask is a DataError naming it.
    """
    root = Path(root)
    image_dir, mask_dir = root / "images", root / "masks"
    for folder in (image_dir, mask_dir):
        if not folder.is_dir():
            raise DataError(f"{folder} is not a folder; a segmentation folder holds images/ and masks/ with "
                            "matching file names.")
    images = sorted((p for p in image_dir.iterdir() if p.suffix.lower() in IMAGE_EXTENSIONS and
                     not p.name.startswith(".")), key=lambda p: p.stem)
    if not images:
        raise DataError(f"{image_dir} holds no images ({', '.join(IMAGE_EXTENSIONS)}).")
    masks = {p.stem: p for p in mask_dir.iterdir() if p.is_file() and not p.name.startswith(".")}
    mask_paths = []
    for image in images:
        if image.stem not in masks:
            raise DataError(f"No mask for image {image}: expected {mask_dir / (image.stem + '.png')} (one class-index "
                            "PNG per image, same name).")
        mask_paths.append(masks[image.stem])
    stems = [p.stem for p in images]
    patients, volumes, slices = _stem_fields(stems, stem_pattern, [str(p) for p in images])
    return SegmentationSource(images, mask_paths, num_classes, ids=stems, patients=patients, volumes=volumes,
                              slices=slices, channels=channels, decode_options=decode_options)


def csv_pairs(csv_path: str | Path, num_classes: int, *, image_column: str = "image", mask_column: str = "mask",
              stem_pattern: str | None = None, channels: int = 1,
              decode_options: DecodeOptions = DecodeOptions()) -> SegmentationSource:
    """Pairs listed in a CSV (paths relative to the CSV's folder); optional columns patient, volume, slice.

    Columns patient/volume/slice, where present, win over `stem_pattern`. A missing file is a DataError naming
    the row.
    """
    csv_path = Path(csv_path)
    with open(csv_path, newline="") as handle:
        rows = list(csv.DictReader(handle))
    if not rows:
        raise DataError(f"{csv_path} has no rows; it needs a header with {image_column!r} and {mask_column!r}.")
    for column in (image_column, mask_column):
        if column not in rows[0]:
            raise DataError(f"{csv_path} has no column {column!r} (columns: {list(rows[0])}).")
    images, masks = [], []
    for number, row in enumerate(rows, start=2):
        pair = [csv_path.parent / row[image_column], csv_path.parent / row[mask_column]]
        for kind, path in zip(("image", "mask"), pair):
            if not path.is_file():
                raise DataError(f"{csv_path} line {number}: {kind} {path} does not exist; fix the path or drop the "
                                "row.")
        images.append(pair[0])
        masks.append(pair[1])
    stems = [p.stem for p in images]
    patients, volumes, slices = _stem_fields(stems, stem_pattern, [str(p) for p in images])
    patients = [row.get("patient") or p for row, p in zip(rows, patients)]
    volumes = [row.get("volume") or v for row, v in zip(rows, volumes)]
    slices = [int(row["slice"]) if row.get("slice") else s for row, s in zip(rows, slices)]
    return SegmentationSource(images, masks, num_classes, ids=stems, patients=patients, volumes=volumes,
                              slices=slices, channels=channels, decode_options=decode_options)


def acdc_splits(root: str | Path) -> tuple[dict[str, SegmentationSource], dict[int, list[str]]]:
    """ACDC as SSL4MIS splits it (`root/split.json`): ({"train", "val", "test"} sources, labelled patients).

    The second value maps SSL4MIS's `labeled_num` settings (3, 7) to their patients (`ssl4mis_labeled_patients`).
    """
    root = Path(root)
    split_path = root / "split.json"
    if not split_path.is_file():
        raise DataError(f"{split_path} does not exist; point at the acdc folder holding images/, masks/ and "
                        "split.json (see its README).")
    split = json.loads(split_path.read_text())
    every = folder_pairs(root, ACDC_NUM_CLASSES, stem_pattern=ACDC_STEM_PATTERN)
    position = {stem: i for i, stem in enumerate(every.ids)}
    sources = {}
    for name in ("train", "val", "test"):
        unknown = [stem for stem in split[name] if stem not in position]
        if unknown:
            raise DataError(f"{split_path}: {len(unknown)} {name} slices have no image, e.g. {unknown[0]}.")
        sources[name] = every.subset([position[stem] for stem in split[name]])
    labeled = {int(k): list(v) for k, v in split.get("ssl4mis_labeled_patients", {}).items()}
    return sources, labeled


def labeled_split(source: SegmentationSource, *, labeled_patients: Sequence[str] | None = None,
                  labeled_fraction: float | None = None, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """(labelled, unlabelled) positions in `source`: every slice of `labeled_patients`, or a seeded fraction.

    By patients is SSL4MIS's setting (its labelled slices are whole patients); the fraction draws round(f * N)
    images uniformly (cass_jax.data.label_fraction_indices). The unlabelled part is all the rest.
    """
    if (labeled_patients is None) == (labeled_fraction is None):
        raise ValueError("Give exactly one of labeled_patients or labeled_fraction.")
    if labeled_patients is not None:
        known = set(source.patients)
        unknown = [p for p in labeled_patients if p not in known]
        if unknown:
            raise DataError(f"Labelled patient {unknown[0]!r} is not in this split ({len(known)} patients, e.g. "
                            f"{sorted(known)[:3]}); check the patient ids.")
        wanted = set(labeled_patients)
        is_labeled = np.asarray([p in wanted for p in source.patients])
    else:
        is_labeled = np.zeros(len(source), bool)
        is_labeled[label_fraction_indices(np.zeros(len(source)), float(labeled_fraction), seed, "random")] = True
    return np.flatnonzero(is_labeled), np.flatnonzero(~is_labeled)


def volume_groups(source: SegmentationSource) -> dict[str, np.ndarray]:
    """volume id -> positions of its slices in `source`, ordered by slice index (volumes in order of appearance)."""
    groups: dict[str, list[int]] = {}
    for position, volume in enumerate(source.volumes):
        groups.setdefault(volume, []).append(position)
    slices = source.slices
    return {volume: np.asarray(sorted(members, key=lambda i: slices[i])) for volume, members in groups.items()}
