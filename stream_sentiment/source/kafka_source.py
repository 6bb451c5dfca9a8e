"""The Kafka source: the consumer group's side of a worker, handing out admitted posts.

It owns the consumer and the dead-letter producer. On assignment it claims the
partitions in Redis (through the checkpointing sink) and seeks each one to its
applied mark; a partition never applied starts at its earliest retained offset,
by an explicit seek. Two ways a log and Redis can disagree are never skipped
silently:

* Kafka holds commits for a partition Redis has no mark for: Redis lost its data
  (``recovery.on_redis_loss``: refuse, exit code 4, or rebuild from the beginning).
* A partition's log ends below its mark (the fetch's high-water mark says so): the
  log restarted (``recovery.on_offset_regression``: stop that partition, or rebase).

Each fetch is decoded in one pass into :class:`Admitted` posts for the scheduler;
rejected records are published to the dead-letter topic in one background task,
with their original key and bytes, and finish (so they can be counted) once the
broker acknowledged them. A gap in a partition's offsets is read again before it
is accepted (``kafka_gap_refetches``).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import os
import socket
import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from stream_sentiment.aggregation.progress import PartitionProgress
from stream_sentiment.clients import kafka_consumer, kafka_producer, redacted_url, start_kafka
from stream_sentiment.config import Settings
from stream_sentiment.metrics import PipelineMetrics
from stream_sentiment.sinks.checkpoint import CheckpointingSink, Outcome, RedisStateLostError
from stream_sentiment.sinks.redis_sink import PartitionState
from stream_sentiment.source.dead_letters import SourceRecord, publish_dead_letter, send_dead_letter
from stream_sentiment.source.messages import MessageLimits, Post, Rejection, decode_post

log = logging.getLogger(__name__)

# Records decoded per fetch: decoding runs on the event loop, and 2,000 at once held it ~30 ms, during which
# no engine completion or Redis answer was handled. A fetch-wait's worth at 100k posts/s still fits in one.
FETCH_MAX_RECORDS = 500


@dataclass(slots=True)
class Admitted:
    """A valid post on its way to the scheduler, with where it came from, its event time, when Kafka
    appended it and when this worker fetched it (epoch seconds; the last two for latency metrics only).

    ``owner`` is the partition's progress that fetched it: a progress replaced meanwhile (a rebase after the
    log restarted, a resync, a revoke and re-assignment) has other records at the same offsets, so a result
    is finished only in the progress that fetched its record.

    Immutable by convention, not frozen: one is made per post on the hot path (see ``Post``).
    """

    partition: int
    offset: int
    post: Post
    event_time: float
    appended_at: float
    fetched_at: float | None = None
    owner: PartitionProgress[Outcome] | None = None


class KafkaSource:
    """One consumer-group member's Kafka side.

    Args:
        settings: the service settings.
        sink: where partitions are claimed, tracked and forgotten.
        metrics: fetch, gap and regression counters.
        fail: records a failure that must stop the worker (a listener callback cannot raise usefully).
        wall_clock: epoch seconds, for idle-partition detection only.
    """

    def __init__(
        self,
        settings: Settings,
        sink: CheckpointingSink,
        metrics: PipelineMetrics,
        *,
        fail: Callable[[BaseException], None],
        wall_clock: Callable[[], float] = time.time,
    ) -> None:
        self.settings = settings
        self.sink = sink
        self.metrics = metrics
        self._fail = fail
        self._wall_clock = wall_clock
        limits = settings.limits
        self.limits = MessageLimits(limits.max_message_bytes, limits.max_text_chars, limits.max_id_chars,
                                    limits.max_field_chars)
        self.default_language = settings.default_language
        self.consumer: Any = None
        self.producer: Any = None
        # Partitions whose log restarted below their mark and are not consumed (recovery.on_offset_regression).
        self.regressed: set[int] = set()
        # Wall-clock time each owned partition last had records: idle partitions stop holding back alerts.
        self.last_record_at: dict[int, float] = {}
        # Dead letters on their way to the broker (their records finish once acknowledged).
        self.publishing: set[asyncio.Task[None]] = set()
        # partition -> (the offset a gap starts at, re-reads of it so far)
        self._gap_rereads: dict[int, tuple[int, int]] = {}
        # Names this member in the owner tokens it claims partitions with (logs, the owners hash).
        self._member_name = f"{socket.gethostname()}-{os.getpid()}"
        self.paused = False
        # When the last fetch began (monotonic seconds): kafka_fetch_min_interval_ms spaces fetches from it.
        self._fetched_at = float("-inf")
        sink.on_resync = self.resync
        sink.on_fenced = self.fenced
        sink.on_lost = self.redis_lost

    async def start(self, on_revoked: Callable[[set[int]], Awaitable[None]],
                    consumer_options: dict[str, Any] | None = None) -> None:
        """Connect, subscribe; ``on_revoked`` drains the worker's in-flight posts of revoked partitions."""
        from aiokafka import ConsumerRebalanceListener

        source = self

        class Listener(ConsumerRebalanceListener):  # type: ignore[misc]
            # aiokafka logs and swallows a callback's exception; a failed assignment would then
            # silently skip its partitions. Stop the worker instead: a restart resumes at the marks.
            async def on_partitions_revoked(self, revoked: Any) -> None:
                gone = {tp.partition for tp in revoked}
                try:
                    await on_revoked(gone)
                except Exception as error:
                    source._fail(error)
                finally:
                    for partition in gone:
                        source.sink.forget(partition)  # no longer ours to apply or commit
                        source.last_record_at.pop(partition, None)

            async def on_partitions_assigned(self, assigned: Any) -> None:
                try:
                    await source._assigned(assigned)
                except Exception as error:
                    source._fail(error)

        settings = self.settings
        self.producer = kafka_producer(settings, acks="all")
        options = {
            "session_timeout_ms": settings.kafka_session_timeout_ms,
            "heartbeat_interval_ms": settings.kafka_heartbeat_interval_ms,
            "fetch_max_wait_ms": settings.kafka_fetch_max_wait_ms,
            "fetch_min_bytes": settings.kafka_fetch_min_bytes,
            **(consumer_options or {}),
        }
        self.consumer = kafka_consumer(
            settings, group_id=settings.consumer_group, enable_auto_commit=False, auto_offset_reset="earliest",
            **options,
        )
        try:  # a certificate or password the broker refuses fails here, with the reason (exit code 3)
            await start_kafka(self.producer, settings)
            await start_kafka(self.consumer, settings)
        except BaseException:
            await self.stop()
            raise
        self.consumer.subscribe([settings.topic], listener=Listener())

    async def stop(self) -> None:
        for task in self.publishing:
            task.cancel()
        if self.consumer is not None:
            await self.consumer.stop()
        if self.producer is not None:
            await self.producer.stop()

    def partition_count(self) -> int | None:
        """How many partitions the topic has, once the consumer knows (each one's stream time counts)."""
        partitions = self.consumer.partitions_for_topic(self.settings.topic) if self.consumer else None
        return len(partitions) if partitions else None

    # -- assignment -------------------------------------------------------------------------------

    async def _assigned(self, assigned: Any) -> None:
        partitions = sorted(tp.partition for tp in assigned)
        # A new token per assignment: once this member holds the partitions, writes of a previous owner that
        # has not noticed its revoke (a stalled zombie) are refused by the fence.
        generation = getattr(getattr(self.consumer, "_coordinator", None), "generation", "?")
        owner = f"{self._member_name}:{generation}:{uuid.uuid4().hex[:12]}"
        states = await self.sink.assign(partitions, owner)
        now = self._wall_clock()
        fresh, lost = [], []
        for tp in assigned:
            self.regressed.discard(tp.partition)
            self.last_record_at[tp.partition] = now
            state = states.get(tp.partition)
            if state is not None:
                self.consumer.seek(tp, state.mark)
                self.sink.track(tp.partition, state.mark, state.stream_time, in_redis=True)
            elif await self.consumer.committed(tp) is not None:
                # The group applied and committed records here, but Redis knows none of them.
                lost.append(tp)
            else:
                fresh.append(tp)
        if fresh:
            # Never applied: start at the earliest retained offset, by an explicit seek. The consumer's own
            # position() would do the same, but the fetcher may already have moved it past records it holds,
            # which the mark would then skip.
            for tp, beginning in (await self.consumer.beginning_offsets(fresh)).items():
                self.consumer.seek(tp, beginning)
                self.sink.track(tp.partition, beginning, None, in_redis=False)
        for tp in lost:
            await self.redis_lost(tp.partition)
        log.info("assigned %s as %s", partitions, owner)

    async def redis_lost(self, partition: int) -> None:
        """Redis has no mark for a partition this group applied: refuse, or recount it from the beginning."""
        tp = self._tp(partition)
        settings = self.settings
        if settings.recovery.on_redis_loss == "refuse":
            self.consumer.pause(tp)
            self._fail(RedisStateLostError(
                f"Redis ({redacted_url(settings.redis_url)}, prefix {settings.redis_prefix!r}) has no offset mark for "
                f"partition {partition} of {settings.topic!r}, but consumer group {settings.consumer_group!r} has "
                "applied and committed records there: Redis lost the counts this group wrote (restarted without "
                "persistence, flushed, or another Redis or prefix). Resuming from Kafka's commit would silently "
                "drop them. To count the retained log again, set recovery.on_redis_loss = \"rebuild\" "
                "(STREAM_SENTIMENT_RECOVERY__ON_REDIS_LOSS=rebuild); to start afresh from the commits on purpose, "
                "reset the group's offsets instead."))
            return
        beginning = (await self.consumer.beginning_offsets([tp]))[tp]
        log.warning("partition %d: Redis lost its state; rebuilding from the earliest retained offset %d "
                    "(recovery.on_redis_loss = rebuild)", partition, beginning)
        self.consumer.seek(tp, beginning)
        self.sink.track(partition, beginning, None, in_redis=False)

    def resync(self, partition: int, state: PartitionState) -> None:
        """Redis's mark moved under this worker: resume the partition there (its in-flight posts are dropped)."""
        self.sink.track(partition, state.mark, state.stream_time, in_redis=True)
        self.consumer.seek(self._tp(partition), state.mark)

    def fenced(self, partition: int) -> None:
        """Another member owns ``partition`` now: stop fetching it until the group's revoke arrives."""
        self.consumer.pause(self._tp(partition))

    def _tp(self, partition: int) -> Any:
        from aiokafka import TopicPartition

        return TopicPartition(self.settings.topic, partition)

    # -- fetching ---------------------------------------------------------------------------------

    async def fetch(self, timeout_ms: int, *, paused: bool) -> list[Admitted]:
        """One fetch, decoded: the valid posts; rejected records go to the dead-letter topic.

        ``paused`` stops fetching (backpressure, no working engine, Redis down) while the consumer still
        polls, so the group keeps this member.
        """
        consumer = self.consumer
        min_interval = self.settings.kafka_fetch_min_interval_ms / 1000
        if min_interval and not paused:
            # Records arriving meanwhile wait in the consumer's buffer and come in this fetch: fewer, larger
            # fetches. Batches, scored results and Redis writes do not wait for it (their own tasks and timers).
            wait = self._fetched_at + min_interval - time.monotonic()
            if wait > 0:
                await asyncio.sleep(wait)
            self._fetched_at = time.monotonic()
        assigned = consumer.assignment()
        self.paused = paused
        if paused:
            consumer.pause(*assigned)
        else:
            consumer.resume(*[tp for tp in assigned
                              if tp.partition in self.sink.progress and tp.partition not in self.regressed])
        batches = await consumer.getmany(timeout_ms=timeout_ms, max_records=FETCH_MAX_RECORDS)
        # What is assigned now: a rebalance may have run during the fetch.
        await self._check_offset_regressions(consumer.assignment())
        return self._admit(batches)

    async def _check_offset_regressions(self, assigned: Any) -> None:
        """A partition whose log now ends below its mark restarted (re-created topic, broker restored empty).

        The fetch's high-water mark says where the log ends (Tansu answers fetches past the end with no
        error, so a reset policy never fires); without this check its new records below the mark would be
        skipped silently.
        """
        for tp in assigned:
            progress = self.sink.progress.get(tp.partition)
            end = self.consumer.highwater(tp)
            if progress is None or end is None or end >= progress.mark or tp.partition in self.regressed:
                continue
            if await self.sink.call_redis("regression", functools.partial(
                    self.sink.redis.record_regression, tp.partition, progress.mark)):
                self.metrics.offset_regressions.inc()
            if self.settings.recovery.on_offset_regression == "rebase":
                beginning = (await self.consumer.beginning_offsets([tp]))[tp]
                moved = await self.sink.call_redis("regression", functools.partial(
                    self.sink.redis.rebase, tp.partition, progress.mark, beginning))
                log.error("partition %d: its log ends at %d, below the mark %d: it restarted. Counting the new log "
                          "from offset %d (recovery.on_offset_regression = rebase)%s", tp.partition, end,
                          progress.mark, beginning, "" if moved else "; another worker moved the mark first")
                if moved:
                    self.consumer.seek(tp, beginning)
                    self.sink.track(tp.partition, beginning, progress.stream_time, in_redis=True)
                continue
            self.regressed.add(tp.partition)
            self.consumer.pause(tp)
            log.error("partition %d: its log ends at offset %d, below the mark %d in Redis: the log restarted "
                      "(a re-created topic, a broker restored empty). Not consuming it: its new records would "
                      "be skipped below the mark. Set recovery.on_offset_regression = \"rebase\" to count the new "
                      "log from its beginning.", tp.partition, end, progress.mark)

    def _admit(self, batches: dict[Any, list[Any]]) -> list[Admitted]:
        """Decode and validate fetched records; rejected ones go to the dead-letter topic."""
        admitted: list[Admitted] = []
        rejected: list[tuple[PartitionProgress[Outcome], SourceRecord, Rejection]] = []
        decode_started = time.perf_counter()
        fetched_at = self._wall_clock()
        for tp, records in batches.items():
            self.metrics.records_fetched.inc(len(records))
            progress = self.sink.progress.get(tp.partition)
            if progress is None:
                continue
            if records:
                self.last_record_at[tp.partition] = fetched_at
                self.sink.note_records(tp.partition)
            partition, mark = tp.partition, progress.mark
            expected = progress.next_offset  # the offset the next record should have (kept locally: per record)
            limits, language = self.limits, self.default_language
            for record in records:
                offset = record.offset
                if offset < mark:
                    continue  # fetched before the seek to the applied mark took effect
                if offset > expected and self._reread_gap(tp, expected, offset):
                    break  # the rest of this partition's fetch comes again, after the gap
                progress.fetched(offset)
                expected = offset + 1
                outcome = decode_post(record.value, limits, language)
                if isinstance(outcome, Rejection):
                    rejected.append((progress, SourceRecord(
                        record.topic, record.partition, offset, record.timestamp, record.key, record.value,
                    ), outcome))
                    continue
                appended_at = record.timestamp / 1000
                # The log's own clock bounds a post's: a ts ahead of its record's Kafka timestamp (a producer's
                # wrong clock, a hostile post) is clamped to it, so it cannot pull the stream time into the future.
                ts = outcome.ts
                event_time = appended_at if ts is None or ts > appended_at else ts
                admitted.append(Admitted(partition, offset, outcome, event_time, appended_at, fetched_at, progress))
        self.metrics.stage_seconds.labels("decode").inc(time.perf_counter() - decode_started)
        if rejected:
            self._dead_letter(rejected)
        return admitted

    def _reread_gap(self, tp: Any, expected: int, got: int) -> bool:
        """Seek back to a gap's start to read it again; False once it survived its re-reads (then it is skipped).

        Offsets a partition skips are marked applied with the range that follows, so a gap accepted while
        its records were only not yet readable loses them for good; a real gap (compaction, transaction
        markers) costs ``kafka_gap_refetches`` extra fetches.
        """
        start, rereads = self._gap_rereads.get(tp.partition, (expected, 0))
        if start != expected:
            rereads = 0
        if rereads < self.settings.kafka_gap_refetches:
            self._gap_rereads[tp.partition] = (expected, rereads + 1)
            self.consumer.seek(tp, expected)
            self.metrics.offset_gaps.labels("refetched").inc()
            return True
        self._gap_rereads.pop(tp.partition, None)
        self.metrics.offset_gaps.labels("skipped").inc()
        log.warning("partition %d: offsets %d-%d still missing after %d re-read(s): skipped", tp.partition, expected,
                    got - 1, rereads)
        return False

    # -- dead letters and commits -----------------------------------------------------------------

    def _dead_letter(self, rejected: list[tuple[PartitionProgress[Outcome], SourceRecord, Rejection]]) -> None:
        """Publish a fetch's rejected records in one background task, off the fetch loop.

        Each record is finished (and so may be applied and counted) only once the broker acknowledged its
        dead letter: the DLQ stays at-least-once, the counters exactly once. Sent together, the records share
        the producer's batches instead of one broker round trip each.
        """
        async def publish() -> None:
            try:
                topic = self.settings.dead_letter_topic
                acks = [await send_dead_letter(self.producer, topic, record, rejection)
                        for _, record, rejection in rejected]
                await asyncio.gather(*acks)
                for progress, record, rejection in rejected:
                    if self.sink.progress.get(record.partition) is progress:  # not revoked meanwhile
                        with contextlib.suppress(KeyError):
                            progress.finished(record.offset, rejection)
            except asyncio.CancelledError:
                raise
            except Exception as error:  # a broker that refuses dead letters stops the worker, loudly
                self._fail(error)

        task = asyncio.create_task(publish())
        self.publishing.add(task)
        task.add_done_callback(self.publishing.discard)

    async def dead_letter(self, record: SourceRecord, rejection: Rejection) -> None:
        """Publish one record found bad after admission (a post the engine fails on alone) and wait for it."""
        await publish_dead_letter(self.producer, self.settings.dead_letter_topic, record, rejection)

    async def commit(self, marks: dict[int, int]) -> None:
        """Commit applied marks to Kafka; a failure is only a longer replay, so it is counted and logged."""
        from aiokafka import TopicPartition
        from aiokafka.errors import KafkaError

        offsets = {TopicPartition(self.settings.topic, p): mark for p, mark in marks.items()}
        try:
            async with asyncio.timeout(self.settings.commit_timeout_s):
                await self.consumer.commit(offsets)
            self.metrics.commits.labels("ok").inc()
        except (KafkaError, TimeoutError) as error:
            self.metrics.commits.labels("failed").inc()
            # Redis already holds the truth; a lost commit only means a replay that the fence skips.
            log.warning("commit of %s failed: %s", marks, error)
