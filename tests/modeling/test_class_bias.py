"""The dev-chosen class-bias shift (issue 16): numpy only, no torch."""

from __future__ import annotations

import numpy as np
import pytest

from stream_sentiment.labels import LABELS
from stream_sentiment.modeling.class_bias import choose_shift, score_shift, shifted_probabilities
from stream_sentiment.modeling.mixture import DEV_SETS


def _dev(positive_penalty: float, seed: int = 7) -> dict[str, tuple[np.ndarray, list[str]]]:
    """Dev sets scored by a classifier that knows the gold label but holds ``positive_penalty`` against positive."""
    rng = np.random.default_rng(seed)
    dev = {}
    for name in DEV_SETS:
        gold = rng.integers(0, len(LABELS), 600)
        logits = 2.0 * np.eye(len(LABELS))[gold] + rng.normal(0, 1.0, (600, len(LABELS)))
        logits[:, LABELS.index("positive")] -= positive_penalty
        logp = np.log(shifted_probabilities(logits, np.zeros(len(LABELS))))
        dev[name] = (logp, [LABELS[g] for g in gold])
    return dev


def test_the_chosen_shift_undoes_a_bias_against_a_class_and_raises_the_dev_score():
    dev = _dev(positive_penalty=1.5)
    record = choose_shift(dev)
    assert record["shift"]["neutral"] == 0.0
    assert record["shift"]["positive"] - record["shift"]["negative"] == pytest.approx(1.5, abs=0.45)
    assert record["selection_score"] > record["selection_score_unshifted"]
    assert record["selection_score"] == score_shift(dev, record["shift"]["negative"], record["shift"]["positive"])[0]


def test_no_shift_helps_an_unbiased_classifier_much_and_a_tie_keeps_the_smaller_shift():
    dev = _dev(positive_penalty=0.0)
    record = choose_shift(dev, grid=(-0.1, 0.0, 0.1))
    assert record["selection_score"] - record["selection_score_unshifted"] < 0.01
    # Confident enough that no shift of the grid changes a decision: every shift scores the same, 0 is kept.
    confident = {name: (np.log(shifted_probabilities(20.0 * np.eye(len(LABELS))[[LABELS.index(g) for g in gold]],
                                                     np.zeros(len(LABELS)))), gold) for name, (_, gold) in dev.items()}
    assert choose_shift(confident, grid=(0.5, 0.0, 1.0))["shift"] == {"negative": 0.0, "neutral": 0.0, "positive": 0.0}
