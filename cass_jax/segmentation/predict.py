"""`mode=segment`: a saved segmentation network's masks for new images (a folder, recursively, or a CSV of paths).

Writes `<workdir>/masks/<relative path>.png` (class indices, at each image's own size), optional overlay pictures,
`errors.csv` for images that could not be read (the run goes on) and `summary.json` with class pixel shares.
"""

from __future__ import annotations

import csv
import json
import time
from pathlib import Path

import ml_collections
import numpy as np
from absl import logging

from cass_jax.data.dicom import decode_options_from_config
from cass_jax.data.sources import DataError, is_image_file
from cass_jax.reporting import ProgressLine
from cass_jax.segmentation.data import read_image
from cass_jax.segmentation.figures import overlay, write_mask_png, write_png
from cass_jax.segmentation.segmenter import load_segmenter


def default_segment_config() -> ml_collections.ConfigDict:
    """`model`: a saved segmenter folder (runs/<run>/models/<network>); `input`: a folder or a CSV with `column`."""
    return ml_collections.ConfigDict(dict(
        mode="segment", model="", input="", column="image", overlays=False, log_every_images=50,
        # DICOM / high-bit-depth decoding, as for training data (see cass_jax.data.config).
        data=ml_collections.ConfigDict(dict(window="", dicom_frame=ml_collections.config_dict.placeholder(int)))))


def input_paths(location: str | Path, column: str = "image") -> list[tuple[Path, Path]]:
    """(image path, output path relative to the masks folder) for every image in a folder tree or a CSV."""
    location = Path(location).expanduser()
    if location.is_dir():
        paths = sorted(p for p in location.rglob("*") if p.is_file() and is_image_file(p))
        return [(p, p.relative_to(location)) for p in paths]
    if location.is_file() and location.suffix.lower() == ".csv":
        with location.open(newline="") as f:
            rows = list(csv.DictReader(f))
        if rows and column not in rows[0]:
            raise DataError(f"{location} has no column {column!r} (columns: {', '.join(rows[0])}); set "
                            "--config.column to the column of image paths.")
        paths = [Path(row[column]) if Path(row[column]).is_absolute() else location.parent / row[column]
                 for row in rows]
        return [(p, Path(f"{i:06d}_{p.name}")) for i, p in enumerate(paths)]
    raise DataError(f"config.input={str(location)!r} is neither a folder nor a .csv file.")


def run_segment(config: ml_collections.ConfigDict, workdir: str | Path) -> dict:
    """Segments every input image; returns the summary written to `summary.json`."""
    workdir = Path(workdir).absolute()
    if not config.model:
        raise ValueError("Set --config.model to a saved segmenter folder, e.g. runs/seg/runs/<run>/models/cnn.")
    segmenter = load_segmenter(config.model)
    channels = int(segmenter.info.get("in_channels", 1))
    decode_options = decode_options_from_config(config.data)
    inputs = input_paths(config.input, config.column)
    if not inputs:
        raise DataError(f"No images found in {config.input}.")
    errors, pixel_counts = [], np.zeros(segmenter.num_classes, np.int64)
    progress = ProgressLine(len(inputs), 1)
    started = time.monotonic()
    for index, (path, relative) in enumerate(inputs, start=1):
        try:
            image = read_image(path, channels, decode_options)
        except (DataError, ValueError, OSError) as error:
            errors.append((str(path), " ".join(str(error).split())))
            continue
        mask = segmenter([image])[0]
        write_mask_png(workdir / "masks" / relative.with_suffix(".png"), mask)
        pixel_counts += np.bincount(mask.ravel(), minlength=segmenter.num_classes)[:segmenter.num_classes]
        if config.overlays:
            gray = image.astype(np.float32) / 255.0
            write_png(workdir / "overlays" / relative.with_suffix(".png"), overlay(gray, mask))
        if index == 1:
            progress.compiled(index)
        if index % config.log_every_images == 0 or index == len(inputs):
            progress.log(index, {"errors": len(errors)}, progress.images_per_second(index))
    with (workdir / "errors.csv").open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["path", "error"])
        writer.writerows(errors)
    names = segmenter.info.get("class_names") or [f"class_{c}" for c in range(segmenter.num_classes)]
    total = max(int(pixel_counts.sum()), 1)
    summary = {"model": str(config.model), "images": len(inputs) - len(errors), "errors": len(errors),
               "seconds": time.monotonic() - started,
               "pixel_share": {name: float(count) / total for name, count in zip(names, pixel_counts)}}
    (workdir / "summary.json").write_text(json.dumps(summary, indent=2))
    logging.info("Wrote %d masks to %s (%d unreadable images in errors.csv).", summary["images"],
                 workdir / "masks", len(errors))
    return summary
