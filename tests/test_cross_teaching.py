"""The cross-teaching step: SGD as PyTorch's, learning on a tiny task, no gradient through pseudo-labels, the
supervised-only variant, and 2 devices giving the losses of 1.

Test-sized networks (unet_ssl4mis_narrow, swin_unet_micro) at 64 px, batches of 2 + 2, compiled at XLA backend
optimisation level 0 (compile time dominates on CPU).
"""

import functools
import os
import pickle
import subprocess
import sys
import textwrap
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import Mesh

from cass_jax import parallel
from cass_jax.segmentation import cross_teaching as ct

REPO = Path(__file__).resolve().parents[1]
FAST_COMPILE = {"xla_backend_optimization_level": 0}
SIZE, CLASSES, STEPS = 64, 3, 8
CONFIG = ct.CrossTeachingConfig(cnn="unet_ssl4mis_narrow", transformer="swin_unet_micro", image_size=SIZE,
                                num_classes=CLASSES, base_lr=0.05, max_iterations=1000)


def synthetic_batch(seed: int, labeled: int = 2, unlabeled: int = 2) -> dict[str, np.ndarray]:
    """Noisy images with a bright disc (class 1) and a mid-gray square (class 2), their masks, and unlabelled ones."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:SIZE, :SIZE]
    images, masks = [], []
    for _ in range(labeled + unlabeled):
        mask = np.zeros((SIZE, SIZE), np.int32)
        top, left = rng.integers(4, 30, 2)
        mask[top:top + 20, left:left + 20] = 2
        cy, cx = rng.integers(16, 48, 2)
        mask[(yy - cy) ** 2 + (xx - cx) ** 2 < rng.integers(36, 100)] = 1
        image = np.choose(mask, [0.1, 0.9, 0.5]) + 0.08 * rng.standard_normal((SIZE, SIZE))
        images.append(image[..., None].astype(np.float32))
        masks.append(mask)
    return {"labeled_image": np.stack(images[:labeled]), "labeled_mask": np.stack(masks[:labeled]),
            "unlabeled_image": np.stack(images[labeled:])}


def host_state(state: ct.CrossTeachingState) -> dict:
    """The state as NumPy (key as raw data), picklable for another process."""
    return jax.device_get({"step": state.step, "params": state.params, "batch_stats": state.batch_stats,
                           "opt_state": state.opt_state, "rng": jax.random.key_data(state.rng)})


def numpy_leaves(tree) -> np.ndarray:
    return np.concatenate([np.ravel(np.asarray(leaf, np.float64)) for leaf in jax.tree.leaves(tree)])


TWO_DEVICE_SCRIPT = textwrap.dedent("""
    import pickle, sys
    import jax, numpy as np
    from jax.sharding import Mesh
    sys.path[:0] = [sys.argv[1], sys.argv[1] + "/tests"]
    from cass_jax import parallel
    from cass_jax.segmentation import cross_teaching as ct
    from test_cross_teaching import CONFIG, FAST_COMPILE, synthetic_batch

    assert jax.device_count() == 2, jax.devices()
    with open(sys.argv[2], "rb") as handle:
        start = pickle.load(handle)
    state = ct.CrossTeachingState(step=start["step"], params=start["params"], batch_stats=start["batch_stats"],
                                  opt_state=start["opt_state"], rng=jax.random.wrap_key_data(start["rng"]))
    mesh = Mesh(np.asarray(jax.devices()), ("data",))
    state = jax.device_put(state, parallel.replicated(mesh))
    step = ct.jit_train_step(ct.build_networks(CONFIG), mesh, compiler_options=FAST_COMPILE)
    metrics = []
    for i in range(2):
        state, step_metrics = step(state, synthetic_batch(0), jax.random.fold_in(jax.random.key(1), i))
        metrics.append(jax.device_get(step_metrics))
    with open(sys.argv[3], "wb") as handle:
        pickle.dump({"metrics": metrics, "params": jax.device_get(state.params),
                     "batch_stats": jax.device_get(state.batch_stats)}, handle)
""")


def start_two_device_run(start: dict, folder: Path) -> subprocess.Popen:
    """Two steps from `start` on a 2-device mesh, in a subprocess that compiles while this process goes on."""
    with open(folder / "start.pkl", "wb") as handle:
        pickle.dump(start, handle)
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=2", "JAX_PLATFORMS": "cpu"}
    with open(folder / "log.txt", "w") as log:  # a file, not a pipe: a full pipe would stall the process
        return subprocess.Popen([sys.executable, "-c", TWO_DEVICE_SCRIPT, str(REPO), str(folder / "start.pkl"),
                                 str(folder / "outputs.pkl")], stdout=log, stderr=subprocess.STDOUT, env=env)


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """Cross teaching on one fixed batch for STEPS steps (1-device mesh); the 2-device run starts from its state."""
    networks = ct.build_networks(CONFIG)
    state = ct.init(CONFIG, jax.random.key(0), networks)
    folder = tmp_path_factory.mktemp("two_devices")
    process = start_two_device_run(host_state(state), folder)
    mesh = Mesh(np.asarray(jax.devices()[:1]), ("data",))
    state = jax.device_put(state, parallel.replicated(mesh))
    step = ct.jit_train_step(networks, mesh, compiler_options=FAST_COMPILE)
    batch = synthetic_batch(0)
    history, after_two = [], None
    first_batch_stats = jax.device_get(state.batch_stats)
    for i in range(STEPS):
        state, metrics = step(state, batch, jax.random.fold_in(jax.random.key(1), i))
        history.append(jax.device_get(metrics))
        if i == 1:
            after_two = host_state(state)
    yield {"networks": networks, "history": history, "after_two": after_two, "state": state,
           "first_batch_stats": first_batch_stats, "two_devices": (process, folder)}
    if process.poll() is None:
        process.kill()
        process.wait()


def test_cross_teaching_lowers_the_loss(run):
    first, last = run["history"][0], run["history"][-1]
    assert float(last["loss"]) < 0.9 * float(first["loss"]), [float(m["loss"]) for m in run["history"]]
    for name in ct.NETWORKS:
        assert float(last[f"{name}/supervised_loss"]) < float(first[f"{name}/supervised_loss"]), name
        assert np.isfinite(float(last[f"{name}/pseudo_label_loss"]))
        expected = float(first[f"{name}/supervised_loss"]) + float(first["consistency_weight"]) * float(
            first[f"{name}/pseudo_label_loss"])
        assert float(first[f"{name}/loss"]) == pytest.approx(expected, rel=1e-6)
        assert float(first[f"{name}/supervised_loss"]) == pytest.approx(
            0.5 * (float(first[f"{name}/cross_entropy"]) + float(first[f"{name}/dice_loss"])), rel=1e-6)
    assert float(first["consistency_weight"]) == pytest.approx(0.1 * np.exp(-5.0), rel=1e-6)  # step 0 // 150 = 0
    assert [float(m["learning_rate"]) for m in run["history"][:2]] == pytest.approx(
        [0.05, 0.05 * (1 - 1 / 1000) ** 0.9], rel=1e-6)
    assert int(run["state"].step) == STEPS
    final_stats = jax.device_get(run["state"].batch_stats["cnn"])
    assert np.abs(numpy_leaves(final_stats) - numpy_leaves(run["first_batch_stats"]["cnn"])).max() > 0


def test_evaluate_scores_both_networks_per_volume(run, tmp_path):
    """The trained tiny networks, evaluated on two 2-slice volumes of the synthetic task (slices 40x48 -> 64 px)."""
    from PIL import Image
    from cass_jax.segmentation.data import ACDC_STEM_PATTERN, folder_pairs

    for folder in ("images", "masks"):
        (tmp_path / folder).mkdir()
    batch = synthetic_batch(5, labeled=4, unlabeled=1)
    for i, (image, mask) in enumerate(zip(batch["labeled_image"], batch["labeled_mask"])):
        stem = f"patient001_frame{i // 2 + 1:02d}_slice{i % 2 + 1:02d}"
        Image.fromarray(np.clip(np.rint(image[4:44, 8:56, 0] * 255), 0, 255).astype(np.uint8)).save(
            tmp_path / "images" / f"{stem}.png")
        Image.fromarray(mask[4:44, 8:56].astype(np.uint8)).save(tmp_path / "masks" / f"{stem}.png")
    source = folder_pairs(tmp_path, num_classes=CLASSES, stem_pattern=ACDC_STEM_PATTERN)
    results = ct.evaluate(run["state"], source, run["networks"], batch_size=2)
    for name in ct.NETWORKS:
        assert sorted(results[name]["volumes"]) == ["patient001_frame01", "patient001_frame02"]
        summary = results[name]["summary"]
        assert 0.0 <= summary["volume/dice/mean"] <= 1.0 and 0.0 <= summary["volume/iou/mean"] <= 1.0
        assert summary["volume/iou/mean"] <= summary["volume/dice/mean"]
        assert {f"volume/{m}/class_{c}" for m in ("dice", "iou", "hd95") for c in (1, 2)} <= set(summary)


def test_sgd_poly_is_pytorch_sgd_with_weight_decay():
    """NumPy torch.optim.SGD(momentum=0.9, weight_decay=1e-4) with lr set to lr * (1 - t / T) ** 0.9 before step t."""
    config = ct.CrossTeachingConfig(base_lr=0.01, max_iterations=10)
    optimizer = ct.sgd_poly(config)
    rng = np.random.default_rng(0)
    params = {"w": rng.standard_normal((3, 4)).astype(np.float32), "b": rng.standard_normal(4).astype(np.float32)}
    state = optimizer.init(params)
    reference = {k: v.astype(np.float64) for k, v in params.items()}
    buffers = {}
    for t in range(4):
        grads = {k: rng.standard_normal(v.shape).astype(np.float32) for k, v in params.items()}
        updates, state = optimizer.update(grads, state, params)
        params = optax.apply_updates(params, updates)
        lr = 0.01 * (1 - t / 10) ** 0.9
        for k in reference:
            d_p = grads[k] + 1e-4 * reference[k]
            buffers[k] = d_p if t == 0 else 0.9 * buffers[k] + d_p
            reference[k] = reference[k] - lr * buffers[k]
        assert float(ct.learning_rate(config, t)) == pytest.approx(lr, rel=1e-6)
    for k in reference:
        np.testing.assert_allclose(params[k], reference[k], rtol=1e-5, atol=1e-6)


@functools.cache
def two_unets():
    """A cheaper pair (two narrow U-Nets) for properties of the loss wiring that do not depend on the architectures."""
    config = ct.CrossTeachingConfig(cnn="unet_ssl4mis_narrow", transformer="unet_ssl4mis_narrow",
                                    image_size=SIZE, num_classes=CLASSES, base_lr=0.05, max_iterations=1000)
    networks = ct.build_networks(config)
    return networks, ct.init(config, jax.random.key(2), networks)


def test_pseudo_labels_carry_no_gradient():
    """d(network A's pseudo-label loss)/d(network B's parameters) is exactly 0; d/d(A's own) is not."""
    networks, state = two_unets()
    batch = synthetic_batch(1)

    def pseudo_label_loss(params, name):
        _, (_, terms) = ct.segmentation_losses(params, state.batch_stats, batch, jax.random.key(3), jnp.float32(1.0),
                                               networks=networks)
        return terms[name]["pseudo_label_loss"]

    grads = jax.jit(lambda p: {name: jax.grad(pseudo_label_loss)(p, name) for name in ct.NETWORKS},
                    compiler_options=FAST_COMPILE)(state.params)
    for name, other in zip(ct.NETWORKS, reversed(ct.NETWORKS)):
        assert np.linalg.norm(numpy_leaves(grads[name][name])) > 1e-6, name
        assert not numpy_leaves(grads[name][other]).any(), (name, other)


def test_supervised_step_ignores_unlabelled_images():
    networks, state = two_unets()
    batch = synthetic_batch(2)
    labelled_only = {key: batch[key] for key in ("labeled_image", "labeled_mask")}
    step = jax.jit(functools.partial(ct.supervised_step, networks=networks), compiler_options=FAST_COMPILE)
    new_state, metrics = step(state, labelled_only, jax.random.key(4))
    assert not any("pseudo" in key for key in metrics) and "consistency_weight" not in metrics
    assert float(metrics["loss"]) == pytest.approx(
        sum(float(metrics[f"{name}/supervised_loss"]) for name in ct.NETWORKS), rel=1e-6)
    assert int(new_state.step) == 1
    assert np.abs(numpy_leaves(new_state.params) - numpy_leaves(state.params)).max() > 0


def test_two_devices_match_one_device(run):
    """The same two steps on a 2-device mesh (batch split 1 + 1 per device) give the 1-device losses and updates."""
    process, folder = run["two_devices"]
    process.wait(timeout=600)
    assert process.returncode == 0, (folder / "log.txt").read_text()[-3000:]
    with open(folder / "outputs.pkl", "rb") as handle:
        two = pickle.load(handle)
    for one_metrics, two_metrics in zip(run["history"][:2], two["metrics"]):
        for key in ("loss", "cnn/loss", "transformer/loss", "cnn/pseudo_label_loss", "pseudo_label_agreement"):
            np.testing.assert_allclose(two_metrics[key], one_metrics[key], rtol=1e-5, err_msg=key)
    for key in ("params", "batch_stats"):
        np.testing.assert_allclose(numpy_leaves(two[key]), numpy_leaves(run["after_two"][key]), rtol=1e-4, atol=1e-6)
