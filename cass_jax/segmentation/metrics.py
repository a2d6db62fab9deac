"""Segmentation scores: per-class Dice, IoU and HD95 of a 2D slice or a 3D volume, and their means over cases.

Dice, IoU and HD95 are MedPy's (`medpy.metric.binary.dc/jc/hd95`), the implementation SSL4MIS's `val_2D.py` calls.
Empty structures follow SSL4MIS (see `structure_scores`); scores are NumPy, computed on the host after prediction.
"""

from __future__ import annotations

from typing import Mapping, Sequence

import numpy as np
from medpy.metric import binary as medpy_binary


METRIC_NAMES = ("dice", "iou", "hd95")
EMPTY_POLICIES = ("ssl4mis", "ignore_empty_reference")


def structure_scores(prediction: np.ndarray, reference: np.ndarray, spacing: Sequence[float] | None = None,
                     empty_policy: str = "ssl4mis") -> tuple[float, float, float]:
    """(Dice, IoU, HD95) of one binary structure (any truthy value is foreground), 2D or 3D.

    `empty_policy="ssl4mis"` is SSL4MIS's val_2D `calculate_metric_percase`: an empty prediction scores Dice 0 and
    HD95 0 (IoU 0 here) whatever the reference holds. SSL4MIS never meets a filled prediction with an empty reference
    (every ACDC volume holds all three structures) and MedPy's hd95 raises there; here Dice and IoU are 0 and HD95 is
    NaN (undefined, left out of nan-means). `"ignore_empty_reference"` (MONAI's `ignore_empty=True`, useful per slice)
    makes every score NaN when the reference is empty and otherwise scores an empty prediction Dice 0, IoU 0, HD95 NaN.
    HD95 is in units of `spacing` (default 1 per axis, as SSL4MIS's current val_2D); axis 0 of a volume is the slice.
    """
    if empty_policy not in EMPTY_POLICIES:
        raise ValueError(f"empty_policy must be one of {EMPTY_POLICIES}, got {empty_policy!r}.")
    prediction, reference = np.asarray(prediction).astype(bool), np.asarray(reference).astype(bool)
    if prediction.shape != reference.shape:
        raise ValueError(f"Prediction shape {prediction.shape} differs from reference shape {reference.shape}.")
    has_prediction, has_reference = bool(prediction.any()), bool(reference.any())
    if empty_policy == "ignore_empty_reference" and not has_reference:
        return float("nan"), float("nan"), float("nan")
    if not has_prediction:
        return 0.0, 0.0, (0.0 if empty_policy == "ssl4mis" else float("nan"))
    dice, iou = float(medpy_binary.dc(prediction, reference)), float(medpy_binary.jc(prediction, reference))
    if not has_reference:
        return dice, iou, float("nan")
    return dice, iou, float(medpy_binary.hd95(prediction, reference, voxelspacing=spacing))


def class_scores(prediction: np.ndarray, reference: np.ndarray, num_classes: int,
                 spacing: Sequence[float] | None = None, empty_policy: str = "ssl4mis") -> dict[str, np.ndarray]:
    """{"dice", "iou", "hd95"}: float64 (num_classes - 1,) for foreground classes 1..C-1 of one slice or volume.

    `prediction` and `reference` are class-index arrays of one shape; background (class 0) is not scored, as in
    SSL4MIS (`for i in range(1, classes)`).
    """
    rows = [structure_scores(prediction == c, reference == c, spacing, empty_policy) for c in range(1, num_classes)]
    table = np.asarray(rows, np.float64).reshape(num_classes - 1, len(METRIC_NAMES))
    return {name: table[:, i] for i, name in enumerate(METRIC_NAMES)}


def mean_scores(cases: Sequence[Mapping[str, np.ndarray]], prefix: str = "") -> dict[str, float]:
    """Means over cases (slices or volumes): `{prefix}{metric}/class_{c}` and `{prefix}{metric}/mean` (over classes).

    NaN cases (undefined scores, see `structure_scores`) are left out of each class's mean; the class mean is
    the mean of the per-class means, as SSL4MIS reports (average over cases, then over the three structures).
    """
    summary = {}
    for name in METRIC_NAMES:
        table = np.stack([case[name] for case in cases])  # (cases, classes)
        with np.errstate(invalid="ignore"):
            per_class = np.array([np.nanmean(column) if np.isfinite(column).any() else np.nan for column in table.T])
        for c, value in enumerate(per_class, start=1):
            summary[f"{prefix}{name}/class_{c}"] = float(value)
        summary[f"{prefix}{name}/mean"] = float(np.nanmean(per_class)) if np.isfinite(per_class).any() else np.nan
    return summary
