"""The worker: Kafka records in, fenced Redis increments out, offsets committed after.

Data path per record: decode and validate (bad ones to the dead-letter topic)
-> tokenize in an executor -> length-bucket batcher -> an engine stream (each
stream has one worker thread, so a session/context is never shared) -> the
partition's progress buffer -> contiguous offset ranges applied to Redis
through the fence (``sinks.redis_sink``) -> Kafka commit of the applied mark.

The event loop only coordinates: decoding is cheap and bounded by the message
size limit, tokenization and inference run in executors. Fetching pauses
while more than ``max_in_flight_posts`` records are unapplied, so memory stays
bounded whatever the input rate.

On assignment each partition is positioned at Redis's applied mark (not the
possibly older Kafka commit), so a restarted or rebalanced worker resumes
exactly where the shared state says; on revocation in-flight work is drained,
applied and committed under one deadline, and anything it cannot finish is
left to the next owner (the fence turns any late write from this worker into
a no-op).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from collections import deque
from collections.abc import AsyncIterator, Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from stream_sentiment.aggregation.alerts import AlertRules
from stream_sentiment.aggregation.buckets import BucketRules, RedisKeys, ScoredPost, increments_for
from stream_sentiment.aggregation.monitor import AlertMonitor
from stream_sentiment.aggregation.progress import PartitionProgress
from stream_sentiment.batching.batcher import Batcher, BatchingPolicy, FormedBatch
from stream_sentiment.batching.tokenizer import PostTokenizer, pad_to_bucket
from stream_sentiment.config import Settings
from stream_sentiment.engines.base import Engine
from stream_sentiment.engines.slots import PoisonBatchError, RecoveryPolicy, SlotFailedError, SlotPool
from stream_sentiment.metrics import PipelineMetrics
from stream_sentiment.sinks.redis_sink import ApplyOutcome, RedisSink
from stream_sentiment.source.dead_letters import SourceRecord, publish_dead_letter
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
        wall_clock: epoch seconds (event-time lateness).
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
                                 aggregation.dimensions, settings.alerts.sample_posts)
        self.keys = RedisKeys(settings.redis_prefix)
        self.progress: dict[int, PartitionProgress[Outcome]] = {}
        self._apply_locks: dict[int, asyncio.Lock] = {}
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
        # Wakes _dispatch when the oldest queued post's timeout or window runs out, whatever the fetch loop does.
        self._flush_timer: asyncio.TimerHandle | None = None
        self._inference: set[asyncio.Task[None]] = set()
        self._applier: asyncio.Task[None] | None = None
        self._drains = 0  # drains running (shutdown, revoke): no background applies meanwhile
        # Applied marks not yet committed to Kafka; committed at most every COMMIT_INTERVAL_S.
        self._uncommitted: dict[int, int] = {}
        self._last_commit = 0.0
        # partition -> (the offset a gap starts at, re-reads of it so far)
        self._gap_rereads: dict[int, tuple[int, int]] = {}
        self._consumer: Any = None
        self._producer: Any = None
        self._sink: RedisSink | None = None
        self._failure: BaseException | None = None
        self.scored = 0
        self.dead_lettered = 0

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
            "partitions": sorted(self.progress),
        }

    # -- Kafka plumbing -------------------------------------------------------------------------

    async def run(self, stop: asyncio.Event, *, consumer_options: dict[str, Any] | None = None) -> None:
        """Consume until ``stop`` is set, then drain, apply and commit what was fetched."""
        from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, ConsumerRebalanceListener
        from redis.asyncio import Redis

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
        redis = Redis.from_url(settings.redis_url)
        self._sink = RedisSink(redis, settings.redis_prefix, settings.topic,
                               settings.aggregation.bucket_ttl_seconds)
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
        ticker = asyncio.create_task(self._tick_alerts(self._alert_monitor(redis), stop))
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
            for task in [*self._tokenizing, *self._inference, *([self._applier] if self._applier else [])]:
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
                            engine_version=self.pool.version,
                            stream_max_len=alerts.stream_max_len, delay_seconds=alerts.evaluation_delay_seconds,
                            sample_posts=alerts.sample_posts)
        return self._monitor

    async def _tick_alerts(self, monitor: AlertMonitor, stop: asyncio.Event) -> None:
        """Evaluate closed windows at every bucket boundary, posts or no posts."""
        bucket = self.rules.bucket_seconds
        while not stop.is_set():
            delay = bucket - self.wall_clock() % bucket + 0.01
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), delay)
            if stop.is_set():
                return
            try:
                for alert in await monitor.evaluate_closed(self.wall_clock()):
                    self.metrics.alerts.labels(alert.rule, alert.stats.dimension).inc()
            except Exception:  # Redis hiccup: the next boundary evaluates again
                log.exception("alert evaluation failed")

    async def _on_assigned(self, assigned: Any) -> None:
        assert self._sink is not None
        marks = await self._sink.applied_marks()
        for tp in assigned:
            if tp.partition in marks:
                self._consumer.seek(tp, marks[tp.partition])
                mark = marks[tp.partition]
            else:
                mark = await self._consumer.position(tp)
            self.progress[tp.partition] = PartitionProgress(tp.partition, mark)
            self._apply_locks.setdefault(tp.partition, asyncio.Lock())
        log.info("assigned %s", sorted(tp.partition for tp in assigned))

    async def _on_revoked(self, revoked: Any) -> None:
        try:
            if revoked:
                await self._drain(self.settings.commit_timeout_s)
        finally:
            gone = {tp.partition for tp in revoked}
            for partition in gone:
                self.progress.pop(partition, None)
                self._uncommitted.pop(partition, None)  # no longer ours to commit
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
        # No working engine stream: stop fetching; nothing is applied or committed, so nothing is lost.
        paused = in_flight >= self.settings.batching.max_in_flight_posts or not self.pool.healthy
        if paused:
            self._consumer.pause(*assigned)
        else:
            self._consumer.resume(*assigned)
        self.metrics.in_flight.set(in_flight)
        self.metrics.paused.set(int(paused))
        batches = await self._consumer.getmany(timeout_ms=min(wait_ms, 100), max_records=FETCH_MAX_RECORDS)
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
        decode_started = time.perf_counter()
        for tp, records in batches.items():
            self.metrics.records_fetched.inc(len(records))
            progress = self.progress.get(tp.partition)
            if progress is None:
                continue
            for record in records:
                if record.offset < progress.mark:
                    continue  # fetched before the seek to the applied mark took effect
                if record.offset > progress.next_offset and self._reread_gap(tp, progress.next_offset, record.offset):
                    break  # the rest of this partition's fetch comes again, after the gap
                progress.fetched(record.offset)
                outcome = decode_post(record.value, self.limits)
                if isinstance(outcome, Rejection):
                    # Publishing waits on the broker; that is not decode time.
                    self.metrics.stage_seconds.labels("decode").inc(time.perf_counter() - decode_started)
                    await publish_dead_letter(self._producer, self.settings.dead_letter_topic, SourceRecord(
                        record.topic, record.partition, record.offset, record.timestamp, record.key, record.value,
                    ), outcome)
                    progress.finished(record.offset, outcome)
                    decode_started = time.perf_counter()
                    continue
                appended_at = record.timestamp / 1000
                event_time = outcome.ts if outcome.ts is not None else appended_at
                admitted.append(Admitted(tp.partition, record.offset, outcome, event_time, appended_at))
        self.metrics.stage_seconds.labels("decode").inc(time.perf_counter() - decode_started)
        return admitted

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
        assert self._sink is not None
        for partition, progress in list(self.progress.items()):
            async with self._apply_locks[partition]:
                if self.progress.get(partition) is not progress:
                    continue
                while (ready := progress.take_ready()) is not None:
                    increments = increments_for(ready.results, self.wall_clock(), self.rules, self.keys)
                    with self.metrics.stage("redis"):
                        started = time.perf_counter()
                        result = await self._sink.apply(partition, ready.first, ready.next_offset, increments)
                        self.metrics.redis_apply.observe(time.perf_counter() - started)
                    self.metrics.fence.labels(result.outcome.value).inc()
                    if result.outcome is ApplyOutcome.OUT_OF_ORDER:
                        raise RuntimeError(
                            f"partition {partition}: Redis mark is {result.mark}, this worker had {ready.first}; "
                            "another worker owns it"
                        )
                    progress.applied(ready)
                    if result.outcome is ApplyOutcome.APPLIED:
                        self._count_applied(ready.results)
                    if self.progress.get(partition) is progress:  # not revoked while Redis answered
                        self._uncommitted[partition] = progress.mark
        due = self.clock() - self._last_commit >= COMMIT_INTERVAL_S
        if self._uncommitted and (force_commit or due):
            marks, self._uncommitted = self._uncommitted, {}
            self._last_commit = self.clock()
            await self._commit(marks)

    def _count_applied(self, results: list[Outcome]) -> None:
        """Counts posts once, when the fence applied them (a duplicate range counts nothing)."""
        written = self.wall_clock()
        labels: dict[str, int] = {}
        latency = self.metrics.end_to_end
        for result in results:
            if isinstance(result, Rejection):
                self.dead_lettered += 1
                self.metrics.dead_letters.labels(result.reason.value).inc()
                continue
            labels[result.label] = labels.get(result.label, 0) + 1
            if result.appended_at is not None:
                latency.observe(max(0.0, written - result.appended_at))
        for label, count in labels.items():  # one labelled increment per label, not per post
            self.scored += count
            self.metrics.posts_scored.labels(label).inc(count)

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
                while self._tokenizing:  # fetched posts still in the tokenizer reach the batcher first
                    await asyncio.wait(list(self._tokenizing))
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
