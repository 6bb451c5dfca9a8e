"""Which modules INT8 calibration leaves FP32: the module grouping and the keep-until-agreement rule."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from stream_sentiment.modeling.build import main as calibrate
from stream_sentiment.modeling.quantize import (
    float_modules_for_agreement,
    keep_until_agreement,
    prepared_modules,
    quantizable_modules,
    quantize_model,
)
from tests.conftest import REPO
from tests.modeling.test_calibration_progress import tiny_fp32_version


def test_modules_group_nodes_by_parent_path_and_skip_shape_gathers(tmp_path: Path) -> None:
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    weights = {name: rng.normal(size=shape).astype(np.float32)
               for name, shape in {"table": (10, 4), "query": (4, 4), "up": (4, 8)}.items()}
    nodes = [
        helper.make_node("Gather", ["table", "ids"], ["embedded"], name="/embeddings/word/Gather"),
        helper.make_node("Shape", ["embedded"], ["shape"], name="/layer.0/Shape"),
        helper.make_node("Gather", ["shape", "zero"], ["batch"], name="/layer.0/self/Gather"),  # shape arithmetic
        helper.make_node("MatMul", ["embedded", "query"], ["q"], name="/layer.0/self/query/MatMul"),
        helper.make_node("Transpose", ["q"], ["q_t"], perm=[0, 2, 1]),
        helper.make_node("MatMul", ["q", "q_t"], ["scores"], name="/layer.0/self/MatMul"),
        helper.make_node("MatMul", ["scores", "q"], ["context"], name="/layer.0/self/MatMul_1"),
        helper.make_node("MatMul", ["context", "up"], ["out"], name="/layer.0/dense/MatMul"),
    ]
    graph = helper.make_graph(
        nodes, "tiny-encoder",
        [helper.make_tensor_value_info("ids", TensorProto.INT64, ["batch", "sequence"])],
        [helper.make_tensor_value_info("out", TensorProto.FLOAT, ["batch", "sequence", 8]),
         helper.make_tensor_value_info("batch", TensorProto.INT64, [])],
        [numpy_helper.from_array(value, name) for name, value in weights.items()]
        + [numpy_helper.from_array(np.array(0, dtype=np.int64), "zero")],
    )
    path = tmp_path / "tiny.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(path))

    assert quantizable_modules(path) == {
        "/embeddings/word": ["/embeddings/word/Gather"],
        "/layer.0/self/query": ["/layer.0/self/query/MatMul"],
        "/layer.0/self": ["/layer.0/self/MatMul", "/layer.0/self/MatMul_1"],  # attention's two activation MatMuls
        "/layer.0/dense": ["/layer.0/dense/MatMul"],
    }


def test_modules_are_kept_most_sensitive_first_until_the_target() -> None:
    gains = {"a": 0.004, "b": 0.003, "c": 0.002, "d": 0.001}
    measured: list[list[str]] = []

    def measure(kept: list[str]) -> float:
        measured.append(kept)
        return round(0.980 + sum(gains[m] for m in kept), 4)

    kept, reached = keep_until_agreement(["a", "b", "c", "d"], 0.980, 0.987, measure)
    assert (kept, reached) == (["a", "b"], 0.987)
    assert measured == [["a"], ["a", "b"]]  # one measurement per step, each of the whole set kept so far


def test_nothing_is_kept_when_the_baseline_already_agrees_enough() -> None:
    def never(kept: list[str]) -> float:
        raise AssertionError("no measurement needed")

    assert keep_until_agreement(["a", "b"], 0.995, 0.99, never) == ([], 0.995)


def test_every_module_is_kept_when_the_target_is_out_of_reach() -> None:
    kept, reached = keep_until_agreement(["a", "b"], 0.98, 1.0, lambda kept: 0.98 + 0.001 * len(kept))
    assert kept == ["a", "b"] and reached == 0.982


def test_calibrate_refuses_an_agreement_that_is_not_a_fraction(tmp_path: Path) -> None:
    with pytest.raises(SystemExit, match="a fraction in"):
        calibrate(["--checkpoint", str(tmp_path), "--version", "v9", "--float-until-agreement", "99"])


def test_the_sweep_keeps_a_sensitive_module_float_and_leaves_the_token_embeddings_int8(tmp_path: Path) -> None:
    """End to end on a tiny FP32 engine (tests/modeling/test_calibration_progress.py's): its token embedding, a
    dense MatMul and a narrowing classifier (kept float anyway, by shape, as FFN down-projections are)."""
    import onnx

    fp32 = tiny_fp32_version(tmp_path / "t1-fp32")
    texts = [json.loads(line)["text"] for line in (REPO / "calibration" / "golden.jsonl").read_text().splitlines()]

    assert prepared_modules(fp32) == {"dense": ["dense"]}  # no token embedding, no classifier
    result = float_modules_for_agreement(fp32, texts * 2, texts, tmp_path / "work", 1.0, show_progress=False)
    assert [row["module"] for row in result["sweep"]] == ["dense"]  # type: ignore[attr-defined]
    assert 0 < float(result["baseline_agreement"]) <= float(result["agreement"]) <= 1  # type: ignore[arg-type]
    if float(result["baseline_agreement"]) < 1.0:  # type: ignore[arg-type]
        assert result["modules"] == ["dense"] and result["keep_float"] == ["dense"]

    # What quantize_model does with a kept node: no DequantizeLinear feeds it, the others stay quantized.
    quantized = quantize_model(fp32, texts * 2, "minmax", tmp_path / "kept.onnx", show_progress=False,
                               keep_float=["dense"])
    graph = onnx.load(str(quantized)).graph
    dequantized = {output for node in graph.node if node.op_type == "DequantizeLinear" for output in node.output}
    by_name = {node.name: node for node in graph.node}
    assert not dequantized & set(by_name["dense"].input)
    assert dequantized & set(by_name["token_embedding"].input)
