"""Saved classifiers and predict mode: models.json, exact reproduction of test metrics, errors, TTA, ensembles."""

import csv
import dataclasses
import json
import shutil
from pathlib import Path

import jax
import numpy as np
import pytest
from PIL import Image

from cass_jax import finetune, inference
from cass_jax.classifier import load_classifier
from cass_jax.models import create_model, init_variables
from cass_jax.port import save_variables
from configs.common import base_config, tiny_arms

REPO = Path(__file__).resolve().parents[1]
BRAIN_MRI = REPO.parent / "shared" / "data" / "brain_mri_small"


def tiny_downstream_config(weights: Path):
    """Tiny arms on 64 synthetic phantoms; the ViT starts from a weights file, so its probe stores only the head."""
    c = base_config()
    tiny_arms(c, image_size=128)
    c.data.source = "synthetic"
    c.data.synthetic_num_images = 64
    c.data.synthetic_size = 128
    d = c.downstream
    d.init = "arm_init"
    d.label_fractions = (1.0,)
    d.seeds = (0, 1)
    d.max_epochs = 2
    d.batch_size = 8
    c.vit.init = str(weights)
    return c


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """One fine-tuned CNN and one linear-probed ViT, two seeds each, the best of each kept."""
    root = tmp_path_factory.mktemp("inference")
    weights = root / "vit_start.msgpack"
    vit = create_model("vit_micro_patch16", num_classes=1000, img_size=128)
    save_variables(weights, init_variables(vit, jax.random.PRNGKey(3), 128))
    config = tiny_downstream_config(weights)
    splits = finetune.load_downstream_data(config)
    records = finetune.run_settings(config, root, ("cnn",), ("finetune",), splits)
    records += finetune.run_settings(config, root, ("vit",), ("linear_probe",), splits)
    finetune.write_models_index(root, records)
    return config, root, records


def _by_setting(records, arm):
    kept = [r for r in records if r["arm"] == arm and r.get("classifier")]
    assert len(kept) == 1
    return kept[0]


def test_models_json_lists_the_best_seed_of_each_setting(trained):
    _, root, records = trained
    entries = json.loads((root / "models.json").read_text())
    assert sorted(e["arm"] for e in entries) == ["cnn", "vit"]
    for entry in entries:
        group = [r for r in records if r["arm"] == entry["arm"]]
        best = min(group, key=lambda r: r["best_val_loss"])
        assert entry["seed"] == best["seed"] and entry["method"] == "none" and entry["init"] == "arm_init"
        assert entry["test_metrics"] == json.loads(json.dumps(best["test_metrics"]))
        assert Path(entry["path"]).is_dir()
    models = sorted(p.name for p in (root / "models").iterdir())
    assert models == sorted(Path(e["path"]).name for e in entries)  # the other seeds were deleted


def test_saved_classifier_reproduces_the_recorded_test_predictions(trained):
    config, root, records = trained
    for arm in ("cnn", "vit"):
        record = _by_setting(records, arm)
        classifier = load_classifier(record["classifier"])
        assert classifier.image_size == 128 and list(classifier.class_names) == list(
            finetune.load_downstream_data(config).class_names)
        saved = np.load(Path(root) / "downstream" / Path(record["classifier"]).name / "test_predictions.npz")
        summary = inference.run_predict(_predict_config(record["classifier"], split="test"), root / f"predict_{arm}")
        assert summary["metrics"]["accuracy"] == record["test_metrics"]["accuracy"]
        assert summary["metrics"]["macro_f1"] == record["test_metrics"]["macro_f1"]
        rows = _read_csv(root / f"predict_{arm}" / "predictions.csv")
        assert [r["path"] for r in rows] == list(saved["paths"])
        probabilities = np.asarray([[float(r[c]) for c in classifier.class_names] for r in rows])
        np.testing.assert_allclose(probabilities, saved["probabilities"], atol=1e-5)


def test_linear_probe_stores_only_its_head(trained):
    _, _, records = trained
    folder = Path(_by_setting(records, "vit")["classifier"])
    assert (folder / "head.msgpack").is_file() and not (folder / "variables.msgpack").exists()
    assert (folder / "config.json").is_file()
    info = json.loads((folder / "classifier.json").read_text())
    assert info["protocol"] == "linear_probe" and info["backbone"].endswith("vit_start.msgpack")


def _predict_config(model, split="all", path="", **overrides):
    config = inference.default_predict_config()
    config.model = str(model)
    config.split = split
    config.data.path = str(path)
    config.batch_size = 8
    for key, value in overrides.items():
        *parents, leaf = key.split(".")
        node = config
        for parent in parents:
            node = node[parent]
        node[leaf] = value
    return config


def _read_csv(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def _write_phantoms(folder: Path, count: int, classes=("glioma", "notumor")):
    from cass_jax.data import synthetic_phantom

    for i in range(count):
        target = folder / classes[i % len(classes)]
        target.mkdir(parents=True, exist_ok=True)
        Image.fromarray(synthetic_phantom(i, seed=5, size=96)).save(target / f"img_{i}.png")


def test_unreadable_files_go_to_errors_csv_and_the_rest_is_predicted(trained, tmp_path):
    _, root, records = trained
    images = tmp_path / "images"
    _write_phantoms(images, 9)
    (images / "glioma" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    out = tmp_path / "out"
    summary = inference.run_predict(_predict_config(_by_setting(records, "cnn")["classifier"], path=images), out)
    rows = _read_csv(out / "predictions.csv")
    errors = _read_csv(out / "errors.csv")
    assert len(rows) == 9 and summary["unreadable"] == 1
    assert [e["path"] for e in errors] == [str(images / "glioma" / "broken.png")]
    assert "broken.png" in errors[0]["reason"]
    classes = list(load_classifier(_by_setting(records, "cnn")["classifier"]).class_names)
    sums = [sum(float(r[c]) for c in classes) for r in rows]
    np.testing.assert_allclose(sums, 1.0, atol=1e-5)
    assert {r["label"] for r in rows} == {"glioma", "notumor"}  # class folders named like the model's classes
    assert summary["metrics"]["num_examples"] == 9
    assert (out / "confusion_matrix.csv").is_file()


def test_csv_input_ensemble_and_tta(trained, tmp_path):
    _, _, records = trained
    images = tmp_path / "images"
    _write_phantoms(images, 4)
    table = tmp_path / "list.csv"
    names = sorted(str(p.relative_to(images)) for p in images.rglob("*.png"))
    table.write_text("image\n" + "\n".join(names) + "\n")
    cnn = load_classifier(_by_setting(records, "cnn")["classifier"])
    vit = load_classifier(_by_setting(records, "vit")["classifier"])
    out = tmp_path / "out"
    models = f"{cnn.path},{vit.path}"
    summary = inference.run_predict(_predict_config(models, path=table, tta=2, **{"data.image_dir": str(images)}),
                                    out)
    assert summary["images"] == 4 and "metrics" not in summary
    rows = _read_csv(out / "predictions.csv")
    uint8 = [np.asarray(Image.open(images / n).convert("RGB")) for n in names]
    expected = np.mean([c.probabilities(view) for c in (cnn, vit) for view in inference.tta_views(
        c.preprocess(uint8), 2)], axis=0)
    got = np.asarray([[float(r[c]) for c in cnn.class_names] for r in rows])
    np.testing.assert_allclose(got, expected, atol=1e-5)
    np.testing.assert_allclose(inference.predict_images([cnn, vit], uint8, tta=2), expected, atol=1e-6)


def test_bad_inputs_fail_with_one_clear_error(trained, tmp_path):
    _, _, records = trained
    cnn = load_classifier(_by_setting(records, "cnn")["classifier"])
    with pytest.raises(FileNotFoundError, match="no_such_model"):
        inference.run_predict(_predict_config(tmp_path / "no_such_model", path=tmp_path), tmp_path / "out")
    with pytest.raises(ValueError, match="tta=9"):
        inference.run_predict(_predict_config(cnn.path, path=tmp_path, tta=9), tmp_path / "out")
    with pytest.raises(ValueError, match="expects RGB images"):
        cnn(np.zeros((2, 128, 128, 1), np.uint8))
    other = dataclasses.replace(cnn, class_names=("a", "b", "c", "d"))
    with pytest.raises(ValueError, match="different classes"):
        inference.predict_images([cnn, other], [np.zeros((128, 128, 3), np.uint8)])


@pytest.mark.skipif(not BRAIN_MRI.is_dir(), reason="../shared/data/brain_mri_small is absent")
def test_predicts_every_real_test_image(trained, tmp_path):
    _, _, records = trained
    out = tmp_path / "out"
    summary = inference.run_predict(_predict_config(_by_setting(records, "cnn")["classifier"],
                                                    path=BRAIN_MRI / "Testing"), out)
    rows = _read_csv(out / "predictions.csv")
    assert len(rows) == 100 and summary["unreadable"] == 0
    classes = ("glioma", "meningioma", "notumor", "pituitary")
    np.testing.assert_allclose([sum(float(r[c]) for c in classes) for r in rows], 1.0, atol=1e-5)
    assert summary["metrics"]["num_examples"] == 100  # the synthetic classes carry the brain MRI names


def test_saliency_pngs_figures_mask_scores_and_sanity_check(trained, tmp_path):
    _, _, records = trained
    images = tmp_path / "images"
    _write_phantoms(images, 3)
    masks = tmp_path / "masks"
    masks.mkdir()
    for path in images.rglob("*.png"):
        mask = np.zeros((96, 96), np.uint8)
        mask[20:60, 30:70] = 255
        Image.fromarray(mask).save(masks / path.name)
    cnn, vit = (_by_setting(records, arm)["classifier"] for arm in ("cnn", "vit"))
    out = tmp_path / "out"
    summary = inference.run_predict(_predict_config(
        f"{cnn},{vit}", path=images, saliency="vanilla,grad_cam,attention_rollout", saliency_images=2,
        masks=str(masks), saliency_sanity_check=True), out)
    report = summary["saliency"]
    assert sorted(report["models"]) == ["cnn arm_init", "vit arm_init"]  # short column labels
    folders = [Path(cnn).name, Path(vit).name]
    for label, methods in (("cnn arm_init", ("vanilla", "grad_cam")),
                           ("vit arm_init", ("vanilla", "grad_cam", "attention_rollout"))):
        name = report["models"][label]["folder"]
        assert name in folders
        for method in methods:
            pngs = sorted((out / "saliency" / name / method).glob("*.png"))
            assert len(pngs) == 2 and Image.open(pngs[0]).size == (128, 128)
            scores = report["models"][label]["mask_scores"][method]
            assert 0.0 <= scores["mass_in_mask"] <= 1.0 and scores["pointing_game"] in (0.0, 0.5, 1.0)
            assert -1.0 <= report["models"][label]["randomisation_rank_correlation"][method] <= 1.0
    assert not (out / "saliency" / folders[0] / "attention_rollout").exists()  # rollout is for ViTs only
    figure = Image.open(out / "saliency" / "comparison_vanilla.png")
    assert figure.size[0] > 3 * 128 and figure.size[1] > 2 * 128  # input + two model columns, two rows
    with pytest.raises(ValueError, match="Unknown saliency method"):
        inference.run_predict(_predict_config(cnn, path=images, saliency="vanila"), tmp_path / "bad")
    assert not (tmp_path / "bad").exists()  # refused before anything was written
    with pytest.raises(FileNotFoundError, match="No mask for image"):
        inference.run_predict(_predict_config(cnn, path=images, saliency="vanilla", masks=str(tmp_path)),
                              tmp_path / "nomask")


def test_pipeline_writes_the_saliency_figure_of_its_fine_tuned_models(trained, tmp_path):
    from cass_jax.pipeline import write_pipeline_saliency

    config, _, records = trained
    splits = finetune.load_downstream_data(config)
    report = write_pipeline_saliency(config, tmp_path, records, splits.test)
    assert list(report["models"]) == ["cnn arm_init"]
    assert report["models"]["cnn arm_init"]["path"] == _by_setting(records, "cnn")["classifier"]
    assert len(report["images"]) == config.downstream.saliency_images
    figure = Image.open(tmp_path / "saliency" / "comparison_vanilla.png")
    assert figure.size[1] > config.downstream.saliency_images * 128


@pytest.mark.skipif(not BRAIN_MRI.is_dir(), reason="../shared/data/brain_mri_small is absent")
def test_dicom_copies_of_real_images_get_the_jpegs_predictions(trained, tmp_path):
    """16-bit MONOCHROME2 and 8-bit MONOCHROME1 DICOMs (no extension for one of them) written losslessly."""
    from tests.test_dicom import WINDOW_8_BIT, WINDOW_16_BIT, write_dicom

    _, _, records = trained
    jpegs = sorted((BRAIN_MRI / "Testing").glob("*/*.jpg"))[::10]
    folders = {kind: tmp_path / kind for kind in ("jpeg", "mono2_16", "mono1_8")}
    for jpeg in jpegs:
        rgb = np.asarray(Image.open(jpeg).convert("RGB"))
        if not (np.array_equal(rgb[..., 0], rgb[..., 1]) and np.array_equal(rgb[..., 0], rgb[..., 2])):
            continue  # DICOM MONOCHROME holds one channel: only gray images convert losslessly
        v8 = rgb[..., 0]
        for folder in folders.values():
            (folder / jpeg.parent.name).mkdir(parents=True, exist_ok=True)
        shutil.copy(jpeg, folders["jpeg"] / jpeg.parent.name)
        write_dicom(folders["mono2_16"] / jpeg.parent.name / f"{jpeg.stem}.dcm", v8.astype(np.uint16) * 257,
                    "MONOCHROME2", WINDOW_16_BIT)
        write_dicom(folders["mono1_8"] / jpeg.parent.name / jpeg.stem, 255 - v8, "MONOCHROME1", WINDOW_8_BIT)
    model = _by_setting(records, "cnn")["classifier"]
    predicted = {}
    for kind, folder in folders.items():
        inference.run_predict(_predict_config(model, path=folder), tmp_path / f"out_{kind}")
        rows = _read_csv(tmp_path / f"out_{kind}" / "predictions.csv")
        predicted[kind] = np.asarray([[float(r[c]) for c in ("glioma", "meningioma", "notumor", "pituitary")]
                                      for r in rows])
    assert len(predicted["jpeg"]) >= 5
    np.testing.assert_allclose(predicted["mono2_16"], predicted["jpeg"], atol=1e-6)
    np.testing.assert_allclose(predicted["mono1_8"], predicted["jpeg"], atol=1e-6)


def test_figure_labels_are_short_and_unique(trained):
    from cass_jax.saliency_report import short_names

    _, _, records = trained
    cnn = load_classifier(_by_setting(records, "cnn")["classifier"])
    probe = dataclasses.replace(cnn, info={**cnn.info, "protocol": "linear_probe"})
    other_seed = dataclasses.replace(cnn, info={**cnn.info, "seed": 7})
    assert short_names([cnn]) == ["cnn arm_init"]
    assert short_names([cnn, probe]) == ["cnn arm_init finetune", "cnn arm_init linear_probe"]
    assert short_names([cnn, other_seed]) == [f"cnn arm_init finetune 1 {cnn.info['seed']}", "cnn arm_init finetune 1 7"]
