"""The packed torch-cuda forward's host side and its settings, without torch: chunking, capture inputs, layout."""

from __future__ import annotations

import numpy as np
import pytest

from stream_sentiment.batching.tokenizer import pad_to_bucket
from stream_sentiment.config import Settings
from stream_sentiment.engines.base import EngineError
from stream_sentiment.engines.packing import PackLayout, pack_into, token_budgets
from stream_sentiment.engines.torch_backend import TorchCudaEngine, packed_layout
from stream_sentiment.engines.torch_packed import row_chunks, warm_batch
from stream_sentiment.service import open_engine


def test_row_chunks_keep_order_within_rows_and_tokens() -> None:
    lengths = np.array([100, 200, 50, 300, 10, 10, 10, 400])
    chunks = row_chunks(lengths, rows_capacity=3, max_tokens=400)
    assert [(c.start, c.stop) for c in chunks] == [(0, 3), (3, 6), (6, 7), (7, 8)]  # 350, 320, 10, 400
    assert all(c.stop - c.start <= 3 and lengths[c].sum() <= 400 for c in chunks)
    assert row_chunks(np.array([5] * 10), rows_capacity=256, max_tokens=512) == [slice(0, 10)]
    assert row_chunks(np.zeros(0, dtype=np.int64), 4, 512) == []
    with pytest.raises(ValueError, match="exceeds"):
        row_chunks(np.array([600]), 4, 512)


@pytest.mark.parametrize("budget", [512, 1024, 2048, 6144, 32768])
def test_a_capture_input_fills_its_budget_exactly(budget: int) -> None:
    layout = PackLayout(rows_capacity=256, max_length=256, budgets=token_budgets(32768))
    batch = warm_batch(budget, layout)
    arrays = [np.zeros(32768, np.int32) for _ in range(3)] + [np.zeros(layout.cu_size, np.int32)]
    packed = pack_into(batch, layout, *arrays)
    assert (packed.real_tokens, packed.budget) == (budget, budget)
    assert (arrays[0][:budget] != 0).all()  # real tokens, not [PAD]: a capture runs what serving runs


def test_packed_layout_follows_rows_tokens_and_max_length() -> None:
    assert packed_layout(256, 256).budgets[-1] == 32768
    assert packed_layout(256, 256, 65536).budgets[-1] == 65536
    assert packed_layout(64, 256, 8192).budgets == (512, 1024, 2048, 4096, 6144, 8192)
    small = packed_layout(1, 128, 8192)  # never more tokens than max_rows rows of max_length
    assert small.budgets == (128,) and small.rows_capacity == 1


def test_settings_choose_the_forward_and_its_token_budgets(engine_version) -> None:
    assert Settings.load().engine.torch_forward == "padded"
    settings = Settings.load(engine={"backend": "torch-cuda", "torch_forward": "packed"},
                             batching={"max_rows": 128, "max_tokens": 16384})
    _, engine = open_engine(settings)  # not activated: needs no torch
    assert isinstance(engine, TorchCudaEngine)
    assert engine.forward == "packed"
    assert engine.layout.budgets[-1] == 16384 and engine.layout.rows_capacity == 128
    _, padded = open_engine(Settings.load(engine={"backend": "torch-cuda"}))
    assert isinstance(padded, TorchCudaEngine) and padded.forward == "padded"
    with pytest.raises(ValueError, match="forward"):
        TorchCudaEngine(engine_version, forward="unpadded")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="float16"):
        TorchCudaEngine(engine_version, forward="packed", dtype="float32")
    with pytest.raises(ValueError):
        Settings.load(engine={"torch_forward": "unpadded"})


def test_a_row_longer_than_the_largest_token_budget_is_an_engine_error(engine_version) -> None:
    engine = TorchCudaEngine(engine_version, forward="packed", max_rows=1, max_tokens=64)  # not activated
    engine._packed_slots = [object()]  # type: ignore[list-item]  # the check comes before any CUDA state is used
    too_long = pad_to_bucket([list(range(1, 100))], 128)  # 99 real tokens, a largest budget of 64
    with pytest.raises(EngineError, match="exceeds"):
        engine._infer_packed(None, too_long, 0)  # type: ignore[arg-type]
