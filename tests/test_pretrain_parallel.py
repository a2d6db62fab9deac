"""Data parallelism: 4 local devices match 1, and two processes joined by jax.distributed match one."""

import os
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import jax
import numpy as np

from cass_jax.port import load_variables

REPO = Path(__file__).resolve().parents[1]

MULTI_DEVICE_SCRIPT = textwrap.dedent("""
    import functools, sys
    import jax, numpy as np
    from jax.sharding import Mesh, NamedSharding, PartitionSpec
    sys.path.insert(0, sys.argv[1])
    from configs.common import base_config, tiny_arms
    from cass_jax.methods.cass import build_arms, initial_state, train_step

    assert jax.device_count() == 4, jax.devices()
    config = base_config()
    tiny_arms(config, image_size=128)
    config.batch_size = 8
    arms = build_arms(config, total_steps=10, steps_per_epoch=5)
    rng = np.random.default_rng(0)
    batches = [{"image": rng.normal(size=(8, 128, 128, 3)).astype(np.float32)} for _ in range(2)]

    def run(devices):
        mesh = Mesh(np.asarray(devices), ("data",))
        replicated, sharded = NamedSharding(mesh, PartitionSpec()), NamedSharding(mesh, PartitionSpec("data"))
        step = jax.jit(functools.partial(train_step, arms=arms), in_shardings=(replicated, sharded),
                       out_shardings=(replicated, replicated))
        state = jax.device_put(initial_state(config, arms), replicated)
        for batch in batches:
            state, metrics = step(state, jax.device_put(batch, sharded))
        return jax.device_get((state.params, state.batch_stats, metrics["loss"]))

    (params_1, stats_1, loss_1), (params_4, stats_4, loss_4) = run(jax.devices()[:1]), run(jax.devices())
    np.testing.assert_allclose(loss_1, loss_4, rtol=1e-5)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6), stats_1, stats_4)
    differences = np.concatenate([np.abs(a - b).ravel() for a, b in zip(jax.tree.leaves(params_1),
                                                                      jax.tree.leaves(params_4))])
    # Adam divides by sqrt(v): where a gradient is ~0, fp32 reordering noise can move one element by a
    # fraction of a step (lr 1e-3), so bound the worst element by one step and the mean tightly.
    assert differences.max() < 1e-3 and differences.mean() < 1e-6, (differences.max(), differences.mean())
    print("MATCHED", differences.size, differences.max(), differences.mean())
""")


def test_four_devices_match_one_device():
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=4", "JAX_PLATFORMS": "cpu"}
    result = subprocess.run([sys.executable, "-c", MULTI_DEVICE_SCRIPT, str(REPO)], capture_output=True,
                            text=True, timeout=600, env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "MATCHED" in result.stdout


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


TINY_PRETRAIN_FLAGS = [
    "--config=configs/demo.py", "--config.mode=pretrain", "--config.data.synthetic_num_images=64",
    "--config.data.synthetic_size=128", "--config.batch_size=8", "--config.num_epochs=1",
    "--config.log_every_steps=2",
]


def test_two_processes_match_one_process(tmp_path):
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    env.pop("XLA_FLAGS", None)
    port = free_port()
    workers = [subprocess.Popen(
        [sys.executable, "main.py", *TINY_PRETRAIN_FLAGS, f"--workdir={tmp_path / 'two'}", "--distributed",
         f"--coordinator_address=localhost:{port}", "--num_processes=2", f"--process_id={i}"],
        cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for i in range(2)]
    single = subprocess.run([sys.executable, "main.py", *TINY_PRETRAIN_FLAGS, f"--workdir={tmp_path / 'one'}"],
                            cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    outputs = [w.communicate(timeout=600)[0] for w in workers]
    for worker, output in zip(workers, outputs):
        assert worker.returncode == 0, output[-3000:]
    assert single.returncode == 0, single.stderr[-3000:]
    for i, output in enumerate(outputs):
        assert f"process {i} of 2 reads 4 images of each global batch of 8" in output, output[-3000:]
    for arm in ("cnn", "vit"):
        a = load_variables(tmp_path / "one" / "export" / f"{arm}.msgpack")
        b = load_variables(tmp_path / "two" / "export" / f"{arm}.msgpack")
        differences = np.concatenate([np.abs(x - y).ravel() for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b))])
        # As in the multi-device test: one Adam step (lr 1e-3) bounds the worst element, the mean is tight.
        assert differences.max() < 1e-3 and differences.mean() < 1e-6, (arm, differences.max(), differences.mean())
