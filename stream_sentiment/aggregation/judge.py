"""When a worker judges alerts: the loop that calls :meth:`AlertMonitor.judge_due` as ranges are applied.

Which windows alert, and with what, depends only on the log (``aggregation.monitor``); this loop
only decides how soon after the group's watermark passes a window it is judged: whenever this
worker applies a range, else every ``JUDGE_INTERVAL_S`` (idle partitions, other workers' progress),
and never more often than every ``JUDGE_MIN_GAP_S``. Before each round it marks the owned
partitions that have had nothing new for ``aggregation.idle_partition_seconds`` as idle, so they
stop holding back the watermark. While Redis does not answer it waits; a failed round is counted
and retried on the next one.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Protocol

from stream_sentiment.aggregation.alerts import AlertRules
from stream_sentiment.aggregation.buckets import BucketRules
from stream_sentiment.aggregation.monitor import AlertMonitor
from stream_sentiment.sinks.checkpoint import TRANSIENT_REDIS_ERRORS
from stream_sentiment.sinks.keys import RedisKeys

if TYPE_CHECKING:
    from stream_sentiment.config import Settings
    from stream_sentiment.metrics import PipelineMetrics

log = logging.getLogger(__name__)
# Longest the alert judge waits for an applied range before looking anyway (idle partitions, other workers'
# progress). Judgements depend only on the log; this bounds how soon after the watermark they come.
JUDGE_INTERVAL_S = 1.0
# Shortest gap between two judge rounds: a busy worker applies many ranges a second, and one look at the
# group's watermark per round trip is enough.
JUDGE_MIN_GAP_S = 0.2


class AppliedRanges(Protocol):
    """What the judge needs of the worker's checkpointing sink (``sinks.checkpoint.CheckpointingSink``)."""

    @property
    def applied(self) -> asyncio.Event:
        """Set whenever a range is applied."""

    @property
    def redis_down(self) -> bool: ...

    async def mark_idle(self, last_record_at: dict[int, float], now: float, idle_s: float) -> None: ...


class Partitions(Protocol):
    """What the judge needs of the worker's Kafka source (``source.kafka_source.KafkaSource``)."""

    @property
    def paused(self) -> bool:
        """Fetching is held back (a paused partition is not idle)."""

    @property
    def last_record_at(self) -> dict[int, float]:
        """Wall-clock time each owned partition last had records."""

    def partition_count(self) -> int | None:
        """How many partitions the topic has, once known."""


class AlertJudge:
    """Judges the windows the group's watermark has passed, for one worker, until stopped.

    Args:
        monitor: the alert monitor that judges and records (shared rules, Redis keys, engine version).
        sink: the worker's checkpointing sink: applied ranges wake the loop, idle partitions are marked through it.
        source: the worker's Kafka source: the topic's partition count, which partitions went quiet.
        metrics: alerts raised, the group's watermark, Redis errors (``judge``).
        idle_partition_seconds: how long a partition has had no records before it is marked idle.
        wall_clock: epoch seconds, for idle-partition detection only.
    """

    def __init__(self, monitor: AlertMonitor, sink: AppliedRanges, source: Partitions, metrics: PipelineMetrics, *,
                 idle_partition_seconds: float, wall_clock: Callable[[], float]) -> None:
        self.monitor = monitor
        self.sink = sink
        self.source = source
        self.metrics = metrics
        self.idle_partition_seconds = idle_partition_seconds
        self.wall_clock = wall_clock

    @classmethod
    def for_settings(cls, settings: Settings, client: Any, keys: RedisKeys, buckets: BucketRules, *,
                     engine_version: str, sink: AppliedRanges, source: Partitions, metrics: PipelineMetrics,
                     wall_clock: Callable[[], float]) -> AlertJudge:
        """A judge with the service's alert rules and windows; ``client`` is a redis.asyncio client."""
        alerts = settings.alerts
        rules = AlertRules(alerts.ratio_threshold, alerts.min_posts, alerts.surge_z, alerts.ewma_alpha,
                           alerts.cooldown_seconds)
        monitor = AlertMonitor(
            client, keys, buckets, settings.aggregation.windows_seconds, rules,
            topic=settings.topic, engine_version=engine_version, stream_max_len=alerts.stream_max_len,
            sample_posts=alerts.sample_posts,
        )
        return cls(monitor, sink, source, metrics, idle_partition_seconds=settings.aggregation.idle_partition_seconds,
                   wall_clock=wall_clock)

    @property
    def engine_version(self) -> str:
        """The engine (``model/version``) alerts name where their window's buckets recorded none."""
        return self.monitor.engine_version

    @engine_version.setter
    def engine_version(self, version: str) -> None:
        self.monitor.engine_version = version

    async def run(self, stop: asyncio.Event) -> None:
        """Judge the due windows whenever a range is applied (or each second) until ``stop`` is set."""
        monitor, sink, source, metrics = self.monitor, self.sink, self.source, self.metrics
        applied = sink.applied
        reported = False
        while not stop.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(applied.wait(), JUDGE_INTERVAL_S)
            applied.clear()
            partitions = source.partition_count()
            if not partitions or sink.redis_down:
                continue
            try:
                if not source.paused:  # a paused partition is not idle, only held back
                    await sink.mark_idle(source.last_record_at, self.wall_clock(), self.idle_partition_seconds)
                for alert in await monitor.judge_due(partitions):
                    metrics.alerts.labels(alert.rule, alert.stats.dimension).inc()
                if monitor.watermark is not None:
                    metrics.watermark.set(monitor.watermark)
                reported = False
            except TRANSIENT_REDIS_ERRORS as error:
                metrics.redis_errors.labels("judge").inc()
                if not reported:  # the applier reports the outage itself; say once why alerts wait
                    log.warning("alert judgement waits for Redis: %s", error)
                    reported = True
            await asyncio.sleep(JUDGE_MIN_GAP_S)
