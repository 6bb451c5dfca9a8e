"""Activation smoothing before INT8 (``modeling.smoothing``) on a tiny network with an outlier channel, and its
fold back into float weights for the torch backends (``engine_build.onnx_weights``)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from stream_sentiment.engine_build.onnx_weights import SMOOTH_SUFFIX, _Graph, _linear_weights
from stream_sentiment.engines.manifest import EngineVersion
from stream_sentiment.modeling.corpora import LABELS
from stream_sentiment.modeling.quantize import candidate_version, score, uniform_calibration_batches
from stream_sentiment.modeling.smoothing import smooth_widening_inputs, smoothed_version, widening_matmuls
from tests.modeling.test_calibration_progress import VOCABULARY, save_classifier_graph, tiny_fp32_version

HIDDEN, WIDE = 8, 32
POSTS = ["I absolutely love this, best day ever!", "worst service ever, furious", "meeting at 3pm on Tuesday",
         "delayed three hours, thanks a lot", "ok", "not bad at all", "what a mess", "so happy for you"] * 8


def outlier_model(path: Path) -> Path:
    """Token embedding -> a per-channel gain (a LayerNorm's weight, as it were: channel 3 is 40x the others, as
    MiniLM's LayerNorm outputs have one outlier channel) -> a widening MatMul -> ReLU -> masked sum over tokens
    -> classifier. The gain is a float op: the outlier appears after the quantized embedding lookup."""
    from onnx import TensorProto, helper

    rng = np.random.default_rng(0)
    gain = np.ones(HIDDEN, dtype=np.float32)
    gain[3] = 40.0
    weights = {
        "embedding": rng.normal(size=(VOCABULARY, HIDDEN)).astype(np.float32),
        "gain": gain,
        "up": (rng.normal(size=(HIDDEN, WIDE)) / np.sqrt(HIDDEN)).astype(np.float32),
        "up.bias": np.zeros(WIDE, dtype=np.float32),  # named as a state dict's: how onnx_weights finds "up"
        # Small: logits of a few units, so probabilities do not saturate and rounding shows in them.
        "classifier": (rng.normal(size=(WIDE, len(LABELS))) * 2e-3).astype(np.float32),
        "sequence_axis": np.array([1], dtype=np.int64),
        "feature_axis": np.array([2], dtype=np.int64),
    }
    nodes = [
        helper.make_node("Gather", ["embedding", "input_ids"], ["embedded"], name="token_embedding"),
        helper.make_node("Mul", ["embedded", "gain"], ["normed"], name="gain"),
        helper.make_node("MatMul", ["normed", "up"], ["projected"], name="up"),
        helper.make_node("Add", ["projected", "up.bias"], ["widened"]),
        helper.make_node("Relu", ["widened"], ["activated"]),
        helper.make_node("Cast", ["attention_mask"], ["mask_float"], to=TensorProto.FLOAT),
        helper.make_node("Unsqueeze", ["mask_float", "feature_axis"], ["mask_column"]),
        helper.make_node("Mul", ["activated", "mask_column"], ["masked"]),
        helper.make_node("ReduceSum", ["masked", "sequence_axis"], ["pooled"], keepdims=0),
        helper.make_node("MatMul", ["pooled", "classifier"], ["logits"], name="classifier"),
    ]
    return save_classifier_graph(path, "outlier-sentiment", nodes, weights)


@pytest.fixture
def fp32(tmp_path: Path) -> EngineVersion:
    return tiny_fp32_version(tmp_path / "outlier-fp32", outlier_model, model="outlier")


def _run(path: Path, batch) -> np.ndarray:
    import onnxruntime as ort

    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return session.run(["logits"], {"input_ids": batch.input_ids, "attention_mask": batch.attention_mask})[0]


def test_smoothing_keeps_the_fp32_function_and_flattens_the_channels(fp32, tmp_path: Path) -> None:
    import onnx
    from onnx import numpy_helper

    from stream_sentiment.batching.tokenizer import PostTokenizer

    batches = uniform_calibration_batches(PostTokenizer(fp32).encode(POSTS))
    smoothed = tmp_path / "smoothed.onnx"
    record = smooth_widening_inputs(fp32.model_path, smoothed, batches, alpha=0.5)
    assert record["inputs"] == ["normed"]  # the classifier narrows (WIDE -> 3): not smoothed
    (before, after), = record["max_over_median_channel"]
    assert before > 20 and after < before / 4
    for batch in batches:
        np.testing.assert_allclose(_run(smoothed, batch), _run(fp32.model_path, batch), rtol=1e-4, atol=1e-3)
    model = onnx.load(str(smoothed))
    (mul,) = [node for node in model.graph.node if node.op_type == "Mul" and node.input[1].endswith(SMOOTH_SUFFIX)]
    assert widening_matmuls(model) == {mul.output[0]: [n for n in model.graph.node if n.name == "up"]}
    inverse = numpy_helper.to_array(next(t for t in model.graph.initializer if t.name == mul.input[1]))
    assert inverse[3] < inverse[[0, 1, 2, 4]].min()  # the outlier channel is divided most
    with pytest.raises(ValueError, match="alpha"):
        smooth_widening_inputs(fp32.model_path, tmp_path / "bad.onnx", batches, alpha=1.0)


def test_smoothed_int8_is_closer_to_fp32(fp32, tmp_path: Path) -> None:
    reference = score(fp32, POSTS, show_progress=False)
    errors = {}
    for alpha in (None, 0.5):
        source = fp32 if alpha is None else smoothed_version(fp32, POSTS, alpha, tmp_path / "smoothed-fp32")
        candidate = candidate_version(source, POSTS, "minmax", tmp_path / f"int8-{alpha}", show_progress=False)
        errors[alpha] = float(np.abs(score(candidate, POSTS, show_progress=False) - reference).mean())
    assert errors[0.5] < 0.7 * errors[None]  # 0.42x on the dev VM


def test_a_smoothed_int8_builds_weights_fold_back_to_the_fp32_weights(fp32, tmp_path: Path) -> None:
    """On the graph calibration really writes (ORT's pre-processing, Q/DQ pairs): the torch backends' weight for
    the smoothed MatMul is the FP32 one, to within its int8 rounding."""
    import onnx
    from onnx import numpy_helper

    original = next(numpy_helper.to_array(t) for t in onnx.load(str(fp32.model_path)).graph.initializer
                    if t.name == "up")
    smoothed = smoothed_version(fp32, POSTS, 0.5, tmp_path / "smoothed-fp32")
    candidate = candidate_version(smoothed, POSTS, "minmax", tmp_path / "int8", show_progress=False)
    state: dict[str, np.ndarray] = {}
    _linear_weights(_Graph(onnx.load(str(candidate.model_path))), state)
    folded = state["up.weight"].T  # back to ONNX's [in, out]
    step = np.abs(original).max(axis=0) / 127  # per output channel: int8 rounding of the unsmoothed weight
    assert np.abs(folded - original).max() < 3 * step.max()
    assert any(node.op_type == "Mul" and node.input[1].endswith(SMOOTH_SUFFIX)
               for node in onnx.load(str(candidate.model_path)).graph.node)  # it was smoothed, and folded back


def test_the_torch_backends_weights_fold_the_smoothing_back() -> None:
    """``Mul(x, x_smooth_inv) -> Q -> DQ -> MatMul(., DQ(W'))`` + ``P.bias``: the module's weight is
    ``diag(1/s) W'``, transposed to ``nn.Linear``'s ``[out, in]``."""
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(1)
    inverse = rng.uniform(0.1, 1.0, size=4).astype(np.float32)
    smoothed_weight = rng.normal(size=(4, 6)).astype(np.float32)
    nodes = [
        helper.make_node("Mul", ["x", "x" + SMOOTH_SUFFIX], ["x_smoothed"]),
        helper.make_node("QuantizeLinear", ["x_smoothed", "scale", "zero"], ["x_q"]),
        helper.make_node("DequantizeLinear", ["x_q", "scale", "zero"], ["x_dq"]),
        helper.make_node("MatMul", ["x_dq", "w"], ["y"]),
        helper.make_node("Add", ["y", "P.bias"], ["out"]),
    ]
    graph = helper.make_graph(
        nodes, "fold", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])],
        [helper.make_tensor_value_info("out", TensorProto.FLOAT, [1, 6])],
        [numpy_helper.from_array(inverse, "x" + SMOOTH_SUFFIX), numpy_helper.from_array(smoothed_weight, "w"),
         numpy_helper.from_array(np.float32(0.1), "scale"), numpy_helper.from_array(np.int8(0), "zero"),
         numpy_helper.from_array(np.zeros(6, np.float32), "P.bias")])
    state: dict[str, np.ndarray] = {}
    _linear_weights(_Graph(helper.make_model(graph)), state)
    np.testing.assert_allclose(state["P.weight"], (smoothed_weight * inverse[:, None]).T, rtol=1e-6)
