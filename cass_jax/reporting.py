"""What a long run shows: TensorBoard through CLU writers, and one readable console line with speed and ETA."""

import collections
import logging as logging_std
import time
from pathlib import Path
from typing import Any, Mapping

import jax
import ml_collections
import numpy as np
from absl import logging
from clu import metric_writers


def create_writer(logdir: str | Path) -> metric_writers.MetricWriter:
    """TensorBoard on the first process, nothing on the others.

    No logging writer: each loop prints its own progress line, and echoing every scalar and image summary
    to the console buried it (the demo printed 140 such lines).
    """
    if jax.process_index() > 0:
        return metric_writers.MultiWriter([])
    return metric_writers.AsyncMultiWriter([metric_writers.SummaryWriter(str(logdir))])


class _LibraryInfoFilter(logging_std.Filter):
    """Drops INFO and DEBUG records that libraries log through absl (orbax logs ~10 lines per checkpoint; CLU's
    progress reporter a "Setting work unit notes" line that repeats the loop's own progress line)."""

    QUIET = ("/orbax/", "/grain/", "/tensorflow_datasets/", "/clu/")

    def filter(self, record: logging_std.LogRecord) -> bool:
        return record.levelno >= logging_std.WARNING or not any(p in record.pathname for p in self.QUIET)


def quiet_library_logs(quiet: bool = True) -> None:
    """Hides the INFO lines of orbax, grain, TFDS and CLU (warnings and errors still show); idempotent."""
    absl_logger = logging_std.getLogger("absl")
    for existing in [f for f in absl_logger.filters if isinstance(f, _LibraryInfoFilter)]:
        absl_logger.removeFilter(existing)
    if quiet:
        absl_logger.addFilter(_LibraryInfoFilter())


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
    """Logs `step s/N | metrics | img/s | ETA` and measures throughput between calls.

    Call `compiled(step)` once the first step of a run (or of a resumed run) has returned: rates and the ETA
    then leave out compilation, which otherwise made the first ETA many times too long. The ETA uses the rate over
    the last `eta_window` logged intervals, so a pause (a suspended process, a job sharing the cores for a while)
    stops skewing it a few lines later; `mean_images_per_second` keeps the whole run's rate.
    """

    def __init__(self, total_steps: int, global_batch_size: int, start_step: int = 0, eta_window: int = 5):
        self.total_steps = total_steps
        self.batch_size = global_batch_size
        self._last_step = start_step
        self._last_time = time.monotonic()
        self._origin: tuple[int, float] | None = None
        self._recent: collections.deque[tuple[int, float]] = collections.deque(maxlen=eta_window + 1)

    def compiled(self, step: int) -> None:
        """Marks `step` as the first step after compilation: timing starts here."""
        self._last_step, self._last_time = step, time.monotonic()
        self._origin = (step, self._last_time)
        self._recent.clear()
        self._recent.append(self._origin)

    def _rate_since(self, point: tuple[int, float] | None, step: int) -> float:
        if point is None or step <= point[0]:
            return float("nan")
        return (step - point[0]) * self.batch_size / max(time.monotonic() - point[1], 1e-9)

    def mean_images_per_second(self, step: int) -> float:
        """Throughput from the first step after compilation to now (`step`); NaN before a step has been timed."""
        return self._rate_since(self._origin, step)

    def recent_images_per_second(self, step: int) -> float:
        """Throughput over the last `eta_window` intervals up to now (`step`); NaN before a step has been timed."""
        return self._rate_since(self._recent[0] if self._recent else None, step)

    def eta_seconds(self, step: int, images_per_second: float) -> float:
        """Remaining time at the recent rate after compilation (else at `images_per_second`)."""
        rate = self.recent_images_per_second(step)
        return (self.total_steps - step) * self.batch_size / max(images_per_second if np.isnan(rate) else rate, 1e-9)

    def images_per_second(self, step: int) -> float:
        """Throughput since the previous call (includes data loading and logging: what the user gets)."""
        now = time.monotonic()
        rate = (step - self._last_step) * self.batch_size / max(now - self._last_time, 1e-9)
        self._last_step, self._last_time = step, now
        if self._recent:
            self._recent.append((step, now))
        return rate

    def line(self, step: int, scalars: Mapping[str, float], images_per_second: float) -> str:
        remaining = self.eta_seconds(step, images_per_second)
        eta = time.strftime("%H:%M:%S", time.gmtime(remaining)) if remaining < 86400 else f"{remaining / 3600:.0f}h"
        shown = " | ".join(f"{k} {v:.4g}" for k, v in scalars.items())
        return f"step {step}/{self.total_steps} | {shown} | {images_per_second:.1f} img/s | ETA {eta}"

    def log(self, step: int, scalars: Mapping[str, float], images_per_second: float) -> None:
        logging.info("%s", self.line(step, scalars, images_per_second))
