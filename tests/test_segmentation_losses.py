"""Segmentation losses and scores against NumPy renderings of SSL4MIS's formulas and brute-force references.

Losses: `code/utils/losses.py` DiceLoss, torch's CrossEntropyLoss and `code/utils/ramps.py` sigmoid_rampup written
out in NumPy (float64), compared on random inputs at relative error <= 1e-5. Scores: Dice / IoU by counting, HD95 by
all-pairs surface distances, the t-interval by hand.
"""

import jax.numpy as jnp
import numpy as np
import pytest
import scipy.stats

from cass_jax import metrics as classification_metrics
from cass_jax.segmentation import losses, metrics


def rel_err(ours, theirs) -> float:
    ours, theirs = np.asarray(ours, np.float64), np.asarray(theirs, np.float64)
    return float(np.abs(ours - theirs).max() / max(np.abs(theirs).max(), 1e-12))


def numpy_softmax(logits: np.ndarray) -> np.ndarray:
    shifted = logits - logits.max(-1, keepdims=True)
    return np.exp(shifted) / np.exp(shifted).sum(-1, keepdims=True)


def numpy_cross_entropy(logits: np.ndarray, labels: np.ndarray) -> float:
    """torch.nn.CrossEntropyLoss() (mean over pixels) of NCHW logits, here NHWC."""
    log_probabilities = np.log(numpy_softmax(logits))
    return float(-np.take_along_axis(log_probabilities, labels[..., None], -1).mean())


def numpy_ssl4mis_dice_loss(probabilities: np.ndarray, labels: np.ndarray, num_classes: int) -> float:
    """SSL4MIS DiceLoss.forward(inputs, target, softmax=False), transcribed: one-hot, per-class _dice_loss, mean."""
    loss = 0.0
    for i in range(num_classes):
        score, target = probabilities[..., i], (labels == i).astype(np.float64)
        smooth = 1e-5
        intersect = np.sum(score * target)
        y_sum = np.sum(target * target)
        z_sum = np.sum(score * score)
        loss += 1 - (2 * intersect + smooth) / (z_sum + y_sum + smooth)
    return loss / num_classes


def numpy_sigmoid_rampup(current: float, rampup_length: float) -> float:
    if rampup_length == 0:
        return 1.0
    current = np.clip(current, 0.0, rampup_length)
    phase = 1.0 - current / rampup_length
    return float(np.exp(-5.0 * phase * phase))


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_cross_entropy_and_dice_match_numpy(seed):
    rng = np.random.default_rng(seed)
    num_classes = 4
    logits = (3.0 * rng.standard_normal((3, 12, 10, num_classes))).astype(np.float32)
    labels = rng.integers(0, num_classes, (3, 12, 10))
    labels[0] = 0  # a slice of background only, as many ACDC slices
    reference_logits = logits.astype(np.float64)
    assert rel_err(losses.cross_entropy(jnp.asarray(logits), jnp.asarray(labels)),
                   numpy_cross_entropy(reference_logits, labels)) <= 1e-5
    probabilities = numpy_softmax(reference_logits)
    ours = losses.dice_loss(jnp.asarray(probabilities.astype(np.float32)), jnp.asarray(labels), num_classes)
    assert rel_err(ours, numpy_ssl4mis_dice_loss(probabilities, labels, num_classes)) <= 1e-5


def test_dice_loss_counts_absent_classes_and_background():
    """A class absent from target and prediction scores Dice (0 + 1e-5) / (0 + 1e-5) = 1 (loss 0); perfect -> 0."""
    labels = np.zeros((1, 4, 4), np.int64)
    labels[0, :2] = 1
    one_hot = np.eye(3)[labels]
    assert float(losses.dice_loss(jnp.asarray(one_hot), jnp.asarray(labels), 3)) == pytest.approx(0.0, abs=1e-6)
    uniform = np.full((1, 4, 4, 3), 1 / 3)
    assert rel_err(losses.dice_loss(jnp.asarray(uniform), jnp.asarray(labels), 3),
                   numpy_ssl4mis_dice_loss(uniform, labels, 3)) <= 1e-5


def test_sigmoid_rampup_and_consistency_weight_match_numpy():
    for length in (0.0, 5.0, 200.0):
        for current in (-3.0, 0.0, 1.0, 2.5, 4.0, 5.0, 99.0, 200.0, 250.0):
            assert rel_err(losses.sigmoid_rampup(current, length), numpy_sigmoid_rampup(current, length)) <= 1e-5
    for step in (0, 149, 150, 7_777, 29_999, 30_000, 40_000):
        expected = 0.1 * numpy_sigmoid_rampup(step // 150, 200.0)
        assert rel_err(losses.consistency_weight(jnp.asarray(step)), expected) <= 1e-5
    assert float(losses.consistency_weight(30_000)) == pytest.approx(0.1)


def brute_force_hd95(a: np.ndarray, b: np.ndarray, spacing) -> float:
    """95th percentile of both directed surface-to-surface distances, surfaces = mask minus its 4/6-neighbour
    erosion (outside the array counts as background), every pair of surface points measured."""
    def surface(mask):
        padded = np.pad(mask, 1)
        eroded = mask.copy()
        for axis in range(mask.ndim):
            for shift in (-1, 1):
                eroded &= np.roll(padded, shift, axis)[tuple(slice(1, -1) for _ in range(mask.ndim))]
        return np.argwhere(mask & ~eroded) * np.asarray(spacing, np.float64)

    points_a, points_b = surface(a), surface(b)
    distances = np.sqrt(((points_a[:, None, :] - points_b[None, :, :]) ** 2).sum(-1))
    return float(np.percentile(np.concatenate([distances.min(1), distances.min(0)]), 95))


def random_blob(shape, seed: int) -> np.ndarray:
    from scipy import ndimage
    field = ndimage.gaussian_filter(np.random.default_rng(seed).standard_normal(shape), 2.0)
    return field > np.quantile(field, 0.7)


@pytest.mark.parametrize("shape, spacing", [((40, 36), (1.0, 1.0)), ((5, 24, 20), (10.0, 1.0, 1.0))])
def test_structure_scores_against_brute_force(shape, spacing):
    for seed in range(3):
        a, b = random_blob(shape, seed), random_blob(shape, seed + 10)
        dice, iou, hd95 = metrics.structure_scores(a, b, spacing)
        assert dice == pytest.approx(2 * (a & b).sum() / (a.sum() + b.sum()))
        assert iou == pytest.approx((a & b).sum() / (a | b).sum())
        assert hd95 == pytest.approx(brute_force_hd95(a, b, spacing), rel=1e-9)
        assert hd95 > 0


def test_empty_structures_follow_ssl4mis():
    empty, filled = np.zeros((8, 8), bool), np.zeros((8, 8), bool)
    filled[2:5, 2:5] = True
    assert metrics.structure_scores(empty, filled) == (0.0, 0.0, 0.0)   # val_2D: empty prediction -> 0, 0
    assert metrics.structure_scores(empty, empty) == (0.0, 0.0, 0.0)
    dice, iou, hd95 = metrics.structure_scores(filled, empty)           # MedPy raises here; HD95 undefined
    assert (dice, iou) == (0.0, 0.0) and np.isnan(hd95)
    assert np.isnan(metrics.structure_scores(empty, empty, empty_policy="ignore_empty_reference")).all()
    dice, iou, hd95 = metrics.structure_scores(empty, filled, empty_policy="ignore_empty_reference")
    assert (dice, iou) == (0.0, 0.0) and np.isnan(hd95)


def test_class_scores_and_means():
    reference = np.zeros((2, 10, 10), np.uint8)
    reference[:, 2:6, 2:6] = 1
    reference[:, 6:9, 6:9] = 2
    prediction = reference.copy()
    prediction[:, 2, 2:6] = 0
    scores = metrics.class_scores(prediction, reference, num_classes=4)
    assert scores["dice"][0] == pytest.approx(2 * 24 / (24 + 32))
    assert scores["dice"][1] == 1.0 and scores["hd95"][1] == 0.0
    assert scores["dice"][2] == 0.0 and scores["hd95"][2] == 0.0      # class 3: absent, predicted absent
    other = {"dice": np.array([0.5, np.nan, 1.0]), "iou": np.ones(3), "hd95": np.array([2.0, 4.0, np.nan])}
    summary = metrics.mean_scores([scores, other], prefix="volume/")
    assert summary["volume/dice/class_1"] == pytest.approx((scores["dice"][0] + 0.5) / 2)
    assert summary["volume/dice/class_2"] == 1.0                       # the NaN case is left out
    assert summary["volume/dice/mean"] == pytest.approx(np.mean([summary[f"volume/dice/class_{c}"]
                                                                 for c in (1, 2, 3)]))


def test_mean_confidence_interval():
    values = [1.0, 2.0, 3.0, 4.0, 5.0]
    result = classification_metrics.mean_confidence_interval(values)
    assert result["mean"] == 3.0 and result["n"] == 5
    assert result["half_width"] == pytest.approx(2.7764451 * np.sqrt(2.5) / np.sqrt(5), rel=1e-6)
    low, high = scipy.stats.t.interval(0.95, 4, loc=3.0, scale=scipy.stats.sem(values))
    assert (result["low"], result["high"]) == pytest.approx((low, high))
    assert np.isnan(classification_metrics.mean_confidence_interval([0.8])["half_width"])
