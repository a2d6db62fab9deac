"""Predictions of saved classifiers for new images: one model or an ensemble, test-time augmentation.

`mode=predict` (configs/predict.py) reads a folder, a CSV or a training run's own split, writes
predictions.csv (and metrics when the images have labels), and puts unreadable files in errors.csv
instead of stopping. `predict_images` does the same in memory for other programs.
"""

from __future__ import annotations

import csv
import dataclasses
import json
import os
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import ml_collections
import numpy as np
from absl import logging

from cass_jax import data as data_lib
from cass_jax import metrics as metrics_lib
from cass_jax.classifier import CONFIG_FILE, Classifier, load_classifier
from cass_jax.data.loader import normalize_images
from cass_jax.data.sources import FileImageSource, ImageSource, is_image_file, decode_options_from_config
from cass_jax.reporting import ProgressLine, create_writer

__all__ = ["Predictions", "load_classifier", "predict_images", "predict_source", "run_predict", "tta_views"]

# The eight flips and rotations of a square image (the dihedral group), in the order TTA uses them.
_VIEWS: tuple[Callable[[np.ndarray], np.ndarray], ...] = (
    lambda x: x,
    lambda x: x[:, :, ::-1],            # horizontal flip
    lambda x: x[:, ::-1, :],            # vertical flip
    lambda x: x[:, ::-1, ::-1],         # 180 degrees
    lambda x: x.transpose(0, 2, 1, 3),  # transpose
    lambda x: np.rot90(x, 1, axes=(1, 2)),
    lambda x: np.rot90(x, 3, axes=(1, 2)),
    lambda x: np.rot90(x, 2, axes=(1, 2)).transpose(0, 2, 1, 3),  # anti-transpose
)
MAX_TTA = len(_VIEWS)


def tta_views(images: np.ndarray, count: int) -> list[np.ndarray]:
    """The first `count` flipped/rotated views of a (B, S, S, C) batch; view 0 is the batch itself."""
    if not 1 <= count <= MAX_TTA:
        raise ValueError(f"tta={count} is invalid; use 1 (no test-time augmentation) to {MAX_TTA} views "
                         "(identity, horizontal flip, vertical flip, 180 degrees, then transposes and 90 degrees).")
    return [np.ascontiguousarray(view(images)) for view in _VIEWS[:count]]


def check_ensemble(classifiers: Sequence[Classifier]) -> None:
    """Models averaged together must predict the same classes in the same order."""
    if not classifiers:
        raise ValueError("No model given; set --config.model to a saved classifier folder (see models.json).")
    first = classifiers[0]
    for other in classifiers[1:]:
        if other.class_names != first.class_names or other.multi_label != first.multi_label:
            raise ValueError(
                f"Models {first.name} and {other.name} predict different classes ({list(first.class_names)} vs "
                f"{list(other.class_names)}); an ensemble needs models of the same task.")


def ensemble_probabilities(classifiers: Sequence[Classifier], images: Sequence[np.ndarray], tta: int = 1,
                           batch_size: int | None = None) -> np.ndarray:
    """Mean probability over models and TTA views for uint8 images of any size (each model resizes them).

    `batch_size` pads the batch to that many rows, so the last, smaller batch of a run reuses the compiled step.
    """
    total = None
    for classifier in classifiers:
        batch = classifier.preprocess(images)
        padded = _pad(batch, batch_size)
        for view in tta_views(padded, tta):
            probabilities = classifier.probabilities(view)[:len(images)]
            total = probabilities if total is None else total + probabilities
    return total / (len(classifiers) * tta)


def _pad(batch: np.ndarray, size: int | None) -> np.ndarray:
    if size is None or len(batch) >= size:
        return batch
    return np.concatenate([batch, np.zeros((size - len(batch), *batch.shape[1:]), batch.dtype)])


def predict_images(classifiers: Classifier | Sequence[Classifier], images: Sequence[np.ndarray],
                   tta: int = 1) -> np.ndarray:
    """In-memory prediction: uint8 (H, W, 3) images -> (N, C) probabilities, averaged over models and views."""
    classifiers = [classifiers] if isinstance(classifiers, Classifier) else list(classifiers)
    check_ensemble(classifiers)
    return ensemble_probabilities(classifiers, list(images), tta)


@dataclasses.dataclass
class Predictions:
    """What a prediction run produced: one row per readable image, plus the files that could not be read."""

    paths: list[str]
    probabilities: np.ndarray
    positions: np.ndarray                 # positions of the predicted images in the source
    errors: list[tuple[str, str]]         # (path, reason) of every unreadable image
    seconds: float


def _load(source: ImageSource, position: int) -> tuple[np.ndarray | None, str | None]:
    try:
        return source[position]["image"], None
    except (OSError, ValueError) as error:
        return None, " ".join(str(error).split())


def predict_source(classifiers: Sequence[Classifier], source: ImageSource, *, batch_size: int = 32, tta: int = 1,
                   threads: int = 2, log_every_batches: int = 10) -> Predictions:
    """Predicts every image of `source`; unreadable ones are collected in `errors`, the rest go on."""
    check_ensemble(classifiers)
    tta_views(np.zeros((1, 1, 1, 1), np.float32), tta)  # a bad tta fails before any image is read
    total = len(source)
    num_batches = -(-total // batch_size)
    progress = ProgressLine(num_batches, batch_size)
    paths, probabilities, positions, errors = [], [], [], []
    start = time.perf_counter()
    with ThreadPoolExecutor(max(1, threads)) as pool:
        for batch_index, first in enumerate(range(0, total, batch_size), start=1):
            chunk = range(first, min(first + batch_size, total))
            loaded = list(pool.map(lambda p: _load(source, p), chunk))
            good = [(p, image) for p, (image, _) in zip(chunk, loaded) if image is not None]
            errors += [(source.describe(int(source.rows[p])), reason)
                       for p, (_, reason) in zip(chunk, loaded) if reason is not None]
            if good:
                probabilities.append(ensemble_probabilities(classifiers, [image for _, image in good], tta,
                                                            batch_size))
                positions += [p for p, _ in good]
                paths += [source.describe(int(source.rows[p])) for p, _ in good]
            if batch_index == 1:
                progress.compiled(1)
            elif batch_index % log_every_batches == 0 or batch_index == num_batches:
                progress.log(batch_index, {"images": min(first + batch_size, total), "unreadable": len(errors)},
                             progress.images_per_second(batch_index))
    num_classes = classifiers[0].num_classes
    stacked = np.concatenate(probabilities) if probabilities else np.zeros((0, num_classes), np.float32)
    return Predictions(paths, stacked, np.asarray(positions, np.int64), errors, time.perf_counter() - start)


def default_predict_config() -> ml_collections.ConfigDict:
    """The options of `mode=predict`; configs/predict.py starts from these."""
    c = ml_collections.ConfigDict()
    c.mode = "predict"
    # Saved classifier folder(s) (listed in a workdir's models.json) or exported arms; several, comma-separated,
    # are an ensemble: their probabilities are averaged.
    c.model = ""
    # "all": every image under data.path (a folder, searched recursively, or a CSV with an image column);
    # "train", "val" or "test": that split of the dataset the (first) model was trained on, carved as in training
    # (data.path, when given, replaces the dataset's path).
    c.split = "all"
    # Test-time augmentation: average over this many flipped/rotated views (1 = none, at most 8).
    c.tta = 1
    c.batch_size = 32
    # Multi-label models: labels with a probability at or above this are predicted.
    c.threshold = 0.5
    # Threads that read and resize images.
    c.read_threads = 2
    # Saliency maps (comma-separated methods: vanilla, smoothgrad, integrated_gradients, grad_cam,
    # attention_rollout) for `saliency_images` images spread evenly over the input, one PNG per image, model and
    # method, plus a side-by-side figure; masks: a folder of mask PNGs named like the images, for the overlap scores.
    c.saliency = ""
    c.saliency_images = 8
    c.masks = ""
    # Also run the model-randomisation sanity check (Adebayo et al.) on those images and report its figure.
    c.saliency_sanity_check = False
    c.seed = 0
    c.data = data_lib.default_data_config()
    # "auto": a folder or a .csv file, told apart by data.path. The models' own image size and normalisation
    # are always used (data.image_size, mean and std are ignored here).
    c.data.source = "auto"
    return c


@dataclasses.dataclass
class PredictionInputs:
    """The images to predict, and their labels in the models' class order when the input has labels."""

    source: ImageSource
    labels: np.ndarray | None
    note: str = ""


def _file_source(paths: Sequence[Path], ids: Sequence[str], data_config: Any,
                 class_names: Sequence[str]) -> FileImageSource:
    return FileImageSource(paths, np.zeros(len(paths), np.int64), ids, class_names, False,
                           decode_options=decode_options_from_config(data_config))


def _folder_inputs(root: Path, data_config: Any, classifier: Classifier) -> PredictionInputs:
    """Every image under `root`; labelled when each sits in `root/<class>/` and the classes are the model's."""
    images = sorted(p for p in root.rglob("*") if is_image_file(p))
    if not images:
        raise data_lib.DataError(f"{root} (data.path) holds no images; give a folder of images or a CSV file.")
    relative = [p.relative_to(root) for p in images]
    source = _file_source(images, [str(r) for r in relative], data_config, classifier.class_names)
    folders = {r.parts[0] for r in relative if len(r.parts) == 2}
    if classifier.multi_label or any(len(r.parts) != 2 for r in relative):
        return PredictionInputs(source, None)
    unknown = sorted(folders - set(classifier.class_names))
    if unknown:
        return PredictionInputs(source, None, f"folders {unknown} are not classes of the model "
                                              f"{list(classifier.class_names)}; no metrics")
    labels = np.asarray([classifier.class_names.index(r.parts[0]) for r in relative], np.int64)
    return PredictionInputs(source, labels)


def _csv_inputs(table: Path, data_config: Any, classifier: Classifier) -> PredictionInputs:
    """The CSV's image column; its other (or configured) columns are labels when they name the model's classes."""
    with table.open(newline="") as f:
        reader = csv.DictReader(f)
        header = [h.strip() for h in (reader.fieldnames or [])]
        rows = [{k.strip(): (v or "").strip() for k, v in row.items() if k is not None} for row in reader]
    column = data_config.csv_image_column
    if column not in header:
        raise data_lib.DataError(f"{table} has no image column {column!r} (columns: {header}); set "
                                 "data.csv_image_column.")
    folder = Path(data_config.image_dir).expanduser() if data_config.image_dir else table.parent
    names = [row[column] + (data_config.image_extension if not Path(row[column]).suffix else "") for row in rows]
    source = _file_source([folder / n for n in names], names, data_config, classifier.class_names)
    label_columns = list(data_config.csv_label_columns or [h for h in header if h != column])
    if not label_columns:
        return PredictionInputs(source, None)
    classes = list(classifier.class_names)
    if len(label_columns) == 1:
        values = [[v.strip() for v in row[label_columns[0]].split(data_config.csv_label_separator) if v.strip()]
                  for row in rows]
        unknown = sorted({v for vs in values for v in vs} - set(classes))
        if unknown:
            return PredictionInputs(source, None, f"labels {unknown[:5]} are not classes of the model; no metrics")
        multi_hot = np.zeros((len(rows), len(classes)), np.float32)
        for i, vs in enumerate(values):
            multi_hot[i, [classes.index(v) for v in vs]] = 1.0
    elif set(label_columns) <= set(classes):
        multi_hot = np.zeros((len(rows), len(classes)), np.float32)
        for c in label_columns:
            multi_hot[:, classes.index(c)] = [float(row[c] or 0) for row in rows]
    else:
        return PredictionInputs(source, None, f"columns {label_columns} are not the model's classes; no metrics")
    if classifier.multi_label:
        return PredictionInputs(source, multi_hot)
    if np.any(multi_hot.sum(1) != 1):
        return PredictionInputs(source, None, "some rows do not hold exactly one label; no metrics")
    return PredictionInputs(source, multi_hot.argmax(1).astype(np.int64))


def _split_inputs(config: ml_collections.ConfigDict, classifier: Classifier) -> PredictionInputs:
    """A split of the dataset the model was trained on, carved exactly as training carved it."""
    saved = Path(classifier.path) / CONFIG_FILE
    if not saved.is_file():
        raise FileNotFoundError(f"split={config.split!r} needs the training config {saved}; this model has none. "
                                "Use split='all' with data.path.")
    data_config = ml_collections.ConfigDict(json.loads(saved.read_text())["data"])
    if config.data.path:
        data_config.path = config.data.path
        data_config.source = _source_kind(config.data) if config.data.source == "auto" else config.data.source
    splits = data_lib.load_splits(data_config)
    source = {"train": splits.train_full, "val": splits.val, "test": splits.test}[config.split]
    if list(splits.class_names) != list(classifier.class_names):
        return PredictionInputs(source, None, f"dataset classes {splits.class_names} differ from the model's")
    return PredictionInputs(source, np.asarray(source.labels))


def _source_kind(data_config: Any) -> str:
    path = Path(data_config.path).expanduser()
    if path.is_dir():
        return "folder"
    if path.is_file() and path.suffix.lower() == ".csv":
        return "csv"
    raise data_lib.DataError(f"data.path={data_config.path!r} is neither a folder nor a .csv file; give the folder "
                             "of images to predict or a CSV listing them.")


def prediction_inputs(config: ml_collections.ConfigDict, classifier: Classifier) -> PredictionInputs:
    """The images `config` asks to predict (see `default_predict_config`)."""
    if config.split in ("train", "val", "test"):
        return _split_inputs(config, classifier)
    if config.split != "all":
        raise ValueError(f"split={config.split!r} is invalid; use 'all', 'train', 'val' or 'test'.")
    if not config.data.path:
        raise ValueError("Set --config.data.path to a folder of images or a CSV file (or --config.split=test "
                         "to predict the model's own test split).")
    kind = _source_kind(config.data) if config.data.source == "auto" else config.data.source
    if kind == "folder":
        return _folder_inputs(Path(config.data.path).expanduser(), config.data, classifier)
    if kind == "csv":
        return _csv_inputs(Path(config.data.path).expanduser(), config.data, classifier)
    raise ValueError(f"data.source={kind!r} cannot be predicted with split='all'; use 'auto', 'folder' or 'csv', "
                     "or split='test' for the model's own dataset.")


def _write_csv(path: Path, header: Sequence[str], rows: Sequence[Sequence[Any]]) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with tmp.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(header)
        writer.writerows(rows)
    os.replace(tmp, path)


def write_predictions(workdir: Path, classifiers: Sequence[Classifier], predictions: Predictions,
                      labels: np.ndarray | None) -> None:
    """predictions.csv (path, [label,] prediction, one probability column per class) and errors.csv."""
    first = classifiers[0]
    class_names = list(first.class_names)
    predicted = first.predicted_labels(predictions.probabilities)
    header = ["path"] + (["label"] if labels is not None else []) + ["prediction"] + class_names
    rows = []
    for i, (path, names) in enumerate(zip(predictions.paths, predicted)):
        label = []
        if labels is not None:
            row_label = labels[i]
            label = [";".join(class_names[j] for j in np.flatnonzero(row_label > 0.5)) if first.multi_label
                     else class_names[int(row_label)]]
        rows.append([path, *label, ";".join(names), *(f"{p:.6g}" for p in predictions.probabilities[i])])
    _write_csv(workdir / "predictions.csv", header, rows)
    _write_csv(workdir / "errors.csv", ["path", "reason"], predictions.errors)


def run_predict(config: ml_collections.ConfigDict, workdir: str | Path) -> dict[str, Any]:
    """`mode=predict`: loads the model(s), predicts the configured images, writes the files in `workdir`."""
    from cass_jax import saliency_report

    workdir = Path(workdir).absolute()
    tta_views(np.zeros((1, 1, 1, 1), np.float32), int(config.tta))  # a bad tta fails before any model is read
    methods = saliency_report.parse_methods(config.saliency)
    paths = [p.strip() for p in str(config.model).split(",") if p.strip()]
    if not paths:
        raise ValueError("Set --config.model to a saved classifier folder (listed in a workdir's models.json) or "
                         "several, comma-separated, for an ensemble.")
    classifiers = [dataclasses.replace(load_classifier(p), threshold=float(config.threshold)) for p in paths]
    check_ensemble(classifiers)
    inputs = prediction_inputs(config, classifiers[0])
    workdir.mkdir(parents=True, exist_ok=True)
    logging.info("Predicting %d images with %s (tta %d)", len(inputs.source), ", ".join(c.name for c in classifiers),
                 config.tta)
    predictions = predict_source(classifiers, inputs.source, batch_size=int(config.batch_size), tta=int(config.tta),
                                 threads=int(config.read_threads))
    if not predictions.paths:
        write_predictions(workdir, classifiers, predictions, None)
        raise ValueError(f"None of the {len(inputs.source)} images could be read; see {workdir / 'errors.csv'}.")
    labels = None if inputs.labels is None else inputs.labels[predictions.positions]
    write_predictions(workdir, classifiers, predictions, labels)
    summary = {"models": [c.path for c in classifiers], "images": len(predictions.paths),
               "unreadable": len(predictions.errors), "tta": int(config.tta), "seconds": predictions.seconds,
               "images_per_second": len(predictions.paths) / max(predictions.seconds, 1e-9)}
    writer = create_writer(workdir)
    if labels is not None:
        metrics = metrics_lib.classification_metrics(labels, predictions.probabilities, classifiers[0].multi_label)
        summary["metrics"] = metrics
        if "confusion_matrix" in metrics:
            class_names = list(classifiers[0].class_names)
            _write_csv(workdir / "confusion_matrix.csv", ["label \\ prediction", *class_names],
                       [[name, *row] for name, row in zip(class_names, metrics["confusion_matrix"])])
        writer.write_scalars(0, {k: metrics[k] for k in metrics_lib.summary_names(classifiers[0].multi_label)})
        logging.info("Metrics over %d labelled images: %s", len(labels), {
            k: round(metrics[k], 4) for k in metrics_lib.summary_names(classifiers[0].multi_label)})
    elif inputs.note:
        summary["note"] = inputs.note
        logging.info("Labels not used: %s", inputs.note)
    if methods or config.saliency_sanity_check:
        summary["saliency"] = saliency_report.write_saliency(config, workdir, classifiers, inputs.source,
                                                             predictions, methods, writer)
    writer.flush()
    from cass_jax.finetune import dump_json

    dump_json(workdir / "summary.json", summary)
    if predictions.errors:
        logging.warning("%d images could not be read; they are listed in %s", len(predictions.errors),
                        workdir / "errors.csv")
    logging.info("Wrote %s (%d rows)", workdir / "predictions.csv", len(predictions.paths))
    return summary
