"""Shallower students of the 6-layer MiniLM: which base layers they keep, and their initial weights.

A student keeps the base model's width (384) and vocabulary, so it can start from the base
weights: the embeddings, and ``layers`` of the six transformer layers spread evenly with the top
one always kept (the sentence-transformer was pre-trained to mean-pool the *last* layer's
states). This is TinyBERT's uniform mapping: 3 layers keep base layers 1, 3, 5; 2 keep 2, 5.
A student may also have a narrower FFN (``intermediate_size``): each kept layer keeps its most
important FFN neurons (:func:`prune_ffn`), the rest of the layer unchanged.

:func:`kept_layers`, :func:`student_state` and :func:`prune_ffn` are torch-free (plain mappings of arrays), so the
CPU tests check them without torch; :func:`random_student_checkpoint` (torch) writes a random
student for measuring speed, which does not depend on the weights.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import replace
from pathlib import Path
from typing import Any, TypeVar

import numpy as np

T = TypeVar("T")
_LAYER = re.compile(r"^encoder\.layer\.(\d+)\.(.+)$")


def kept_layers(base_layers: int, layers: int) -> list[int]:
    """Base layer indices a ``layers``-deep student starts from: evenly spaced, the top one always kept."""
    if not 1 <= layers <= base_layers:
        raise ValueError(f"a student has 1..{base_layers} layers, not {layers}")
    return [round((i + 1) * base_layers / layers) - 1 for i in range(layers)]


def student_state(base: Mapping[str, T], base_layers: int, layers: int) -> dict[str, T]:
    """The base state dict renumbered for a ``layers``-deep student (layer ``kept_layers[i]`` -> ``i``).

    Everything outside ``encoder.layer.*`` (embeddings, and a head if present) is kept as is.
    """
    mapping = {base_index: i for i, base_index in enumerate(kept_layers(base_layers, layers))}
    state: dict[str, T] = {}
    for name, value in base.items():
        match = _LAYER.match(name)
        if match is None:
            state[name] = value
        elif int(match.group(1)) in mapping:
            state[f"encoder.layer.{mapping[int(match.group(1))]}.{match.group(2)}"] = value
    return state


def ffn_neurons_to_keep(up_weight: Any, down_weight: Any, size: int) -> list[int]:
    """The ``size`` FFN neurons of one layer with the largest ``|up row| * |down column|``, in index order.

    A neuron's contribution to the layer output scales with both its input weights (``up_weight``
    ``[intermediate, hidden]``, torch's Linear layout) and its output weights (``down_weight``
    ``[hidden, intermediate]``); the product of their norms is the usual magnitude criterion for
    structured pruning. Arrays or tensors: anything ``numpy.asarray`` reads.
    """
    up = np.asarray(up_weight, dtype=np.float32)
    down = np.asarray(down_weight, dtype=np.float32)
    if not 1 <= size <= up.shape[0]:
        raise ValueError(f"keep 1..{up.shape[0]} FFN neurons, not {size}")
    importance = np.linalg.norm(up, axis=1) * np.linalg.norm(down, axis=0)
    return sorted(int(i) for i in np.argsort(-importance, kind="stable")[:size])


def prune_ffn(state: Mapping[str, Any], layers: int, size: int) -> dict[str, Any]:
    """``state`` with every layer's FFN cut to its ``size`` most important neurons (:func:`ffn_neurons_to_keep`)."""
    pruned = dict(state)
    for layer in range(layers):
        up, down = f"encoder.layer.{layer}.intermediate.dense", f"encoder.layer.{layer}.output.dense"
        keep = ffn_neurons_to_keep(state[f"{up}.weight"], state[f"{down}.weight"], size)
        pruned[f"{up}.weight"] = state[f"{up}.weight"][keep]
        pruned[f"{up}.bias"] = state[f"{up}.bias"][keep]
        pruned[f"{down}.weight"] = state[f"{down}.weight"][:, keep]
    return pruned


def random_student_checkpoint(
    base_model_dir: Path, layers: int, destination: Path, *, intermediate_size: int = 0, seed: int = 0
) -> Path:
    """A randomly initialised ``layers``-deep classifier as a checkpoint folder ``calibrate`` packages.

    For speed measurements only: ONNX Runtime's time does not depend on the weights' values.
    """
    import torch

    from stream_sentiment.modeling.checkpoint_files import write_checkpoint
    from stream_sentiment.modeling.minilm import EncoderConfig, SentimentClassifier

    config = EncoderConfig.from_json(base_model_dir / "config.json")
    config = replace(config, num_hidden_layers=layers, intermediate_size=intermediate_size or config.intermediate_size)
    torch.manual_seed(seed)
    model = SentimentClassifier(config, fused_attention=False)
    write_checkpoint(destination, model.state_dict(), config.to_dict(), base_model_dir)
    return destination


def main(argv: list[str] | None = None) -> int:
    import argparse

    parser = argparse.ArgumentParser(description="Write a random student checkpoint (for speed measurements)")
    parser.add_argument("--base-model", type=Path, required=True)
    parser.add_argument("--layers", type=int, required=True)
    parser.add_argument("--intermediate-size", type=int, default=0, help="FFN width (0: the base's)")
    parser.add_argument("--output", type=Path, required=True)
    args = parser.parse_args(argv)
    print(random_student_checkpoint(args.base_model, args.layers, args.output,
                                    intermediate_size=args.intermediate_size))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
