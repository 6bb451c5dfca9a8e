"""The checkpointing sink: finished records -> one fenced Lua call per offset range -> Kafka commit after.

Each partition's fetched records wait in a :class:`PartitionProgress` until the
longest finished prefix can be applied as one range: its increments (computed
from the partition's stream time, so a function of the log alone), its new
offset mark and stream time, in one atomic call through ``RedisSink``. Kafka
offsets are committed only after Redis answered (Quix Streams' order), at most
once per ``commit_interval_s``: Redis holds the truth, the commit only bounds
what a restart re-reads.

The fence refuses three kinds of stale write, and each has one answer here:

* ``DUPLICATE``: the range was applied before (a replay) -- nothing written, the records leave.
* ``OUT_OF_ORDER``: the mark moved under this worker -- re-read it and resume there
  (``on_resync``), never skip or double.
* ``FENCED``: another member claimed the partition since -- drop it (``on_fenced``);
  the consumer group's revoke follows.
* ``LOST``: the mark this worker resumed from is gone -- Redis lost its data (``on_lost``
  refuses or rebuilds, ``recovery.on_redis_loss``).

Redis faults are ridden out, not fatal: a call that fails with a connection
error, a time-out, ``LOADING`` or ``READONLY`` is retried with backoff while
:attr:`redis_down` tells the source to stop fetching, for up to
``outage_limit_s``; only then does :class:`RedisOutageError` stop the worker.
Nothing is lost or doubled meanwhile: a range is only removed once Redis
answered for it, and a retried call that had in fact been applied comes back
as ``DUPLICATE``.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import numpy as np
from redis.exceptions import BusyLoadingError, ReadOnlyError
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from stream_sentiment.aggregation.buckets import BucketRules, RangeIncrements, ScoredPost, increments_for
from stream_sentiment.aggregation.progress import PartitionProgress, ReadyRange
from stream_sentiment.metrics import PipelineMetrics, observe_many
from stream_sentiment.sinks.keys import RedisKeys
from stream_sentiment.sinks.redis_sink import ApplyOutcome, ApplyResult, PartitionState, RangeWrite, RedisSink
from stream_sentiment.source.messages import Rejection

log = logging.getLogger(__name__)

Outcome = ScoredPost | Rejection
T = TypeVar("T")
# Errors that mean "Redis is not answering right now", not "this call is wrong". BusyLoadingError is a
# ConnectionError; READONLY is what a replica says during a failover.
TRANSIENT_REDIS_ERRORS = (RedisConnectionError, RedisTimeoutError, BusyLoadingError, ReadOnlyError)
# First wait before retrying a failed Redis call; doubles up to RedisSettings.retry_max_seconds.
FIRST_RETRY_S = 0.1


class RedisOutageError(RuntimeError):
    """Redis stayed unreachable past ``redis.outage_limit_seconds``."""


class RedisStateLostError(RuntimeError):
    """Redis lost the marks (and counts) of partitions this consumer group had applied."""


class CheckpointingSink:
    """Applies each partition's finished records to Redis in offset order, then commits them to Kafka.

    Args:
        redis_sink: the fenced Lua writer.
        rules: how posts become bucket increments.
        keys: the service's Redis keys.
        metrics: where fence outcomes, counts and Redis faults are recorded.
        commit: commits ``{partition: next offset}`` to Kafka (failures are the callee's to report).
        outage_limit_s: how long Redis may stay unreachable before :class:`RedisOutageError`.
        retry_max_s: longest wait between retries.
        commit_interval_s: Kafka commits at most this often (a drain forces one).
        clock: monotonic seconds (backoff, commit interval).
        wall_clock: epoch seconds, for the end-to-end latency metric only.
    """

    def __init__(
        self,
        redis_sink: RedisSink,
        rules: BucketRules,
        keys: RedisKeys,
        metrics: PipelineMetrics,
        *,
        commit: Callable[[dict[int, int]], Awaitable[None]],
        outage_limit_s: float = 300.0,
        retry_max_s: float = 5.0,
        commit_interval_s: float = 1.0,
        clock: Callable[[], float] = time.monotonic,
        wall_clock: Callable[[], float] = time.time,
    ) -> None:
        self.redis = redis_sink
        self.rules = rules
        self.keys = keys
        self.metrics = metrics
        self._commit = commit
        self.outage_limit_s = outage_limit_s
        self.retry_max_s = retry_max_s
        self.commit_interval_s = commit_interval_s
        self._clock = clock
        self._wall_clock = wall_clock
        self.progress: dict[int, PartitionProgress[Outcome]] = {}
        # One apply at a time: whatever finished while one waits for Redis goes out in the next, together
        # (with small batches, one Lua call per scored batch and partition was most of the sink's cost).
        self._applying = asyncio.Lock()
        # Applied marks not yet committed to Kafka.
        self._uncommitted: dict[int, int] = {}
        self._last_commit = 0.0
        self._down_since: float | None = None
        # The token this member claimed its partitions with (see RedisSink.claim).
        self.owner = ""
        self._idle_marked: set[int] = set()
        # Set whenever a range is applied: whoever judges alerts may find the watermark moved.
        self.applied = asyncio.Event()
        # Called with the partition and Redis's state when the mark moved under this worker.
        self.on_resync: Callable[[int, PartitionState], None] = lambda partition, state: None
        # Called with a partition another member claimed since this one did.
        self.on_fenced: Callable[[int], None] = lambda partition: None
        # Called with a partition whose mark Redis lost while this worker was applying it.
        self.on_lost: Callable[[int], Awaitable[None]] = _nothing
        # Partitions whose mark Redis holds (resumed from it, or applied since): a missing one is a loss.
        self._marked: set[int] = set()
        self.scored = 0
        self.dead_lettered = 0
        self._scored_series: dict[str, Any] = {}

    @property
    def redis_down(self) -> bool:
        """True while Redis is not answering: the source stops fetching, readiness is false."""
        return self._down_since is not None

    async def call_redis(self, operation: str, call: Callable[[], Awaitable[T]]) -> T:
        """``call()``, retried with backoff through a Redis outage of up to ``outage_limit_s``."""
        delay = FIRST_RETRY_S
        while True:
            try:
                result = await call()
            except TRANSIENT_REDIS_ERRORS as error:
                self.metrics.redis_errors.labels(operation).inc()
                now = self._clock()
                if self._down_since is None:
                    self._down_since = now
                    self.metrics.redis_outages.inc()
                    self.metrics.redis_down.set(1)
                    log.error("Redis is not answering (%s: %s): fetching paused, retrying for up to %.0f s",
                              operation, error, self.outage_limit_s)
                if now - self._down_since >= self.outage_limit_s:
                    raise RedisOutageError(
                        f"Redis has not answered for {now - self._down_since:.0f} s (redis.outage_limit_seconds = "
                        f"{self.outage_limit_s:.0f}); last error during {operation}: {error}. Nothing applied is "
                        "lost: restart the worker once Redis is back and it resumes at the marks Redis holds."
                    ) from error
                await asyncio.sleep(delay)
                delay = min(2 * delay, self.retry_max_s)
                continue
            if self._down_since is not None:
                log.warning("Redis answers again after %.1f s: fetching resumes", self._clock() - self._down_since)
                self._down_since = None
                self.metrics.redis_down.set(0)
            return result

    async def assign(self, partitions: list[int], owner: str) -> dict[int, PartitionState]:
        """Claim ``partitions`` for ``owner`` and return what Redis holds for each (absent: never applied)."""
        self.owner = owner
        await self.call_redis("assign", lambda: self.redis.claim(owner, partitions))
        states = await self.call_redis("assign", self.redis.partition_states)
        return {p: states[p] for p in partitions if p in states}

    def track(self, partition: int, mark: int, stream_time: float | None, *,
              in_redis: bool) -> PartitionProgress[Outcome]:
        """Start (or restart) collecting ``partition``'s records at ``mark`` (``in_redis``: Redis holds it)."""
        progress: PartitionProgress[Outcome] = PartitionProgress(partition, mark, stream_time)
        self.progress[partition] = progress
        if in_redis:
            self._marked.add(partition)
        else:
            self._marked.discard(partition)
        self._uncommitted.pop(partition, None)
        return progress

    def forget(self, partition: int) -> None:
        """``partition`` is no longer this worker's: nothing of it is applied or committed from here on."""
        self.progress.pop(partition, None)
        self._uncommitted.pop(partition, None)
        self._idle_marked.discard(partition)
        self._marked.discard(partition)

    async def mark_idle(self, last_record_at: dict[int, float], now: float, idle_s: float) -> None:
        """Tell the group which owned partitions have had nothing new for ``idle_s`` (wall clock).

        The one input to alerts that depends on timing rather than the log: docs/scaling.md says when.
        """
        idle = [p for p, progress in self.progress.items()
                if p not in self._idle_marked and progress.in_flight == 0
                and now - last_record_at.get(p, now) >= idle_s]
        if idle:
            await self.call_redis("idle", lambda: self.redis.mark_idle(idle))
            self._idle_marked.update(idle)

    def note_records(self, partition: int) -> None:
        """``partition`` has records again: its next range clears its idle flag in Redis."""
        self._idle_marked.discard(partition)

    async def apply_ready(self, *, force_commit: bool = False) -> None:
        """Apply every partition's finished prefix, all in one Redis call, then commit to Kafka if due.

        Calls run one after another: one made while another waits for Redis applies what finished
        meanwhile, so a burst of scored batches costs a round trip or two, not one per batch.
        """
        async with self._applying:
            await self._apply_ranges()
        due = self._clock() - self._last_commit >= self.commit_interval_s
        if self._uncommitted and (force_commit or due):
            marks, self._uncommitted = self._uncommitted, {}
            self._last_commit = self._clock()
            await self._commit(marks)

    async def _apply_ranges(self) -> None:
        ready: list[tuple[PartitionProgress[Outcome], ReadyRange[Outcome], RangeIncrements]] = []
        for progress in list(self.progress.values()):
            taken = progress.take_ready()
            if taken is not None:
                ready.append((progress, taken, increments_for(taken.results, progress.stream_time, self.rules,
                                                              self.keys)))
        if not ready:
            return
        writes = [RangeWrite(taken.partition, taken.first, taken.next_offset, ranged.increments, ranged.stream_time,
                             mark_expected=taken.partition in self._marked) for _, taken, ranged in ready]
        with self.metrics.stage("redis"):
            started = time.perf_counter()
            results = await self.call_redis("apply", functools.partial(self.redis.apply_many, writes, self.owner))
            self.metrics.redis_apply.observe(time.perf_counter() - started)
        for (progress, taken, ranged), result in zip(ready, results, strict=True):
            self.metrics.fence.labels(result.outcome.value).inc()
            await self._applied(progress, taken, ranged, result)

    async def _applied(self, progress: PartitionProgress[Outcome], ready: ReadyRange[Outcome],
                       ranged: RangeIncrements, result: ApplyResult) -> None:
        """Redis's answer for one partition's range: the records leave, or the fence's refusal is acted on."""
        partition = progress.partition
        if result.outcome in (ApplyOutcome.APPLIED, ApplyOutcome.DUPLICATE):
            progress.applied(ready)
            progress.stream_time = ranged.stream_time
            owned = self.progress.get(partition) is progress  # not revoked (or replaced) while Redis answered
            if owned:
                self._marked.add(partition)
                self._uncommitted[partition] = progress.mark
            if result.outcome is ApplyOutcome.APPLIED:
                self._count_applied(ready.results)
                if owned:
                    self._idle_marked.discard(partition)  # the script cleared the partition's idle flag
                self.applied.set()
            return
        if self.progress.get(partition) is not progress:
            return  # revoked or replaced while Redis answered: the refusal is about a range nobody holds now
        if result.outcome is ApplyOutcome.FENCED:
            log.error("partition %d: another member claimed it since this one did; dropping it", partition)
            self.forget(partition)
            self.on_fenced(partition)
        elif result.outcome is ApplyOutcome.LOST:
            log.error("partition %d: Redis no longer holds its mark (it was at %d): Redis lost its data",
                      partition, progress.mark)
            self.forget(partition)
            await self.on_lost(partition)
        else:  # OUT_OF_ORDER
            states = await self.call_redis("resync", self.redis.partition_states)
            state = states.get(partition, PartitionState(result.mark, None))
            log.warning("partition %d: Redis's mark is %d, this worker's range started at %d: "
                        "resuming at Redis's mark", partition, state.mark, ready.first)
            self.on_resync(partition, state)

    def _count_applied(self, results: list[Outcome]) -> None:
        """Counts posts once, when the fence applied them (a duplicate range counts nothing).

        Latencies are observed for the whole range at once (``observe_many``), not post by post, and the
        range is walked by comprehensions rather than a loop body per post.
        """
        written = self._wall_clock()
        scored = [result for result in results if not isinstance(result, Rejection)]
        if len(scored) < len(results):
            for result in results:
                if isinstance(result, Rejection):
                    self.dead_lettered += 1
                    self.metrics.dead_letters.labels(result.reason.value).inc()
        appended = [post.appended_at for post in scored if post.appended_at is not None]
        fetched = [post.fetched_at for post in scored if post.fetched_at is not None]
        scored_at = [post.scored_at for post in scored if post.scored_at is not None]
        for times, histogram in ((appended, self.metrics.end_to_end), (fetched, self.metrics.pipeline_latency),
                                 (scored_at, self.metrics.apply_wait)):
            if times:
                observe_many(histogram, np.maximum(0.0, written - np.asarray(times, dtype=np.float64)))
        for label, count in Counter([post.label for post in scored]).items():  # one increment per label
            self.scored += count
            series = self._scored_series.get(label)
            if series is None:  # looked up once: labels() takes a lock and builds a key per call
                series = self._scored_series[label] = self.metrics.posts_scored.labels(label)
            series.inc(count)


async def _nothing(partition: int) -> None:
    return None
