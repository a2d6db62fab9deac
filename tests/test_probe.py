"""The logistic-regression linear probe: folding into the head, standardisation, the choice of C, end to end."""

import jax
import numpy as np
import pytest
from sklearn.linear_model import LogisticRegression

from cass_jax import finetune, probe
from cass_jax.classifier import load_classifier
from configs.common import base_config, tiny_arms


def _features(seed, n=120, dim=6, classes=3, shift=2.0):
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, classes, n)
    centres = rng.normal(size=(classes, dim)) * shift
    return rng.normal(size=(n, dim)) * 3.0 + 5.0 + centres[labels], labels


@pytest.mark.parametrize("classes_present", [(0, 1, 2, 3), (0, 2, 3), (1, 3)])
def test_folded_head_gives_the_regressions_logits_on_raw_features(classes_present):
    x, y = _features(0, classes=4)
    keep = np.isin(y, classes_present)
    x, y = x[keep], y[keep]
    standardiser = probe.Standardiser.fit(x)
    model = LogisticRegression(C=1.0, max_iter=5000).fit(standardiser(x), y)
    head = probe.head_from_regression([model], standardiser, num_classes=4, multi_label=False)
    logits = x @ head["kernel"].astype(np.float64) + head["bias"]
    expected = np.log(model.predict_proba(standardiser(x)))  # softmax is shift-invariant: compare log-softmax
    log_softmax = logits - np.log(np.exp(logits - logits.max(1, keepdims=True)).sum(1, keepdims=True)) \
        - logits.max(1, keepdims=True)
    np.testing.assert_allclose(log_softmax[:, list(classes_present)], expected, rtol=1e-4, atol=1e-4)
    absent = sorted(set(range(4)) - set(classes_present))
    assert np.all(log_softmax[:, absent] < -20)


def test_multi_label_heads_and_constant_labels():
    x, y = _features(1, classes=3)
    labels = np.stack([y == 0, y == 1, np.ones_like(y, bool)], axis=1).astype(np.float32)  # label 2 always on
    fit = probe.fit_probe(x, labels, x, labels, num_classes=3, multi_label=True, c_values=(1.0,))
    standardiser = probe.Standardiser.fit(x)
    for label in (0, 1):
        model = LogisticRegression(C=1.0, max_iter=5000).fit(standardiser(x), labels[:, label])
        np.testing.assert_allclose(x @ fit.head["kernel"][:, label] + fit.head["bias"][label],
                                   model.decision_function(standardiser(x)), rtol=1e-4, atol=1e-4)
    assert np.all(x @ fit.head["kernel"][:, 2] + fit.head["bias"][2] > 20)


def test_standardisation_uses_the_training_features_only():
    train = np.array([[1.0, 10.0], [3.0, 10.0]])
    standardiser = probe.Standardiser.fit(train)
    np.testing.assert_allclose(standardiser.mean, [2.0, 10.0])
    np.testing.assert_allclose(standardiser.std, [1.0, 1.0])  # the constant feature keeps std 1
    np.testing.assert_allclose(standardiser(np.array([[5.0, 12.0]])), [[3.0, 2.0]])


def test_c_is_chosen_by_validation_score_then_log_loss():
    x, y = _features(2, n=200, shift=1.0)
    val_x, val_y = _features(3, n=200, shift=1.0)
    fit = probe.fit_probe(x, y, val_x, val_y, num_classes=3, multi_label=False)
    assert [h["C"] for h in fit.history] == list(probe.DEFAULT_C_VALUES)
    best = max(fit.history, key=lambda h: (h["val_balanced_accuracy"], -h["val_log_loss"]))
    assert fit.c == best["C"] and fit.val_loss == best["val_log_loss"]
    assert len({round(h["val_log_loss"], 6) for h in fit.history}) > 1  # C matters: the choice is not vacuous


def test_probe_run_freezes_the_backbone_and_reports_the_folded_head(tmp_path):
    c = base_config()
    tiny_arms(c, image_size=128)
    c.data.source, c.data.synthetic_num_images, c.data.synthetic_size = "synthetic", 48, 128
    d = c.downstream
    d.init, d.label_fractions, d.seeds, d.saliency = "random", (1.0, 0.5), (0,), ""
    d.probe_c_values = (0.01, 1.0)
    splits = finetune.load_downstream_data(c)
    cache = {}
    records = [finetune.train_and_evaluate(c, splits, finetune.RunSpec(
        "cnn", "linear_probe", finetune.resolve_init(c, "cnn", "random", tmp_path), fraction, 0),
        tmp_path / f"run{fraction}", classifier_dir=tmp_path / f"model{fraction}", feature_cache=cache)
        for fraction in (1.0, 0.5)]
    assert len(cache) == 2  # train_full and val features, extracted once for both fractions
    for record in records:
        assert record["probe"] == "logistic_regression" and record["epochs_run"] == 0
        assert sum(h["chosen"] for h in record["history"]) == 1
    classifier = load_classifier(tmp_path / "model1.0")
    arm_init = finetune.resolve_init(c, "cnn", "random", tmp_path)
    initial = finetune.InitialVariables(128)(classifier.model, arm_init, jax.random.fold_in(jax.random.PRNGKey(0), 0))
    trained, start = (jax.tree.leaves({k: v for k, v in variables["params"].items() if k != "head"})
                      for variables in (classifier.variables, initial))
    assert all(np.array_equal(a, b) for a, b in zip(trained, start, strict=True))  # the backbone stayed frozen
