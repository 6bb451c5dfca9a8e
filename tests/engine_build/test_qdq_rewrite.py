"""The load-time INT8 rewrite must not change a single output value."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
from onnx import numpy_helper

from stream_sentiment.engine_build.qdq_rewrite import signed_to_unsigned_activations


def _session(model: bytes | str) -> ort.InferenceSession:
    options = ort.SessionOptions()
    # No graph optimization: both models run the reference Q/DQ kernels, so
    # the comparison isolates the rewrite from ORT's fused-kernel rounding.
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    options.log_severity_level = 3
    return ort.InferenceSession(model, options, providers=["CPUExecutionProvider"])


def test_rewrite_is_exact_on_the_committed_model(engine_version):
    rng = np.random.default_rng(1)
    ids = rng.integers(1000, 29000, size=(4, 32), dtype=np.int64)
    mask = np.ones_like(ids)
    mask[1, 20:] = 0
    feeds = {"input_ids": ids, "attention_mask": mask}
    original = _session(str(engine_version.model_path)).run(None, feeds)[0]
    rewritten = _session(signed_to_unsigned_activations(engine_version.model_path)).run(None, feeds)[0]
    np.testing.assert_array_equal(original, rewritten)


def test_rewrite_moves_only_activation_zero_points_to_uint8(engine_version):
    model = onnx.ModelProto.FromString(signed_to_unsigned_activations(engine_version.model_path))
    initializers = {i.name: i for i in model.graph.initializer}
    weight_dq = activation_q = 0
    for node in model.graph.node:
        if node.op_type == "QuantizeLinear":
            assert numpy_helper.to_array(initializers[node.input[2]]).dtype == np.uint8
            activation_q += 1
        elif node.op_type == "DequantizeLinear" and node.input[0] in initializers:
            # weights int8, the Gemm bias int32: both stay signed
            assert numpy_helper.to_array(initializers[node.input[0]]).dtype in (np.int8, np.int32)
            weight_dq += 1
    assert activation_q > 0 and weight_dq > 0


def _matmul_model(weight: np.ndarray) -> onnx.ModelProto:
    from onnx import TensorProto, helper

    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["y"], name="down")],
        "down_projection",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [None, weight.shape[0]])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [None, weight.shape[1]])],
        [numpy_helper.from_array(weight, "w")],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def test_weight_only_int8_quarters_the_weight_and_the_load_time_rewrite_folds_it(tmp_path):
    from stream_sentiment.modeling.quantize import quantize_weights_only

    rng = np.random.default_rng(3)
    weight = rng.normal(0, 0.05, size=(64, 16)).astype(np.float32)
    weight[:, 3] = 0.0  # an all-zero channel must not divide by zero
    path = tmp_path / "model.onnx"
    onnx.save(_matmul_model(weight), str(path))
    x = rng.normal(size=(5, 64)).astype(np.float32)
    expected = x @ weight

    assert quantize_weights_only(path, ["down"]) == 1
    model = onnx.load(str(path))
    stored = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}
    assert stored["w_int8"].dtype == np.int8 and "w" not in stored  # int8 on disk, the float copy gone
    assert [n.op_type for n in model.graph.node] == ["DequantizeLinear", "MatMul"]
    served = _session(str(path)).run(None, {"x": x})[0]
    # Per-channel rounding of the weights only: within half a step per weight.
    np.testing.assert_allclose(served, expected, atol=np.abs(x).sum(1).max() * np.abs(weight).max() / 127)

    rewritten = onnx.ModelProto.FromString(signed_to_unsigned_activations(path))
    assert [n.op_type for n in rewritten.graph.node] == ["MatMul"]  # dequantized once, at load
    np.testing.assert_allclose(_session(rewritten.SerializeToString()).run(None, {"x": x})[0], served, rtol=1e-6)
