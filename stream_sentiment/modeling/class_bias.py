"""A class-bias correction of a trained classifier, chosen on the dev sets (issue 16).

The training tweets (CrowdFlower) are 43% negative, 39% neutral and 18% positive, and their
"neutral" is mostly news-like text; the VADER rating protocol that the held-out review and NYT
sentences follow -- as do the test tweets -- calls any mean rating within +-0.5 neutral and has many
more positive posts. A classifier trained on the tweets therefore leans negative, and towards its
own neutral, off its training domain. Adding a constant to the negative and the positive logit
(neutral is the reference) moves the decision boundaries without touching the encoder: the classic
prior-shift correction, with the shift *chosen*, not assumed, by the same dev score that ranks v2's
runs (:func:`~stream_sentiment.modeling.mixture.selection_score_v2`: tweet-validation macro-F1,
review-dev macro-F1, NYT polar accuracy) over a grid. The test tweets take no part; ``calibrate``
scores them once, for the record.

The chosen shift is added to the classifier's bias in a copy of the checkpoint, so every backend
(ONNX Runtime INT8, the FP32 export, torch-cuda) serves it with no serving code, and ``calibrate``
packages the copy as it packages any checkpoint.

    python -m stream_sentiment.modeling.class_bias --checkpoint build/train/v2 --output build/train/v2-bias
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path
from typing import Any

import numpy as np

from stream_sentiment.engines.base import softmax
from stream_sentiment.labels import LABELS
from stream_sentiment.modeling.metrics import classification_report
from stream_sentiment.modeling.mixture import DEV_SETS, load_mixture, selection_score_v2

# Shifts tried for the negative and the positive logit (neutral stays 0), in logit units; of equal dev
# scores the smaller total shift is kept.
GRID = tuple(round(float(x), 2) for x in np.arange(-1.0, 3.0001, 0.1))
RECORD_FILE = "class_bias.json"

DevLogits = dict[str, tuple[np.ndarray, list[str]]]


def shifted_probabilities(log_probabilities: np.ndarray, bias: np.ndarray) -> np.ndarray:
    """What the shifted classifier outputs: the engines' softmax of ``log_probabilities + bias``."""
    return softmax(log_probabilities + bias)


def _bias_vector(negative: float, positive: float) -> np.ndarray:
    values = {"negative": negative, "neutral": 0.0, "positive": positive}
    return np.array([values[label] for label in LABELS])


def score_shift(dev: DevLogits, negative: float, positive: float) -> tuple[float, dict[str, dict[str, Any]]]:
    """The dev selection score and reports of the classifier with the shift applied."""
    bias = _bias_vector(negative, positive)
    reports = {name: classification_report(gold, shifted_probabilities(logp, bias))
               for name, (logp, gold) in dev.items()}
    return selection_score_v2(reports), reports


def choose_shift(dev: DevLogits, grid: tuple[float, ...] = GRID) -> dict[str, Any]:
    """The grid's best (negative, positive) shift by the dev score; a tie keeps the smaller total shift."""
    best: tuple[float, float, float, float] | None = None  # (score, -size, negative, positive)
    for negative in grid:
        for positive in grid:
            score, _ = score_shift(dev, negative, positive)
            candidate = (score, -(abs(negative) + abs(positive)), negative, positive)
            if best is None or candidate[:2] > best[:2]:
                best = candidate
    assert best is not None
    score, _, negative, positive = best
    unshifted, before = score_shift(dev, 0.0, 0.0)
    _, after = score_shift(dev, negative, positive)
    summary = {name: {k: r[k] for k in ("accuracy", "macro_f1", "polar_accuracy")} for name, r in after.items()}
    return {"shift": {"negative": negative, "neutral": 0.0, "positive": positive},
            "selection_score": score, "selection_score_unshifted": unshifted, "dev": summary,
            "dev_unshifted": {name: {k: r[k] for k in ("accuracy", "macro_f1", "polar_accuracy")}
                              for name, r in before.items()},
            "grid": [grid[0], grid[-1], len(grid)]}


def dev_log_probabilities(checkpoint: Path, corpora_dir: Path, *, show_progress: bool = True) -> DevLogits:
    """Log class probabilities of the FP32 checkpoint on each dev set (normalized as in training)."""
    import torch

    from stream_sentiment.batching.normalization import get_normalizer
    from stream_sentiment.modeling.export import load_classifier
    from stream_sentiment.modeling.train import load_tokenizer, predict

    training = json.loads((checkpoint / "training.json").read_text()) if (checkpoint / "training.json").exists() else {}
    normalize = get_normalizer(training.get("config", {}).get("normalization", "twitter-v1"))
    model = load_classifier(checkpoint)
    tokenizer = load_tokenizer(checkpoint, int(training.get("config", {}).get("max_length", 256)))
    mixture = load_mixture(corpora_dir)
    dev: DevLogits = {}
    for name in DEV_SETS:
        rows = mixture.dev[name]
        probabilities = predict(model, tokenizer, [normalize(r.text) for r in rows], torch.device("cpu"),
                                desc=f"score {name}", show_progress=show_progress)
        dev[name] = (np.log(np.clip(probabilities, 1e-12, 1.0)), [r.label for r in rows])
    return dev


def write_shifted_checkpoint(checkpoint: Path, output: Path, shift: dict[str, float], record: dict[str, Any]) -> Path:
    """A copy of ``checkpoint`` whose classifier bias has ``shift`` added, with the choice recorded beside it."""
    from safetensors.numpy import load_file, save_file

    if output.exists():
        shutil.rmtree(output)
    shutil.copytree(checkpoint, output)
    (weights,) = sorted(output.glob("checkpoint*.safetensors"))
    tensors = load_file(str(weights))
    bias = tensors["classifier.bias"]
    tensors["classifier.bias"] = (bias.astype(np.float32) + _bias_vector(shift["negative"], shift["positive"])
                                  .astype(np.float32)).astype(bias.dtype)
    save_file(tensors, str(weights))
    (output / RECORD_FILE).write_text(json.dumps({"source_checkpoint": str(checkpoint), **record}, indent=1) + "\n")
    return output


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--checkpoint", type=Path, required=True, help="a trained checkpoint folder")
    parser.add_argument("--output", type=Path, required=True, help="where the shifted copy goes")
    parser.add_argument("--corpora-dir", type=Path, default=Path(".cache/corpora"))
    parser.add_argument("--no-progress", action="store_true")
    args = parser.parse_args(argv)
    dev = dev_log_probabilities(args.checkpoint, args.corpora_dir, show_progress=not args.no_progress)
    record = choose_shift(dev)
    write_shifted_checkpoint(args.checkpoint, args.output, record["shift"], record)
    print(json.dumps(record))
    return 0


if __name__ == "__main__":
    sys.exit(main())
