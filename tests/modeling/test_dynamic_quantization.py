"""``calibrate --method dynamic``: ONNX Runtime's dynamic INT8 form, and what the other consumers make of it.

On the tiny FP32 network of the calibration tests (an embedding table, two MatMuls): the dynamic
candidate quantizes the MatMuls' weights per output channel and their inputs per batch, stores the
embedding table int8 per row, scores close to FP32 on ONNX Runtime, strips back to the FP32 function
up to the weights' rounding (``qdq_rewrite``), and is refused by the TensorRT builder before any build.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from stream_sentiment.batching.tokenizer import PostTokenizer, pad_to_bucket
from stream_sentiment.engine_build.qdq_rewrite import (
    is_dynamically_quantized,
    signed_to_unsigned_activations,
    strip_quantization,
)
from stream_sentiment.engines.manifest import EngineRepositoryError, EngineVersion
from stream_sentiment.modeling.quantize import candidate_version, choose_method, score
from tests.modeling.test_calibration_progress import tiny_fp32_version

POSTS = ["I love it", "worst flight ever, furious", "the meeting is at 3pm", "ok", "thanks a lot @airline :("]


@pytest.fixture
def versions(tmp_path: Path) -> tuple[EngineVersion, EngineVersion]:
    fp32 = tiny_fp32_version(tmp_path / "engines" / "t1-fp32")
    dynamic = candidate_version(fp32, [], "dynamic", tmp_path / "engines" / "t1-int8-dynamic", show_progress=False)
    return fp32, dynamic


def _logits(model: bytes | str, version: EngineVersion) -> np.ndarray:
    import onnxruntime as ort

    session = ort.InferenceSession(model, providers=["CPUExecutionProvider"])
    batch = pad_to_bucket(PostTokenizer(version).encode(POSTS), 32)
    (logits,) = session.run(["logits"], {"input_ids": batch.input_ids, "attention_mask": batch.attention_mask})
    return logits


def test_the_dynamic_form_quantizes_weights_per_channel_and_tables_per_row(versions) -> None:
    import onnx
    from onnx import numpy_helper

    fp32, dynamic = versions
    assert is_dynamically_quantized(dynamic.model_path) and not is_dynamically_quantized(fp32.model_path)
    model = onnx.load(str(dynamic.model_path))
    ops = {node.name: node.op_type for node in model.graph.node}
    # The [8, 8] dense MatMul is quantized; the [8, 3] classifier is shaped like an FFN down-projection
    # (wider in than out), which calibrate keeps float by default, as in the static form.
    assert ops["dense_quant"] == "MatMulInteger" and ops["classifier"] == "MatMul"
    assert sorted(ops.values()).count("DynamicQuantizeLinear") == 1
    assert "QuantizeLinear" not in ops.values()  # no fixed activation scales anywhere
    initializers = {init.name: numpy_helper.to_array(init) for init in model.graph.initializer}
    (dense,) = [node for node in model.graph.node if node.op_type == "MatMulInteger"]
    weight = initializers[dense.input[1]]
    weight_scale = initializers[f"{dense.input[1].removesuffix('_quantized')}_scale"]
    assert weight.dtype == np.int8 and weight_scale.shape == (weight.shape[1],)  # a scale per output column
    assert (np.abs(weight).max(axis=0) == 127).all() and not initializers[dense.input[3]].any()  # symmetric
    assert initializers["embedding_int8"].dtype == np.int8
    assert initializers["embedding_scale"].shape == (initializers["embedding_int8"].shape[0],)  # a scale per row
    assert "embedding" not in initializers  # the FP32 table is gone from the file
    (table,) = [node for node in model.graph.node if node.op_type == "DequantizeLinear"]
    assert [(a.name, a.i) for a in table.attribute] == [("axis", 0)]


def test_dynamic_scores_close_to_fp32_and_strips_back_to_it(versions) -> None:
    fp32, dynamic = versions
    reference = score(fp32, POSTS, show_progress=False)
    quantized = score(dynamic, POSTS, show_progress=False)
    assert np.abs(quantized - reference).max() < 0.05
    # Made float again (weights dequantized, no activation rounding): the FP32 function up to the weights' grid,
    # as a valid, topologically sorted graph.
    import onnx

    onnx.checker.check_model(onnx.load_from_string(strip_quantization(dynamic.model_path)))
    stripped = _logits(strip_quantization(dynamic.model_path), dynamic)
    expected = _logits(str(fp32.model_path), fp32)
    np.testing.assert_allclose(stripped, expected, rtol=0.02, atol=0.02 * np.abs(expected).max())
    # What a worker loads (the load-time rewrite): the table folded once, the integer MatMuls kept.
    served = _logits(signed_to_unsigned_activations(dynamic.model_path), dynamic)
    np.testing.assert_allclose(served, _logits(str(dynamic.model_path), dynamic), atol=1e-6)


def test_modules_the_sensitivity_rule_keeps_float_stay_float(tmp_path: Path) -> None:
    import onnx

    fp32 = tiny_fp32_version(tmp_path / "engines" / "t1-fp32")
    kept = candidate_version(fp32, [], "dynamic", tmp_path / "engines" / "t1-int8-kept", show_progress=False,
                             keep_float=["token_embedding", "dense"])
    model = onnx.load(str(kept.model_path))
    assert {node.op_type for node in model.graph.node}.isdisjoint({"MatMulInteger", "DequantizeLinear"})
    assert "embedding" in {init.name for init in model.graph.initializer}  # the FP32 table, as asked


def test_build_engine_gives_the_real_reason_with_or_without_tensorrt(versions, capsys) -> None:
    from stream_sentiment.cli import main

    _, dynamic = versions
    assert main(["build-engine", "--engine", str(dynamic.path)]) != 0
    assert "quantized dynamically" in capsys.readouterr().err


def test_the_tensorrt_builder_refuses_a_dynamic_version_before_building(versions) -> None:
    from stream_sentiment.engine_build.tensorrt_build import build_plan
    from stream_sentiment.engines.plans import GpuIdentity
    from tests.engines.fake_tensorrt import FakeTensorRTBuilder

    _, dynamic = versions
    fake = FakeTensorRTBuilder()
    with pytest.raises(EngineRepositoryError, match=r"quantized dynamically.*Q/DQ"):
        build_plan(dynamic, trt=fake, gpu=GpuIdentity("x", "9.0"))
    assert fake.profiles == [] and not (dynamic.path / "plans").exists()


def _results(**agreements: float) -> dict[str, object]:
    return {method: {"validation": {"agreement_with_fp32": value}} for method, value in agreements.items()}


def test_dynamic_is_chosen_only_when_it_agrees_better_by_more_than_the_tolerance() -> None:
    static = {"minmax": 0.982, "entropy": 0.979, "percentile": 0.975}
    assert choose_method(_results(**static, dynamic=0.990), "validation") == "dynamic"
    assert choose_method(_results(**static, dynamic=0.985), "validation") == "minmax"  # within noise: the static form
    assert choose_method(_results(**static), "validation") == "minmax"  # a comparison without it
