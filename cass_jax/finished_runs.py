"""Finished downstream runs found again: a pipeline rerun after a crash or a kill skips the runs it completed.

A run's folder holds `result.json` (written last, so its presence means the run finished) and
`test_predictions.npz`. The record carries a fingerprint of everything the run's numbers depend on: the data and
downstream settings, the arm's model settings, the compute dtype, the run itself and the bytes of its starting
weights. A finished run is reused only when that fingerprint matches, so a changed learning rate, a new split or
a re-pretrained export trains the run again instead of reporting stale scores.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import math
from pathlib import Path
from typing import Any

import ml_collections
import numpy as np
from absl import logging

# Downstream settings that choose which runs happen, not what one run computes.
_SELECTION_KEYS = frozenset({"arms", "protocols", "arm", "label_fractions", "seeds", "init", "pretrain_workdir",
                             "evaluate_baseline", "ensemble", "save_models", "saliency", "saliency_images"})


def file_digest(path: str | Path | None) -> str | None:
    """SHA-256 of a weights file (None for random init), read once per file version: every run of an arm hashes
    the same export, twice (looking for the finished run, then recording it)."""
    if path is None:
        return None
    stat = Path(path).stat()
    return _content_digest(str(Path(path).absolute()), stat.st_mtime_ns, stat.st_size)


@functools.lru_cache(maxsize=64)
def _content_digest(path: str, mtime_ns: int, size: int) -> str:
    """The hash itself; the modification time and size in the key make a rewritten file hash again."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            digest.update(block)
    return digest.hexdigest()


def run_fingerprint(config: ml_collections.ConfigDict, run: Any) -> str:
    """A digest of what one downstream run (`finetune.RunSpec`) depends on."""
    downstream = {k: v for k, v in config.downstream.to_dict().items() if k not in _SELECTION_KEYS}
    content = {
        # The weights by content, not by path: a workdir moved elsewhere still finds its runs.
        "run": {**dataclasses.asdict(run), "init": {**dataclasses.asdict(run.init), "weights_path": None}},
        "data": config.data.to_dict(),
        "downstream": downstream,
        "arm": config[run.arm].to_dict(),
        "dtype": config.get("dtype", "float32"),
        "weights": file_digest(run.init.weights_path),
    }
    return hashlib.sha256(json.dumps(content, sort_keys=True, default=str).encode()).hexdigest()


def load_finished_run(config: ml_collections.ConfigDict, run: Any, run_dir: Path) -> dict[str, Any] | None:
    """The record of `run` if it finished in `run_dir` with the same fingerprint, test predictions included;
    else None."""
    result_file, predictions_file = run_dir / "result.json", run_dir / "test_predictions.npz"
    if not (result_file.is_file() and predictions_file.is_file()):
        return None
    try:
        record = json.loads(result_file.read_text())
    except json.JSONDecodeError:
        logging.warning("%s is not valid JSON; running %s again.", result_file, run_dir.name)
        return None
    if record.get("fingerprint") != run_fingerprint(config, run):
        logging.info("%s was made with other settings or starting weights; running it again.", run_dir.name)
        return None
    # results.json writes an undefined score (NaN) as null; the tables expect NaN back.
    record["test_metrics"] = {k: math.nan if v is None else v for k, v in record["test_metrics"].items()}
    with np.load(predictions_file) as predictions:
        record["test_probabilities"] = predictions["probabilities"]
        record["test_labels"] = predictions["labels"]
    record["weights"] = run.init.weights_path  # where the same bytes are now
    # <workdir>/models/<run>, as finetune.run_arm_inits saves it; gone when another seed's classifier was kept.
    classifier = run_dir.parent.parent / "models" / run.name
    record["classifier"] = str(classifier) if classifier.is_dir() else None
    logging.info("[%s] finished before (%s): reused.", run_dir.name, result_file)
    return record
