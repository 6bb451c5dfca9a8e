"""quantize.attention_matmuls finds attention's activation-by-activation MatMuls, and only those."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from stream_sentiment.modeling.quantize import attention_matmuls, ffn_down_projections


def test_it_finds_the_matmuls_without_a_weight(tmp_path: Path) -> None:
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    weights = {name: rng.normal(size=shape).astype(np.float32)
               for name, shape in {"query": (4, 4), "key": (4, 4), "up": (4, 16), "down": (16, 4)}.items()}
    nodes = [
        helper.make_node("MatMul", ["hidden", "query"], ["q"], name="q_projection"),
        helper.make_node("MatMul", ["hidden", "key"], ["k"], name="k_projection"),
        helper.make_node("Transpose", ["k"], ["k_t"], perm=[0, 2, 1]),
        helper.make_node("MatMul", ["q", "k_t"], ["scores"], name="attention_scores"),
        helper.make_node("Softmax", ["scores"], ["p"], axis=-1),
        helper.make_node("MatMul", ["p", "q"], ["context"], name="attention_context"),
        helper.make_node("MatMul", ["context", "up"], ["wide"], name="ffn_up"),
        helper.make_node("MatMul", ["wide", "down"], ["out"], name="ffn_down"),
    ]
    graph = helper.make_graph(
        nodes, "tiny-attention",
        [helper.make_tensor_value_info("hidden", TensorProto.FLOAT, ["batch", "sequence", 4])],
        [helper.make_tensor_value_info("out", TensorProto.FLOAT, ["batch", "sequence", 4])],
        [numpy_helper.from_array(value, name) for name, value in weights.items()],
    )
    path = tmp_path / "tiny.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(path))

    assert attention_matmuls(path) == ["attention_scores", "attention_context"]
    assert ffn_down_projections(path) == ["ffn_down"]  # the other exclusion, found by its weight's shape
