"""Classification metrics for the three sentiment labels (numpy only)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from stream_sentiment.modeling.corpora import LABELS


def classification_report(gold: Sequence[str], probabilities: np.ndarray) -> dict[str, Any]:
    """Accuracy, macro-F1, polar accuracy, per-class precision/recall and the confusion matrix.

    Args:
        gold: one label per row, each in ``LABELS``.
        probabilities: ``[n, len(LABELS)]`` class probabilities in ``LABELS`` order.

    ``polar_accuracy`` is measured on the rows whose gold label is negative or
    positive only: is P(positive) > P(negative) exactly when the gold label is
    positive? It is the question an alerting system asks of a polar post, and it
    does not depend on where the neutral band is cut.
    """
    if len(gold) != len(probabilities):
        raise ValueError(f"{len(gold)} labels for {len(probabilities)} predictions")
    index = {label: i for i, label in enumerate(LABELS)}
    truth = np.array([index[g] for g in gold], dtype=np.int64)
    predicted = probabilities.argmax(axis=1) if len(gold) else np.zeros(0, dtype=np.int64)
    size = len(LABELS)
    confusion = np.zeros((size, size), dtype=np.int64)
    np.add.at(confusion, (truth, predicted), 1)

    per_class: dict[str, dict[str, float | int]] = {}
    f1_scores = []
    for i, label in enumerate(LABELS):
        true_positive = confusion[i, i]
        predicted_count = confusion[:, i].sum()
        support = confusion[i, :].sum()
        precision = true_positive / predicted_count if predicted_count else 0.0
        recall = true_positive / support if support else 0.0
        f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
        f1_scores.append(f1)
        per_class[label] = {
            "precision": round(float(precision), 4),
            "recall": round(float(recall), 4),
            "f1": round(float(f1), 4),
            "support": int(support),
        }

    negative, positive = index["negative"], index["positive"]
    polar = (truth == negative) | (truth == positive)
    says_positive = probabilities[polar, positive] > probabilities[polar, negative]
    polar_correct = says_positive == (truth[polar] == positive)
    n = len(gold)
    return {
        "n": n,
        "accuracy": round(float((predicted == truth).mean()) if n else 0.0, 4),
        "macro_f1": round(float(np.mean(f1_scores)), 4),
        "polar_accuracy": round(float(polar_correct.mean()) if polar.any() else 0.0, 4),
        "polar_n": int(polar.sum()),
        "per_class": per_class,
        "confusion_matrix": {
            "labels": list(LABELS),
            "rows_are": "gold",
            "matrix": confusion.tolist(),
        },
    }

