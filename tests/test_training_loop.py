"""The shared training loop on a toy regression: exact resume, NaN stop with a good checkpoint, hooks, halting."""

import json
import time

import grain
import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest

from cass_jax.reporting import create_writer
from cass_jax.training_loop import LoopHooks, LoopSettings, TrainingClock, run_loop

TRUE_WEIGHTS = np.asarray([1.5, -2.0, 0.5], np.float32)


def batches(poison_at: int | None = None):
    """Step t's batch depends on t only (grain's iterator state resumes it); `poison_at` makes one batch NaN."""
    def make(index):
        rng = np.random.default_rng(index)
        x = rng.standard_normal((8, 3)).astype(np.float32)
        y = x @ TRUE_WEIGHTS
        if poison_at is not None and index == poison_at - 1:
            y = y * np.nan
        return {"x": x, "y": y}
    return iter(grain.MapDataset.range(10_000).map(make).to_iter_dataset())


@jax.jit
def step(state, batch):
    def loss_fn(w):
        return jnp.mean((batch["x"] @ w - batch["y"]) ** 2)
    loss, grad = jax.value_and_grad(loss_fn)(state["w"])
    return {"w": state["w"] - 0.1 * grad, "step": state["step"] + 1}, {"loss": loss}


def initial():
    return {"w": jnp.zeros(3, jnp.float32), "step": jnp.zeros((), jnp.int32)}


def settings(**overrides):
    values = dict(total_steps=30, batch_size=8, log_every_steps=5, checkpoint_every_steps=10, keep_checkpoints=2)
    return LoopSettings(**{**values, **overrides})


class Recorder(LoopHooks):
    def __init__(self):
        self.calls = []

    def first_batch(self, batch, writer):
        self.calls.append(("first_batch", None))

    def after_log(self, step, scalars):
        self.calls.append(("log", step))
        assert {"loss", "images_per_second", "learning_rate"} <= set(scalars)

    def scalars(self, step, state):
        return {"learning_rate": 0.05}


def test_loop_learns_logs_and_calls_hooks(tmp_path):
    hooks = Recorder()
    state, finished = run_loop(initial(), batches(), step, workdir=tmp_path, settings=settings(),
                               writer=create_writer(tmp_path), hooks=hooks)
    assert finished and int(state["step"]) == 30
    np.testing.assert_allclose(np.asarray(state["w"]), TRUE_WEIGHTS, atol=0.05)
    assert hooks.calls == [("first_batch", None)] + [("log", s) for s in (5, 10, 15, 20, 25, 30)]
    assert ocp.CheckpointManager(tmp_path / "checkpoints").all_steps() == [20, 30]


def test_halt_then_resume_equals_an_uninterrupted_run(tmp_path):
    straight, _ = run_loop(initial(), batches(), step, workdir=tmp_path / "a", settings=settings(),
                           writer=create_writer(tmp_path / "a"))
    state, finished = run_loop(initial(), batches(), step, workdir=tmp_path / "b", settings=settings(halt_after_steps=13),
                               writer=create_writer(tmp_path / "b"))
    assert not finished and int(state["step"]) == 13
    resumed, finished = run_loop(initial(), batches(), step, workdir=tmp_path / "b", settings=settings(),
                                 writer=create_writer(tmp_path / "b"))
    assert finished
    np.testing.assert_array_equal(np.asarray(straight["w"]), np.asarray(resumed["w"]))


def test_a_resumed_run_counts_the_wall_time_of_its_earlier_invocations(tmp_path):
    earlier = TrainingClock(started=time.perf_counter() - 100.0)  # as if set-up had taken 100 s
    run_loop(initial(), batches(), step, workdir=tmp_path, settings=settings(halt_after_steps=13),
             writer=create_writer(tmp_path), clock=earlier)
    recorded = json.loads((tmp_path / "checkpoints" / TrainingClock.FILE).read_text())
    assert set(recorded) == {"10", "13"} and 100.0 <= recorded["10"] <= recorded["13"] < 200.0
    clock = TrainingClock()
    run_loop(initial(), batches(), step, workdir=tmp_path, settings=settings(), writer=create_writer(tmp_path),
             clock=clock)
    assert clock.seconds_before == recorded["13"]
    assert recorded["13"] < clock.seconds() < recorded["13"] + 100.0
    assert json.loads((tmp_path / "checkpoints" / TrainingClock.FILE).read_text())["30"] >= recorded["13"]


def test_a_run_resumed_from_a_checkpoint_without_recorded_time_reports_none(tmp_path):
    run_loop(initial(), batches(), step, workdir=tmp_path, settings=settings(halt_after_steps=10),
             writer=create_writer(tmp_path))
    (tmp_path / "checkpoints" / TrainingClock.FILE).unlink()
    clock = TrainingClock()
    run_loop(initial(), batches(), step, workdir=tmp_path, settings=settings(), writer=create_writer(tmp_path),
             clock=clock)
    assert clock.seconds() is None


def test_non_finite_loss_stops_naming_the_step_and_keeps_the_last_good_checkpoint(tmp_path):
    with pytest.raises(FloatingPointError, match=r"Non-finite loss at step 17 \(loss=nan\)"):
        run_loop(initial(), batches(poison_at=17), step, workdir=tmp_path, settings=settings(checkpoint_every_steps=4),
                 writer=create_writer(tmp_path))
    manager = ocp.CheckpointManager(tmp_path / "checkpoints")
    assert manager.latest_step() == 16
