"""SlotPool: rebuild-and-retry, streams leaving rotation, timeouts; a real engine with injected faults."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Iterator
from contextlib import contextmanager

import numpy as np
import pytest

from stream_sentiment.batching.tokenizer import PostTokenizer, pad_to_bucket
from stream_sentiment.engines.base import Engine, TokenBatch
from stream_sentiment.engines.faults import FaultInjectingEngine
from stream_sentiment.engines.onnxruntime_backend import OnnxRuntimeEngine
from stream_sentiment.engines.slots import PoisonBatchError, RecoveryPolicy, SlotFailedError, SlotPool
from stream_sentiment.metrics import PipelineMetrics
from tests.engines.failing_engine import FailsOnToken


@pytest.fixture
def batch(engine_version) -> TokenBatch:
    ids = PostTokenizer(engine_version).encode(["worst flight ever", "lovely crew, thanks", "gate 12"])
    return pad_to_bucket(ids, 32)


@contextmanager
def _pooled(engine: Engine, policy: RecoveryPolicy | None = None) -> Iterator[SlotPool]:
    """``engine`` activated, in a pool; the pool stopped and the engine released afterwards."""
    engine.activate()
    pool = SlotPool(engine, PipelineMetrics(), policy)
    try:
        yield pool
    finally:
        pool.close()
        engine.deactivate()


def _faulty(engine_version, **faults) -> FaultInjectingEngine:
    return FaultInjectingEngine(OnnxRuntimeEngine(engine_version, streams=2, threads_per_stream=1), **faults)


def test_a_failed_call_is_rebuilt_and_retried_with_the_same_result(engine_version, batch):
    engine = _faulty(engine_version, every_kth_call=2)
    with _pooled(engine) as pool:
        expected = engine.inner.infer(batch, 0)
        first = asyncio.run(pool.score(batch, 0))  # call 1: fine
        second = asyncio.run(pool.score(batch, 0))  # call 2 fails, rebuilt, call 3 answers
        np.testing.assert_allclose(first, expected, rtol=1e-6)
        np.testing.assert_allclose(second, expected, rtol=1e-6)
        value = pool.metrics.value
        assert value("stream_sentiment_engine_retries_total") == 1
        assert value("stream_sentiment_engine_rebuilds_total", {"version": "v1", "stream": "0"}) == 1
        assert value("stream_sentiment_engine_failures_total", {"version": "v1", "stream": "0"}) == 1
        assert pool.lost == set() and pool.healthy


def test_a_stream_that_keeps_failing_leaves_rotation_and_gives_the_batch_back(engine_version, batch):
    engine = _faulty(engine_version, broken_stream=1)
    with _pooled(engine, RecoveryPolicy(max_retries=2, max_consecutive_failures=3)) as pool:
        stream = pool.take()
        assert stream == 1  # the last idle slot is handed out first
        with pytest.raises(SlotFailedError) as failure:
            asyncio.run(pool.score(batch, stream))
        assert failure.value.lost and failure.value.stream == 1
        pool.give_back(stream)
        assert pool.lost == {1} and pool.idle == [0] and pool.healthy
        assert engine.injected == 4  # the call, two retries, and the probe that shows the device is broken
        assert pool.metrics.value("stream_sentiment_engine_streams_lost", {"version": "v1"}) == 1
        assert asyncio.run(pool.score(batch, pool.take())).shape == (3, 3)  # the other stream still scores


def test_retries_are_bounded_per_batch(engine_version, batch):
    engine = _faulty(engine_version, broken_stream=0)
    with _pooled(engine, RecoveryPolicy(max_retries=1, max_consecutive_failures=10)) as pool:
        with pytest.raises(SlotFailedError) as failure:
            asyncio.run(pool.score(batch, 0))
        assert not failure.value.lost  # one retry and a probe, then the batch goes elsewhere; the stream stays
        assert engine.injected == 3


class _Hanging(Engine):
    """An engine whose calls never return until released: a hung GPU call, for the timeout path."""

    backend = "hanging"

    def __init__(self, inner: Engine) -> None:
        super().__init__(inner.version, inner.streams)
        self.release = threading.Event()

    def _activate_impl(self) -> None: ...

    def _infer_impl(self, batch: TokenBatch, stream: int) -> np.ndarray:
        self.release.wait(10)
        return np.zeros((batch.rows, 3), dtype=np.float32)

    def _rebuild_impl(self, stream: int) -> None: ...

    def _deactivate_impl(self) -> None: ...


def test_a_call_that_times_out_takes_its_stream_out_at_once(engine_version, batch):
    engine = _Hanging(OnnxRuntimeEngine(engine_version, streams=2))
    with _pooled(engine, RecoveryPolicy(max_retries=3, call_timeout=0.2)) as pool:
        try:
            with pytest.raises(SlotFailedError) as failure:
                asyncio.run(pool.score(batch, 0))
            assert failure.value.lost and pool.lost == {0}
        finally:
            engine.release.set()  # let the stuck call end, so closing the pool does not wait for it


def test_a_batch_that_fails_on_a_working_slot_is_reported_as_poison_and_the_slot_stays(engine_version, batch):
    poison = int(batch.input_ids[1, 1])
    engine = FailsOnToken(OnnxRuntimeEngine(engine_version, streams=1, threads_per_stream=1), poison)
    with _pooled(engine, RecoveryPolicy(max_retries=2, max_consecutive_failures=3)) as pool:
        with pytest.raises(PoisonBatchError) as failure:
            asyncio.run(pool.score(batch, 0))
        assert not failure.value.lost and pool.lost == set() and pool.healthy
        # the slot still scores other posts
        clean = TokenBatch(batch.input_ids[:1], batch.attention_mask[:1], batch.bucket)
        assert asyncio.run(pool.score(clean, 0)).shape == (1, 3)
