"""The FP16-typed Q/DQ export for TensorRT's strongly typed path: types, structure and numbers on ONNX Runtime."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, external_data_helper, helper, numpy_helper

from stream_sentiment.engine_build.fp16_qdq import convert_fp16_qdq, write_fp16_qdq


def tiny_qdq_model() -> onnx.ModelProto:
    """x[N,4] -> Q/DQ -> MatMul(DQ(int8 W)) + b, then a float32-lowest mask term, as exporters write masks."""
    rng = np.random.default_rng(0)
    weight = rng.integers(-127, 128, (4, 3)).astype(np.int8)
    inits = [
        numpy_helper.from_array(np.float32(0.02), "x_scale"), numpy_helper.from_array(np.int8(0), "x_zero"),
        numpy_helper.from_array(weight, "w_q"), numpy_helper.from_array(np.float32(0.01), "w_scale"),
        numpy_helper.from_array(np.int8(0), "w_zero"),
        numpy_helper.from_array(rng.normal(size=3).astype(np.float32), "bias"),
        numpy_helper.from_array(np.float32(np.finfo(np.float32).min), "lowest"),
        numpy_helper.from_array(np.float32(1.0), "one"),
    ]
    nodes = [
        helper.make_node("QuantizeLinear", ["x", "x_scale", "x_zero"], ["x_q"]),
        helper.make_node("DequantizeLinear", ["x_q", "x_scale", "x_zero"], ["x_dq"]),
        helper.make_node("DequantizeLinear", ["w_q", "w_scale", "w_zero"], ["w"]),
        helper.make_node("MatMul", ["x_dq", "w"], ["mm"]),
        helper.make_node("Add", ["mm", "bias"], ["biased"]),
        helper.make_node("Cast", ["mask"], ["mask_f"], to=TensorProto.FLOAT),
        helper.make_node("Sub", ["one", "mask_f"], ["inverse"]),
        helper.make_node("Mul", ["inverse", "lowest"], ["additive"]),
        helper.make_node("Add", ["biased", "additive"], ["masked"]),
        helper.make_node("Softmax", ["masked"], ["probabilities"], axis=-1),
    ]
    graph = helper.make_graph(
        nodes, "tiny", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 4]),
                        helper.make_tensor_value_info("mask", TensorProto.INT64, ["n", 3])],
        [helper.make_tensor_value_info("probabilities", TensorProto.FLOAT, ["n", 3])], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def run(model: onnx.ModelProto, feeds: dict[str, np.ndarray]) -> np.ndarray:
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL  # the graph as written
    session = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    return session.run(None, feeds)[0]


def test_float_parts_become_fp16_while_qdq_scales_and_graph_io_stay_float32():
    original = tiny_qdq_model()
    model = convert_fp16_qdq(original)
    onnx.checker.check_model(model, full_check=True)  # every node's input types agree
    types = {t.name: t.data_type for t in model.graph.initializer}
    assert {types[n] for n in ("x_scale", "w_scale")} == {TensorProto.FLOAT}
    assert {types[n] for n in ("bias", "lowest", "one")} == {TensorProto.FLOAT16}
    assert numpy_helper.to_array(next(t for t in model.graph.initializer if t.name == "lowest")) == -65504
    ops = [n.op_type for n in model.graph.node]
    # x in, the mask's, back to float32 before the Q, after each DQ, the output's.
    assert ops.count("Cast") == 1 + 1 + 1 + 2 + 1
    assert model.graph.output[0].type.tensor_type.elem_type == TensorProto.FLOAT
    assert original.graph.initializer[5].data_type == TensorProto.FLOAT  # the input model is left unchanged


def test_fp16_export_scores_like_the_float32_graph():
    rng = np.random.default_rng(1)
    feeds = {"x": rng.normal(size=(16, 4)).astype(np.float32),
             "mask": rng.integers(0, 2, (16, 3)).astype(np.int64)}
    feeds["mask"][:, 0] = 1  # every row keeps one unmasked column, as every post keeps a token
    expected = run(tiny_qdq_model(), feeds)
    got = run(convert_fp16_qdq(tiny_qdq_model()), feeds)
    assert not np.isnan(got).any()  # float32's lowest clipped to FP16's, not -inf times 0
    np.testing.assert_allclose(got, expected, atol=2e-3)


def test_models_with_external_data_are_read_and_written(tmp_path):
    source = tmp_path / "model.onnx"
    model = tiny_qdq_model()
    external_data_helper.convert_model_to_external_data(model, location="model.onnx.data", size_threshold=0)
    onnx.save_model(model, str(source))
    assert (tmp_path / "model.onnx.data").is_file()
    destination = write_fp16_qdq(source, tmp_path / "out" / "model.fp16.onnx")
    model = onnx.load(str(destination))
    assert {t.name: t.data_type for t in model.graph.initializer}["bias"] == TensorProto.FLOAT16
