"""The one loop every long training run shares: resume, step, progress, TensorBoard, NaN stop, checkpoints, halting.

A run hands it a state, a data iterator and a jitted step, plus `LoopHooks` for what differs between runs (extra
scalars, per-epoch work, validation, pictures). The loop owns the step counter, the orbax checkpoint of
{state, data iterator} (so a resumed run repeats the killed one exactly), the console line and the non-finite check.
"""

from __future__ import annotations

import dataclasses
import json
import time
from pathlib import Path
from typing import Any, Callable, Mapping

import jax
import numpy as np
from absl import logging
from clu import metric_writers, periodic_actions

from cass_jax.checkpointing import Checkpointer
from cass_jax.reporting import ProgressLine

StepFn = Callable[[Any, Any], tuple[Any, Mapping[str, jax.Array]]]


@dataclasses.dataclass(frozen=True)
class LoopSettings:
    """How long to run and how often to log, check and save (config keys of the same names)."""

    total_steps: int
    batch_size: int                    # global images per step, for img/s and the ETA
    log_every_steps: int = 20
    checkpoint_every_steps: int = 500
    keep_checkpoints: int = 3
    halt_after_steps: int = 0          # stop this invocation after so many steps (0: never); rerun to resume
    finite_metrics: tuple[str, ...] = ("loss",)  # metrics that must stay finite, else the run stops
    console_metrics: tuple[str, ...] = ("loss",)  # shown on the progress line (others go to TensorBoard only)

    @classmethod
    def from_config(cls, config: Any, *, total_steps: int, batch_size: int, **fields: Any) -> "LoopSettings":
        """Settings from a config holding log_every_steps, checkpoint_every_steps, keep_checkpoints, halt_after_steps."""
        return cls(total_steps=total_steps, batch_size=batch_size, log_every_steps=config.log_every_steps,
                   checkpoint_every_steps=config.checkpoint_every_steps, keep_checkpoints=config.keep_checkpoints,
                   halt_after_steps=config.halt_after_steps, **fields)


class LoopHooks:
    """What a run adds to the loop. Every hook is optional; the defaults do nothing.

    Hooks run on the host between steps. Anything they persist must be a pure function of the state (validation,
    pictures), so redoing the steps after a resume redoes it identically.
    """

    def first_batch(self, batch: Any, writer: metric_writers.MetricWriter) -> None:
        """Called once with the first batch of a fresh run (e.g. a picture of the augmented inputs)."""

    def after_step(self, step: int, state: Any) -> Any:
        """Called after every step with the new state; returns the state to continue from (e.g. weight averaging)."""
        return state

    def scalars(self, step: int, state: Any) -> dict[str, float]:
        """Extra scalars for this log step (learning rates, epoch, ...), written with the step's mean metrics."""
        return {}

    def after_log(self, step: int, scalars: Mapping[str, float]) -> None:
        """Called with everything logged at this step (e.g. a collapse monitor that may raise)."""

    def periodic(self, step: int, state: Any, writer: metric_writers.MetricWriter) -> None:
        """Called after every step; does its own scheduling (validation every N steps, pictures, ...)."""


def check_finite(metrics: Mapping[str, Any], step: int, names: tuple[str, ...]) -> None:
    """Raises FloatingPointError naming the non-finite metrics of `step`; the last checkpoint stays restorable."""
    values = {name: float(metrics[name]) for name in names if name in metrics}
    bad = {name: value for name, value in values.items() if not np.isfinite(value)}
    if bad:
        shown = ", ".join(f"{name}={value}" for name, value in values.items())
        raise FloatingPointError(
            f"Non-finite {', '.join(bad)} at step {step} ({shown}). The run stopped; the last checkpoint holds the "
            "last good state. Lower the learning rate or use dtype=float32.")


def mean_metrics(interval: list[Mapping[str, Any]]) -> dict[str, float]:
    """The mean of each metric over the steps since the last log."""
    return {key: float(value) for key, value in jax.tree.map(lambda *xs: np.mean(xs), *interval).items()}


class TrainingClock:
    """Wall seconds a run has taken up to each of its checkpoints, over all the invocations that made it.

    Kept beside the checkpoints (`wall_seconds.json`: step -> seconds), so a run resumed after a kill or a halt
    reports the time of the whole run: the seconds recorded at the checkpoint it resumed from plus this
    invocation's since `started` (a `time.perf_counter()` value; by default when the clock is made). Work done after
    the last checkpoint of a killed invocation is not counted; its redoing is.
    """

    FILE = "wall_seconds.json"

    def __init__(self, started: float | None = None):
        self.started = time.perf_counter() if started is None else started
        self.path: Path | None = None
        self.recorded: dict[str, float] = {}
        self.seconds_before: float | None = 0.0

    def resume(self, checkpoint_dir: Path, start_step: int) -> None:
        """Reads the times recorded so far; the run continues from the checkpoint of `start_step` (0: fresh)."""
        self.path = Path(checkpoint_dir) / self.FILE
        self.recorded = self._read()
        # None when the run resumed from a checkpoint written before this file existed: its earlier time is unknown.
        self.seconds_before = 0.0 if start_step == 0 else self.recorded.get(str(start_step))

    def _read(self) -> dict[str, float]:
        try:
            return json.loads(self.path.read_text()) if self.path.is_file() else {}
        except json.JSONDecodeError:
            logging.warning("%s is not valid JSON; the run's earlier wall time is unknown.", self.path)
            return {}

    def seconds(self) -> float | None:
        """The run's wall seconds so far, or None when its earlier invocations' time is unknown."""
        if self.seconds_before is None:
            return None
        return self.seconds_before + time.perf_counter() - self.started

    def record(self, step: int) -> None:
        """Notes the time at the checkpoint of `step` (written through a temporary file)."""
        seconds = self.seconds()
        if seconds is None or self.path is None or jax.process_index() != 0:
            return
        self.recorded[str(step)] = seconds
        temporary = self.path.with_name(self.FILE + ".tmp")
        temporary.write_text(json.dumps(self.recorded, indent=1))
        temporary.replace(self.path)


def run_loop(state: Any, iterator: Any, step_fn: StepFn, *, workdir: str | Path, settings: LoopSettings,
             writer: metric_writers.MetricWriter, hooks: LoopHooks = LoopHooks(),
             to_device: Callable[[Any], Any] = lambda batch: batch,
             clock: TrainingClock | None = None) -> tuple[Any, bool]:
    """Runs (or resumes from `workdir/checkpoints`) steps 1..total_steps; returns (state, finished).

    `finished` is False when the run halted on `settings.halt_after_steps` (rerun the same command to continue).
    `to_device` places a host batch for the step (sharding); hooks see the host batch. The non-finite check of a
    step is made after the next step is dispatched (so it does not stall the device), and always before a save.
    `clock` records the run's wall time at each checkpoint (by default one started now); read its `seconds()`
    afterwards for the whole run's.
    """
    workdir = Path(workdir).absolute()
    checkpointer = Checkpointer(workdir / "checkpoints", keep=settings.keep_checkpoints,
                                every_steps=settings.checkpoint_every_steps)
    start_step = checkpointer.latest_step() or 0
    clock = clock or TrainingClock()
    clock.resume(workdir / "checkpoints", start_step)
    if start_step:
        state = checkpointer.restore(start_step, state, iterator)
        logging.info("Resumed from the checkpoint at step %d of %d.", start_step, settings.total_steps)
    progress = ProgressLine(settings.total_steps, settings.batch_size, start_step)
    report_progress = periodic_actions.ReportProgress(num_train_steps=settings.total_steps, writer=writer)
    pending, interval = None, []
    try:
        for step in range(start_step + 1, settings.total_steps + 1):
            batch = next(iterator)
            if step == 1:
                hooks.first_batch(batch, writer)
            with jax.profiler.StepTraceAnnotation("train", step_num=step):
                state, metrics = step_fn(state, to_device(batch))
            if step == start_step + 1:
                progress.compiled(step)
            if pending is not None:
                check_finite(*pending, settings.finite_metrics)
            pending = (metrics, step)
            interval.append(metrics)
            report_progress(step)
            state = hooks.after_step(step, state)

            if step % settings.log_every_steps == 0 or step == settings.total_steps:
                scalars = mean_metrics(interval)
                interval = []
                scalars["images_per_second"] = progress.images_per_second(step)
                scalars.update(hooks.scalars(step, state))
                writer.write_scalars(step, scalars)
                progress.log(step, {k: scalars[k] for k in settings.console_metrics if k in scalars},
                             scalars["images_per_second"])
                hooks.after_log(step, scalars)
            hooks.periodic(step, state, writer)

            halting = settings.halt_after_steps > 0 and step - start_step >= settings.halt_after_steps
            if checkpointer.should_save(step) or step == settings.total_steps or halting:
                check_finite(*pending, settings.finite_metrics)
                checkpointer.save(step, state, iterator)
                clock.record(step)
            if halting and step < settings.total_steps:
                logging.info("Halting at step %d (config.halt_after_steps); rerun the same command to resume.", step)
                return state, False
    finally:
        checkpointer.wait()
        checkpointer.close()
        writer.flush()
    return state, True

