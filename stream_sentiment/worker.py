"""The worker: Kafka records in, fenced Redis increments out, offsets committed after.

Data path per record: decode and validate (bad ones to the dead-letter topic)
-> tokenize in an executor -> length-bucket batcher -> an engine stream (each
stream has one worker thread, so a session/context is never shared) -> the
checkpointing sink (``sinks.checkpoint``): contiguous offset ranges applied to
Redis through the fence, with the partition's stream time -> Kafka commit of
the applied mark. Alongside, the alert judge looks whether the group's
event-time watermark passed a window end (``aggregation.monitor``).

The event loop only coordinates: decoding is cheap and bounded by the message
size limit, tokenization and inference run in executors. Fetching pauses
while more than ``max_in_flight_posts`` records are unapplied, while no engine
stream works and while Redis does not answer, so memory stays bounded and
nothing is lost whatever happens downstream.

On assignment each partition is claimed in Redis and positioned at Redis's
applied mark (not the possibly older Kafka commit), so a restarted or
rebalanced worker resumes exactly where the shared state says. A partition
Kafka has commits for but Redis has no mark for means Redis lost its data
(``recovery.on_redis_loss``); a partition whose log ends below its mark
restarted (``recovery.on_offset_regression``): neither is ever skipped
silently. On revocation in-flight work is drained, applied and committed under
one deadline, and anything it cannot finish is left to the next owner (the
fence turns any late write from this worker into a no-op).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import json
import logging
import os
import socket
import time
import uuid
from collections import deque
from collections.abc import AsyncIterator, Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from stream_sentiment.aggregation.alerts import AlertRules
from stream_sentiment.aggregation.buckets import BucketRules, RedisKeys, ScoredPost
from stream_sentiment.aggregation.monitor import AlertMonitor
from stream_sentiment.aggregation.progress import PartitionProgress
from stream_sentiment.batching.batcher import Batcher, BatchingPolicy, FormedBatch
from stream_sentiment.batching.tokenizer import PostTokenizer, pad_to_bucket
from stream_sentiment.config import Settings
from stream_sentiment.engines.base import Engine
from stream_sentiment.engines.slots import PoisonBatchError, RecoveryPolicy, SlotFailedError, SlotPool
from stream_sentiment.metrics import PipelineMetrics
from stream_sentiment.sinks.checkpoint import TRANSIENT_REDIS_ERRORS, CheckpointingSink, RedisStateLostError
from stream_sentiment.sinks.redis_sink import PartitionState, RedisSink
from stream_sentiment.source.dead_letters import SourceRecord, publish_dead_letter, send_dead_letter
from stream_sentiment.source.messages import MessageLimits, Post, Rejection, RejectReason, decode_post

log = logging.getLogger(__name__)
Outcome = ScoredPost | Rejection
# Redis holds the applied marks, so the Kafka commit only bounds how much a
# restart re-reads (and the fence skips): once a second is plenty, and spares
# the group coordinator a commit per batch.
COMMIT_INTERVAL_S = 1.0
# Records decoded per turn of the fetch loop: decoding runs on the event loop, and 2,000 at once held it
# ~30 ms, during which no engine completion or Redis answer was handled. A fetch-wait's worth at 100k
# posts/s still fits in one turn.
FETCH_MAX_RECORDS = 500
# Fetches whose tokenization may be in flight at once: one in the tokenizer thread while the event loop
# decodes the next fetch, one queued behind it. Serial, decode and tokenization added up per post; more
# than two would only hold memory, as the thread takes them one at a time anyway.
TOKENIZE_AHEAD = 2
# Longest the alert judge waits for an applied range before looking anyway (idle partitions, other workers'
# progress). Judgements depend only on the log; this bounds how soon after the watermark they come.
JUDGE_INTERVAL_S = 1.0
# Shortest gap between two judge rounds: a busy worker applies many ranges a second, and one look at the
# group's watermark per round trip is enough.
JUDGE_MIN_GAP_S = 0.2


@dataclass(frozen=True)
class Admitted:
    partition: int
    offset: int
    post: Post
    event_time: float
    appended_at: float


def _chosen_buckets(chosen: tuple[int, ...] | None, engine_buckets: tuple[int, ...]) -> tuple[int, ...]:
    if chosen is None:
        return engine_buckets
    unknown = sorted(set(chosen) - set(engine_buckets))
    if unknown:
        raise ValueError(f"batching.buckets {unknown} are not buckets of the engine ({list(engine_buckets)})")
    # Posts are truncated to the engine's max length, so only its largest bucket holds every post.
    if max(engine_buckets) not in chosen:
        raise ValueError(f"batching.buckets must include the engine's largest bucket, {max(engine_buckets)}")
    return tuple(sorted(set(chosen)))


class Worker:
    """One consumer-group member scoring posts with ``engine`` (already activated).

    Args:
        settings: the service settings.
        engine: an active engine whose version matches ``tokenizer``.
        tokenizer: the engine version's tokenizer.
        metrics: where to count; a private registry when not given.
        clock: monotonic seconds, injectable for tests.
        wall_clock: epoch seconds: latency metrics and idle-partition detection only, never results.
    """

    def __init__(
        self,
        settings: Settings,
        engine: Engine,
        tokenizer: PostTokenizer,
        *,
        metrics: PipelineMetrics | None = None,
        clock: Callable[[], float] = time.monotonic,
        wall_clock: Callable[[], float] = time.time,
    ) -> None:
        self.settings = settings
        self.tokenizer = tokenizer
        self.metrics = metrics if metrics is not None else PipelineMetrics()
        self.pool = self.new_pool(engine)
        self.metrics.set_engine(engine.backend, engine.version.manifest.version)
        self.clock = clock
        self.wall_clock = wall_clock
        batching = settings.batching
        self.batcher: Batcher[Admitted] = Batcher(BatchingPolicy(
            buckets=_chosen_buckets(batching.buckets, tokenizer.buckets), max_rows=batching.max_rows,
            max_tokens=batching.max_tokens, window=batching.window_ms / 1000, timeout=batching.timeout_ms / 1000,
            merge_smaller_on_timeout=batching.merge_smaller_on_timeout,
        ))
        limits = settings.limits
        self.limits = MessageLimits(limits.max_message_bytes, limits.max_text_chars, limits.max_id_chars,
                                    limits.max_field_chars)
        aggregation = settings.aggregation
        self.rules = BucketRules(aggregation.bucket_seconds, aggregation.allowed_lateness_seconds,
                                 aggregation.dimensions, settings.alerts.sample_posts,
                                 aggregation.max_out_of_orderness_seconds)
        self.keys = RedisKeys(settings.redis_prefix)
        from redis.asyncio import Redis

        # Connects lazily, on the first call inside run()'s event loop.
        self._redis = Redis.from_url(settings.redis_url)
        self.sink = CheckpointingSink(
            RedisSink(self._redis, settings.redis_prefix, settings.topic, aggregation.bucket_ttl_seconds),
            self.rules, self.keys, self.metrics, commit=self._commit,
            outage_limit_s=settings.redis.outage_limit_seconds, retry_max_s=settings.redis.retry_max_seconds,
            commit_interval_s=COMMIT_INTERVAL_S, clock=clock, wall_clock=wall_clock,
        )
        self.sink.on_resync = self._resync
        self.sink.on_fenced = self._fenced
        self.sink.on_lost = self._redis_lost
        # Partitions whose log restarted below their mark and are not consumed (recovery.on_offset_regression).
        self.regressed: set[int] = set()
        # Wall-clock time each owned partition last had records: idle partitions stop holding back alerts.
        self._last_record_at: dict[int, float] = {}
        # Formed batches waiting for a slot: handed back by a failed slot, or drained from the batcher.
        self._ready: deque[FormedBatch[Admitted]] = deque()
        # Recent live posts and the active engine's labels: the shadow sample a hot swap is checked on.
        self.shadow: deque[tuple[tuple[int, ...], int]] = deque(maxlen=settings.admin.shadow_sample_size)
        # Called (once per outage) when no engine stream works; the engine manager may fall back to the CPU.
        self.on_engine_down: Callable[[], None] | None = None
        self._engine_down_reported = False
        self._closing = False
        self._monitor: AlertMonitor | None = None
        self._tokenize_executor = ThreadPoolExecutor(1, "tokenize")
        self._tokenizing: deque[asyncio.Task[None]] = deque()
        # Dead letters on their way to the broker (their records finish once acknowledged).
        self._publishing: set[asyncio.Task[None]] = set()
        # Wakes _dispatch when the oldest queued post's timeout or window runs out, whatever the fetch loop does.
        self._flush_timer: asyncio.TimerHandle | None = None
        self._inference: set[asyncio.Task[None]] = set()
        self._applier: asyncio.Task[None] | None = None
        self._drains = 0  # drains running (shutdown, revoke): no background applies meanwhile
        # partition -> (the offset a gap starts at, re-reads of it so far)
        self._gap_rereads: dict[int, tuple[int, int]] = {}
        self._consumer: Any = None
        self._producer: Any = None
        self._fetch_paused = False
        # Names this member in the owner tokens it claims partitions with (logs, the owners hash).
        self._member_name = f"{socket.gethostname()}-{os.getpid()}"
        self._failure: BaseException | None = None

    @property
    def progress(self) -> dict[int, PartitionProgress[Outcome]]:
        """Fetched-but-unapplied records of each partition this worker owns."""
        return self.sink.progress

    @property
    def scored(self) -> int:
        """Posts this worker counted in Redis (fence-applied)."""
        return self.sink.scored

    @property
    def dead_lettered(self) -> int:
        """Rejected records this worker counted in Redis."""
        return self.sink.dead_lettered

    @property
    def engine(self) -> Engine:
        """The engine new batches go to."""
        return self.pool.engine

    def new_pool(self, engine: Engine) -> SlotPool:
        """Slots for an activated engine, with this worker's recovery settings and metrics."""
        settings = self.settings.engine
        policy = RecoveryPolicy(settings.max_retries, settings.max_consecutive_failures, settings.call_timeout_s)
        return SlotPool(engine, self.metrics, policy)

    def swap_pool(self, pool: SlotPool) -> tuple[SlotPool, float]:
        """Cut over to ``pool``: pause dispatch, flip, resume; returns the old pool and the pause in seconds.

        Batches already running stay on the old engine and finish there (await ``old.drained()``);
        posts queued in the batcher were tokenized by the same tokenizer (the manager checks), so
        they simply go to the new engine. Nothing is awaited in between, so the pause is the flip.
        """
        started = time.perf_counter()
        old, self.pool = self.pool, pool
        if self._monitor is not None:
            self._monitor.engine_version = pool.version
        self.metrics.set_engine(pool.engine.backend, pool.version)
        self._engine_down_reported = False
        self.metrics.consumption_paused.set(0)
        paused = time.perf_counter() - started
        self._dispatch()
        return old, paused

    @contextlib.asynccontextmanager
    async def engine_time(self, wait_limit: float) -> AsyncIterator[None]:
        """Hold one slot of the active engine while the body runs other work on the same device.

        Validating a candidate engine on a CPU host competes for the cores live batches use, and two
        parallel engines on the same cores slow each other far more than taking turns. So the body
        starts when the active engine is idle (or after ``wait_limit`` seconds), one of its slots is
        reserved meanwhile, and live batches wait at most for the body -- keep it a few milliseconds.
        """
        pool = self.pool
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(pool.drained(), wait_limit)
        stream = pool.take()
        try:
            yield
        finally:
            if stream is not None:
                pool.give_back(stream)
                self._dispatch()

    def readiness(self) -> dict[str, Any]:
        return {
            "engine": self.pool.version, "backend": self.engine.backend, "streams": self.engine.streams,
            "lost_streams": sorted(self.pool.lost), "engine_working": self.pool.healthy,
            "redis_up": not self.sink.redis_down, "partitions": sorted(self.progress),
        }

    # -- Kafka plumbing -------------------------------------------------------------------------

    async def run(self, stop: asyncio.Event, *, consumer_options: dict[str, Any] | None = None) -> None:
        """Consume until ``stop`` is set, then drain, apply and commit what was fetched."""
        from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, ConsumerRebalanceListener

        worker = self

        class Listener(ConsumerRebalanceListener):  # type: ignore[misc]
            # aiokafka logs and swallows a callback's exception; a failed assignment would then
            # silently skip its partitions. Stop the worker instead: a restart resumes at the marks.
            async def on_partitions_revoked(self, revoked: Any) -> None:
                try:
                    await worker._on_revoked(revoked)
                except Exception as error:
                    worker._fail(error)

            async def on_partitions_assigned(self, assigned: Any) -> None:
                try:
                    await worker._on_assigned(assigned)
                except Exception as error:
                    worker._fail(error)

        settings = self.settings
        redis = self._redis
        self._producer = AIOKafkaProducer(bootstrap_servers=settings.bootstrap_servers, acks="all")
        options = {
            "session_timeout_ms": settings.kafka_session_timeout_ms,
            "heartbeat_interval_ms": settings.kafka_heartbeat_interval_ms,
            "fetch_max_wait_ms": settings.kafka_fetch_max_wait_ms,
            **(consumer_options or {}),
        }
        self._consumer = AIOKafkaConsumer(
            bootstrap_servers=settings.bootstrap_servers, group_id=settings.consumer_group,
            enable_auto_commit=False, auto_offset_reset="earliest", **options,
        )
        await self._producer.start()
        await self._consumer.start()
        self._consumer.subscribe([settings.topic], listener=Listener())
        ticker = asyncio.create_task(self._judge_alerts(self._alert_monitor(redis), stop))
        try:
            while not stop.is_set():
                if self._failure is not None:
                    raise self._failure
                await self._poll_once()
            await self._drain(settings.shutdown_timeout_s)
            if self._failure is not None:  # recorded by a batch or the applier while draining
                raise self._failure
        finally:
            # No new batches from here on: a cancelled batch's clean-up must not start another one.
            self._closing = True
            ticker.cancel()
            if self._flush_timer is not None:
                self._flush_timer.cancel()
            for task in [*self._tokenizing, *self._publishing, *self._inference,
                         *([self._applier] if self._applier else [])]:
                task.cancel()
            await self._consumer.stop()
            await self._producer.stop()
            await redis.aclose()
            self.pool.close()
            self._tokenize_executor.shutdown(wait=False, cancel_futures=True)

    def _alert_monitor(self, redis: Any) -> AlertMonitor:
        alerts = self.settings.alerts
        rules = AlertRules(alerts.ratio_threshold, alerts.min_posts, alerts.surge_z, alerts.ewma_alpha,
                           alerts.cooldown_seconds)
        self._monitor = AlertMonitor(redis, self.keys, self.rules, self.settings.aggregation.windows_seconds, rules,
                                     topic=self.settings.topic, engine_version=self.pool.version,
                                     stream_max_len=alerts.stream_max_len, sample_posts=alerts.sample_posts)
        return self._monitor

    async def _judge_alerts(self, monitor: AlertMonitor, stop: asyncio.Event) -> None:
        """Judge the windows the group's watermark has passed, whenever a range is applied (or each second).

        Which windows alert, and with what, depends only on the log (``aggregation.monitor``); this loop
        only decides how soon after the watermark passes a window it is judged.
        """
        applied = self.sink.applied
        idle_s = self.settings.aggregation.idle_partition_seconds
        reported = False
        while not stop.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(applied.wait(), JUDGE_INTERVAL_S)
            applied.clear()
            partitions = self._consumer.partitions_for_topic(self.settings.topic) if self._consumer else None
            if not partitions or self.sink.redis_down:
                continue
            try:
                if not self._fetch_paused:  # a paused partition is not idle, only held back
                    await self.sink.mark_idle(self._last_record_at, self.wall_clock(), idle_s)
                for alert in await monitor.judge_due(len(partitions)):
                    self.metrics.alerts.labels(alert.rule, alert.stats.dimension).inc()
                if monitor.watermark is not None:
                    self.metrics.watermark.set(monitor.watermark)
                reported = False
            except TRANSIENT_REDIS_ERRORS as error:
                self.metrics.redis_errors.labels("judge").inc()
                if not reported:  # the applier reports the outage itself; say once why alerts wait
                    log.warning("alert judgement waits for Redis: %s", error)
                    reported = True
            await asyncio.sleep(JUDGE_MIN_GAP_S)

    async def _on_assigned(self, assigned: Any) -> None:
        partitions = sorted(tp.partition for tp in assigned)
        # A new token per assignment: once this member holds the partitions, writes of a previous owner that
        # has not noticed its revoke (a stalled zombie) are refused by the fence.
        generation = getattr(getattr(self._consumer, "_coordinator", None), "generation", "?")
        owner = f"{self._member_name}:{generation}:{uuid.uuid4().hex[:12]}"
        states = await self.sink.assign(partitions, owner)
        now = self.wall_clock()
        fresh, lost = [], []
        for tp in assigned:
            self.regressed.discard(tp.partition)
            self._last_record_at[tp.partition] = now
            state = states.get(tp.partition)
            if state is not None:
                self._consumer.seek(tp, state.mark)
                self.sink.track(tp.partition, state.mark, state.stream_time, in_redis=True)
            elif await self._consumer.committed(tp) is not None:
                # The group applied and committed records here, but Redis knows none of them.
                lost.append(tp)
            else:
                fresh.append(tp)
        if fresh:
            # Never applied: start at the earliest retained offset, by an explicit seek. The consumer's own
            # position() would do the same, but the fetcher may already have moved it past records it holds,
            # which the mark would then skip.
            for tp, beginning in (await self._consumer.beginning_offsets(fresh)).items():
                self._consumer.seek(tp, beginning)
                self.sink.track(tp.partition, beginning, None, in_redis=False)
        for tp in lost:
            await self._redis_lost(tp.partition)
        log.info("assigned %s as %s", partitions, owner)

    async def _redis_lost(self, partition: int) -> None:
        """Redis has no mark for a partition this group applied: refuse, or recount it from the beginning."""
        from aiokafka import TopicPartition

        tp = TopicPartition(self.settings.topic, partition)
        if self.settings.recovery.on_redis_loss == "refuse":
            self._consumer.pause(tp)
            self._fail(RedisStateLostError(
                f"Redis ({self.settings.redis_url}, prefix {self.settings.redis_prefix!r}) has no offset mark for "
                f"partition {partition} of {self.settings.topic!r}, but consumer group "
                f"{self.settings.consumer_group!r} has applied and committed records there: Redis lost the counts "
                "this group wrote (restarted without persistence, flushed, or another Redis or prefix). Resuming "
                "from Kafka's commit would silently drop them. To count the retained log again, set "
                "recovery.on_redis_loss = \"rebuild\" (STREAM_SENTIMENT_RECOVERY__ON_REDIS_LOSS=rebuild); to start "
                "afresh from the commits on purpose, reset the group's offsets instead."))
            return
        beginning = (await self._consumer.beginning_offsets([tp]))[tp]
        log.warning("partition %d: Redis lost its state; rebuilding from the earliest retained offset %d "
                    "(recovery.on_redis_loss = rebuild)", partition, beginning)
        self._consumer.seek(tp, beginning)
        self.sink.track(partition, beginning, None, in_redis=False)

    async def _check_offset_regressions(self, assigned: Any) -> None:
        """A partition whose log now ends below its mark restarted (re-created topic, broker restored empty).

        The fetch's high-water mark says where the log ends (Tansu answers fetches past the end with no
        error, so a reset policy never fires); without this check its new records below the mark would be
        skipped silently.
        """
        for tp in assigned:
            progress = self.progress.get(tp.partition)
            end = self._consumer.highwater(tp)
            if progress is None or end is None or end >= progress.mark or tp.partition in self.regressed:
                continue
            self.metrics.offset_regressions.inc()
            await self.sink.call_redis("regression", functools.partial(self.sink.redis.record_regression,
                                                                       tp.partition))
            if self.settings.recovery.on_offset_regression == "rebase":
                beginning = (await self._consumer.beginning_offsets([tp]))[tp]
                moved = await self.sink.call_redis("regression", functools.partial(
                    self.sink.redis.rebase, tp.partition, progress.mark, beginning))
                log.error("partition %d: its log ends at %d, below the mark %d: it restarted. Counting the new log "
                          "from offset %d (recovery.on_offset_regression = rebase)%s", tp.partition, end,
                          progress.mark, beginning, "" if moved else "; another worker moved the mark first")
                if moved:
                    self._consumer.seek(tp, beginning)
                    self.sink.track(tp.partition, beginning, progress.stream_time, in_redis=True)
                continue
            self.regressed.add(tp.partition)
            self._consumer.pause(tp)
            log.error("partition %d: its log ends at offset %d, below the mark %d in Redis: the log restarted "
                      "(a re-created topic, a broker restored empty). Not consuming it: its new records would "
                      "be skipped below the mark. Set recovery.on_offset_regression = \"rebase\" to count the new "
                      "log from its beginning.", tp.partition, end, progress.mark)

    def _resync(self, partition: int, state: PartitionState) -> None:
        """Redis's mark moved under this worker: resume the partition there (its in-flight posts are dropped)."""
        from aiokafka import TopicPartition

        self.sink.track(partition, state.mark, state.stream_time, in_redis=True)
        self._consumer.seek(TopicPartition(self.settings.topic, partition), state.mark)

    def _fenced(self, partition: int) -> None:
        """Another member owns ``partition`` now: stop fetching it until the group's revoke arrives."""
        from aiokafka import TopicPartition

        self._consumer.pause(TopicPartition(self.settings.topic, partition))

    async def _on_revoked(self, revoked: Any) -> None:
        try:
            if revoked:
                await self._drain(self.settings.commit_timeout_s)
        finally:
            gone = {tp.partition for tp in revoked}
            for partition in gone:
                self.sink.forget(partition)  # no longer ours to apply or commit
                self._last_record_at.pop(partition, None)
            # What was fetched from the revoked partitions but not applied belongs to the next owner now;
            # the posts of partitions this worker keeps stay queued (aiokafka revokes every partition at
            # once today, but a kept post dropped here would block its partition for good).
            kept: deque[FormedBatch[Admitted]] = deque()
            for batch in [*self._ready, *self.batcher.drain(self.clock())]:
                entries = tuple(e for e in batch.entries if e.item.partition not in gone)
                if entries:
                    kept.append(FormedBatch(batch.bucket, entries, batch.reason, batch.formed))
            self._ready = kept

    async def _poll_once(self) -> None:
        now = self.clock()
        deadline = self.batcher.next_deadline(engine_idle=bool(self.pool.idle))
        wait_ms = 100 if deadline is None else max(1, int((deadline - now) * 1000))
        in_flight = sum(p.in_flight for p in self.progress.values())
        assigned = self._consumer.assignment()
        # No working engine stream, or Redis not answering: stop fetching; nothing is applied or committed,
        # so nothing is lost. The consumer still polls, so the group keeps this member.
        paused = (in_flight >= self.settings.batching.max_in_flight_posts or not self.pool.healthy
                  or self.sink.redis_down)
        self._fetch_paused = paused
        if paused:
            self._consumer.pause(*assigned)
        else:
            self._consumer.resume(*[tp for tp in assigned
                                    if tp.partition in self.progress and tp.partition not in self.regressed])
        self.metrics.in_flight.set(in_flight)
        self.metrics.paused.set(int(paused))
        batches = await self._consumer.getmany(timeout_ms=min(wait_ms, 100), max_records=FETCH_MAX_RECORDS)
        # What is assigned now: a rebalance may have run during the fetch.
        await self._check_offset_regressions(self._consumer.assignment())
        admitted = await self._admit(batches)
        if admitted:
            # A partition revoked (and maybe reassigned) meanwhile has a new progress: its posts are the next owner's.
            owners = {a.partition: self.progress.get(a.partition) for a in admitted}
            while len(self._tokenizing) >= TOKENIZE_AHEAD:
                await asyncio.wait([self._tokenizing[0]])
            self._tokenize_then_queue(admitted, owners)
        self._dispatch()
        self._apply_in_background()

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
            self._consumer.seek(tp, expected)
            self.metrics.offset_gaps.labels("refetched").inc()
            return True
        self._gap_rereads.pop(tp.partition, None)
        self.metrics.offset_gaps.labels("skipped").inc()
        log.warning("partition %d: offsets %d-%d still missing after %d re-read(s): skipped", tp.partition, expected,
                    got - 1, rereads)
        return False

    def _tokenize_then_queue(self, admitted: list[Admitted], owners: dict[int, Any]) -> None:
        """Tokenize in the executor and queue the posts in the batcher when done; the fetch loop goes on."""
        loop = asyncio.get_running_loop()
        future = loop.run_in_executor(self._tokenize_executor, self._tokenize, [a.post.text for a in admitted])

        async def queue_when_tokenized() -> None:
            try:
                token_ids = await future
                with self.metrics.stage("batch"):
                    now = self.clock()
                    for item, ids in zip(admitted, token_ids, strict=True):
                        if self.progress.get(item.partition) is owners[item.partition]:
                            self.batcher.add(item, ids, now)
                self._dispatch()
            except asyncio.CancelledError:
                raise
            except Exception as error:  # a tokenizer failure must stop the worker, as it did inline
                self._fail(error)

        task = asyncio.create_task(queue_when_tokenized())
        self._tokenizing.append(task)
        task.add_done_callback(self._tokenizing.remove)

    async def _admit(self, batches: dict[Any, list[Any]]) -> list[Admitted]:
        """Decode and validate fetched records; rejected ones go to the dead-letter topic."""
        admitted: list[Admitted] = []
        rejected: list[tuple[PartitionProgress[Outcome], SourceRecord, Rejection]] = []
        decode_started = time.perf_counter()
        fetched_at = self.wall_clock()
        for tp, records in batches.items():
            self.metrics.records_fetched.inc(len(records))
            progress = self.progress.get(tp.partition)
            if progress is None:
                continue
            if records:
                self._last_record_at[tp.partition] = fetched_at
                self.sink.note_records(tp.partition)
            for record in records:
                if record.offset < progress.mark:
                    continue  # fetched before the seek to the applied mark took effect
                if record.offset > progress.next_offset and self._reread_gap(tp, progress.next_offset, record.offset):
                    break  # the rest of this partition's fetch comes again, after the gap
                progress.fetched(record.offset)
                outcome = decode_post(record.value, self.limits)
                if isinstance(outcome, Rejection):
                    rejected.append((progress, SourceRecord(
                        record.topic, record.partition, record.offset, record.timestamp, record.key, record.value,
                    ), outcome))
                    continue
                appended_at = record.timestamp / 1000
                # The log's own clock bounds a post's: a ts ahead of its record's Kafka timestamp (a producer's
                # wrong clock, a hostile post) is clamped to it, so it cannot pull the stream time into the future.
                event_time = appended_at if outcome.ts is None or outcome.ts > appended_at else outcome.ts
                admitted.append(Admitted(tp.partition, record.offset, outcome, event_time, appended_at))
        self.metrics.stage_seconds.labels("decode").inc(time.perf_counter() - decode_started)
        if rejected:
            self._dead_letter(rejected)
        return admitted

    def _dead_letter(self, rejected: list[tuple[PartitionProgress[Outcome], SourceRecord, Rejection]]) -> None:
        """Publish a fetch's rejected records in one background task, off the fetch loop.

        Each record is finished (and so may be applied and counted) only once the broker acknowledged its
        dead letter: the DLQ stays at-least-once, the counters exactly once. Sent together, the records share
        the producer's batches instead of one broker round trip each.
        """
        async def publish() -> None:
            try:
                topic = self.settings.dead_letter_topic
                acks = [await send_dead_letter(self._producer, topic, record, rejection)
                        for _, record, rejection in rejected]
                await asyncio.gather(*acks)
                for progress, record, rejection in rejected:
                    if self.progress.get(record.partition) is progress:  # not revoked meanwhile
                        with contextlib.suppress(KeyError):
                            progress.finished(record.offset, rejection)
                self._apply_in_background()
            except asyncio.CancelledError:
                raise
            except Exception as error:  # a broker that refuses dead letters stops the worker, loudly
                self._fail(error)

        task = asyncio.create_task(publish())
        self._publishing.add(task)
        task.add_done_callback(self._publishing.discard)

    def _arm_flush(self) -> None:
        """Call _dispatch when the batcher's next timeout or window is due (an engine slot is idle)."""
        if self._flush_timer is not None:
            self._flush_timer.cancel()
            self._flush_timer = None
        if self._closing or not self.pool.idle:
            return  # a slot coming free dispatches by itself
        deadline = self.batcher.next_deadline(engine_idle=True)
        if deadline is not None:
            delay = max(0.0, deadline - self.clock())
            self._flush_timer = asyncio.get_running_loop().call_later(delay, self._dispatch)

    def _tokenize(self, texts: list[str]) -> list[tuple[int, ...]]:
        with self.metrics.stage("tokenize"):
            return self.tokenizer.encode(texts)


    # -- batches and engine streams -----------------------------------------------------------

    def _dispatch(self) -> None:
        pool = self.pool
        while pool.idle and not self._closing:
            if self._ready:
                batch = self._ready.popleft()
            else:
                polled = self.batcher.poll(self.clock(), engine_idle=True)
                if polled is None:
                    break
                batch = polled
                self._record_batch(batch)
            stream = pool.take()
            assert stream is not None
            task = asyncio.create_task(self._infer(batch, pool, stream))
            self._inference.add(task)
            task.add_done_callback(self._inference.discard)
        self._arm_flush()

    def _record_batch(self, batch: FormedBatch[Admitted]) -> None:
        waited = batch.formed - min(e.arrived for e in batch.entries)
        self.metrics.record_batch(batch.bucket, batch.rows, batch.real_tokens, batch.reason.value, waited)

    async def _infer(self, batch: FormedBatch[Admitted], pool: SlotPool, stream: int) -> None:
        holding_stream = True
        try:
            tokens = pad_to_bucket([e.token_ids for e in batch.entries], batch.bucket)
            try:
                probabilities = await pool.score(tokens, stream)
            except PoisonBatchError:
                await self._isolate_poison(batch)
                return
            except SlotFailedError:
                # Not scored, so not applied or committed: another slot (or engine) takes it.
                self._ready.appendleft(batch)
                self.metrics.batches_requeued.inc()
                if not self.pool.healthy:
                    self._engine_down()
                return
            if pool is self.pool:
                # Only the newest posts stay in the bounded sample: the tail of the batch is enough.
                keep = self.shadow.maxlen or 0
                tail = zip(batch.entries[-keep:], probabilities[-keep:], strict=True) if keep else ()
                self.shadow.extend((tuple(e.token_ids), int(np.argmax(row))) for e, row in tail)
            # Python floats once for the whole batch: indexing numpy rows per post costs more than scoring them.
            for entry, row in zip(batch.entries, probabilities.tolist(), strict=True):
                admitted = entry.item
                progress = self.progress.get(admitted.partition)
                if progress is None:
                    continue  # partition revoked meanwhile: its next owner re-reads it
                scored = ScoredPost(admitted.post, admitted.event_time, tuple(row), admitted.appended_at)
                with contextlib.suppress(KeyError):
                    progress.finished(admitted.offset, scored)
            # The stream is free once the batch is scored: the next batch need not wait for Redis.
            holding_stream = False
            pool.give_back(stream)
            self._dispatch()
            await self._apply_ready()
        except Exception as error:  # a bug here must stop the worker, not vanish in a task
            self._fail(error)
        finally:
            if holding_stream:
                pool.give_back(stream)
                self._dispatch()

    async def _isolate_poison(self, batch: FormedBatch[Admitted]) -> None:
        """A batch fails on a working engine: halve it until the post at fault is alone, then dead-letter it.

        The other posts are scored as usual; the failing one is counted under ``engine_error``
        and published to the dead-letter topic, so one bad post never stops the partition.
        """
        if batch.rows > 1:
            half = batch.rows // 2
            for part in (batch.entries[half:], batch.entries[:half]):
                self._ready.appendleft(FormedBatch(batch.bucket, part, batch.reason, batch.formed))
            self.metrics.batches_requeued.inc()
            return
        admitted = batch.entries[0].item
        progress = self.progress.get(admitted.partition)
        if progress is None:
            return
        rejection = Rejection(RejectReason.ENGINE_ERROR, "the engine fails on this post alone")
        post = admitted.post
        value = json.dumps({k: v for k, v in asdict(post).items() if v is not None}, ensure_ascii=False).encode()
        await publish_dead_letter(self._producer, self.settings.dead_letter_topic, SourceRecord(
            self.settings.topic, admitted.partition, admitted.offset, int(admitted.appended_at * 1000), None, value,
        ), rejection)
        with contextlib.suppress(KeyError):
            progress.finished(admitted.offset, rejection)
        await self._apply_ready()

    def _engine_down(self) -> None:
        if self._engine_down_reported:
            return
        self._engine_down_reported = True
        self.metrics.consumption_paused.set(1)
        log.error("no stream of %s works: consumption paused, nothing is committed", self.engine.describe())
        if self.on_engine_down is not None:
            self.on_engine_down()

    def _fail(self, error: BaseException) -> None:
        """A background task (batch, applier, tokenizer job, rebalance callback) failed: ``run()`` raises the first."""
        self._failure = self._failure or error

    # -- Redis and commits ------------------------------------------------------------------------

    def _apply_in_background(self) -> None:
        """Apply what is ready and commit when due, off the fetch loop.

        Scored batches apply themselves; this catches the rest (dead letters, the commit interval).
        Awaited inline, its Redis round trips and the once-a-second Kafka commit held up the next
        fetch, and every post behind it: the tail of the append-to-fetch latency.
        """
        if self._drains or (self._applier is not None and not self._applier.done()):
            # A drain applies and commits last itself; a running applier takes whatever is ready when it
            # gets there, and the next poll looks again.
            return

        async def apply() -> None:
            try:
                await self._apply_ready()
            except Exception as error:  # as in _infer: stop the worker
                self._fail(error)

        self._applier = asyncio.create_task(apply())

    async def _apply_ready(self, *, force_commit: bool = False) -> None:
        await self.sink.apply_ready(force_commit=force_commit)

    async def _commit(self, marks: dict[int, int]) -> None:
        from aiokafka import TopicPartition
        from aiokafka.errors import KafkaError

        offsets = {TopicPartition(self.settings.topic, p): mark for p, mark in marks.items()}
        try:
            async with asyncio.timeout(self.settings.commit_timeout_s):
                await self._consumer.commit(offsets)
            self.metrics.commits.labels("ok").inc()
        except (KafkaError, TimeoutError) as error:
            self.metrics.commits.labels("failed").inc()
            # Redis already holds the truth; a lost commit only means a replay that the fence skips.
            log.warning("commit of %s failed: %s", marks, error)

    async def _drain(self, budget_s: float) -> None:
        """Score everything queued, wait for in-flight batches, apply and commit, within ``budget_s``."""
        self._drains += 1
        try:
            async with asyncio.timeout(budget_s):
                while self._tokenizing or self._publishing:  # fetched records reach the batcher or the DLQ first
                    await asyncio.wait([*self._tokenizing, *self._publishing])
                for batch in self.batcher.drain(self.clock()):
                    self._record_batch(batch)
                    self._ready.append(batch)
                while True:
                    self._dispatch()
                    if not self._inference:
                        break  # everything scored, or no working stream left (then nothing is applied)
                    await asyncio.gather(*list(self._inference), return_exceptions=True)
                if self._applier is not None:  # its commit, if one is running, lands before the last one
                    await asyncio.wait([self._applier])  # none starts while a drain runs
                await self._apply_ready(force_commit=True)
        except TimeoutError:
            # Not lost: unapplied records are read again by the next owner. But say what was left.
            log.warning("drain ran out of its %.1f s: %d tokenizer job(s), %d engine call(s) still running; %s",
                        budget_s, len(self._tokenizing), len(self._inference),
                        {p: progress.summary() for p, progress in self.progress.items() if progress.in_flight})
        finally:
            self._drains -= 1
