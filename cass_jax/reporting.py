"""What a long run shows: TensorBoard through CLU writers, and one readable console line with speed and ETA."""

import time
from pathlib import Path
from typing import Any, Mapping

import jax
import ml_collections
import numpy as np
from absl import logging
from clu import metric_writers


def create_writer(logdir: str | Path) -> metric_writers.MetricWriter:
    """TensorBoard + log writer on the first process, log-only on the others."""
    return metric_writers.create_default_writer(str(logdir), just_logging=jax.process_index() > 0)


def flat_hparams(config: ml_collections.ConfigDict) -> dict[str, Any]:
    """The config as flat `a.b.c -> scalar` pairs, the form TensorBoard's hparams plugin takes."""
    out = {}

    def visit(prefix, node):
        for key, value in node.items():
            name = f"{prefix}{key}"
            if isinstance(value, (ml_collections.ConfigDict, dict)):
                visit(name + ".", value)
            elif isinstance(value, (bool, int, float, str)):
                out[name] = value
            else:
                out[name] = str(value)

    visit("", config)
    return out


def image_grid(images: np.ndarray, mean, std, max_images: int = 16) -> np.ndarray:
    """Normalised (B, H, W, 3) inputs back to [0, 1], tiled into one square-ish (H', W', 3) picture."""
    images = np.asarray(images[:max_images], np.float32) * np.asarray(std) + np.asarray(mean)
    images = np.clip(images, 0.0, 1.0)
    n, h, w, c = images.shape
    cols = int(np.ceil(np.sqrt(n)))
    rows = int(np.ceil(n / cols))
    grid = np.ones((rows * h, cols * w, c), np.float32)
    for i, image in enumerate(images):
        r, col = divmod(i, cols)
        grid[r * h:(r + 1) * h, col * w:(col + 1) * w] = image
    return grid


class ProgressLine:
    """Logs `step s/N | metrics | img/s | ETA` and measures throughput between calls."""

    def __init__(self, total_steps: int, global_batch_size: int, start_step: int = 0):
        self.total_steps = total_steps
        self.batch_size = global_batch_size
        self._last_step = start_step
        self._last_time = time.monotonic()

    def images_per_second(self, step: int) -> float:
        """Throughput since the previous call (includes data loading and logging: what the user gets)."""
        now = time.monotonic()
        rate = (step - self._last_step) * self.batch_size / max(now - self._last_time, 1e-9)
        self._last_step, self._last_time = step, now
        return rate

    def line(self, step: int, scalars: Mapping[str, float], images_per_second: float) -> str:
        remaining = (self.total_steps - step) * self.batch_size / max(images_per_second, 1e-9)
        eta = time.strftime("%H:%M:%S", time.gmtime(remaining)) if remaining < 86400 else f"{remaining / 3600:.0f}h"
        shown = " | ".join(f"{k} {v:.4g}" for k, v in scalars.items())
        return f"step {step}/{self.total_steps} | {shown} | {images_per_second:.1f} img/s | ETA {eta}"

    def log(self, step: int, scalars: Mapping[str, float], images_per_second: float) -> None:
        logging.info("%s", self.line(step, scalars, images_per_second))
