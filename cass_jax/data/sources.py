"""Random-access image sources: class folders, CSV tables, TFDS array_record datasets, synthetic phantoms.

Every source has `len()` and `__getitem__` returning {"image": uint8 (H, W, 3) RGB, "label", "id"},
so grain's MapDataset can read it, plus `labels`, `ids`, `class_names` and `subset()` for splitting.
"""

from __future__ import annotations

import csv
import dataclasses
import hashlib
import io
import os
from pathlib import Path
from typing import Any, Sequence

import numpy as np
from PIL import Image

from cass_jax.data.dicom import (
    DICOM_EXTENSIONS,
    DecodeOptions,
    check_dicom,
    decode_options_from_config,
    is_dicom_file,
    looks_like_dicom,
)
from cass_jax.data.synthetic import SYNTHETIC_CLASS_NAMES, synthetic_label, synthetic_phantom
from cass_jax.data.transforms import decode_image

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff") + DICOM_EXTENSIONS
TRAIN_FOLDER_NAMES = ("training", "train")
TEST_FOLDER_NAMES = ("testing", "test")
VAL_FOLDER_NAMES = ("validation", "val", "valid")
BRAIN_MRI_HINT = (
    "For Brain Tumor MRI: download the Kaggle 'Brain Tumor MRI Dataset' "
    "(https://www.kaggle.com/datasets/masoudnickparvar/brain-tumor-mri-dataset), unzip it and point "
    "data.path at the folder holding Training/ and Testing/ (each with glioma/, meningioma/, notumor/, "
    "pituitary/). See data/README.md."
)


class DataError(ValueError):
    """Bad or missing input data; the message names the file, row or value and what to do."""


class ImageSource:
    """A list of labelled examples, addressable by position; subclasses say how to load one image.

    `rows` index the full, unsplit table so subsets share the loader and stay cheap to pickle.
    `decode_options` (window, DICOM frame) reach `decode_image` in every grain worker.
    """

    decode_options: DecodeOptions = DecodeOptions()

    def __init__(
        self,
        labels: np.ndarray,
        ids: Sequence[str],
        class_names: Sequence[str],
        multi_label: bool,
        rows: np.ndarray | None = None,
    ):
        self._all_labels = labels
        self._all_ids = np.asarray(ids, dtype=object)
        self.class_names = list(class_names)
        self.multi_label = multi_label
        self.rows = np.arange(len(labels)) if rows is None else np.asarray(rows, dtype=np.int64)

    def __len__(self) -> int:
        return len(self.rows)

    @property
    def labels(self) -> np.ndarray:
        """int64 (N,) class indices, or float32 (N, C) multi-hot vectors when multi_label."""
        return self._all_labels[self.rows]

    @property
    def ids(self) -> list[str]:
        return list(self._all_ids[self.rows])

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    def subset(self, indices: Sequence[int] | np.ndarray) -> "ImageSource":
        """The examples at `indices` (positions in this source), in that order."""
        other = object.__new__(type(self))
        other.__dict__.update(self.__dict__)
        other.rows = self.rows[np.asarray(indices, dtype=np.int64)]
        return other

    def load_image(self, row: int) -> np.ndarray:
        """uint8 (H, W, 3) RGB image of table row `row`."""
        raise NotImplementedError

    def encoded_bytes(self, row: int) -> bytes | None:
        """The stored (encoded) bytes of row `row`, for duplicate detection; None if not file-backed."""
        return None

    def describe(self, row: int) -> str:
        """Where row `row` comes from, for error messages."""
        return str(self._all_ids[row])

    def __getitem__(self, index: int) -> dict[str, Any]:
        row = int(self.rows[index])
        label = self._all_labels[row]
        return {
            "image": self.load_image(row),
            "label": label.astype(np.float32) if self.multi_label else int(label),
            "id": str(self._all_ids[row]),
        }


class FileImageSource(ImageSource):
    """Images stored as files (class folders or a CSV table): JPEG, PNG, BMP, TIFF or DICOM."""

    def __init__(
        self,
        paths: Sequence[str],
        labels,
        ids,
        class_names,
        multi_label,
        rows=None,
        decode_options: DecodeOptions = DecodeOptions(),
    ):
        super().__init__(labels, ids, class_names, multi_label, rows)
        self.paths = np.asarray([str(p) for p in paths], dtype=object)
        self.decode_options = decode_options

    def encoded_bytes(self, row: int) -> bytes:
        return Path(self.paths[row]).read_bytes()

    def load_image(self, row: int) -> np.ndarray:
        """The decoded image; a missing or undecodable file is a ValueError naming it."""
        path = str(self.paths[row])
        try:
            data = self.encoded_bytes(row)
        except OSError as error:
            raise DataError(f"Cannot read image {path}: {error}. Restore the file or remove its row.") from error
        return decode_image(data, path, self.decode_options)

    def describe(self, row: int) -> str:
        return str(self.paths[row])


class TfdsImageSource(ImageSource):
    """Examples of a TFDS dataset prepared as array_record, read with `tfds.data_source`.

    Images are read undecoded and decoded with PIL like files, so duplicates can be found by hash.
    """

    def __init__(
        self,
        data_source,
        image_key: str,
        labels,
        ids,
        class_names,
        multi_label,
        rows=None,
        decode_options: DecodeOptions = DecodeOptions(),
    ):
        super().__init__(labels, ids, class_names, multi_label, rows)
        self.data_source = data_source
        self.image_key = image_key
        self.decode_options = decode_options

    def encoded_bytes(self, row: int) -> bytes:
        return self.data_source[row][self.image_key]

    def load_image(self, row: int) -> np.ndarray:
        return decode_image(self.encoded_bytes(row), self.describe(row), self.decode_options)

    def describe(self, row: int) -> str:
        return f"TFDS example {self._all_ids[row]}"


class SyntheticSource(ImageSource):
    """Procedural MRI-like phantoms (see `synthetic.py`), generated on access."""

    def __init__(self, num_images: int, size: int, seed: int, rows=None, contrast: float = 1.0,
                 lesion_scale: float = 1.0):
        labels = np.asarray([synthetic_label(i) for i in range(num_images)], dtype=np.int64)
        ids = [f"synthetic_{seed}_{i:06d}" for i in range(num_images)]
        super().__init__(labels, ids, SYNTHETIC_CLASS_NAMES, False, rows)
        self.size = size
        self.seed = seed
        self.contrast = contrast
        self.lesion_scale = lesion_scale

    def load_image(self, row: int) -> np.ndarray:
        return synthetic_phantom(row, seed=self.seed, size=self.size, contrast=self.contrast,
                                 lesion_scale=self.lesion_scale)


def is_image_file(path: Path) -> bool:
    """An image by extension, or a DICOM file by content whatever its name (often none, or a UID such as 1.2.3)."""
    if not path.is_file() or path.name.startswith("."):
        return False
    return path.suffix.lower() in IMAGE_EXTENSIONS or is_dicom_file(path)


def _find_child(root: Path, names: Sequence[str]) -> Path | None:
    for child in sorted(root.iterdir()):
        if child.is_dir() and child.name.lower() in names:
            return child
    return None


def scan_class_folders(root: Path, class_names: Sequence[str] = ()) -> tuple[list[Path], list[str], list[str]]:
    """Lists images of `root/<class>/*` sorted by (class, file name); returns (paths, class of each, classes)."""
    folders = sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not folders:
        raise DataError(f"{root} has no class folders. Expected {root}/<class name>/<image files>.")
    found = [p.name for p in folders]
    if class_names:
        unknown = sorted(set(found) - set(class_names))
        if unknown:
            raise DataError(
                f"{root} has class folders {unknown} that are not in data.class_names={list(class_names)}. "
                "Add them to data.class_names or remove the folders."
            )
    paths, classes = [], []
    for folder in folders:
        images = sorted(p for p in folder.iterdir() if is_image_file(p))
        if not images:
            raise DataError(
                f"Class folder {folder} contains no images (looked for {', '.join(IMAGE_EXTENSIONS)} and "
                "DICOM files by content). "
                "Add its images or remove the empty folder."
            )
        paths += images
        classes += [folder.name] * len(images)
    return paths, classes, found


def folder_sources(
    path: str, class_names: Sequence[str] = (), decode_options: DecodeOptions = DecodeOptions()
) -> dict[str, FileImageSource]:
    """Class-folder tree: `Training/<class>`, `Testing/<class>` (optional `Validation/<class>`) or `<class>`.

    Returns {"train": ..., "test": ..., "val": ...} for the splits that exist (plain class folders give
    only "train"). All splits share one class list; a class folder in the test split that the training
    split lacks is an error. Images are files with an image extension (DICOM included) and DICOM files
    recognised by content; other files are ignored.
    """
    root = Path(path).expanduser()
    if not path or not root.is_dir():
        raise DataError(f"Dataset folder {str(root)!r} (data.path) does not exist. {BRAIN_MRI_HINT}")
    split_folders = {
        "train": _find_child(root, TRAIN_FOLDER_NAMES),
        "test": _find_child(root, TEST_FOLDER_NAMES),
        "val": _find_child(root, VAL_FOLDER_NAMES),
    }
    if split_folders["train"] is None:
        if split_folders["test"] is not None:
            raise DataError(f"{root} has a test folder {split_folders['test']} but no Training/ or train/ folder.")
        split_folders = {"train": root}
    scanned = {name: scan_class_folders(folder, class_names) for name, folder in split_folders.items() if folder}
    names = list(class_names) or scanned["train"][2]
    for split, (_, _, found) in scanned.items():
        unknown = sorted(set(found) - set(names))
        if unknown:
            raise DataError(
                f"Split folder {split_folders[split]} has classes {unknown} that the training folder "
                f"{split_folders['train']} lacks. Rename or remove them, or list every class in data.class_names."
            )
    paths, labels, split_of = [], [], []
    for split, (split_paths, classes, _) in scanned.items():
        paths += split_paths
        labels += [names.index(c) for c in classes]
        split_of += [split] * len(split_paths)
    ids = [str(p.relative_to(root)) for p in paths]
    full = FileImageSource(paths, np.asarray(labels, np.int64), ids, names, False, decode_options=decode_options)
    split_of = np.asarray(split_of)
    return {split: full.subset(np.flatnonzero(split_of == split)) for split in scanned}


def _parse_indicator(value: str, csv_path: Path, line: int, column: str) -> float:
    try:
        number = float(value)
    except ValueError:
        number = -1.0
    if number not in (0.0, 1.0):
        raise DataError(
            f"{csv_path} line {line}: column {column!r} has value {value!r}; one-hot/multi-hot label columns "
            "must hold 0 or 1. Fix the row, or set data.csv_label_columns to the right columns."
        )
    return number


def csv_source(
    csv_path: str,
    *,
    image_column: str = "image",
    label_columns: Sequence[str] = (),
    image_dir: str = "",
    image_extension: str = ".jpg",
    multi_label: bool = False,
    class_names: Sequence[str] = (),
    label_separator: str = ";",
    decode_options: DecodeOptions = DecodeOptions(),
) -> FileImageSource:
    """A CSV table of images: `image,<class name column>`, one-hot columns, or multi-label.

    Label layouts: one label column of class names (`image_name,diagnosis`; with multi_label, a list
    joined by `label_separator`), or several 0/1 columns (ISIC 2019 `image,MEL,NV,...`: exactly one 1
    per row unless multi_label). Every row is checked: missing image files and unknown labels are errors
    naming the line. Rows are sorted by image id. A name without extension gets `image_extension` unless
    the file exists under that name and is DICOM.
    """
    table = Path(csv_path).expanduser()
    if not csv_path or not table.is_file():
        raise DataError(f"CSV file {str(table)!r} (data.path) does not exist. See data/README.md for the format.")
    folder = Path(image_dir).expanduser() if image_dir else table.parent
    with table.open(newline="") as f:
        reader = csv.DictReader(f)
        header = [h.strip() for h in (reader.fieldnames or [])]
        rows = [{k.strip(): (v or "").strip() for k, v in row.items() if k is not None} for row in reader]
    if image_column not in header:
        raise DataError(f"{table} has no image column {image_column!r} (columns: {header}). Set data.csv_image_column.")
    columns = list(label_columns) or [h for h in header if h != image_column]
    missing_columns = [c for c in columns if c not in header]
    if missing_columns or not columns:
        raise DataError(f"{table} lacks label columns {missing_columns or '(none)'}; columns are {header}.")
    if not rows:
        raise DataError(f"{table} has no rows.")
    if len(columns) == 1:
        column = columns[0]
        values = []
        for row in rows:
            value = row[column]
            values.append([v.strip() for v in value.split(label_separator) if v.strip()] if multi_label else [value])
        names = list(class_names) or sorted({v for vs in values for v in vs})
        index = {n: i for i, n in enumerate(names)}
        labels = np.zeros((len(rows), len(names)), np.float32)
        for i, vs in enumerate(values):
            for v in vs:
                if v not in index:
                    raise DataError(
                        f"{table} line {i + 2}: unknown label {v!r} in column {column!r}; known classes are {names}. "
                        "Fix the row or add the class to data.class_names."
                    )
                labels[i, index[v]] = 1.0
            if not vs and not multi_label:
                raise DataError(f"{table} line {i + 2}: empty label in column {column!r}.")
    else:
        names = list(class_names) or columns
        if len(names) != len(columns):
            raise DataError(f"data.class_names={names} must name the {len(columns)} label columns {columns}.")
        labels = np.asarray(
            [[_parse_indicator(row[c], table, i + 2, c) for c in columns] for i, row in enumerate(rows)], np.float32
        )
        if not multi_label:
            bad = np.flatnonzero(labels.sum(1) != 1)
            if len(bad):
                raise DataError(
                    f"{table} line {bad[0] + 2}: one-hot label columns {columns} must hold exactly one 1 per row "
                    f"({len(bad)} rows do not). For multi-label data set data.multi_label=True."
                )
    ids, paths, missing = [], [], []
    for i, row in enumerate(rows):
        name = row[image_column]
        if not Path(name).suffix and image_extension and not is_dicom_file(folder / name):
            name += image_extension
        path = folder / name
        if not path.is_file():
            missing.append(f"line {i + 2}: {path}")
        ids.append(name)
        paths.append(path)
    if missing:
        raise DataError(
            f"{table}: {len(missing)} rows point at missing image files, e.g. {missing[:3]}. Put the images in "
            f"{folder} (or set data.image_dir to their folder) or remove those rows."
        )
    order = np.argsort(np.asarray(ids, dtype=object), kind="stable")
    final = labels if multi_label else labels.argmax(1).astype(np.int64)
    return FileImageSource(
        [paths[i] for i in order],
        final[order],
        [ids[i] for i in order],
        names,
        multi_label,
        decode_options=decode_options,
    )


def tfds_sources(
    name: str,
    *,
    data_dir: str = "",
    image_key: str = "image",
    label_key: str = "label",
    multi_label: bool = False,
    decode_options: DecodeOptions = DecodeOptions(),
) -> dict[str, TfdsImageSource]:
    """Splits ("train", "test", "validation" -> "val") of a TFDS dataset prepared as array_record."""
    import tensorflow_datasets as tfds  # Imported lazily: TensorFlow is slow to import.

    from cass_jax.data import tfds_brain_mri  # noqa: F401  (registers the brain_tumor_mri builder)

    try:
        builder = tfds.builder(name, data_dir=data_dir or None)
    except Exception as error:
        raise DataError(
            f"TFDS dataset {name!r} (data.path) is not available in {data_dir or 'the default TFDS data_dir'}: "
            f"{error}. Prepare it first (see data/README.md), e.g. with the brain_tumor_mri builder."
        ) from error
    if not builder.is_prepared():
        raise DataError(
            f"TFDS dataset {name!r} is not prepared in {builder.data_dir}. Prepare it once with "
            "builder.download_and_prepare(file_format='array_record') (see data/README.md)."
        )
    label_feature = builder.info.features[label_key]
    if hasattr(label_feature, "names"):
        class_names = list(label_feature.names)
    elif hasattr(getattr(label_feature, "feature", None), "names"):
        class_names = list(label_feature.feature.names)
    else:
        raise DataError(f"TFDS feature {label_key!r} of {name!r} has no class names (need a ClassLabel).")
    skip = {image_key: tfds.decode.SkipDecoding()}
    sources = {}
    for split in builder.info.splits:
        key = {"validation": "val"}.get(split, split)
        if key not in ("train", "test", "val"):
            continue
        data_source = tfds.data_source(name, split=split, data_dir=data_dir or None, decoders=skip, download=False)
        records = [data_source[i] for i in range(len(data_source))]
        raw = [record[label_key] for record in records]
        if multi_label:
            labels = np.zeros((len(raw), len(class_names)), np.float32)
            for i, r in enumerate(raw):
                labels[i, np.asarray(r, np.int64)] = 1.0
        else:
            labels = np.asarray(raw, np.int64)
        if "id" in builder.info.features:  # e.g. brain_tumor_mri stores each file's relative path
            ids = [r["id"].decode() if isinstance(r["id"], bytes) else str(r["id"]) for r in records]
        else:
            ids = [f"{name}/{split}/{i}" for i in range(len(records))]
        order = np.argsort(np.asarray(ids, dtype=object), kind="stable")  # same order as the other sources
        sources[key] = TfdsImageSource(
            data_source, image_key, labels, ids, class_names, multi_label, rows=order, decode_options=decode_options
        )
    if "train" not in sources:
        raise DataError(f"TFDS dataset {name!r} has no 'train' split (splits: {list(builder.info.splits)}).")
    return sources


@dataclasses.dataclass
class ScanResult:
    """Content hash of each row (None where unreadable) and the rows that are corrupt, with reasons."""

    digests: list[str | None]
    corrupt: dict[int, str]


def _check_encoded(data: bytes, name: str = "", options: DecodeOptions = DecodeOptions()) -> str | None:
    """Cheap validity check of encoded image bytes: a readable header and, for JPEG/PNG, an end marker.

    DICOM: the dataset parses, its pixel data is complete, a decoding plugin is installed and the frame
    is chosen (see `check_dicom`).
    """
    if looks_like_dicom(data, name):
        return check_dicom(data, options)
    try:
        with Image.open(io.BytesIO(data)) as image:
            kind = image.format
    except Exception as error:
        return f"not a readable image ({error})"
    tail = data[-4096:]
    if kind == "JPEG" and b"\xff\xd9" not in tail:
        return "truncated JPEG (no end-of-image marker)"
    if kind == "PNG" and b"IEND" not in tail:
        return "truncated PNG (no IEND chunk)"
    return None


def scan_rows(source: ImageSource, rows: Sequence[int], threads: int | None = None) -> ScanResult:
    """Hashes and checks the stored bytes of `rows` (threaded: reading and hashing release the GIL)."""
    from concurrent.futures import ThreadPoolExecutor

    def one(row: int) -> tuple[str | None, str | None]:
        try:
            data = source.encoded_bytes(row)
        except OSError as error:
            return None, f"unreadable ({error})"
        if data is None:
            return None, None
        digest = hashlib.blake2b(data, digest_size=16).hexdigest()
        return digest, _check_encoded(data, source.describe(row), source.decode_options)

    with ThreadPoolExecutor(threads or min(8, (os.cpu_count() or 1) + 2)) as pool:
        results = list(pool.map(one, rows))
    digests = [d for d, _ in results]
    corrupt = {row: reason for row, (_, reason) in zip(rows, results) if reason}
    return ScanResult(digests, corrupt)


def source_splits_from_config(data_config) -> dict[str, ImageSource]:
    """The dataset's own splits for `data_config.source` (only "train" when it has none)."""
    kind = data_config.source
    class_names = tuple(data_config.get("class_names", ()) or ())
    try:
        decode_options = decode_options_from_config(data_config)
    except ValueError as error:
        raise DataError(str(error)) from error
    if kind == "folder":
        return folder_sources(data_config.path, class_names, decode_options)
    if kind == "csv":
        return {
            "train": csv_source(
                data_config.path,
                image_column=data_config.csv_image_column,
                label_columns=tuple(data_config.csv_label_columns or ()),
                image_dir=data_config.image_dir,
                image_extension=data_config.image_extension,
                multi_label=data_config.multi_label,
                class_names=class_names,
                label_separator=data_config.csv_label_separator,
                decode_options=decode_options,
            )
        }
    if kind == "tfds":
        return tfds_sources(
            data_config.path,
            data_dir=data_config.tfds_data_dir,
            image_key=data_config.tfds_image_key,
            label_key=data_config.tfds_label_key,
            multi_label=data_config.multi_label,
            decode_options=decode_options,
        )
    if kind == "synthetic":
        return {
            "train": SyntheticSource(
                data_config.synthetic_num_images,
                data_config.synthetic_size,
                data_config.synthetic_seed,
                contrast=data_config.synthetic_contrast,
                lesion_scale=data_config.synthetic_lesion_scale,
            )
        }
    raise DataError(f"Unknown data.source {kind!r}; use 'folder', 'csv', 'tfds' or 'synthetic'.")
