"""The alert judge's loop: when it judges, what it counts, how it waits out Redis (the monitor itself is faked)."""

from __future__ import annotations

import asyncio
import logging
import time
from types import SimpleNamespace

import pytest
from redis.exceptions import ConnectionError as RedisConnectionError

from stream_sentiment.aggregation import judge as judge_module
from stream_sentiment.aggregation.judge import AlertJudge
from stream_sentiment.metrics import PipelineMetrics


class FakeMonitor:
    """Fails ``failures`` rounds with a Redis connection error, then raises one ratio alert per round."""

    def __init__(self, failures: int) -> None:
        self.failures = failures
        self.rounds: list[int] = []
        self.watermark: float | None = None
        self.engine_version = "v1"

    async def judge_due(self, partitions: int) -> list[SimpleNamespace]:
        self.rounds.append(partitions)
        if len(self.rounds) <= self.failures:
            raise RedisConnectionError("Redis is restarting")
        self.watermark = 1_700_000_000.0 + len(self.rounds)
        return [SimpleNamespace(rule="ratio", stats=SimpleNamespace(dimension="topic"))]


class FakeSink:
    def __init__(self) -> None:
        self.applied = asyncio.Event()
        self.redis_down = False
        self.idle_calls: list[tuple[dict[int, float], float, float]] = []

    async def mark_idle(self, last_record_at: dict[int, float], now: float, idle_s: float) -> None:
        self.idle_calls.append((last_record_at, now, idle_s))


class FakeSource:
    def __init__(self, partitions: int | None) -> None:
        self.partitions = partitions
        self.paused = False
        self.last_record_at = {0: 5.0}

    def partition_count(self) -> int | None:
        return self.partitions


@pytest.fixture(autouse=True)
def quick_rounds(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(judge_module, "JUDGE_INTERVAL_S", 0.01)
    monkeypatch.setattr(judge_module, "JUDGE_MIN_GAP_S", 0.001)


def _run(judge: AlertJudge, until: object) -> None:
    async def scenario() -> None:
        stop = asyncio.Event()
        task = asyncio.create_task(judge.run(stop))
        async with asyncio.timeout(10):
            while not until():  # type: ignore[operator]
                await asyncio.sleep(0.005)
        stop.set()
        await task

    asyncio.run(scenario())


def _after(seconds: float) -> object:
    deadline = time.monotonic() + seconds
    return lambda: time.monotonic() >= deadline


def test_a_redis_outage_is_counted_each_round_logged_once_and_judging_resumes(caplog: pytest.LogCaptureFixture):
    monitor, sink, source, metrics = FakeMonitor(failures=3), FakeSink(), FakeSource(4), PipelineMetrics()
    judge = AlertJudge(monitor, sink, source, metrics, idle_partition_seconds=30.0,  # type: ignore[arg-type]
                       wall_clock=lambda: 100.0)
    with caplog.at_level(logging.WARNING, logger="stream_sentiment.aggregation.judge"):
        _run(judge, lambda: len(monitor.rounds) >= 5)
    assert monitor.rounds[:5] == [4] * 5  # the topic's partition count, every round
    assert metrics.redis_errors.labels("judge")._value.get() == 3
    assert [r.getMessage() for r in caplog.records].count("alert judgement waits for Redis: Redis is restarting") == 1
    assert metrics.alerts.labels("ratio", "topic")._value.get() == len(monitor.rounds) - 3
    assert metrics.watermark._value.get() == monitor.watermark
    assert sink.idle_calls[0] == ({0: 5.0}, 100.0, 30.0)


def test_nothing_is_judged_before_the_partition_count_is_known_or_while_redis_is_down():
    monitor, sink, source, metrics = FakeMonitor(failures=0), FakeSink(), FakeSource(None), PipelineMetrics()
    judge = AlertJudge(monitor, sink, source, metrics, idle_partition_seconds=30.0,  # type: ignore[arg-type]
                       wall_clock=lambda: 100.0)
    _run(judge, _after(0.1))  # ten rounds' worth of waiting
    sink.redis_down, source.partitions = True, 2
    sink.applied = asyncio.Event()  # the next run has an event loop of its own
    _run(judge, _after(0.1))
    assert monitor.rounds == [] and sink.idle_calls == []


def test_a_paused_source_marks_no_partition_idle_and_a_swap_renames_the_engine():
    monitor, sink, source, metrics = FakeMonitor(failures=0), FakeSink(), FakeSource(1), PipelineMetrics()
    source.paused = True
    judge = AlertJudge(monitor, sink, source, metrics, idle_partition_seconds=30.0,  # type: ignore[arg-type]
                       wall_clock=lambda: 100.0)
    judge.engine_version = "v2"
    _run(judge, lambda: len(monitor.rounds) >= 2)
    assert sink.idle_calls == [] and monitor.engine_version == "v2"
