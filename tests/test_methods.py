"""DINO and Barlow Twins through the one pretraining driver: exact resume, the real steps' EMA, freezing and
partial training, exports downstream can load, and 2 devices matching 1 for every method (tiny models, 32-64 px)."""

import functools
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
import pytest

from cass_jax.methods import barlow_twins, dino, dino_parts
from cass_jax.models import create_model
from cass_jax.port import load_variables
from cass_jax.pretrain import pretrain, read_exports
from tests.test_pretrain import tiny_config as pretrain_tiny_config

REPO = Path(__file__).resolve().parents[1]


def tiny_config(method: str, image_size: int = 32, **overrides):
    """Tiny arms, small heads and crops, 24 synthetic phantoms: 3 steps per epoch of 8 images, 2 epochs."""
    small_heads = {"method": method, "dino.out_dim": 128, "dino.hidden_dim": 32, "dino.bottleneck_dim": 16,
                   "dino.local_crops_number": 2, "barlow_twins.projector": (64, 64, 64)}
    return pretrain_tiny_config(image_size=image_size, num_images=24, synthetic_size=64,
                                **{**small_heads, **overrides})


def changed_leaves(before, after) -> dict[str, bool]:
    """For each leaf path: whether any bit differs."""
    flat_after = dict(jax.tree_util.tree_flatten_with_path(after)[0])
    return {jax.tree_util.keystr(path): not np.array_equal(np.asarray(value).view(np.uint32),
                                                           np.asarray(flat_after[path]).view(np.uint32))
            for path, value in jax.tree_util.tree_flatten_with_path(before)[0]}


@pytest.mark.parametrize("method, overrides", [
    ("dino", {}),  # crosses the end of the frozen-last-layer epoch
    ("barlow_twins", {"barlow_twins.protocol": "further"}),  # crosses from projector-only to full training
])
def test_kill_and_resume_gives_identical_exports(tmp_path, method, overrides):
    config = functools.partial(tiny_config, method, **overrides)
    straight = pretrain(config(), tmp_path / "straight")
    assert pretrain(config(halt_after_steps=2), tmp_path / "resumed") is None
    assert ocp.CheckpointManager(tmp_path / "resumed" / "checkpoints").latest_step() == 2
    resumed = pretrain(config(), tmp_path / "resumed")
    arm = "vit" if method == "dino" else "cnn"
    assert set(straight) == {arm} and straight[arm]["method"] == method and straight[arm]["num_classes"] == 0
    for kind in ("raw", "swa"):
        jax.tree.map(np.testing.assert_array_equal, load_variables(straight[arm][kind]),
                     load_variables(resumed[arm][kind]))
    # The export is a plain backbone: the registry model without a head reads it, as downstream.init does.
    exported = load_variables(straight[arm]["raw"])
    assert "head" not in exported["params"] and "projector" not in exported["params"]
    kwargs = {"img_size": straight[arm]["image_size"]} if arm == "vit" else {}
    model = create_model(straight[arm]["name"], num_classes=0, **kwargs)
    features = model.apply(exported, jnp.zeros((2, 32, 32, 3)))
    assert features.shape == (2, model.num_features) and read_exports(tmp_path / "straight") == straight


def random_batch(keys_and_sizes, batch_size, seed):
    rng = np.random.default_rng(seed)
    return {key: jnp.asarray(rng.normal(size=(batch_size, size, size, 3)), jnp.float32)
            for key, size in keys_and_sizes}


def test_dino_step_updates_the_teacher_by_ema_and_freezes_the_last_layer_for_the_first_epoch():
    # A large lr without warm-up and a low momentum, so that every update is far above rounding.
    config = tiny_config("dino", **{"dino.arm": "cnn", "dino.lr": 10.0, "dino.warmup_epochs": 0,
                                    "dino.momentum_teacher": 0.9})
    method = dino.build(config, total_steps=6, steps_per_epoch=2)
    step = jax.jit(method.train_step)
    crops = [(key, 32 if key.startswith("global") else 16) for key in method.views.image_keys]
    initial = method.initial_state()
    states = [initial]
    for i in range(3):
        state, metrics = step(states[-1], random_batch(crops, 4, seed=i))
        assert np.isfinite(float(metrics["loss"]))
        states.append(state)

    before, after = states[1], states[2]  # step 1: teacher and student differ by now
    expected = dino_parts.ema_update(before.teacher_params, after.params, method.teacher_momentums[1])
    not_expected = dino_parts.ema_update(before.teacher_params, before.params, method.teacher_momentums[1])
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7), after.teacher_params, expected)
    assert max(float(jnp.abs(a - b).max()) for a, b in zip(jax.tree.leaves(expected),
                                                           jax.tree.leaves(not_expected))) > 1e-3
    # The teacher's BatchNorm statistics come from its own forward passes, not from the student.
    assert any(changed_leaves(before.teacher_batch_stats, after.teacher_batch_stats).values())

    head = [s.params["head"] for s in states]
    for frozen in head[1:3]:  # epoch 0: steps 0 and 1
        np.testing.assert_array_equal(frozen["last_layer_v"], head[0]["last_layer_v"])
        assert changed_leaves(head[0]["mlp_0"], frozen["mlp_0"])["['kernel']"]
    assert not np.array_equal(head[2]["last_layer_v"], head[3]["last_layer_v"])  # epoch 1 trains it
    np.testing.assert_array_equal(head[3]["last_layer_g"], 1.0)  # norm_last_layer: never trained


def test_barlow_twins_projector_epoch_freezes_the_encoder_then_partial_mode_trains_only_the_final_block():
    config = tiny_config("barlow_twins", **{"barlow_twins.protocol": "further", "barlow_twins.further_mode": "partial",
                                            "barlow_twins.sparsity": "group"})
    method = barlow_twins.build(config, total_steps=6, steps_per_epoch=2)
    step = jax.jit(method.train_step)
    views = [(key, 32) for key in method.views.image_keys]
    states = [method.initial_state()]
    for i in range(3):
        state, metrics = step(states[-1], random_batch(views, 4, seed=i))
        assert float(metrics["loss/sparsity"]) > 0
        states.append(state)
    encoders = [s.params["encoder"] for s in states]
    for frozen in encoders[1:3]:  # the projector-only epoch: no encoder parameter moves, not by one bit
        assert not any(changed_leaves(encoders[0], frozen).values())
    assert all(changed_leaves(states[0].params["projector"], states[1].params["projector"]).values())
    # BatchNorm statistics still update in the frozen epoch (fastai trains in train mode).
    assert any(changed_leaves(states[0].batch_stats["encoder"], states[1].batch_stats["encoder"]).values())
    moved = {path for path, changed in changed_leaves(encoders[2], encoders[3]).items() if changed}
    final_block = {path for path in changed_leaves(encoders[2], encoders[3]) if path.startswith("['layer4_0']")}
    # (Not every kernel of the block moves at once: its last BatchNorm scale starts at 0, timm's zero_init_last.)
    assert moved <= final_block and any(path.endswith("['kernel']") for path in moved)


TWO_DEVICE_SCRIPT = textwrap.dedent("""
    import sys
    import jax, numpy as np
    from jax.sharding import Mesh, NamedSharding, PartitionSpec
    sys.path.insert(0, sys.argv[1])
    sys.path.insert(0, sys.argv[1] + "/tests")
    from test_methods import random_batch, tiny_config
    from cass_jax.pretrain import build_method

    assert jax.device_count() == 2, jax.devices()
    for name in ("dino", "barlow_twins"):  # CASS: tests/test_pretrain_parallel.py (4 devices)
        method = build_method(tiny_config(name, **{"barlow_twins.protocol": "further"}), 4, 1)
        sizes = [(key, 16 if key.startswith("local") else 32) for key in method.views.image_keys]
        batches = [random_batch(sizes, 4, seed) for seed in range(2)]

        def run(devices):
            mesh = Mesh(np.asarray(devices), ("data",))
            replicated, sharded = NamedSharding(mesh, PartitionSpec()), NamedSharding(mesh, PartitionSpec("data"))
            step = jax.jit(method.train_step, in_shardings=(replicated, sharded),
                           out_shardings=(replicated, replicated))
            state, losses = jax.device_put(method.initial_state(), replicated), []
            for batch in batches:
                state, metrics = step(state, jax.device_put(batch, sharded))
                losses.append(float(metrics["loss"]))
            return losses

        one, two = run(jax.devices()[:1]), run(jax.devices())
        np.testing.assert_allclose(one, two, rtol=1e-5)
        print("MATCHED", name, one, two)
""")


def test_dino_and_barlow_twins_give_the_same_loss_on_two_devices_as_on_one():
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=2", "JAX_PLATFORMS": "cpu"}
    result = subprocess.run([sys.executable, "-c", TWO_DEVICE_SCRIPT, str(REPO)], capture_output=True, text=True,
                            timeout=600, env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    assert [line.split()[1] for line in result.stdout.splitlines() if line.startswith("MATCHED")] == [
        "dino", "barlow_twins"]


def test_dino_optimizer_is_chosen_by_config():
    with pytest.raises(ValueError, match="config.dino.optimizer='lars'"):
        dino.build(tiny_config("dino", **{"dino.optimizer": "lars"}), 6, 3)

    def optimizer_states(optimizer: str) -> set[type]:
        method = dino.build(tiny_config("dino", **{"dino.optimizer": optimizer}), 6, 3)
        kinds = (optax.TraceState, optax.ScaleByAdamState)
        leaves = jax.tree.leaves(method.initial_state().opt_state, is_leaf=lambda x: isinstance(x, kinds))
        return {type(leaf) for leaf in leaves if isinstance(leaf, kinds)}

    assert optimizer_states("adamw") == {optax.ScaleByAdamState}
    assert optimizer_states("sgd") == {optax.TraceState}


def test_method_is_chosen_by_config_and_unknown_names_are_refused(tmp_path):
    with pytest.raises(ValueError, match="config.method='byol'"):
        pretrain(tiny_config("byol"), tmp_path)
    with pytest.raises(ValueError, match="further_mode='last'"):
        barlow_twins.build(tiny_config("barlow_twins", **{"barlow_twins.further_mode": "last"}), 6, 3)
