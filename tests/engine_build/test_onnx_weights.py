"""The ONNX -> state-dict mapping behind the torch-cuda backend, checked without torch.

A numpy re-statement of ``SentimentClassifier.forward`` (modeling/minilm.py) run
on the extracted weights must reproduce ONNX Runtime on the FP32-stripped graph:
a wrong name, a missing transpose (the square 384x384 projections would not
fail on shape) or a swapped query/key shows up as different logits.
"""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest

from stream_sentiment.batching.tokenizer import PostTokenizer, pad_to_bucket
from stream_sentiment.engine_build.onnx_weights import (
    ExtractedWeights,
    expected_shapes,
    extract_weights,
    weights_for_version,
)
from stream_sentiment.engine_build.qdq_rewrite import strip_quantization
from stream_sentiment.engines.manifest import EngineVersion

POSTS = [
    "I absolutely love this, best day ever! :)",
    "This is the worst service I have ever had. Furious and disgusted.",
    "The meeting is scheduled for 3pm on Tuesday.",
    "delayed for three hours and nobody told us anything, thanks a lot @airline",
    "ok",
]


@pytest.fixture(scope="module")
def weights(engine_version: EngineVersion) -> ExtractedWeights:
    return weights_for_version(engine_version)


@pytest.fixture(scope="module")
def stripped_logits(engine_version: EngineVersion):
    """ONNX Runtime's FP32 logits (INT8-rounded weights, no activation quantization) for the posts."""
    import onnxruntime as ort

    session = ort.InferenceSession(strip_quantization(engine_version.model_path), providers=["CPUExecutionProvider"])
    tokenizer = PostTokenizer(engine_version)
    ids = tokenizer.encode(POSTS)
    results = []
    for bucket in (32, 64):  # 64 leaves most positions padded: checks the masking
        batch = pad_to_bucket(ids, bucket)
        (logits,) = session.run(["logits"], {"input_ids": batch.input_ids, "attention_mask": batch.attention_mask})
        results.append((batch, logits))
    return results


def _layer_norm(state: dict[str, np.ndarray], prefix: str, x: np.ndarray, eps: float) -> np.ndarray:
    mean = x.mean(-1, keepdims=True)
    var = ((x - mean) ** 2).mean(-1, keepdims=True)
    return (x - mean) / np.sqrt(var + eps) * state[f"{prefix}.weight"] + state[f"{prefix}.bias"]


def _erf(x: np.ndarray) -> np.ndarray:
    # Abramowitz & Stegun 7.1.26, |error| < 1.5e-7: numpy has no erf and scipy is not a dependency.
    sign, x = np.sign(x), np.abs(x)
    t = 1.0 / (1.0 + 0.3275911 * x)
    poly = t * (0.254829592 + t * (-0.284496736 + t * (1.421413741 + t * (-1.453152027 + t * 1.061405429))))
    return sign * (1.0 - poly * np.exp(-x * x))


def _linear(state: dict[str, np.ndarray], prefix: str, x: np.ndarray) -> np.ndarray:
    # nn.Linear: x @ W.T + b, with W [out, in].
    return x @ state[f"{prefix}.weight"].T + state[f"{prefix}.bias"]


def numpy_forward(weights: ExtractedWeights, input_ids: np.ndarray, attention_mask: np.ndarray) -> np.ndarray:
    """``SentimentClassifier.forward`` in eval mode, line for line, in float64."""
    state = {k: v.astype(np.float64) for k, v in weights.state_dict.items()}
    cfg = weights.config
    eps, heads = float(cfg["layer_norm_eps"]), int(cfg["num_attention_heads"])
    rows, seq = input_ids.shape
    head_size = int(cfg["hidden_size"]) // heads
    mask = attention_mask.astype(np.float64)
    additive = ((1.0 - mask) * -10000.0)[:, None, None, :]
    hidden = (
        state["embeddings.word_embeddings.weight"][input_ids]
        + state["embeddings.position_embeddings.weight"][np.arange(seq)][None]
        + state["embeddings.token_type_embeddings.weight"][0]
    )
    hidden = _layer_norm(state, "embeddings.LayerNorm", hidden, eps)

    def split(x: np.ndarray) -> np.ndarray:
        return x.reshape(rows, seq, heads, head_size).transpose(0, 2, 1, 3)

    for layer in range(int(cfg["num_hidden_layers"])):
        p = f"encoder.layer.{layer}."
        q, k, v = (split(_linear(state, f"{p}attention.self.{n}", hidden)) for n in ("query", "key", "value"))
        scores = q @ k.transpose(0, 1, 3, 2) / np.sqrt(head_size) + additive
        probs = np.exp(scores - scores.max(-1, keepdims=True))
        probs /= probs.sum(-1, keepdims=True)
        context = (probs @ v).transpose(0, 2, 1, 3).reshape(rows, seq, heads * head_size)
        attended = _layer_norm(
            state, f"{p}attention.output.LayerNorm", _linear(state, f"{p}attention.output.dense", context) + hidden, eps
        )
        up = _linear(state, f"{p}intermediate.dense", attended)
        expanded = 0.5 * up * (1.0 + _erf(up / np.sqrt(2.0)))  # F.gelu, exact (erf) form
        hidden = _layer_norm(
            state, f"{p}output.LayerNorm", _linear(state, f"{p}output.dense", expanded) + attended, eps
        )
    pooled = (hidden * mask[:, :, None]).sum(1) / np.maximum(mask.sum(1, keepdims=True), 1.0)
    return _linear(state, "classifier", pooled)


def test_encoder_config_is_minilm_l6(weights):
    assert weights.config == {
        "vocab_size": 30522,
        "hidden_size": 384,
        "num_hidden_layers": 6,
        "num_attention_heads": 12,
        "intermediate_size": 1536,
        "max_position_embeddings": 512,
        "type_vocab_size": 2,
        "layer_norm_eps": 1e-12,
    }
    assert weights.num_labels == 3


def test_every_module_parameter_is_produced_with_its_shape(weights):
    produced = {name: tuple(array.shape) for name, array in weights.state_dict.items()}
    assert produced == expected_shapes(weights.config, weights.num_labels)
    # 5 embedding tensors, 16 per layer, the head.
    assert len(produced) == 5 + 16 * 6 + 2
    assert all(array.dtype == np.float32 and array.flags.c_contiguous for array in weights.state_dict.values())
    assert all(np.isfinite(array).all() for array in weights.state_dict.values())


def test_only_row_zero_of_the_token_type_table_is_in_the_graph(weights):
    table = weights.state_dict["embeddings.token_type_embeddings.weight"]
    assert np.abs(table[0]).sum() > 0
    assert not table[1].any()


def test_dequantized_weights_are_int8_grids(weights):
    # Per output channel (a row of the nn.Linear weight), every value is an integer multiple of one scale.
    weight = weights.state_dict["encoder.layer.0.attention.self.query.weight"]
    scale = np.abs(weight).max(axis=1, keepdims=True) / 127
    assert np.allclose(weight / scale, np.round(weight / scale), atol=1e-3)


def test_numpy_forward_of_the_extracted_weights_matches_onnxruntime(weights, stripped_logits):
    for batch, expected in stripped_logits:
        actual = numpy_forward(weights, batch.input_ids, batch.attention_mask)
        assert actual.shape == (len(POSTS), 3)
        np.testing.assert_allclose(actual, expected, atol=1e-4)
        assert (actual.argmax(1) == expected.argmax(1)).all()


def test_an_all_padding_row_pools_to_finite_logits(weights):
    # The torch backend pads batches up to a CUDA-graph size; mean pooling must not divide by zero.
    ids = np.zeros((1, 32), dtype=np.int64)
    logits = numpy_forward(weights, ids, np.zeros_like(ids))
    assert np.isfinite(logits).all()


def test_a_manifest_that_records_another_shape_is_refused(engine_version):
    build = {**engine_version.manifest.build, "encoder_config": {"num_attention_heads": 6, "hidden_size": 384}}
    with pytest.raises(ValueError, match="num_attention_heads"):
        extract_weights(engine_version.model_path, build=build)


def test_labels_must_match_the_classifier_rows(engine_version):
    manifest = dataclasses.replace(engine_version.manifest, labels=("negative", "positive"))
    with pytest.raises(ValueError, match="3 outputs"):
        weights_for_version(dataclasses.replace(engine_version, manifest=manifest))


def test_a_graph_that_is_not_the_classifier_is_refused(tmp_path):
    import onnx
    from onnx import TensorProto, helper

    graph = helper.make_graph(
        [helper.make_node("Identity", ["input_ids"], ["logits"])],
        "not-minilm",
        [helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["batch", "sequence"])],
        [helper.make_tensor_value_info("logits", TensorProto.INT64, ["batch", "sequence"])],
    )
    path = tmp_path / "other.onnx"
    onnx.save(helper.make_model(graph), str(path))
    with pytest.raises(ValueError, match="not a SentimentClassifier export"):
        extract_weights(path)


def test_a_dynamically_quantized_version_maps_too():
    """minilm-sentiment v2: MatMulInteger with per-batch activation scales (calibrate chose ``dynamic``), int8
    tables per row, int8-weight down-projections; the torch backend reads it as the float MatMuls it stands for."""
    import onnxruntime as ort

    from stream_sentiment.engine_build.qdq_rewrite import is_dynamically_quantized
    from stream_sentiment.engines.manifest import load_engine_version
    from tests.conftest import REPO

    version = load_engine_version(REPO / "engines" / "minilm-sentiment" / "v2")
    assert is_dynamically_quantized(version.model_path)
    weights = weights_for_version(version)
    assert (weights.config["num_hidden_layers"], weights.config["hidden_size"]) == (6, 384)
    session = ort.InferenceSession(strip_quantization(version.model_path), providers=["CPUExecutionProvider"])
    batch = pad_to_bucket(PostTokenizer(version).encode(POSTS), 32)
    (expected,) = session.run(["logits"], {"input_ids": batch.input_ids, "attention_mask": batch.attention_mask})
    np.testing.assert_allclose(numpy_forward(weights, batch.input_ids, batch.attention_mask), expected, atol=1e-4)
    # Both sides above go through float_dynamic_matmuls; against what is served (integer MatMuls, activations
    # rounded per batch) the extracted weights stay within the activation rounding, on more posts.
    served = ort.InferenceSession(str(version.model_path), providers=["CPUExecutionProvider"])
    texts = [json.loads(line)["text"] for line in (REPO / "calibration" / "golden.jsonl").read_text().splitlines()]
    batch = pad_to_bucket(PostTokenizer(version).encode(texts), 64)
    (quantized,) = served.run(["logits"], {"input_ids": batch.input_ids, "attention_mask": batch.attention_mask})
    extracted = numpy_forward(weights, batch.input_ids, batch.attention_mask)
    assert np.abs(extracted - quantized).max() < 0.1 * np.abs(quantized).max()
    assert (extracted.argmax(1) == quantized.argmax(1)).mean() >= 0.95


def test_the_multilingual_engine_maps_too_its_weight_only_down_projections_included():
    """The 12-layer e5 version: int8-weight down-projections behind a DequantizeLinear, a SentencePiece vocabulary."""
    import onnxruntime as ort

    from stream_sentiment.engines.manifest import load_engine_version
    from tests.conftest import REPO

    version = load_engine_version(REPO / "engines" / "multilingual-sentiment" / "v1")
    weights = weights_for_version(version)
    assert (weights.config["num_hidden_layers"], weights.config["hidden_size"]) == (12, 384)
    assert weights.config["vocab_size"] == 41_575
    session = ort.InferenceSession(strip_quantization(version.model_path), providers=["CPUExecutionProvider"])
    posts = [*POSTS, "航班又延误了三个小时，太让人失望了", "今天天气不错"]
    batch = pad_to_bucket(PostTokenizer(version).encode(posts), 32)
    (expected,) = session.run(["logits"], {"input_ids": batch.input_ids, "attention_mask": batch.attention_mask})
    np.testing.assert_allclose(numpy_forward(weights, batch.input_ids, batch.attention_mask), expected, atol=2e-3)
