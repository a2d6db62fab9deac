"""The linear probe that ranks representations: standardised frozen features, L2 logistic regression (scikit-learn).

On real MRI the gradient-trained head scored chance for every initialisation while this protocol separated them
(RESULTS.md). The fitted regression is folded back into the model's `head` Dense, so a probe is an ordinary
classifier: evaluated, saved and loaded like a fine-tuned one.
"""

from __future__ import annotations

import dataclasses
import functools
import warnings
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import numpy as np
from flax import linen as nn
from sklearn.exceptions import ConvergenceWarning
from sklearn.linear_model import LogisticRegression

from cass_jax import data as data_lib
from cass_jax import metrics as metrics_lib

# Inverse L2 strengths tried (scikit-learn's C); the one with the best validation score is kept.
DEFAULT_C_VALUES = (1e-4, 1e-3, 1e-2, 1e-1, 1.0, 10.0)
# Logit of a class the labelled subset lacks (1% labels can miss one): never predicted, finite for the loss.
ABSENT_CLASS_LOGIT = -30.0


@functools.partial(jax.jit, static_argnames="model")
def _features(variables: Mapping[str, Any], images: jax.Array, *, model: nn.Module) -> jax.Array:
    return model.apply(variables, images, train=False, return_features=True)[1]


def extract_features(model: nn.Module, variables: Mapping[str, Any], source: Any, data_config: Any,
                     batch_size: int) -> np.ndarray:
    """Pooled backbone features (N, D) of every image of `source`, in order: eval mode, no augmentation."""
    features = []
    for batch in data_lib.eval_iterator(source, data_config, batch_size=min(batch_size, len(source))):
        mask = np.asarray(batch["mask"]).astype(bool)
        features.append(np.asarray(_features(variables, batch["image"], model=model), np.float64)[mask])
    return np.concatenate(features)


@dataclasses.dataclass(frozen=True)
class Standardiser:
    """Per-feature mean and standard deviation of the labelled training features (constant features: std 1)."""

    mean: np.ndarray
    std: np.ndarray

    @classmethod
    def fit(cls, features: np.ndarray) -> Standardiser:
        std = features.std(axis=0)
        return cls(features.mean(axis=0), np.where(std > 1e-12, std, 1.0))

    def __call__(self, features: np.ndarray) -> np.ndarray:
        return (features - self.mean) / self.std


def _fit_one(features: np.ndarray, labels: np.ndarray, c: float, seed: int) -> LogisticRegression:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        return LogisticRegression(C=c, max_iter=5000, random_state=seed).fit(features, labels)


def head_from_regression(models: Sequence[LogisticRegression | float], standardiser: Standardiser,
                         num_classes: int, multi_label: bool) -> dict[str, np.ndarray]:
    """The `head` Dense {"kernel": (D, C), "bias": (C,)} whose logits on raw features are the regression's on
    standardised ones: W' = W / std, b' = b - W (mean / std).

    Multi-class: one multinomial model (a binary one gives logits [0, w.z + b]). Multi-label: one binary model per
    label, or a constant logit where the labelled subset has only one value of that label.
    """
    dim = standardiser.mean.shape[0]
    weights = np.zeros((num_classes, dim))
    bias = np.full(num_classes, ABSENT_CLASS_LOGIT)
    if multi_label:
        for label, model in enumerate(models):
            if isinstance(model, LogisticRegression):
                weights[label], bias[label] = model.coef_[0], model.intercept_[0]
            else:
                bias[label] = model
    else:
        (model,) = models
        classes = np.asarray(model.classes_, np.int64)
        if len(classes) == 2:
            weights[classes[1]], bias[classes[1]] = model.coef_[0], model.intercept_[0]
            bias[classes[0]] = 0.0
        else:
            weights[classes], bias[classes] = model.coef_, model.intercept_
    kernel = (weights / standardiser.std).T
    folded_bias = bias - weights @ (standardiser.mean / standardiser.std)
    return {"kernel": kernel.astype(np.float32), "bias": folded_bias.astype(np.float32)}


def _probabilities(head: Mapping[str, np.ndarray], features: np.ndarray, multi_label: bool) -> np.ndarray:
    logits = features @ head["kernel"].astype(np.float64) + head["bias"]
    if multi_label:
        return 1.0 / (1.0 + np.exp(-logits))
    logits = logits - logits.max(axis=1, keepdims=True)
    exp = np.exp(logits)
    return exp / exp.sum(axis=1, keepdims=True)


def _log_loss(probabilities: np.ndarray, labels: np.ndarray, multi_label: bool) -> float:
    p = np.clip(probabilities, 1e-12, 1 - 1e-12)
    if multi_label:
        return float(-np.mean(labels * np.log(p) + (1 - labels) * np.log(1 - p)))
    return float(-np.mean(np.log(p[np.arange(len(labels)), labels.astype(np.int64)])))


@dataclasses.dataclass
class ProbeFit:
    """The chosen head, its inverse strength C, and every C's validation scores."""

    head: dict[str, np.ndarray]
    c: float
    val_loss: float
    history: list[dict[str, float]]


def fit_probe(train_features: np.ndarray, train_labels: np.ndarray, val_features: np.ndarray,
              val_labels: np.ndarray, num_classes: int, multi_label: bool,
              c_values: Sequence[float] = DEFAULT_C_VALUES, seed: int = 0) -> ProbeFit:
    """Fits the regression for each C on the standardised training features and keeps the C with the best
    validation score (balanced accuracy; micro F1 when multi-label), ties broken by the lower validation log loss."""
    standardiser = Standardiser.fit(train_features)
    train_z = standardiser(train_features)
    score_name = "micro_f1" if multi_label else "balanced_accuracy"
    history, best = [], None
    for c in c_values:
        if multi_label:
            models = [_fit_one(train_z, column, c, seed) if 0 < column.sum() < len(column)
                      else (-ABSENT_CLASS_LOGIT if column.sum() else ABSENT_CLASS_LOGIT)
                      for column in train_labels.T.astype(np.int64)]
        else:
            models = [_fit_one(train_z, train_labels, c, seed)]
        head = head_from_regression(models, standardiser, num_classes, multi_label)
        probabilities = _probabilities(head, val_features, multi_label)
        score = metrics_lib.classification_metrics(val_labels, probabilities, multi_label)[score_name]
        loss = _log_loss(probabilities, val_labels, multi_label)
        history.append({"C": float(c), f"val_{score_name}": float(score), "val_log_loss": loss})
        if best is None or (score, -loss) > (best[0], -best[1]):
            best = (score, loss, float(c), head)
    return ProbeFit(head=best[3], c=best[2], val_loss=best[1], history=history)
