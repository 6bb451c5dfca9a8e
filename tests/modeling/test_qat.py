"""Quantization-aware fine-tuning's simulated INT8 (modeling.qat) against ONNX Runtime's real one (torch only)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnxruntime
import pytest

torch = pytest.importorskip("torch")

from stream_sentiment.batching.tokenizer import PostTokenizer, pad_to_bucket  # noqa: E402
from stream_sentiment.engines.manifest import load_engine_version  # noqa: E402
from stream_sentiment.modeling.checkpoint_files import write_checkpoint  # noqa: E402
from stream_sentiment.modeling.corpora import LABELS  # noqa: E402
from stream_sentiment.modeling.export import export_engine_version  # noqa: E402
from stream_sentiment.modeling.minilm import EncoderConfig, SentimentClassifier  # noqa: E402
from stream_sentiment.modeling.qat import (  # noqa: E402
    QuantAwareClassifier,
    calibration_tensors,
    fake_quant_per_channel,
)
from stream_sentiment.modeling.quantize import candidate_version, score  # noqa: E402

REPO = Path(__file__).resolve().parents[2]
COMMITTED_ENGINE = REPO / "engines" / "minilm-sentiment" / "v1"
# The committed tokenizer's vocabulary, a MiniLM shape small enough to export and quantize in seconds.
TINY = EncoderConfig(hidden_size=48, num_hidden_layers=2, num_attention_heads=4, intermediate_size=96,
                     max_position_embeddings=128)


def _texts() -> list[str]:
    records = [json.loads(line) for line in (REPO / "calibration" / "golden.jsonl").read_text().splitlines()]
    return [r["text"] for r in records]


def _tiny_classifier(seed: int = 0) -> SentimentClassifier:
    torch.manual_seed(seed)
    model = SentimentClassifier(TINY, num_labels=len(LABELS), fused_attention=False)
    with torch.no_grad():  # weights large enough that int8 rounding moves the logits measurably
        for parameter in model.parameters():
            if parameter.dim() > 1:
                parameter.normal_(0.0, 0.2)
    return model.eval()


def _logits(model: torch.nn.Module, token_ids: list[tuple[int, ...]]) -> np.ndarray:
    batch = pad_to_bucket(token_ids, max(len(ids) for ids in token_ids))
    with torch.no_grad():
        return model(torch.from_numpy(batch.input_ids), torch.from_numpy(batch.attention_mask)).numpy()


def test_per_channel_rounding_puts_each_row_on_its_own_grid_and_passes_gradients_straight_through():
    weight = torch.tensor([[0.5, -0.25, 0.1], [10.0, 3.0, -7.3]], requires_grad=True)
    rounded = fake_quant_per_channel(weight)
    steps = weight.detach().abs().amax(dim=1, keepdim=True) / 127
    levels = rounded.detach() / steps
    assert torch.allclose(levels, levels.round(), atol=1e-4)
    assert levels.abs().max() <= 127 + 1e-4
    assert torch.allclose(rounded.detach(), weight.detach(), atol=float(steps.max()) / 2 + 1e-6)
    rounded.sum().backward()
    assert weight.grad is not None and torch.equal(weight.grad, torch.ones_like(weight))


def test_before_calibration_the_wrapper_is_the_float_classifier():
    model = _tiny_classifier()
    token_ids = PostTokenizer(load_engine_version(COMMITTED_ENGINE)).encode(_texts()[:8])
    assert np.allclose(_logits(QuantAwareClassifier(model).eval(), token_ids), _logits(model, token_ids), atol=1e-5)


def test_calibrated_wrapper_answers_like_onnxruntime_int8_of_the_same_weights(tmp_path):
    model = _tiny_classifier()
    checkpoint = tmp_path / "checkpoint"
    write_checkpoint(checkpoint, model.state_dict(), TINY.to_dict(), COMMITTED_ENGINE)
    export_engine_version(checkpoint, tmp_path / "t-fp32", model_name="tiny", version="t-fp32",
                          normalization="twitter-v1", max_length=128, build_info={})
    fp32 = load_engine_version(tmp_path / "t-fp32")
    texts = _texts()
    calibration = texts * 2  # the golden set twice: whole batches of 32, as calibrate feeds ORT
    int8 = candidate_version(fp32, calibration, "minmax", tmp_path / "t-int8", show_progress=False,
                             down_projections="int8-weights")
    shipped_probabilities = score(int8, texts, show_progress=False)  # ORT as it serves: fused integer kernels

    tokenizer = PostTokenizer(fp32)
    wrapper = QuantAwareClassifier(model).eval()
    ranges = wrapper.calibrate(calibration_tensors(tokenizer.encode(calibration)))
    assert {"layer.0.input", "layer.1.probabilities", "layer.1.attended", "pooled", "logits"} <= set(ranges)
    token_ids = tokenizer.encode(texts)
    simulated = np.vstack([_logits(wrapper, [ids]) for ids in token_ids])
    wrapper.ranges = {}
    plain = np.vstack([_logits(wrapper, [ids]) for ids in token_ids])

    # The Q/DQ graph's own meaning: ORT with every graph optimization off runs each QuantizeLinear /
    # DequantizeLinear as written. The simulation rounds where it rounds, so it lands on the same logits.
    options = onnxruntime.SessionOptions()
    options.graph_optimization_level = onnxruntime.GraphOptimizationLevel.ORT_DISABLE_ALL
    session = onnxruntime.InferenceSession(str(int8.model_path), options, providers=["CPUExecutionProvider"])
    as_written = np.vstack([
        session.run(None, {"input_ids": batch.input_ids, "attention_mask": batch.attention_mask})[0]
        for batch in (pad_to_bucket([ids], len(ids)) for ids in token_ids)
    ])
    float_gap = np.abs(plain - as_written).mean()
    assert float_gap > 0.01  # int8 rounding moves these logits measurably
    assert np.abs(simulated - as_written).mean() < float_gap / 20

    # Against the fused kernels ORT serves with (their own rounding differs a little), still far closer than float.
    def probabilities(logits: np.ndarray) -> np.ndarray:
        shifted = np.exp(logits - logits.max(axis=1, keepdims=True))
        return shifted / shifted.sum(axis=1, keepdims=True)

    shipped_float_gap = np.abs(probabilities(plain) - shipped_probabilities).mean()
    assert np.abs(probabilities(simulated) - shipped_probabilities).mean() < shipped_float_gap / 1.5


def test_training_mode_leaves_dropout_off_unless_asked_for():
    model = _tiny_classifier()
    token_ids = PostTokenizer(load_engine_version(COMMITTED_ENGINE)).encode(_texts()[:4])
    quiet = QuantAwareClassifier(model).train()
    assert np.array_equal(_logits(quiet, token_ids), _logits(quiet, token_ids))
    noisy = QuantAwareClassifier(model, dropout=True).train()
    assert not np.array_equal(_logits(noisy, token_ids), _logits(noisy, token_ids))
