"""The packed forward pass computes what SentimentClassifier computes on the padded batch (torch on CPU)."""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from bench.packed_variants import Int8Linear, quantized_linears  # noqa: E402
from stream_sentiment.batching.tokenizer import pad_to_bucket  # noqa: E402
from stream_sentiment.engines.minilm_packed import PackedClassifier  # noqa: E402
from stream_sentiment.engines.minilm_torch import EncoderConfig, SentimentClassifier  # noqa: E402
from stream_sentiment.engines.packing import PackLayout, pack_into, token_budgets  # noqa: E402

CONFIG = EncoderConfig(vocab_size=200, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                       intermediate_size=128, max_position_embeddings=64)


def _run(linears: object | None = None) -> tuple[np.ndarray, np.ndarray]:
    torch.manual_seed(0)
    model = SentimentClassifier(CONFIG, num_labels=3).eval().requires_grad_(False)
    rng = np.random.default_rng(0)
    posts = [rng.integers(5, 200, n).tolist() for n in (3, 17, 1, 32, 9)]
    batch = pad_to_bucket(posts, 32)
    expected = model(torch.from_numpy(batch.input_ids), torch.from_numpy(batch.attention_mask)).numpy()
    layout = PackLayout(rows_capacity=8, max_length=32, budgets=token_budgets(128, smallest=32, step=64))
    arrays = [np.zeros(128, np.int32) for _ in range(3)] + [np.zeros(layout.cu_size, np.int32)]
    packed = pack_into(batch, layout, *arrays)
    options = {} if linears is None else {"linears": linears}
    packed_model = PackedClassifier(model, rows_capacity=8, max_length=32, attention="reference", **options)
    ids, positions, segments = (torch.from_numpy(a[: packed.budget]) for a in arrays[:3])
    got = packed_model(ids, positions, segments, torch.from_numpy(arrays[3])).numpy()[: packed.rows]
    return got, expected


def test_packed_forward_equals_the_padded_model() -> None:
    got, expected = _run()
    np.testing.assert_allclose(got, expected, atol=1e-5)


@pytest.mark.parametrize("kind", ["int8", "fp8"])
def test_quantized_linears_stay_close(kind: str) -> None:
    linears = quantized_linears(kind, ("qkv", "out", "up", "down"), emulate=True)
    got, expected = _run(linears)
    # 8-bit activations and weights: close to the float model, not equal to it.
    assert 0 < np.abs(got - expected).max() < 0.1 * np.abs(expected).max()


def test_int8_weights_of_an_int8_version_come_back_exactly() -> None:
    levels = torch.randint(-127, 128, (16, 32), dtype=torch.int8)
    levels[:, 0] = 127  # symmetric min-max quantization puts each channel's largest weight at 127
    scales = torch.rand(16, 1) + 0.01
    layer = Int8Linear(levels.float() * scales, torch.zeros(16))
    assert torch.equal(layer.weight_t.t(), levels)
