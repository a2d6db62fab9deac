"""CASS pretraining end to end with tiny arms: learning, TensorBoard, export, resume, errors, real data."""

import functools
import os
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

from cass_jax.models import create_model
from cass_jax.port import load_variables
from cass_jax.pretrain import pretrain, read_exports, read_pretraining_record
from configs.common import base_config, tiny_arms

REPO = Path(__file__).resolve().parents[1]
BRAIN_MRI = REPO.parent / "shared" / "data" / "brain_mri_small"


def tiny_config(image_size: int = 128, num_images: int = 64, synthetic_size: int = 128, **overrides):
    """Tiny arms on 64 synthetic phantoms at 128 px: 6 steps per epoch of 8 images; `overrides` set dotted keys."""
    c = base_config()
    tiny_arms(c, image_size=image_size)
    c.data.source = "synthetic"
    c.data.synthetic_num_images = num_images
    c.data.synthetic_size = synthetic_size
    c.batch_size = 8
    c.num_epochs = 2
    c.log_every_steps = 1
    c.checkpoint_every_steps = 1000
    c.swa.start_fraction = 0.5
    for key, value in overrides.items():
        node = c
        *path, last = key.split(".")
        for part in path:
            node = node[part]
        node[last] = value
    return c


def read_events(logdir: Path) -> tuple[dict[str, list[float]], set[str]]:
    """Scalar series and all tags from the TensorBoard event files in `logdir`."""
    import tensorflow as tf
    scalars, tags = {}, set()
    for path in sorted(logdir.glob("events.out.tfevents.*")):
        for event in tf.compat.v1.train.summary_iterator(str(path)):
            for value in event.summary.value:
                tags.add(value.tag)
                if value.metadata.plugin_data.plugin_name == "scalars":
                    scalars.setdefault(value.tag, []).append(float(tf.make_ndarray(value.tensor)))
    return scalars, tags


def final_state_params(workdir: Path) -> dict:
    manager = ocp.CheckpointManager(workdir / "checkpoints")
    step = manager.latest_step()
    restored = ocp.StandardCheckpointer().restore(workdir / "checkpoints" / str(step) / "state")
    return restored["params"]


def test_pretraining_learns_logs_and_exports(tmp_path):
    config = tiny_config(num_epochs=4, **{"optim.schedule": "constant"})
    exports = pretrain(config, tmp_path)

    scalars, tags = read_events(tmp_path)
    losses = scalars["loss"]
    assert len(losses) == 24
    assert np.mean(losses[-4:]) < 0.5 * np.mean(losses[:4]), losses
    for tag in ("loss", "cosine", "lr/cnn", "lr/vit", "grad_norm/cnn", "grad_norm/vit", "param_norm/vit",
                "collapse/cnn_std", "collapse/vit_pairwise_cosine", "images_per_second", "steps_per_sec"):
        assert tag in scalars, tag
    assert "augmented_inputs" in tags

    assert set(exports) == {"cnn", "vit"}
    assert exports["cnn"]["swa_snapshots"] == 2          # epochs 3 and 4 of 4
    assert read_exports(tmp_path) == exports
    params = final_state_params(tmp_path)
    images = np.random.default_rng(0).normal(size=(2, 128, 128, 3)).astype(np.float32)
    for arm in ("cnn", "vit"):
        model = create_model(exports[arm]["name"], num_classes=exports[arm]["num_classes"],
                             **({"img_size": 128} if arm == "vit" else {}))
        exported = load_variables(exports[arm]["raw"])
        np.testing.assert_array_equal(
            np.asarray(model.apply(exported, images, train=False)),
            np.asarray(model.apply({**exported, "params": params[arm]}, images, train=False)))
        averaged = load_variables(exports[arm]["swa"])
        assert jax.tree.structure(averaged["params"]) == jax.tree.structure(exported["params"])
        assert np.isfinite(np.asarray(model.apply(averaged, images, train=False))).all()


@pytest.mark.parametrize("workers", [0, 2])
def test_resume_gives_identical_parameters(tmp_path, workers):
    config = functools.partial(tiny_config, **{"data.workers": workers})
    uninterrupted = pretrain(config(), tmp_path / "straight")
    assert pretrain(config(halt_after_steps=5), tmp_path / "resumed") is None
    assert ocp.CheckpointManager(tmp_path / "resumed" / "checkpoints").latest_step() == 5
    resumed = pretrain(config(), tmp_path / "resumed")
    for arm in ("cnn", "vit"):
        for kind in ("raw", "swa"):
            a, b = load_variables(uninterrupted[arm][kind]), load_variables(resumed[arm][kind])
            jax.tree.map(np.testing.assert_array_equal, a, b)
    timing = read_pretraining_record(tmp_path / "resumed")
    assert timing["start_step"] == 5 and timing["wall_seconds"] > timing["invocation_wall_seconds"] > 0


def test_missing_weights_file_is_reported_before_compiling(tmp_path):
    config = tiny_config(**{"cnn.init": str(tmp_path / "nope.msgpack")})
    with pytest.raises(FileNotFoundError, match=r"config.cnn.init=.*nope.msgpack.*cass_jax.port"):
        pretrain(config, tmp_path)


def run_main(*args, env=None, timeout=600):
    return subprocess.run([sys.executable, str(REPO / "main.py"), *args], cwd=REPO, capture_output=True,
                          text=True, timeout=timeout, env={**os.environ, **(env or {})})


def test_cli_rejects_unknown_config_key():
    result = run_main("--config=configs/demo.py", "--config.batch_sise=1", "--workdir=/tmp/unused")
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        "error: unknown config key 'batch_sise' Did you mean \"batch_size\" instead of \"batch_sise\"? "
        "(in --config.batch_sise=1); the keys are listed in configs/common.py and the config file."]


def test_cli_missing_dataset_dir_is_one_clear_line(tmp_path):
    result = run_main("--config=configs/cass_brain_mri.py:smoke", f"--config.data.path={tmp_path / 'absent'}",
                      f"--workdir={tmp_path / 'run'}")
    assert result.returncode == 2
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("error:") and "absent" in last, result.stderr[-2000:]


@pytest.mark.skipif(not BRAIN_MRI.is_dir(), reason="../shared/data/brain_mri_small is absent")
def test_real_brain_mri_smoke_run(tmp_path):
    result = run_main("--config=configs/cass_brain_mri.py:smoke", f"--config.data.path={BRAIN_MRI}",
                      "--config.mode=pretrain", "--config.halt_after_steps=12", f"--workdir={tmp_path}")
    assert result.returncode == 0, result.stderr[-3000:]
    assert "step 10/" in result.stderr
    assert ocp.CheckpointManager(tmp_path / "checkpoints").latest_step() == 12


def test_non_finite_loss_stops_with_the_step_and_keeps_a_good_checkpoint(tmp_path):
    config = tiny_config(checkpoint_every_steps=1, **{"optim.cnn_lr": 1e30, "optim.vit_lr": 1e30,
                                                       "optim.schedule": "constant"})
    with pytest.raises(FloatingPointError, match=r"Non-finite .*at step (\d+)") as error:
        pretrain(config, tmp_path)
    bad_step = int(__import__("re").search(r"step (\d+)", str(error.value)).group(1))
    last_saved = ocp.CheckpointManager(tmp_path / "checkpoints").latest_step()
    assert last_saved == bad_step - 1
    params = final_state_params(tmp_path)
    assert all(np.isfinite(leaf).all() for leaf in jax.tree.leaves(params))


def test_bfloat16_compute_keeps_float32_parameters():
    from cass_jax.methods.cass import build_arms, initial_state, train_step
    config = tiny_config(dtype="bfloat16")
    arms = build_arms(config, total_steps=10, steps_per_epoch=5)
    state = initial_state(config, arms)
    images = np.random.default_rng(0).normal(size=(4, 128, 128, 3)).astype(np.float32)
    state, metrics = jax.jit(functools.partial(train_step, arms=arms))(state, {"image": images})
    assert np.isfinite(float(metrics["loss"]))
    assert {leaf.dtype for leaf in jax.tree.leaves(state.params)} == {np.dtype("float32")}


@pytest.mark.parametrize(("loss_weights", "expect_warning"), [
    ({}, True),                                                  # the paper's loss: the ViT arm collapses
    ({"loss.variance_weight": 25.0, "loss.covariance_weight": 1.0}, False),
])
def test_collapse_warning_fires_for_the_papers_loss_not_with_the_variance_stabiliser(
        tmp_path, caplog, loss_weights, expect_warning):
    # Measured on these 30 steps: the paper's ViT spread falls to ~4% of its step-0 value (threshold 10%);
    # with the VICReg terms both arms stay above ~50%.
    config = tiny_config(batch_size=16, num_epochs=10, log_every_steps=3, **{"optim.schedule": "constant"},
                         **loss_weights)
    with caplog.at_level("WARNING"):
        pretrain(config, tmp_path)
    fired = [r.getMessage() for r in caplog.records if "Possible collapse" in r.getMessage()]
    assert bool(fired) == expect_warning, fired
