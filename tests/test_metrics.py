"""Every metric in cass_jax.metrics against scikit-learn on random predictions."""

import numpy as np
import pytest

from cass_jax import metrics

sklearn_metrics = pytest.importorskip("sklearn.metrics")


def _random_multiclass(seed: int, n: int = 300, num_classes: int = 5, absent: int | None = None):
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, num_classes, size=n)
    logits = rng.normal(size=(n, num_classes))
    if absent is not None:
        labels[labels == absent] = (absent + 1) % num_classes
    probabilities = np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)
    return labels, probabilities


@pytest.mark.filterwarnings("ignore:y_pred contains classes not in y_true")
@pytest.mark.parametrize("absent", [None, 2])
@pytest.mark.parametrize("seed", [0, 1])
def test_multiclass_matches_sklearn(seed, absent):
    labels, probabilities = _random_multiclass(seed, absent=absent)
    predictions = probabilities.argmax(axis=1)
    result = metrics.multiclass_metrics(labels, probabilities)
    all_classes = np.arange(probabilities.shape[1])
    if absent is not None:
        assert result["per_class_support"][absent] == 0
    assert result["accuracy"] == pytest.approx(sklearn_metrics.accuracy_score(labels, predictions))
    for average in ("macro", "weighted", "micro"):
        expected = sklearn_metrics.f1_score(labels, predictions, average=average, zero_division=0)
        assert result[f"{average}_f1"] == pytest.approx(expected), average
    assert result["balanced_accuracy"] == pytest.approx(
        sklearn_metrics.balanced_accuracy_score(labels, predictions)
    )
    precision, recall, f1, support = sklearn_metrics.precision_recall_fscore_support(
        labels, predictions, labels=all_classes, zero_division=0
    )
    np.testing.assert_allclose(result["per_class_precision"], precision)
    np.testing.assert_allclose(result["per_class_recall"], recall)
    np.testing.assert_allclose(result["per_class_f1"], f1)
    np.testing.assert_array_equal(result["per_class_support"], support)
    np.testing.assert_array_equal(
        result["confusion_matrix"], sklearn_metrics.confusion_matrix(labels, predictions, labels=all_classes)
    )
    for c in all_classes:
        if c == absent:
            assert np.isnan(result["per_class_auroc"][c])
        else:
            expected = sklearn_metrics.roc_auc_score(labels == c, probabilities[:, c])
            assert result["per_class_auroc"][c] == pytest.approx(expected)


def test_macro_f1_skips_class_absent_from_labels_and_predictions():
    labels = np.array([0, 0, 1, 1, 3, 3])
    probabilities = np.eye(4)[[0, 1, 1, 1, 3, 0]]
    result = metrics.multiclass_metrics(labels, probabilities)
    expected = sklearn_metrics.f1_score(labels, probabilities.argmax(1), average="macro")
    assert result["macro_f1"] == pytest.approx(expected)
    assert result["per_class_f1"][2] == 0.0


def test_auroc_with_ties_matches_sklearn():
    rng = np.random.default_rng(3)
    targets = rng.integers(0, 2, size=200)
    scores = rng.integers(0, 5, size=200) / 4.0
    assert metrics.binary_auroc(targets, scores) == pytest.approx(
        sklearn_metrics.roc_auc_score(targets, scores)
    )


@pytest.mark.parametrize("seed", [0, 1])
def test_multilabel_matches_sklearn(seed):
    rng = np.random.default_rng(seed)
    n, num_labels = 200, 5
    labels = (rng.random((n, num_labels)) < 0.3).astype(np.float32)
    labels[:, 4] = 0.0  # a label with no positive example
    labels[:10] = 0.0  # samples with no true label
    probabilities = rng.random((n, num_labels))
    predictions = (probabilities >= 0.5).astype(int)
    result = metrics.multilabel_metrics(labels, probabilities)
    for average in ("micro", "macro", "samples"):
        expected = sklearn_metrics.f1_score(labels, predictions, average=average, zero_division=0)
        assert result[f"{average}_f1"] == pytest.approx(expected), average
    assert result["subset_accuracy"] == pytest.approx(sklearn_metrics.accuracy_score(labels, predictions))
    precision, recall, f1, support = sklearn_metrics.precision_recall_fscore_support(
        labels, predictions, zero_division=0
    )
    np.testing.assert_allclose(result["per_class_precision"], precision)
    np.testing.assert_allclose(result["per_class_recall"], recall)
    np.testing.assert_allclose(result["per_class_f1"], f1)
    np.testing.assert_array_equal(result["per_class_support"], support)
    for c in range(4):
        expected = sklearn_metrics.roc_auc_score(labels[:, c], probabilities[:, c])
        assert result["per_class_auroc"][c] == pytest.approx(expected)
    assert np.isnan(result["per_class_auroc"][4])
    assert result["mean_auroc"] == pytest.approx(np.mean(result["per_class_auroc"][:4]))


def test_bad_inputs_raise_clear_errors():
    with pytest.raises(ValueError, match="must lie in"):
        metrics.confusion_matrix(np.array([0, 5]), np.array([0, 1]), num_classes=3)
    with pytest.raises(ValueError, match="num_labels"):
        metrics.multilabel_metrics(np.zeros((4, 3)), np.zeros((4, 2)))
    with pytest.raises(ValueError, match="empty"):
        metrics.multiclass_metrics(np.zeros((0,), int), np.zeros((0, 3)))


def test_summary_and_markdown_table():
    """Mean, std and the 95% CI worked out by hand: 0.8, 0.9, 0.7 -> mean 0.8, s = 0.1, and with
    t(0.975, 2 df) = 4.302653 from the tables, half width 4.302653 * 0.1 / sqrt(3) = 0.248414."""
    setting = {"arm": "cnn", "model": "resnet_tiny", "protocol": "finetune"}
    records = [
        {**setting, "method": method, "init": init, "label_fraction": f, "seed": s, "test_metrics": {"macro_f1": v}}
        for method, init, f, s, v in [("cass", "cass", 1.0, 0, 0.8), ("cass", "cass", 1.0, 1, 0.9),
                                      ("cass", "cass", 1.0, 2, 0.7), ("cass", "cass", 0.1, 0, 0.5),
                                      ("none", "random", 1.0, 0, 0.4)]
    ]
    records.insert(1, {"arm": "vit", "model": "vit_micro_patch16", "protocol": "finetune", "method": "dino",
                       "init": "dino", "label_fraction": 1.0, "seed": 0, "test_metrics": {"macro_f1": 0.6}})
    rows = metrics.summarize_over_seeds(records, ["macro_f1"])
    full = next(r for r in rows if r["label_fraction"] == 1.0 and r["method"] == "cass")
    stats = full["metrics"]["macro_f1"]
    assert stats["mean"] == pytest.approx(0.8) and stats["std"] == pytest.approx(0.1) and stats["n"] == 3
    assert (stats["ci_low"], stats["ci_high"]) == pytest.approx((0.8 - 0.248414, 0.8 + 0.248414), abs=1e-6)
    assert full["seeds"] == [0, 1, 2] and full["model"] == "resnet_tiny"
    single = next(r for r in rows if r["label_fraction"] == 0.1)["metrics"]["macro_f1"]
    assert single["std"] == 0.0 and np.isnan(single["ci_low"]) and np.isnan(single["ci_high"])
    table = metrics.markdown_tables(rows, ["macro_f1"])
    lines = table.splitlines()
    assert "| arm | model | method | protocol | init | 100% | 100% 95% CI | 10% | 10% 95% CI |" in lines
    body = [line for line in lines if line.startswith("| cnn") or line.startswith("| vit")]
    assert body == [  # grouped by arm (the cnn rows together), in the order the records came
        "| cnn | resnet_tiny | cass | finetune | cass | 0.8000 ± 0.1000 (n=3) | [0.5516, 1.0484] "
        "| 0.5000 ± 0.0000 (n=1) | – |",
        "| cnn | resnet_tiny | none | finetune | random | 0.4000 ± 0.0000 (n=1) | – | – | – |",
        "| vit | vit_micro_patch16 | dino | finetune | dino | 0.6000 ± 0.0000 (n=1) | – | – | – |",
    ]


def test_pretraining_table_shows_wall_time_and_throughput():
    runs = [{"method": "dino", "backbones": {"vit": "vit_micro_patch16"}, "images": 256, "epochs": 4,
             "batch_size": 16, "steps": 64, "start_step": 0, "wall_seconds": 61.7, "images_per_second": 123.45},
            {"method": "cass", "backbones": {"cnn": "resnet_tiny", "vit": "vit_micro_patch16"}, "images": 256,
             "epochs": 4, "batch_size": 16, "steps": 64, "start_step": 64, "wall_seconds": None,
             "invocation_wall_seconds": 3.2, "images_per_second": None},
            {"method": "barlow_twins", "backbones": {"cnn": "resnet_tiny"}, "images": 256, "epochs": 4,
             "batch_size": 16, "steps": 64, "start_step": 32, "wall_seconds": 95.4, "invocation_wall_seconds": 50.0,
             "images_per_second": 80.0}]
    lines = metrics.pretraining_table(runs).splitlines()
    assert "| dino | vit: vit_micro_patch16 | 256 | 4 | 16 | 64 | 62 | 123.5 |" in lines
    assert ("| cass | cnn: resnet_tiny, vit: vit_micro_patch16 | 256 | 4 | 16 | 64 | 3 (the invocation resumed "
            "at step 64) | – |") in lines
    assert "| barlow_twins | cnn: resnet_tiny | 256 | 4 | 16 | 64 | 95 | 80.0 |" in lines  # resumed: whole run