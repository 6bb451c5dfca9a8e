"""``kafka_fetch_min_interval_ms`` spaces the fetch loop's fetches; unset, fetches follow each other at once.

What is measured is when the source asks its consumer for records, so a stand-in consumer records the calls
(as tests/test_offset_gaps.py records seeks); what the records become is the loop's usual path.
"""

from __future__ import annotations

import asyncio
import itertools
import time

from stream_sentiment.batching.tokenizer import PostTokenizer
from stream_sentiment.config import Settings
from stream_sentiment.engines.onnxruntime_backend import OnnxRuntimeEngine
from stream_sentiment.metrics import PipelineMetrics
from stream_sentiment.worker import Worker


class FetchRecorder:
    """The consumer calls ``KafkaSource.fetch`` makes, recording when records were asked for."""

    def __init__(self) -> None:
        self.asked: list[float] = []

    def assignment(self) -> set[object]:
        return set()

    def pause(self, *partitions: object) -> None:
        pass

    def resume(self, *partitions: object) -> None:
        pass

    async def getmany(self, timeout_ms: int = 0, max_records: int | None = None) -> dict[object, list[object]]:
        self.asked.append(time.monotonic())
        return {}


async def _fetch_times(engine_version, fetches: int, **settings: float) -> tuple[list[float], float]:
    engine = OnnxRuntimeEngine(engine_version)  # never activated: fetching does not score
    worker = Worker(Settings.load(**settings), engine, PostTokenizer(engine_version), metrics=PipelineMetrics())
    consumer = FetchRecorder()
    worker.source.consumer = consumer
    started = time.monotonic()
    for _ in range(fetches):
        await worker.source.fetch(1, paused=False)
    await worker._redis.aclose()
    return consumer.asked, started


def test_fetches_are_spaced_by_the_minimum_interval(engine_version):
    asked, started = asyncio.run(_fetch_times(engine_version, 4, kafka_fetch_min_interval_ms=40))
    assert asked[0] - started < 0.04  # the first fetch does not wait
    assert all(later - earlier >= 0.04 for earlier, later in itertools.pairwise(asked))


def test_by_default_fetches_follow_each_other_at_once(engine_version):
    asked, started = asyncio.run(_fetch_times(engine_version, 4))
    assert Settings.load().kafka_fetch_min_interval_ms == 0
    assert asked[-1] - started < 0.1  # spaced, the four would take >= 0.12 s
