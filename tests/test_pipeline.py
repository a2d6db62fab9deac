"""The downstream pipeline end to end with tiny arms: tables, ensemble, reproducibility, reuse, real data, and the
comparison of methods (`config.methods`)."""

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from cass_jax import finetune, metrics, pretrain
from cass_jax.pipeline import (
    comparison_arm_inits,
    ensure_pretrained,
    method_config,
    pipeline_methods,
    pretraining_roots,
    run_pipeline,
)
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
    assert "### macro_f1" in table and "| 100% | 100% 95% CI | 50% | 50% 95% CI |" in table
    assert "| ensemble | resnet_tiny+vit_micro_patch16 | cass | finetune | cass |" in table
    assert {r["method"] for r in runs} == {"cass"}
    [timing] = results["pretraining"]
    assert timing["method"] == "cass" and timing["steps"] == timing["images"] // 8 and timing["start_step"] == 0
    assert timing["wall_seconds"] > 0 and timing["images_per_second"] > 0
    assert (f"| cass | cnn: resnet_tiny, vit: vit_micro_patch16 | {timing['images']} | 1 | 8 | {timing['steps']} | "
            f"{timing['wall_seconds']:.0f} |") in table
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


def test_a_rerun_reuses_finished_downstream_runs_and_retrains_only_unfinished_or_changed_ones(
        demo_run, tmp_path, monkeypatch):
    config, original, _ = demo_run
    workdir = tmp_path / "moved"  # also shows a workdir moved elsewhere still finds its runs
    shutil.copytree(original, workdir)
    config = config.copy_and_resolve_references()
    trained = []
    real_train = finetune.train_and_evaluate

    def counting_train(config, splits, run, *args, **kwargs):
        trained.append(run.name)
        return real_train(config, splits, run, *args, **kwargs)

    monkeypatch.setattr(finetune, "train_and_evaluate", counting_train)
    run_pipeline(config, workdir)
    assert trained == []
    assert (workdir / "results.json").read_text().replace(str(workdir), str(original)) == \
        (original / "results.json").read_text()

    killed = workdir / "downstream" / "vit_finetune_cass_f0.5_s1"
    (killed / "result.json").unlink()  # as if killed before the run finished
    results = run_pipeline(config, workdir)
    assert trained == ["vit_finetune_cass_f0.5_s1"]
    rerun = next(r for r in results["runs"] if r["arm"] == "vit" and r["protocol"] == "finetune"
                 and r["label_fraction"] == 0.5 and r["seed"] == 1)
    first_time = json.loads((original / "downstream" / killed.name / "result.json").read_text())
    assert rerun["test_metrics"] == first_time["test_metrics"]

    trained.clear()
    config.downstream.lr = config.downstream.lr / 2
    config.downstream.arms, config.downstream.protocols = ("cnn",), ("finetune",)
    run_pipeline(config, workdir)
    assert sorted(trained) == sorted(f"cnn_finetune_cass_f{f:g}_s{s}" for f in (1.0, 0.5) for s in (0, 1))


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


def comparison_config():
    """The three methods at 64 px on 32 phantoms with small heads: 1 pretraining epoch each, then one seed and one
    label fraction of 1-epoch fine-tuning."""
    c = tiny_config(num_images=32)
    tiny_arms(c, image_size=64)
    c.data.synthetic_size = 64
    c.methods = ("cass", "dino", "barlow_twins")
    c.dino.update(out_dim=128, hidden_dim=32, bottleneck_dim=16, local_crops_number=2)
    c.barlow_twins.projector = (64, 64, 64)
    d = c.downstream
    d.protocols = ("finetune",)
    d.label_fractions = (1.0,)
    d.seeds = (0,)
    d.save_models = "none"
    return c


@pytest.fixture(scope="module")
def comparison_run(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("comparison")
    config = comparison_config()
    return config, workdir, run_pipeline(config, workdir)


def test_comparison_evaluates_every_exported_arm_of_every_method_and_the_arms_without_pretraining(comparison_run):
    _, workdir, results = comparison_run
    for method, arms in (("cass", {"cnn", "vit"}), ("dino", {"vit"}), ("barlow_twins", {"cnn"})):
        exports = pretrain.read_exports(workdir / "pretrain" / method)
        assert set(exports) == arms and {entry["method"] for entry in exports.values()} == {method}
    assert not (workdir / "export").exists()
    runs = {(r["arm"], r["method"], r["init"]): r for r in results["runs"]}
    assert set(runs) == {
        ("cnn", "cass", "cass"), ("vit", "cass", "cass"), ("vit", "dino", "dino"),
        ("cnn", "barlow_twins", "barlow_twins"), ("cnn", "none", "arm_init"), ("vit", "none", "arm_init"),
        ("ensemble", "cass", "cass"), ("ensemble", "none", "arm_init")}
    assert runs[("vit", "dino", "dino")]["weights"] == str(workdir / "pretrain" / "dino" / "export" / "vit_swa.msgpack")
    assert runs[("cnn", "none", "arm_init")]["weights"] is None  # config.cnn.init = random
    assert {r["label_fraction"] for r in results["runs"]} == {1.0}
    assert [t["method"] for t in results["pretraining"]] == ["cass", "dino", "barlow_twins"]
    table = (workdir / "results.md").read_text()
    assert "| arm | model | method | protocol | init | 100% | 100% 95% CI |" in table
    assert "| vit | vit_micro_patch16 | dino | finetune | dino | " in table
    assert "| cnn | resnet_tiny | none | finetune | arm_init | " in table
    assert "| method | backbones | images | epochs | batch | steps | wall time (s) | images/s |" in table
    for timing in results["pretraining"]:
        assert f"| {timing['method']} | " in table.split("### Pretraining")[1] and timing["wall_seconds"] > 0


def test_a_comparison_run_one_method_at_a_time_merges_into_one_table(comparison_run, tmp_path):
    config, workdir, results = comparison_run
    dino_only = config.copy_and_resolve_references()
    dino_only.methods, dino_only.downstream.evaluate_baseline = ("dino",), False
    inits = comparison_arm_inits(dino_only, workdir, pretraining_roots(dino_only, workdir))
    assert [(arm, init.method) for arm, init in inits] == [("vit", "dino")]
    # Two invocations' files: one with the baseline and CASS, one with DINO, Barlow Twins and the baseline again.
    first = dict(results, runs=[r for r in results["runs"] if r["method"] in ("none", "cass")],
                 pretraining=results["pretraining"][:1])
    second = dict(results, runs=[r for r in results["runs"] if r["method"] != "cass"],
                  pretraining=results["pretraining"][1:])
    files = [tmp_path / "first.json", tmp_path / "second.json"]
    for path, value in zip(files, (first, second)):
        path.write_text(json.dumps(value))
    merged = finetune.merge_results(files, tmp_path / "merged")
    assert sorted(map(json.dumps, merged["runs"])) == sorted(map(json.dumps, results["runs"]))
    assert merged["pretraining"] == results["pretraining"]
    table_lines = sorted((tmp_path / "merged" / "results.md").read_text().splitlines())
    assert table_lines == sorted((workdir / "results.md").read_text().splitlines())  # rows in file order
    baseline = next(r for r in second["runs"] if r["method"] == "none")
    baseline["test_metrics"] = dict(baseline["test_metrics"], balanced_accuracy=-1.0)
    files[1].write_text(json.dumps(second))
    with pytest.raises(ValueError, match="other test scores than an earlier file"):
        finetune.merge_results(files, tmp_path / "conflict")


def test_comparison_rerun_reuses_every_export(comparison_run, monkeypatch):
    config, workdir, _ = comparison_run

    def no_pretraining(*args, **kwargs):
        raise AssertionError("a finished export was pretrained again")

    monkeypatch.setattr(pretrain, "pretrain", no_pretraining)
    config.downstream.protocols = ("linear_probe",)
    config.downstream.arms = ("vit",)
    results = run_pipeline(config, workdir)
    assert {(r["arm"], r["method"], r["protocol"]) for r in results["runs"]} == {
        ("vit", "cass", "linear_probe"), ("vit", "dino", "linear_probe"), ("vit", "none", "linear_probe")}
    assert len(results["pretraining"]) == 3


def test_methods_are_read_from_a_string_or_a_sequence_and_checked():
    config = tiny_config()
    assert pipeline_methods(config) == ()
    for value in ("cass, dino,barlow_twins", ("cass,dino", "barlow_twins", "dino")):
        config.methods = value if isinstance(value, tuple) else (value,)
        assert pipeline_methods(config) == ("cass", "dino", "barlow_twins")
    config.methods = ("cass,byol",)
    with pytest.raises(ValueError, match="'byol'"):
        pipeline_methods(config)


def test_a_one_backbone_method_can_name_its_arm_to_pretrain_on_both(tmp_path):
    config = tiny_config()
    config.methods = ("cass,dino:cnn, dino:vit,barlow_twins",)
    assert pipeline_methods(config) == ("cass", "dino:cnn", "dino:vit", "barlow_twins")
    assert pretraining_roots(config, tmp_path) == {
        "cass": tmp_path / "pretrain" / "cass", "dino:cnn": tmp_path / "pretrain" / "dino_cnn",
        "dino:vit": tmp_path / "pretrain" / "dino_vit", "barlow_twins": tmp_path / "pretrain" / "barlow_twins"}
    on_cnn = method_config(config, "dino:cnn")
    assert (on_cnn.method, on_cnn.dino.arm, config.dino.arm) == ("dino", "cnn", "vit")
    assert method_config(config, "barlow_twins").barlow_twins.arm == config.barlow_twins.arm
    for entry, message in (("cass:cnn", "CASS pretrains both arms together"), ("dino:gpu", "arm must be one of")):
        config.methods = (entry,)
        with pytest.raises(ValueError, match=message):
            pipeline_methods(config)


def test_a_missing_pretraining_of_a_compared_method_is_an_error_not_a_skipped_row(tmp_path):
    config = comparison_config()
    config.downstream.pretrain_workdir = str(tmp_path)
    with pytest.raises(FileNotFoundError, match="No finished CASS pretraining in .*pretrain/cass"):
        comparison_arm_inits(config, tmp_path, pretraining_roots(config, tmp_path))


def test_an_export_of_another_method_is_not_reused(demo_run):
    config, workdir, _ = demo_run
    other = config.copy_and_resolve_references()
    other.method = "dino"
    with pytest.raises(ValueError, match="holds a cass pretraining, not config.method='dino'"):
        ensure_pretrained(other, workdir)
