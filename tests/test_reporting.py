"""Console output of long runs: the ETA leaves out compilation, and library INFO lines stay hidden."""

import logging

import numpy as np
import pytest

from cass_jax import reporting


def test_eta_uses_the_rate_after_compilation(monkeypatch):
    clock = iter([0.0, 30.0, 32.0, 32.0, 32.0, 32.0])  # construction, compiled at step 1, then step 11 thrice
    monkeypatch.setattr(reporting.time, "monotonic", lambda: next(clock))
    progress = reporting.ProgressLine(total_steps=101, global_batch_size=4)
    assert np.isnan(progress.mean_images_per_second(1))  # nothing timed yet (reads no clock)
    progress.compiled(1)  # the first step took 30 s: compilation
    assert progress.mean_images_per_second(11) == pytest.approx(10 * 4 / 2.0)  # what pretraining.json records
    assert progress.images_per_second(11) == pytest.approx(10 * 4 / 2.0)
    assert progress.eta_seconds(11, images_per_second=1.0) == pytest.approx(90 * 0.2)  # 0.2 s per step since
    assert "ETA 00:00:18" in progress.line(11, {"loss": 1.0}, 20.0)


def test_eta_forgets_a_pause_after_the_window(monkeypatch):
    now = [0.0]
    monkeypatch.setattr(reporting.time, "monotonic", lambda: now[0])
    progress = reporting.ProgressLine(total_steps=1001, global_batch_size=4, eta_window=3)
    progress.compiled(1)
    step_etas = []
    for step in range(11, 102, 10):  # 10 steps every 2 s, except a 1000 s pause before step 21
        now[0] += 1002.0 if step == 21 else 2.0
        progress.images_per_second(step)
        step_etas.append(progress.eta_seconds(step, images_per_second=1.0))
    assert step_etas[0] == pytest.approx(990 * 0.2)
    assert step_etas[1] > 10 * step_etas[0]  # the pause is in the window
    assert step_etas[-1] == pytest.approx((1001 - 101) * 0.2)  # three intervals later it is not
    assert progress.mean_images_per_second(101) == pytest.approx(100 * 4 / 1020.0)  # the whole run's rate keeps it


def test_eta_before_compilation_is_marked_uses_the_given_rate():
    progress = reporting.ProgressLine(total_steps=10, global_batch_size=2)
    assert progress.eta_seconds(5, images_per_second=1.0) == pytest.approx(10.0)


def _record(path: str, level: int) -> logging.LogRecord:
    return logging.LogRecord("absl", level, path, 1, "message", None, None)


def test_library_info_lines_are_dropped_and_warnings_kept():
    absl_logger = logging.getLogger("absl")
    reporting.quiet_library_logs()
    reporting.quiet_library_logs()  # idempotent: one filter
    try:
        filters = [f for f in absl_logger.filters if isinstance(f, reporting._LibraryInfoFilter)]
        assert len(filters) == 1
        orbax = "/site-packages/orbax/checkpoint/checkpoint_manager.py"
        assert not absl_logger.filter(_record(orbax, logging.INFO))
        assert absl_logger.filter(_record(orbax, logging.WARNING))
        assert not absl_logger.filter(_record("/site-packages/clu/platform/local.py", logging.INFO))
        assert absl_logger.filter(_record("/repo/cass_jax/pretrain.py", logging.INFO))
    finally:
        reporting.quiet_library_logs(False)
    assert absl_logger.filter(_record(orbax, logging.INFO))
