"""Classification metrics over a whole split, mean +- std and the confidence interval over seeds, and the tables.

Pure NumPy over whole-split arrays (every test example counts once; nothing accumulates across epochs).
Definitions follow scikit-learn's defaults (checked against it in tests) without depending on it:
precision/recall/F1 of a class with no predictions or no examples is 0; multi-class macro averages run
over the classes present in the labels or the predictions; balanced accuracy is the mean recall over
classes present in the labels.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import numpy as np
import scipy.stats

MULTICLASS_SUMMARY = ("accuracy", "macro_f1", "weighted_f1", "micro_f1", "balanced_accuracy")
MULTILABEL_SUMMARY = ("micro_f1", "macro_f1", "samples_f1", "mean_auroc")


def _safe_divide(numerator: np.ndarray, denominator: np.ndarray) -> np.ndarray:
    """Elementwise division that gives 0 where the denominator is 0 (scikit-learn's zero_division=0)."""
    numerator = np.asarray(numerator, dtype=np.float64)
    denominator = np.asarray(denominator, dtype=np.float64)
    out = np.zeros(np.broadcast(numerator, denominator).shape, dtype=np.float64)
    np.divide(numerator, denominator, out=out, where=denominator != 0)
    return out


def _f1(tp: np.ndarray, fp: np.ndarray, fn: np.ndarray) -> np.ndarray:
    """F1 = 2TP / (2TP + FP + FN); 0 where undefined."""
    return _safe_divide(2.0 * tp, 2.0 * tp + fp + fn)


def confusion_matrix(labels: np.ndarray, predictions: np.ndarray, num_classes: int) -> np.ndarray:
    """Counts with rows = true class and columns = predicted class, shape (num_classes, num_classes)."""
    labels = np.asarray(labels, dtype=np.int64).reshape(-1)
    predictions = np.asarray(predictions, dtype=np.int64).reshape(-1)
    if labels.shape != predictions.shape:
        raise ValueError(f"labels {labels.shape} and predictions {predictions.shape} differ in length")
    for name, values in (("labels", labels), ("predictions", predictions)):
        if values.size and (values.min() < 0 or values.max() >= num_classes):
            raise ValueError(
                f"{name} must lie in [0, {num_classes}); got range [{values.min()}, {values.max()}]"
            )
    flat = labels * num_classes + predictions
    return np.bincount(flat, minlength=num_classes * num_classes).reshape(num_classes, num_classes)


def binary_auroc(targets: np.ndarray, scores: np.ndarray) -> float:
    """Area under the ROC curve (Mann-Whitney U with mid-ranks for ties); NaN if only one class is present."""
    targets = np.asarray(targets).reshape(-1) > 0.5
    scores = np.asarray(scores, dtype=np.float64).reshape(-1)
    n_pos = int(targets.sum())
    n_neg = targets.size - n_pos
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    order = np.argsort(scores, kind="mergesort")
    sorted_scores = scores[order]
    # Mid-ranks: every member of a run of equal scores gets the mean of the run's 1-based ranks.
    run_starts = np.flatnonzero(np.r_[True, sorted_scores[1:] != sorted_scores[:-1]])
    run_ends = np.r_[run_starts[1:], sorted_scores.size]
    mid_ranks = np.repeat((run_starts + run_ends + 1) / 2.0, run_ends - run_starts)
    ranks = np.empty_like(mid_ranks)
    ranks[order] = mid_ranks
    u_statistic = ranks[targets].sum() - n_pos * (n_pos + 1) / 2.0
    return float(u_statistic / (n_pos * n_neg))


def multiclass_metrics(labels: np.ndarray, probabilities: np.ndarray) -> dict[str, Any]:
    """Metrics of single-label predictions (argmax of `probabilities`, shape (N, C)) against int `labels`.

    Returns scalars (accuracy, macro/weighted/micro F1, balanced accuracy, mean one-vs-rest AUROC) and
    per-class lists (precision, recall, f1, support, auroc) plus the confusion matrix.
    """
    probabilities = np.asarray(probabilities, dtype=np.float64)
    if probabilities.ndim != 2:
        raise ValueError(f"probabilities must have shape (N, num_classes); got {probabilities.shape}")
    num_classes = probabilities.shape[1]
    labels = np.asarray(labels).reshape(-1).astype(np.int64)
    if labels.size == 0:
        raise ValueError("cannot compute metrics over an empty split (0 labels)")
    predictions = probabilities.argmax(axis=1)
    cm = confusion_matrix(labels, predictions, num_classes)
    tp = np.diag(cm).astype(np.float64)
    support = cm.sum(axis=1).astype(np.float64)
    predicted = cm.sum(axis=0).astype(np.float64)
    fp = predicted - tp
    fn = support - tp
    precision = _safe_divide(tp, predicted)
    recall = _safe_divide(tp, support)
    f1 = _f1(tp, fp, fn)
    seen = (support > 0) | (predicted > 0)
    in_labels = support > 0
    auroc = np.array([binary_auroc(labels == c, probabilities[:, c]) for c in range(num_classes)])
    finite_auroc = auroc[np.isfinite(auroc)]
    return {
        "accuracy": float(tp.sum() / labels.size),
        "macro_f1": float(f1[seen].mean()),
        "weighted_f1": float(np.sum(f1 * support) / support.sum()),
        "micro_f1": float(_f1(tp.sum(), fp.sum(), fn.sum())),
        "balanced_accuracy": float(recall[in_labels].mean()),
        "mean_auroc": float(finite_auroc.mean()) if finite_auroc.size else float("nan"),
        "per_class_precision": precision.tolist(),
        "per_class_recall": recall.tolist(),
        "per_class_f1": f1.tolist(),
        "per_class_support": support.astype(np.int64).tolist(),
        "per_class_auroc": auroc.tolist(),
        "confusion_matrix": cm.tolist(),
        "num_examples": int(labels.size),
    }


def multilabel_metrics(
    labels: np.ndarray, probabilities: np.ndarray, threshold: float = 0.5
) -> dict[str, Any]:
    """Metrics of multi-label predictions (`probabilities >= threshold`) against multi-hot `labels` (N, C).

    Returns micro/macro/samples F1, subset accuracy, per-label precision/recall/F1/support and AUROC
    (NaN for a label with only one class in `labels`) and their mean over the labels where it is defined.
    """
    probabilities = np.asarray(probabilities, dtype=np.float64)
    labels = np.asarray(labels) > 0.5
    if probabilities.ndim != 2 or labels.shape != probabilities.shape:
        raise ValueError(
            f"labels {labels.shape} and probabilities {probabilities.shape} must both be (N, num_labels)"
        )
    if labels.shape[0] == 0:
        raise ValueError("cannot compute metrics over an empty split (0 labels)")
    predictions = probabilities >= threshold
    tp = np.sum(labels & predictions, axis=0).astype(np.float64)
    fp = np.sum(~labels & predictions, axis=0).astype(np.float64)
    fn = np.sum(labels & ~predictions, axis=0).astype(np.float64)
    f1 = _f1(tp, fp, fn)
    sample_tp = np.sum(labels & predictions, axis=1)
    sample_fp = np.sum(~labels & predictions, axis=1)
    sample_fn = np.sum(labels & ~predictions, axis=1)
    auroc = np.array([binary_auroc(labels[:, c], probabilities[:, c]) for c in range(labels.shape[1])])
    finite_auroc = auroc[np.isfinite(auroc)]
    return {
        "micro_f1": float(_f1(tp.sum(), fp.sum(), fn.sum())),
        "macro_f1": float(f1.mean()),
        "samples_f1": float(_f1(sample_tp, sample_fp, sample_fn).mean()),
        "subset_accuracy": float(np.mean(np.all(labels == predictions, axis=1))),
        "mean_auroc": float(finite_auroc.mean()) if finite_auroc.size else float("nan"),
        "per_class_precision": _safe_divide(tp, tp + fp).tolist(),
        "per_class_recall": _safe_divide(tp, tp + fn).tolist(),
        "per_class_f1": f1.tolist(),
        "per_class_support": (tp + fn).astype(np.int64).tolist(),
        "per_class_auroc": auroc.tolist(),
        "num_examples": int(labels.shape[0]),
    }


def classification_metrics(
    labels: np.ndarray, probabilities: np.ndarray, multi_label: bool
) -> dict[str, Any]:
    """Dispatches to `multilabel_metrics` or `multiclass_metrics`."""
    if multi_label:
        return multilabel_metrics(labels, probabilities)
    return multiclass_metrics(labels, probabilities)


def summary_names(multi_label: bool) -> tuple[str, ...]:
    """The scalar metrics reported in result tables, in table order."""
    return MULTILABEL_SUMMARY if multi_label else MULTICLASS_SUMMARY


def mean_std(values: Sequence[float]) -> dict[str, float]:
    """Mean and sample standard deviation (ddof=1; 0 for a single value) of per-seed results."""
    values = np.asarray(values, dtype=np.float64)
    std = float(values.std(ddof=1)) if values.size > 1 else 0.0
    return {"mean": float(values.mean()), "std": std, "n": int(values.size)}


def mean_confidence_interval(values: Sequence[float], confidence: float = 0.95) -> dict[str, float]:
    """Mean over seeds and its Student-t confidence interval: mean +- t_{(1+c)/2, n-1} * s / sqrt(n).

    Returns {"mean", "low", "high", "half_width", "std", "n"}; with one value the interval is undefined (NaN).
    """
    values = np.asarray(values, dtype=np.float64)
    if values.ndim != 1 or values.size == 0:
        raise ValueError(f"Need a non-empty 1-D list of per-seed values, got shape {values.shape}.")
    n, mean = int(values.size), float(values.mean())
    if n < 2:
        return {"mean": mean, "low": np.nan, "high": np.nan, "half_width": np.nan, "std": np.nan, "n": n}
    std = float(values.std(ddof=1))
    half_width = float(scipy.stats.t.ppf((1.0 + confidence) / 2.0, df=n - 1) * std / np.sqrt(n))
    return {"mean": mean, "low": mean - half_width, "high": mean + half_width, "half_width": half_width,
            "std": std, "n": n}


def seed_statistics(values: Sequence[float]) -> dict[str, float]:
    """`mean_std` plus the 95% Student-t confidence interval of the mean (`ci_low`, `ci_high`; NaN for one seed)."""
    interval = mean_confidence_interval(values)
    return {**mean_std(values), "ci_low": interval["low"], "ci_high": interval["high"]}


SUMMARY_KEYS = ("arm", "model", "method", "protocol", "init")


def summarize_over_seeds(
    records: Iterable[Mapping[str, Any]], metric_names: Sequence[str]
) -> list[dict[str, Any]]:
    """Groups per-seed run records by (arm, model, method, protocol, init, label_fraction) and reduces each metric.

    Each record needs those keys, seed and test_metrics (a metrics dict).
    """
    groups: dict[tuple, list[Mapping[str, Any]]] = {}
    for record in records:
        key = tuple(record[name] for name in SUMMARY_KEYS) + (float(record["label_fraction"]),)
        groups.setdefault(key, []).append(record)
    return [
        {
            **dict(zip(SUMMARY_KEYS, key)),
            "label_fraction": key[-1],
            "seeds": sorted(int(m["seed"]) for m in members),
            "metrics": {name: seed_statistics([m["test_metrics"][name] for m in members]) for name in metric_names},
        }
        for key, members in groups.items()
    ]


def _fraction_label(fraction: float) -> str:
    return f"{fraction * 100:g}%"


def _mean_std_cell(stats: Mapping[str, float]) -> str:
    return f"{stats['mean']:.4f} ± {stats['std']:.4f} (n={stats['n']})"


def _interval_cell(stats: Mapping[str, float]) -> str:
    """'[low, high]', or '–' where one seed leaves the interval undefined."""
    if stats["n"] < 2:
        return "–"
    return f"[{stats['ci_low']:.4f}, {stats['ci_high']:.4f}]"


def markdown_tables(summary_rows: Sequence[Mapping[str, Any]], metric_names: Sequence[str]) -> str:
    """One Markdown table per metric (the S4MI layout): rows arm x model x method x protocol x init, grouped by arm
    and protocol; per label fraction, a mean ± std column and a 95% CI column."""
    fractions = sorted({row["label_fraction"] for row in summary_rows}, reverse=True)
    row_keys: list[tuple] = []
    cells: dict[tuple, Mapping[str, Any]] = {}
    for row in summary_rows:
        key = tuple(row[name] for name in SUMMARY_KEYS)
        if key not in row_keys:
            row_keys.append(key)
        cells[key + (row["label_fraction"],)] = row
    arms = list(dict.fromkeys(key[0] for key in row_keys))
    protocols = list(dict.fromkeys(key[3] for key in row_keys))
    row_keys.sort(key=lambda key: (arms.index(key[0]), protocols.index(key[3])))
    columns = [f"{_fraction_label(f)}{suffix}" for f in fractions for suffix in ("", " 95% CI")]
    sections = []
    for name in metric_names:
        lines = [f"### {name} (mean ± std over seeds, 95% CI)", "",
                 "| " + " | ".join((*SUMMARY_KEYS, *columns)) + " |", "|" + "---|" * (len(SUMMARY_KEYS) + len(columns))]
        for key in row_keys:
            values = []
            for fraction in fractions:
                row = cells.get(key + (fraction,))
                values += ["–", "–"] if row is None else [_mean_std_cell(row["metrics"][name]),
                                                          _interval_cell(row["metrics"][name])]
            lines.append("| " + " | ".join((*key, *values)) + " |")
        sections.append("\n".join(lines))
    return "\n\n".join(sections) + "\n"


def pretraining_table(runs: Sequence[Mapping[str, Any]]) -> str:
    """Markdown: per pretraining run (`export/pretraining.json`), its backbones, size, wall time and images/s."""
    lines = ["### Pretraining", "",
             "Wall time: the whole run, from reading the data to the written export (compilation, checkpoints and "
             "the export included), summed over the invocations of a resumed run up to the checkpoints they "
             "resumed from. Images/s: the training steps after compilation in the invocation that finished the "
             "run, data loading and checkpoints included.", "",
             "| method | backbones | images | epochs | batch | steps | wall time (s) | images/s |",
             "|---|---|---|---|---|---|---|---|"]
    for run in runs:
        wall = run["wall_seconds"]
        if wall is None:  # a run resumed from a checkpoint older than its clock: only the last invocation is known
            wall, resumed = run["invocation_wall_seconds"], f" (the invocation resumed at step {run['start_step']})"
        else:
            resumed = ""
        backbones = ", ".join(f"{arm}: {model}" for arm, model in run["backbones"].items())
        rate = run["images_per_second"]
        lines.append(f"| {run['method']} | {backbones} | {run['images']} | {run['epochs']} | {run['batch_size']} | "
                     f"{run['steps']} | {wall:.0f}{resumed} | "
                     f"{'–' if rate is None or not np.isfinite(rate) else f'{rate:.1f}'} |")
    return "\n".join(lines) + "\n"
