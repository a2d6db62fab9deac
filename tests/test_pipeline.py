"""The downstream pipeline end to end with tiny arms: tables, ensemble, reproducibility, reuse, real data."""

import json
from pathlib import Path

import numpy as np
import pytest

from cass_jax import finetune, metrics
from cass_jax.pipeline import ensure_pretrained, run_pipeline
from configs.common import base_config, tiny_arms

REPO = Path(__file__).resolve().parents[1]
BRAIN_MRI = REPO.parent / "shared" / "data" / "brain_mri_small"


def tiny_config(num_images: int = 64):
    """Tiny arms on synthetic phantoms at 128 px: 1 pretraining epoch, 1-epoch downstream runs."""
    c = base_config()
    tiny_arms(c, image_size=128)
    c.mode = "pipeline"
    c.data.source = "synthetic"
    c.data.synthetic_num_images = num_images
    c.data.synthetic_size = 128
    c.batch_size = 8
    c.num_epochs = 1
    c.log_every_steps = 4
    c.swa.start_fraction = 0.0
    d = c.downstream
    d.label_fractions = (1.0, 0.5)
    d.seeds = (0, 1)
    d.max_epochs = 1
    d.batch_size = 8
    return c


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("pipeline")
    config = tiny_config()
    results = run_pipeline(config, workdir)
    return config, workdir, results


def test_pipeline_pretrains_then_writes_tables(demo_run):
    config, workdir, results = demo_run
    assert (workdir / "export" / "arms.json").is_file()
    runs = results["runs"]
    single = [r for r in runs if r["arm"] != "ensemble"]
    assert len(single) == 2 * 2 * 2 * 2  # arms x protocols x fractions x seeds
    assert {r["init"] for r in runs} == {"cass"}
    assert {r["weights"] for r in single} == {str(workdir / "export" / f"{arm}_swa.msgpack") for arm in ("cnn", "vit")}
    test_size = runs[0]["test_metrics"]["num_examples"]
    assert all(r["test_metrics"]["num_examples"] == test_size for r in runs)
    assert [r["num_labelled"] for r in single if r["label_fraction"] == 0.5][0] * 2 == pytest.approx(
        [r["num_labelled"] for r in single if r["label_fraction"] == 1.0][0], abs=1)
    rows = {(r["arm"], r["protocol"], r["label_fraction"]): r for r in results["summary"]}
    assert len(rows) == 2 * 2 * 2 + 2
    cell = rows[("cnn", "finetune", 1.0)]["metrics"]["macro_f1"]
    values = [r["test_metrics"]["macro_f1"] for r in single
              if (r["arm"], r["protocol"], r["label_fraction"]) == ("cnn", "finetune", 1.0)]
    assert cell["mean"] == pytest.approx(np.mean(values)) and cell["n"] == 2
    on_disk = json.loads((workdir / "results.json").read_text())
    assert on_disk["summary"] == results["summary"]
    table = (workdir / "results.md").read_text()
    assert "### macro_f1" in table and "| ensemble | finetune | cass |" in table and "| 100% | 50% |" in table
    run_dir = workdir / "downstream" / "cnn_linear_probe_cass_f1_s0"
    assert (run_dir / "result.json").is_file() and list(run_dir.glob("events.out.tfevents.*"))


def test_ensemble_is_mean_of_fine_tuned_probabilities(demo_run):
    _, workdir, results = demo_run
    ensemble = next(r for r in results["runs"] if r["arm"] == "ensemble" and r["label_fraction"] == 1.0
                    and r["seed"] == 1)
    cnn = np.load(workdir / "downstream" / "cnn_finetune_cass_f1_s1" / "test_predictions.npz")
    vit = np.load(workdir / "downstream" / "vit_finetune_cass_f1_s1" / "test_predictions.npz")
    expected = metrics.multiclass_metrics(cnn["labels"], (cnn["probabilities"] + vit["probabilities"]) / 2)
    assert ensemble["test_metrics"] == expected


def test_finished_pretraining_is_reused(demo_run):
    config, workdir, _ = demo_run
    export = workdir / "export" / "cnn.msgpack"
    modified = export.stat().st_mtime_ns
    exports = ensure_pretrained(config, workdir)
    assert exports["cnn"]["raw"] == str(export) and export.stat().st_mtime_ns == modified


def test_single_linear_probe_run_is_reproducible(demo_run):
    config, pretrain_dir, _ = demo_run
    config.mode = "linear_probe"
    config.downstream.arm = "vit"
    config.downstream.label_fractions = (1.0,)
    config.downstream.seeds = (3,)
    config.downstream.pretrain_workdir = str(pretrain_dir)
    outputs = []
    for name in ("first", "second"):
        workdir = pretrain_dir / name
        results = finetune.run(config, workdir)
        assert [(r["arm"], r["protocol"], r["seed"]) for r in results["runs"]] == [("vit", "linear_probe", 3)]
        outputs.append(np.load(workdir / "downstream" / "vit_linear_probe_cass_f1_s3" / "test_predictions.npz"))
    np.testing.assert_array_equal(outputs[0]["probabilities"], outputs[1]["probabilities"])


@pytest.mark.slow
@pytest.mark.skipif(not BRAIN_MRI.is_dir(), reason=f"{BRAIN_MRI} is absent")
def test_linear_probe_of_cass_pretrained_arms_on_brain_mri(tmp_path):
    config = tiny_config()
    config.data.source = "folder"
    config.data.path = str(BRAIN_MRI)
    config.batch_size = 16
    d = config.downstream
    d.protocols = ("linear_probe",)
    d.label_fractions = (1.0,)
    d.seeds = (0,)
    d.max_epochs = 2
    results = run_pipeline(config, tmp_path)
    assert [(r["arm"], r["protocol"]) for r in results["runs"]] == [("cnn", "linear_probe"), ("vit", "linear_probe")]
    for record in results["runs"]:
        test = record["test_metrics"]
        assert test["num_examples"] == 100  # the whole Testing folder: 4 classes x 25
        assert test["per_class_support"] == [25, 25, 25, 25]
        assert 0.0 <= test["macro_f1"] <= 1.0 and np.isfinite(record["test_loss"])
    assert results["class_names"] == ["glioma", "meningioma", "notumor", "pituitary"]


def test_readme_snippet_loads_each_exported_arm_as_written(demo_run):
    """README: `load_classifier(export file)` rebuilds either arm from arms.json (the ViT at the run's 128 px)."""
    from cass_jax.classifier import load_classifier

    _, workdir, _ = demo_run
    images_uint8 = np.random.default_rng(0).integers(0, 256, (2, 150, 100, 3), dtype=np.uint8)
    for arm in ("cnn", "vit"):
        loaded = load_classifier(workdir / "export" / f"{arm}_swa.msgpack")
        probabilities = loaded(images_uint8)
        assert probabilities.shape == (2, 1000)
        np.testing.assert_allclose(probabilities.sum(axis=1), 1.0, rtol=1e-5)
        inputs = loaded.preprocess(images_uint8)
        assert inputs.shape == (2, 128, 128, 3)
        logits, features = loaded.model.apply(loaded.variables, inputs, train=False, return_features=True)
        assert logits.shape == (2, 1000) and features.shape[0] == 2
