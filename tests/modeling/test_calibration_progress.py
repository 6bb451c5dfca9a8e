"""calibrate's progress bars, through its torch-free half (``modeling.quantize``) on a tiny FP32 model.

The real FP32 model comes from a torch export; here a made-up ONNX network with the
same inputs and output (token embedding, masked sum, two MatMuls) stands in, so the
calibration passes and scoring runs that ``calibrate`` makes run on this CPU in seconds.
"""

from __future__ import annotations

import json
import re
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from stream_sentiment.cli import main
from stream_sentiment.engines.manifest import EngineManifest, EngineVersion, load_engine_version, write_manifest
from stream_sentiment.modeling.corpora import LABELS
from stream_sentiment.modeling.quantize import (
    CALIBRATION_LENGTH,
    CALIBRATION_ROWS,
    METHODS,
    STATIC_METHODS,
    compare_methods,
    score,
    uniform_calibration_batches,
)
from tests.conftest import COMMITTED_ENGINE, REPO

TOKENIZER_FILES = ("tokenizer.json", "vocab.txt", "tokenizer_config.json", "special_tokens_map.json")
VOCABULARY = 30522  # the committed tokenizer's (BERT uncased) vocabulary
HIDDEN = 8


def tiny_fp32_model(path: Path) -> Path:
    from onnx import TensorProto, helper

    rng = np.random.default_rng(0)
    weights = {
        "embedding": rng.normal(size=(VOCABULARY, HIDDEN)).astype(np.float32),
        "dense": rng.normal(size=(HIDDEN, HIDDEN)).astype(np.float32),
        "classifier": rng.normal(size=(HIDDEN, len(LABELS))).astype(np.float32),
        "sequence_axis": np.array([1], dtype=np.int64),
        "feature_axis": np.array([2], dtype=np.int64),
    }
    nodes = [
        helper.make_node("Gather", ["embedding", "input_ids"], ["embedded"], name="token_embedding"),
        helper.make_node("Cast", ["attention_mask"], ["mask_float"], to=TensorProto.FLOAT),
        helper.make_node("Unsqueeze", ["mask_float", "feature_axis"], ["mask_column"]),
        helper.make_node("Mul", ["embedded", "mask_column"], ["masked"]),
        helper.make_node("ReduceSum", ["masked", "sequence_axis"], ["pooled"], keepdims=0),
        helper.make_node("MatMul", ["pooled", "dense"], ["hidden"], name="dense"),
        helper.make_node("MatMul", ["hidden", "classifier"], ["logits"], name="classifier"),
    ]
    return save_classifier_graph(path, "tiny-sentiment", nodes, weights)


def save_classifier_graph(path: Path, graph_name: str, nodes: list[Any], weights: dict[str, np.ndarray]) -> Path:
    """Save ``nodes`` as a classifier with the engines' interface: int64 ``input_ids`` and ``attention_mask``
    in, float ``logits`` out; ``weights`` are its initializers."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    graph = helper.make_graph(
        nodes,
        graph_name,
        [helper.make_tensor_value_info(name, TensorProto.INT64, ["batch", "sequence"])
         for name in ("input_ids", "attention_mask")],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", len(LABELS)])],
        [numpy_helper.from_array(value, name) for name, value in weights.items()],
    )
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(path))
    return path


def tiny_fp32_version(folder: Path, write_model: Callable[[Path], Path] = tiny_fp32_model,
                      model: str = "tiny") -> EngineVersion:
    """A complete FP32 version folder at ``folder``: the committed engine's tokenizer and ``write_model``'s
    network (:func:`tiny_fp32_model`)."""
    folder.mkdir(parents=True)
    for name in TOKENIZER_FILES:
        shutil.copy2(COMMITTED_ENGINE / name, folder / name)
    write_model(folder / "model.fp32.onnx")
    write_manifest(folder, EngineManifest(
        model=model, version="t1-fp32", labels=LABELS, precision="fp32", model_file="model.fp32.onnx",
        tokenizer_file="tokenizer.json", text_normalization="twitter-v1", max_length=256,
    ))
    return load_engine_version(folder)


@pytest.fixture
def tiny_fp32(tmp_path: Path) -> EngineVersion:
    return tiny_fp32_version(tmp_path / "engines" / "t1-fp32")


@pytest.fixture(scope="module")
def golden() -> tuple[list[str], list[str]]:
    records = [json.loads(line) for line in (REPO / "calibration" / "golden.jsonl").read_text().splitlines()]
    return [r["text"] for r in records], [r["label"] for r in records]


def test_compare_methods_draws_a_bar_per_calibration_pass_and_scoring_run(tiny_fp32, golden, capsys):
    texts, labels = golden
    calibration_texts = texts * 2  # 120 texts: 3 whole batches of 32, the rest left out
    batches = len(calibration_texts) // CALIBRATION_ROWS
    results = compare_methods(tiny_fp32, calibration_texts, {"golden": (texts, labels)}, tiny_fp32.path.parent)
    out, err = capsys.readouterr()
    assert set(results) == {"fp32", *METHODS}
    # Each bar ends full: calibration counts the batches ORT has run, scoring the posts scored.
    assert re.search(rf"score fp32 golden: 100%\|[^|]*\| {len(texts)}/{len(texts)} ", err)
    for method in METHODS:
        assert re.search(rf"score {method} golden: 100%\|[^|]*\| {len(texts)}/{len(texts)} ", err)
    for method in STATIC_METHODS:  # dynamic quantization runs no calibration pass
        assert re.search(rf"calibrate {method}: 100%\|[^|]*\| {batches}/{batches} ", err)
    assert "calibrate dynamic" not in err
    assert "calibrate" not in out and "score" not in out


def test_no_bars_when_progress_is_off(tiny_fp32, golden, capsys):
    texts, labels = golden
    results = compare_methods(tiny_fp32, texts * 2, {"golden": (texts, labels)}, tiny_fp32.path.parent,
                              show_progress=False)
    probabilities = score(tiny_fp32, texts, desc="score quietly", show_progress=False)
    err = capsys.readouterr().err
    assert "calibrate" not in err and "score" not in err
    assert probabilities.shape == (len(texts), len(LABELS))
    assert results["minmax"]["golden"]["agreement_with_fp32"] > 0  # type: ignore[index]


def test_calibrate_takes_no_progress_and_its_help_needs_no_torch(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["calibrate", "--help"])
    assert exit_info.value.code == 0
    assert "--no-progress" in capsys.readouterr().out


def test_uniform_calibration_batches_are_whole_and_cut_or_padded_to_one_length():
    token_ids = [[101] + [7] * n + [102] for n in range(70)]  # 70 posts, up to 71 tokens: 2 whole batches of 32
    batches = uniform_calibration_batches(token_ids)
    assert [b.input_ids.shape for b in batches] == [(CALIBRATION_ROWS, CALIBRATION_LENGTH)] * 2
    assert batches[1].attention_mask[-1].sum() == CALIBRATION_LENGTH  # the longest are cut, not dropped
    with pytest.raises(ValueError, match="at least"):
        uniform_calibration_batches(token_ids[:CALIBRATION_ROWS - 1])  # no whole batch: refused, not an empty list
