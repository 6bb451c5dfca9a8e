"""The worker: a thin composition of a Kafka source, a scheduler and a checkpointing sink.

Data path: the Kafka source (``source.kafka_source``: assignment, seeks,
decode and validate, bad records to the dead-letter topic) hands
:class:`Admitted` posts to the scheduler (``batching.scheduler``: tokenize in
chunks on the event loop (the Rust tokenizer's share in a thread), length buckets, one batch per free engine
stream), whose scored
batches finish their records in the checkpointing sink (``sinks.checkpoint``:
contiguous offset ranges applied to Redis through the fence with the
partition's stream time, then the Kafka commit). With ``engine.routes`` each route (a language's
engine, ``batching.routing``) has a scheduler of its own and every fetch is split between them; all
feed the one sink. Alongside, the alert judge
looks whether the group's event-time watermark passed a window end
(``aggregation.judge``, which runs ``aggregation.monitor``).

The event loop coordinates and does the cheap per-batch work: decoding is bounded by the message size
limit; the pure-Python tokenization runs in ~1 ms chunks with a yield between them (in a thread it held
the GIL anyway); the Rust tokenizer and inference run in executors. Fetching pauses
while more than ``max_in_flight_posts`` records are unapplied, while no engine
stream works and while Redis does not answer, so memory stays bounded and
nothing is lost whatever happens downstream.

On assignment (in the source) each partition is claimed in Redis and positioned at Redis's
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
import json
import logging
import time
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from dataclasses import asdict
from typing import Any

import numpy as np

from stream_sentiment.aggregation.buckets import BucketRules, RedisKeys, ScoredPost
from stream_sentiment.aggregation.judge import AlertJudge
from stream_sentiment.aggregation.progress import PartitionProgress
from stream_sentiment.batching.batcher import Batcher, Pending
from stream_sentiment.batching.routing import RoutedEngines, RoutePlan, split_by_route
from stream_sentiment.batching.scheduler import Scheduler
from stream_sentiment.batching.tokenizer import PostTokenizer
from stream_sentiment.config import Settings
from stream_sentiment.engines.base import Engine
from stream_sentiment.engines.manifest import EngineRepositoryError
from stream_sentiment.engines.slots import SlotPool
from stream_sentiment.labels import LABELS
from stream_sentiment.metrics import PipelineMetrics
from stream_sentiment.sinks.checkpoint import CheckpointingSink, Outcome
from stream_sentiment.sinks.redis_sink import RedisSink
from stream_sentiment.source.dead_letters import SourceRecord
from stream_sentiment.source.kafka_source import Admitted, KafkaSource
from stream_sentiment.source.messages import Rejection, RejectReason

log = logging.getLogger(__name__)
# Redis holds the applied marks, so the Kafka commit only bounds how much a
# restart re-reads (and the fence skips): once a second is plenty, and spares
# the group coordinator a commit per batch.
COMMIT_INTERVAL_S = 1.0


def _check_labels(engine: Engine) -> None:
    manifest = engine.version.manifest
    if tuple(manifest.labels) != LABELS:
        # Redis counts by these labels and reads P(negative) from the first column.
        raise EngineRepositoryError(
            f"engine {manifest.model}/{manifest.version} outputs {list(manifest.labels)}; the service counts "
            f"{list(LABELS)}, in that order")


class Worker:
    """One consumer-group member scoring posts with ``engine`` (already activated).

    With ``routes`` (``engine.routes``, see ``batching.routing``), posts are split by their language's
    route after decoding, one group per route and fetch, and each route has its own scheduler (engine,
    tokenizer, buckets, slots): a batch never mixes engines. Every route's scored batches finish their
    records in the one checkpointing sink, which applies each partition's finished prefix, so two routes
    finishing offsets of one partition out of order change nothing: exactly-once is per offset.

    Args:
        settings: the service settings.
        engine: an active engine whose version matches ``tokenizer``: the default route's.
        tokenizer: the engine version's tokenizer.
        routes: the route plan and every other route's active engine and tokenizer; unset = one engine.
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
        routes: RoutedEngines | None = None,
        metrics: PipelineMetrics | None = None,
        clock: Callable[[], float] = time.monotonic,
        wall_clock: Callable[[], float] = time.time,
    ) -> None:
        manifest = engine.version.manifest
        _check_labels(engine)
        self.settings = settings
        self.tokenizer = tokenizer
        self.metrics = metrics if metrics is not None else PipelineMetrics()
        self.metrics.set_engine(engine.backend, manifest.version)
        self.clock = clock
        self.wall_clock = wall_clock
        aggregation = settings.aggregation
        self.rules = BucketRules(aggregation.bucket_seconds, aggregation.allowed_lateness_seconds,
                                 aggregation.dimensions, settings.alerts.sample_posts,
                                 aggregation.max_out_of_orderness_seconds)
        self.keys = RedisKeys(settings.redis_prefix)
        from stream_sentiment.clients import async_redis_client

        # Connects lazily, on the first call inside run()'s event loop.
        self._redis = async_redis_client(settings)
        self._failure: BaseException | None = None
        self.sink = CheckpointingSink(
            RedisSink(self._redis, settings.redis_prefix, settings.topic, aggregation.bucket_ttl_seconds),
            self.rules, self.keys, self.metrics, commit=self._commit,
            outage_limit_s=settings.redis.outage_limit_seconds, retry_max_s=settings.redis.retry_max_seconds,
            commit_interval_s=COMMIT_INTERVAL_S, clock=clock, wall_clock=wall_clock,
        )
        self.source = KafkaSource(settings, self.sink, self.metrics, fail=self._fail, wall_clock=wall_clock)
        self.plan: RoutePlan | None = routes.plan if routes is not None and routes.plan.routed else None
        self.scheduler = Scheduler(settings, engine, tokenizer, self.metrics, on_scored=self._scored,
                                   on_poison=self._poisoned, fail=self._fail, clock=clock,
                                   route=routes.plan.default if routes is not None else None)
        # Every route's scheduler, the default route's first.
        self.schedulers: dict[str, Scheduler] = {self.scheduler.route: self.scheduler}
        if routes is not None:
            self._add_routes(routes, engine)
        self._judge: AlertJudge | None = None
        self._applier: asyncio.Task[None] | None = None
        self._drains = 0  # drains running (shutdown, revoke): no background applies meanwhile

    def _add_routes(self, routes: RoutedEngines, default_engine: Engine) -> None:
        plan = routes.plan
        expected = set(plan.targets) - {plan.default}
        if set(routes.engines) != expected:
            raise ValueError(f"routes {sorted(expected)} need an engine each; got {sorted(routes.engines)}")
        plan.check_manifest(plan.default, default_engine.version.manifest)
        for name, (engine, tokenizer) in routes.engines.items():
            _check_labels(engine)
            plan.check_manifest(name, engine.version.manifest)
            self.schedulers[name] = Scheduler(
                self.settings, engine, tokenizer, self.metrics, on_scored=self._scored, on_poison=self._poisoned,
                fail=self._fail, clock=self.clock, route=name, primary=False)

    # -- what the admin endpoint, the service and the benchmarks use ----------------------------

    @property
    def routes(self) -> Mapping[str, Scheduler]:
        """Every route's scheduler by route name, the default route's first (one without routing)."""
        return self.schedulers

    def route(self, name: str) -> Scheduler:
        """A route's scheduler: its ``engine``, ``pool``, ``batcher``, ``shadow``, ``new_pool``, ``swap_pool``."""
        try:
            return self.schedulers[name]
        except KeyError:
            raise KeyError(f"no route {name!r}; routes: {list(self.schedulers)}") from None

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
    def pool(self) -> SlotPool:
        """The active engine's slots."""
        return self.scheduler.pool

    @property
    def engine(self) -> Engine:
        """The engine new batches go to."""
        return self.scheduler.engine

    @property
    def batcher(self) -> Batcher[Admitted]:
        return self.scheduler.batcher

    @property
    def shadow(self) -> Sequence[tuple[tuple[int, ...], int]]:
        """Recent live posts' token ids and the active engine's labels (a hot swap's shadow check)."""
        return self.scheduler.shadow

    @property
    def on_engine_down(self) -> Callable[[], None] | None:
        """Called (once per outage) when no engine stream works; the engine manager may fall back to the CPU."""
        return self.scheduler.on_engine_down

    @on_engine_down.setter
    def on_engine_down(self, callback: Callable[[], None] | None) -> None:
        self.scheduler.on_engine_down = callback

    def new_pool(self, engine: Engine) -> SlotPool:
        """Slots for an activated engine, with this worker's recovery settings and metrics."""
        return self.scheduler.new_pool(engine)

    def swap_pool(self, pool: SlotPool) -> tuple[SlotPool, float]:
        """Cut over to ``pool`` (see :meth:`Scheduler.swap_pool`).

        Alerts name the engines their window's buckets recorded; the judge's own engine, named where a bucket
        recorded none (written before engines were recorded), follows the default route's.
        """
        if self._judge is not None:
            self._judge.engine_version = pool.engine_name
        return self.scheduler.swap_pool(pool)

    def _engine_names(self) -> dict[str, str]:
        """``{model: model/version}`` each route serves now: what an alert names for the models its buckets counted."""
        return {s.pool.model: s.pool.engine_name for s in self.schedulers.values()}

    @contextlib.asynccontextmanager
    async def engine_time(self, wait_limit: float) -> AsyncIterator[None]:
        """Hold one slot of the active engine while the body runs (see :meth:`Scheduler.engine_time`)."""
        async with self.scheduler.engine_time(wait_limit):
            yield

    def readiness(self) -> dict[str, Any]:
        pool = self.pool
        ready = {
            "engine": pool.version, "backend": self.engine.backend, "streams": self.engine.streams,
            "lost_streams": sorted(pool.lost), "engine_working": self._engines_working(),
            "redis_up": not self.sink.redis_down, "partitions": sorted(self.progress),
        }
        if self.plan is not None:
            ready["routes"] = {name: {"engine": f"{s.engine.version.manifest.model}/{s.pool.version}",
                                      "backend": s.engine.backend, "lost_streams": sorted(s.pool.lost),
                                      "engine_working": s.pool.healthy}
                               for name, s in self.schedulers.items()}
        return ready

    def _engines_working(self) -> bool:
        """Every route's engine has a working stream (a route without one holds its partitions' marks back)."""
        return all(scheduler.pool.healthy for scheduler in self.schedulers.values())

    # -- the loop ------------------------------------------------------------------------------

    async def run(self, stop: asyncio.Event, *, consumer_options: dict[str, Any] | None = None) -> None:
        """Consume until ``stop`` is set, then drain, apply and commit what was fetched."""
        try:
            await self.source.start(self._on_revoked, consumer_options)
        except BaseException:  # e.g. the broker refused the certificate or password: nothing else to stop
            self._close_schedulers()
            await self._redis.aclose()
            raise
        self._judge = AlertJudge.for_settings(self.settings, self._redis, self.keys, self.rules,
                                              engine_version=self.pool.engine_name, sink=self.sink, source=self.source,
                                              metrics=self.metrics, wall_clock=self.wall_clock)
        self._judge.monitor.engine_names = self._engine_names
        ticker = asyncio.create_task(self._judge.run(stop))
        try:
            while not stop.is_set():
                if self._failure is not None:
                    raise self._failure
                await self._poll_once()
            await self._shut_down()
            if self._failure is not None:  # recorded by a batch or the applier while draining
                raise self._failure
        finally:
            self._close_schedulers()
            ticker.cancel()
            if self._applier is not None:
                self._applier.cancel()
            await self.source.stop()
            await self._redis.aclose()

    def _close_schedulers(self) -> None:
        for scheduler in self.schedulers.values():
            scheduler.close()

    async def _shut_down(self) -> None:
        """Drain, apply and commit what was fetched, saying before and after what that was.

        An operator stopping a worker (or the demo ending) sees what it finished and what it left to the
        next owner, instead of a process that goes quiet.
        """
        budget = self.settings.shutdown_timeout_s
        fetched = sum(p.in_flight for p in self.progress.values())
        scored, dead = self.scored, self.dead_lettered
        started = self.clock()
        log.info("worker stopping: draining %d fetched posts (up to %.0f s), then applying and committing them",
                 fetched, budget)
        await self._drain(budget)
        left = {p: progress.in_flight for p, progress in self.progress.items() if progress.in_flight}
        log.info("worker stopped: the drain applied %d scored and %d dead-lettered posts in %.1f s%s; "
                 "this run applied %d scored and %d dead-lettered in all; applied marks %s",
                 self.scored - scored, self.dead_lettered - dead, self.clock() - started,
                 f", and left {sum(left.values())} to be read again by the next owner (partitions {sorted(left)})"
                 if left else ", nothing left over", self.scored, self.dead_lettered,
                 {p: progress.mark for p, progress in sorted(self.progress.items())})

    async def _poll_once(self) -> None:
        in_flight = sum(p.in_flight for p in self.progress.values())
        # No working engine stream, or Redis not answering: stop fetching; nothing is applied or committed,
        # so nothing is lost.
        # A route without a working stream pauses fetching too: its posts would hold their partitions' marks.
        paused = (in_flight >= self.settings.batching.max_in_flight_posts or not self._engines_working()
                  or self.sink.redis_down)
        self.metrics.in_flight.set(in_flight)
        self.metrics.paused.set(int(paused))
        schedulers = self.schedulers
        wait_ms = min(scheduler.fetch_wait_ms() for scheduler in schedulers.values())
        admitted = await self.source.fetch(wait_ms, paused=paused)
        if admitted:
            # A partition revoked (and maybe reassigned) meanwhile has a new progress: its posts are the next owner's.
            owners = {partition: self.progress.get(partition) for partition in {a.partition for a in admitted}}

            def keep(partition: int) -> bool:
                return self.progress.get(partition) is owners[partition]

            if self.plan is None:
                await self.scheduler.submit(admitted, keep)
            else:  # one group per route present in the fetch, each in fetch order
                groups = split_by_route(admitted, [a.post.lang or "" for a in admitted], self.plan)
                for route, group in groups.items():
                    await schedulers[route].submit(group, keep)
        for scheduler in schedulers.values():
            scheduler.dispatch()
        self._apply_in_background()

    async def _scored(self, entries: Sequence[Pending[Admitted]], probabilities: np.ndarray, model: str) -> None:
        """A scored batch: its records are finished in their partitions, then applied.

        ``model``'s engine scored the whole batch (a batch never mixes engines); each post carries it into its
        buckets, so alerts name the engines that scored their windows (the model only: which version scored a
        post depends on when a hot swap cut over, and buckets are a function of the log).

        Array work once per batch (Python floats, the labels' argmax), then one ``finished_many`` per
        partition: indexing numpy rows or finding a label per post cost more than scoring them.
        """
        rows = probabilities.tolist()
        labels = [LABELS[column] for column in probabilities.argmax(axis=1).tolist()]
        scored_at = self.wall_clock()  # the start of each post's apply wait (metrics only)
        # Grouped by the progress that fetched each record (see Admitted.owner), not only by partition.
        by_owner: dict[int, tuple[Admitted, list[int], list[ScoredPost]]] = {}
        for entry, row, label in zip(entries, rows, labels, strict=True):
            admitted = entry.item
            group = by_owner.get(id(admitted.owner))
            if group is None:
                group = by_owner[id(admitted.owner)] = (admitted, [], [])
            group[1].append(admitted.offset)
            group[2].append(ScoredPost(admitted.post, admitted.event_time, tuple(row),  # type: ignore[arg-type]
                                       admitted.appended_at, admitted.fetched_at, scored_at, label, model))
        for first, offsets, results in by_owner.values():
            progress = self._owner_progress(first)
            if progress is not None:  # else revoked or replaced meanwhile: its records are read again
                progress.finished_many(offsets, results)
        await self._apply_ready()

    async def _poisoned(self, admitted: Admitted) -> None:
        """The engine fails on this post alone: counted under ``engine_error`` and dead-lettered."""
        progress = self._owner_progress(admitted)
        if progress is None:
            return
        rejection = Rejection(RejectReason.ENGINE_ERROR, "the engine fails on this post alone")
        value = json.dumps({k: v for k, v in asdict(admitted.post).items() if v is not None},
                           ensure_ascii=False).encode()
        await self.source.dead_letter(SourceRecord(
            self.settings.topic, admitted.partition, admitted.offset, int(admitted.appended_at * 1000), None, value,
        ), rejection)
        with contextlib.suppress(KeyError):
            progress.finished(admitted.offset, rejection)
        await self._apply_ready()

    def _owner_progress(self, admitted: Admitted) -> PartitionProgress[Outcome] | None:
        """The partition's progress if it is still the one that fetched ``admitted`` (else None)."""
        progress = self.progress.get(admitted.partition)
        if progress is None or (admitted.owner is not None and progress is not admitted.owner):
            return None
        return progress

    def _fail(self, error: BaseException) -> None:
        """A background task (batch, applier, tokenizer job, rebalance callback) failed: ``run()`` raises the first."""
        self._failure = self._failure or error

    async def _on_revoked(self, gone: set[int]) -> None:
        """Partitions ``gone`` are being revoked: drain, apply and commit their posts under one deadline."""
        try:
            if gone:
                await self._drain(self.settings.commit_timeout_s)
        finally:
            # What was fetched from the revoked partitions but not applied belongs to the next owner now;
            # the posts of partitions this worker keeps stay queued (aiokafka revokes every partition at
            # once today, but a kept post dropped here would block its partition for good).
            for scheduler in self.schedulers.values():
                scheduler.drop(gone)

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
        await self.source.commit(marks)

    async def _drain(self, budget_s: float) -> None:
        """Score everything queued, wait for in-flight batches, apply and commit, within ``budget_s``."""
        self._drains += 1
        try:
            async with asyncio.timeout(budget_s):
                while self.source.publishing:  # rejected records reach the dead-letter topic first
                    await asyncio.wait(list(self.source.publishing))
                # Every route's queue at once: one route's slow engine does not hold back another's drain.
                await asyncio.gather(*(scheduler.drain() for scheduler in self.schedulers.values()))
                if self._applier is not None:  # its commit, if one is running, lands before the last one
                    await asyncio.wait([self._applier])  # none starts while a drain runs
                await self._apply_ready(force_commit=True)
        except TimeoutError:
            # Not lost: unapplied records are read again by the next owner. But say what was left.
            busy = {name: scheduler.busy for name, scheduler in self.schedulers.items()}
            log.warning("drain ran out of its %.1f s: %s still running; %s", budget_s, busy,
                        {p: progress.summary() for p, progress in self.progress.items() if progress.in_flight})
        finally:
            self._drains -= 1
