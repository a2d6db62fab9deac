"""Early stopping, the linear probe's frozen encoder, the fine-tuning step, and init resolution."""

import json
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cass_jax import finetune
from cass_jax.models import create_model, init_variables


def _scripted_fit(losses, patience=5, max_epochs=50):
    def train_epoch(state, epoch):
        return {"epoch": epoch, "weights": np.full(3, float(epoch))}, {"train_loss": 0.0}

    def validate(state, epoch):
        return losses[epoch - 1], {}

    return finetune.fit_with_early_stopping({"epoch": 0, "weights": np.zeros(3)}, train_epoch, validate,
                                            max_epochs, patience)


def test_early_stopping_stops_after_patience_epochs_and_restores_best():
    losses = [1.0, 0.8, 0.9, 0.7, 0.75, 0.8, 0.71, 0.9, 0.72, 0.1, 0.1]
    result = _scripted_fit(losses)
    assert result.best_epoch == 4 and result.best_val_loss == 0.7
    assert result.epochs_run == 9  # epochs 5-9: five without improvement
    assert result.best_state["epoch"] == 4
    np.testing.assert_array_equal(result.best_state["weights"], np.full(3, 4.0))
    assert [row["val_loss"] for row in result.history] == losses[:9]


def test_early_stopping_runs_to_max_epochs_while_improving_and_ignores_nan():
    result = _scripted_fit([5.0, 4.0, math.nan, 3.0, 2.0], patience=2, max_epochs=5)
    assert result.epochs_run == 5 and result.best_epoch == 5
    with pytest.raises(FloatingPointError, match="never finite"):
        _scripted_fit([math.nan] * 3, patience=2, max_epochs=3)


def test_early_stopping_counter():
    stopper = finetune.EarlyStopping(patience=2)
    stopper = stopper.update(1, 1.0)
    assert stopper.improved and not stopper.should_stop
    stopper = stopper.update(2, 1.0)  # equal is not better
    assert not stopper.improved and not stopper.should_stop
    stopper = stopper.update(3, 2.0)
    assert stopper.should_stop and stopper.best_epoch == 1


def _batch(num_classes=3, size=128, n=4, seed=0):
    rng = np.random.default_rng(seed)
    return {"image": jnp.asarray(rng.normal(size=(n, size, size, 3)), jnp.float32),
            "label": jnp.asarray(rng.integers(0, num_classes, size=n))}


SPEC = finetune.LossSpec("focal", multi_label=False, alpha=1.0, gamma=2.0)


def _steps(model, variables, protocol, n_steps=2):
    state = finetune.initial_state(variables, protocol)
    weights = jnp.ones(3)
    for step in range(n_steps):
        state, metrics = finetune.train_step(state, _batch(seed=step), jnp.float32(1e-2), weights,
                                             model=model, protocol=protocol, spec=SPEC)
    assert np.isfinite(float(metrics["loss"]))
    return jax.device_get(state)


def _leaves_equal(a, b):
    return all(np.array_equal(x, y) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))


@pytest.fixture(scope="module")
def resnet():
    model = create_model("resnet_tiny", num_classes=3)
    return model, jax.device_get(init_variables(model, jax.random.PRNGKey(0), 128))


def test_linear_probe_leaves_encoder_and_batch_stats_bit_identical(resnet):
    model, variables = resnet
    state = _steps(model, variables, "linear_probe")
    encoder_before = {k: v for k, v in variables["params"].items() if k != "head"}
    encoder_after = {k: v for k, v in state.params.items() if k != "head"}
    assert _leaves_equal(encoder_before, encoder_after)
    assert _leaves_equal(variables["batch_stats"], state.batch_stats)
    assert not _leaves_equal(variables["params"]["head"], state.params["head"])


def test_finetune_trains_encoder_and_batch_stats(resnet):
    model, variables = resnet
    state = _steps(model, variables, "finetune")
    assert not _leaves_equal(variables["params"]["conv1"], state.params["conv1"])
    assert not _leaves_equal(variables["batch_stats"], state.batch_stats)
    assert not _leaves_equal(variables["params"]["head"], state.params["head"])


def test_linear_probe_on_vit_trains_only_the_head():
    model = create_model("vit_micro_patch16", num_classes=3, img_size=32)
    variables = jax.device_get(init_variables(model, jax.random.PRNGKey(1), 32))
    state = finetune.initial_state(variables, "linear_probe")
    batch = {"image": jnp.ones((2, 32, 32, 3)), "label": jnp.array([0, 2])}
    new_state, _ = finetune.train_step(state, batch, jnp.float32(1e-2), jnp.ones(3), model=model,
                                       protocol="linear_probe", spec=SPEC)
    new_state = jax.device_get(new_state)
    assert _leaves_equal({k: v for k, v in variables["params"].items() if k != "head"},
                         {k: v for k, v in new_state.params.items() if k != "head"})
    assert not _leaves_equal(variables["params"]["head"], new_state.params["head"])


def test_sigmoid_focal_option_is_sigmoid_loss_on_one_hot():
    logits = jnp.array([[2.0, -1.0, 0.5], [0.1, 0.2, 0.3]])
    labels = jnp.array([0, 2])
    weights = jnp.array([0.2, 1.0, 0.5])
    spec = finetune.LossSpec("sigmoid_focal", multi_label=False, alpha=1.0, gamma=2.0)
    multi = finetune.LossSpec("focal", multi_label=True, alpha=1.0, gamma=2.0)
    np.testing.assert_allclose(finetune.per_example_loss(logits, labels, weights, spec),
                               finetune.per_example_loss(logits, jax.nn.one_hot(labels, 3), weights, multi))


def test_confusion_image_shape_and_range():
    image = finetune.confusion_image(np.array([[3, 1], [0, 4]]), cell_pixels=8)
    assert image.shape == (1, 16, 16, 3) and image.min() >= 0 and image.max() <= 1


def _config(tmp_path, init):
    import ml_collections
    config = ml_collections.ConfigDict({
        "cnn": {"name": "resnet_tiny", "init": "random"},
        "vit": {"name": "vit_micro_patch16", "init": str(tmp_path / "missing.msgpack")},
        "downstream": finetune.default_downstream_config(),
    })
    config.downstream.init = init
    return config


def test_resolve_init_reads_the_pretraining_export(tmp_path):
    from cass_jax.port import save_variables
    export = tmp_path / "export"
    save_variables(export / "cnn.msgpack", {"params": {"w": np.zeros(2)}})
    save_variables(export / "cnn_swa.msgpack", {"params": {"w": np.ones(2)}})
    (export / "arms.json").write_text(json.dumps(
        {"cnn": {"name": "resnet_tiny", "num_classes": 8, "image_size": 128, "raw": "cnn.msgpack",
                 "swa": "cnn_swa.msgpack"}}))
    config = _config(tmp_path, "cass")
    assert finetune.resolve_init(config, "cnn", "cass", tmp_path).weights_path == str(export / "cnn_swa.msgpack")
    assert finetune.resolve_init(config, "cnn", "cass_raw", tmp_path).weights_path == str(export / "cnn.msgpack")
    config.downstream.use_swa = False
    assert finetune.resolve_init(config, "cnn", "cass", tmp_path).weights_path == str(export / "cnn.msgpack")
    assert finetune.resolve_init(config, "cnn", "random", tmp_path).weights_path is None


def test_resolve_init_errors_name_what_is_missing(tmp_path):
    config = _config(tmp_path, "cass")
    with pytest.raises(FileNotFoundError, match="arms.json"):
        finetune.resolve_init(config, "cnn", "cass", tmp_path)
    with pytest.raises(FileNotFoundError, match="config.vit.init"):
        finetune.resolve_init(config, "vit", "arm_init", tmp_path)
    with pytest.raises(FileNotFoundError, match="downstream.init"):
        finetune.resolve_init(config, "cnn", str(tmp_path / "nope.msgpack"), tmp_path)
    assert finetune.parse_inits("cass, random") == ["cass", "random"]


def test_check_downstream_config_rejects_bad_values(tmp_path):
    config = _config(tmp_path, "random")
    config.downstream.loss = "focall"
    with pytest.raises(ValueError, match="downstream.loss='focall'"):
        finetune.check_downstream_config(config)
    config.downstream.loss = "focal"
    config.downstream.label_fractions = (1.0, 0.0)
    with pytest.raises(ValueError, match="label_fractions"):
        finetune.check_downstream_config(config)


def test_multi_label_steps_train_and_evaluate_with_sigmoid_outputs():
    model = create_model("vit_micro_patch16", num_classes=3, img_size=32)
    variables = jax.device_get(init_variables(model, jax.random.PRNGKey(2), 32))
    spec = finetune.LossSpec("focal", multi_label=True, alpha=1.0, gamma=2.0)
    batch = {"image": jnp.ones((2, 32, 32, 3)), "label": jnp.array([[1.0, 0.0, 1.0], [0.0, 0.0, 0.0]])}
    state = finetune.initial_state(variables, "finetune")
    state, metrics = finetune.train_step(state, batch, jnp.float32(1e-3), jnp.ones(3), model=model,
                                         protocol="finetune", spec=spec)
    assert np.isfinite(float(metrics["loss"]))
    losses, probabilities = finetune.eval_step({"params": state.params}, batch, jnp.ones(3), model=model, spec=spec)
    logits = model.apply({"params": state.params}, batch["image"], train=False)
    np.testing.assert_allclose(probabilities, jax.nn.sigmoid(logits), rtol=1e-6)
    assert losses.shape == (2,)


def test_best_state_survives_later_donated_steps():
    model = create_model("vit_micro_patch16", num_classes=3, img_size=32)
    variables = jax.device_get(init_variables(model, jax.random.PRNGKey(4), 32))
    batch = {"image": jnp.ones((2, 32, 32, 3)), "label": jnp.array([0, 1])}
    snapshots = {}

    def train_epoch(state, epoch):
        state, _ = finetune.train_step(state, batch, jnp.float32(1e-2), jnp.ones(3), model=model,
                                       protocol="finetune", spec=SPEC)
        snapshots[epoch] = jax.tree.map(np.array, jax.device_get(state.params))
        return state, {}

    scripted = {1: 1.0, 2: 0.5, 3: 0.9, 4: 0.8}
    result = finetune.fit_with_early_stopping(finetune.initial_state(variables, "finetune"), train_epoch,
                                              lambda state, epoch: (scripted[epoch], {}), 4, patience=2)
    assert result.best_epoch == 2 and result.epochs_run == 4
    assert _leaves_equal(result.best_state.params, snapshots[2])
    assert not _leaves_equal(snapshots[2], snapshots[4])
