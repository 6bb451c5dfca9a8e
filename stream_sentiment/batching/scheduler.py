"""The scheduler: admitted posts -> tokens -> length buckets -> one batch per free engine stream.

It joins the pure batcher (``batching.batcher``) to the engine's slots
(``engines.slots``): posts are tokenized (the pure-Python ASCII fast path on the
event loop in ~1 ms chunks, the Rust tokenizer's share in one executor thread),
queued in their length bucket in fetch order, and whenever a
stream is free the batcher is asked for the batch due first. A timer wakes it
when the oldest queued post's window or timeout runs out, whatever the fetch
loop is doing. Scored batches go out through ``on_scored``; a batch that fails
on a working engine is halved until the post at fault is alone, which goes out
through ``on_poison``; a batch whose stream failed goes to another stream.

Kafka, Redis and offsets are not its business: it sees :class:`Admitted` posts in
and hands the same objects back with their scores.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from stream_sentiment.batching.batcher import Batcher, BatchingPolicy, Formation, FormedBatch, Pending
from stream_sentiment.batching.cost import backend_cost
from stream_sentiment.batching.tokenizer import PostTokenizer, pad_to_bucket
from stream_sentiment.config import Settings
from stream_sentiment.engines.base import Engine
from stream_sentiment.engines.slots import PoisonBatchError, RecoveryPolicy, SlotFailedError, SlotPool
from stream_sentiment.metrics import PipelineMetrics
from stream_sentiment.source.kafka_source import Admitted

log = logging.getLogger(__name__)
# Fetches whose tokenization may be in flight at once: one in the tokenizer thread while the event loop
# decodes the next fetch, one queued behind it. Serial, decode and tokenization added up per post; more
# than two would only hold memory, as the thread takes them one at a time anyway.
TOKENIZE_AHEAD = 2
# Longest a fetch waits for records when no batch is due sooner.
MAX_FETCH_WAIT_MS = 100
# The pure-Python tokenization fast path runs on the event loop in chunks of about this many characters
# (~1 ms of CPU), yielding between them: in a thread it held the GIL anyway, so the loop waited just the
# same (up to the 5 ms switch interval at a time), and the two threads' contention for the GIL cost more
# CPU per post than the tokenization itself.
TOKENIZE_CHUNK_CHARS = 8192

# A scored batch's entries and their probabilities ``float32 [rows, labels]``, in the entries' order.
# A scored batch: its entries, their probabilities, and the model of the engine that scored them.
Scored = Callable[[Sequence[Pending[Admitted]], np.ndarray, str], Awaitable[None]]


def chosen_buckets(chosen: tuple[int, ...] | None, engine_buckets: tuple[int, ...]) -> tuple[int, ...]:
    """The length buckets to batch by: ``chosen`` (checked against the engine's) or the engine's own."""
    if chosen is None:
        return engine_buckets
    unknown = sorted(set(chosen) - set(engine_buckets))
    if unknown:
        raise ValueError(f"batching.buckets {unknown} are not buckets of the engine ({list(engine_buckets)})")
    # Posts are truncated to the engine's max length, so only its largest bucket holds every post.
    if max(engine_buckets) not in chosen:
        raise ValueError(f"batching.buckets must include the engine's largest bucket, {max(engine_buckets)}")
    return tuple(sorted(set(chosen)))


def batching_policy(settings: Settings, engine_buckets: tuple[int, ...]) -> BatchingPolicy:
    """The batch formation the settings ask for, for an engine with ``engine_buckets``.

    ``least-cost`` weighs calls against padded tokens with the configured costs, or the engine
    backend's defaults (``batching.cost.BACKEND_COSTS``; with ``engine.torch_forward = "packed"`` a
    padded token costs next to nothing, ``batching.cost.PACKED_TOKEN_COST``). An engine-server worker
    reads its own ``engine.torch_forward``: the server's when they share the settings file, as deployed.
    """
    batching = settings.batching
    return BatchingPolicy(
        buckets=chosen_buckets(batching.buckets, engine_buckets), max_rows=batching.max_rows,
        max_tokens=batching.max_tokens, window=batching.window_ms / 1000, timeout=batching.timeout_ms / 1000,
        merge_smaller_on_timeout=batching.merge_smaller_on_timeout, formation=Formation(batching.formation),
        cost=backend_cost(settings.engine.backend, batching.call_cost_us, batching.token_cost_ns,
                          packed=settings.engine.torch_forward == "packed"),
    )


class Scheduler:
    """Batches admitted posts by length bucket onto an engine's streams.

    Args:
        settings: the service settings (batching, engine recovery, shadow sample size).
        engine: an active engine whose version matches ``tokenizer``.
        tokenizer: the engine version's tokenizer.
        metrics: batch, stage and engine figures.
        on_scored: called with a batch's entries, their probabilities and the scoring engine's model (the pool
            that ran it), once the stream is free again.
        on_poison: called with a post the engine fails on alone.
        fail: records a failure that must stop the worker (a task cannot raise to it).
        clock: monotonic seconds, injectable for tests.
        route: the route this scheduler serves (``batching.routing``), the ``route`` label of its metrics;
            unset = the engine's model, the one route of a worker without routing.
        primary: whether it serves the default route, whose engine ``engine_info`` names.
    """

    def __init__(
        self,
        settings: Settings,
        engine: Engine,
        tokenizer: PostTokenizer,
        metrics: PipelineMetrics,
        *,
        on_scored: Scored,
        on_poison: Callable[[Admitted], Awaitable[None]],
        fail: Callable[[BaseException], None],
        clock: Callable[[], float] = time.monotonic,
        route: str | None = None,
        primary: bool = True,
    ) -> None:
        self.settings = settings
        self.tokenizer = tokenizer
        self.metrics = metrics
        self.clock = clock
        self.route = route if route is not None else engine.version.manifest.model
        self.primary = primary
        metrics.set_route_engine(self.route, engine.backend, engine.version.manifest.version)
        self._on_scored = on_scored
        self._on_poison = on_poison
        self._fail = fail
        self.pool = self.new_pool(engine)
        self.batcher: Batcher[Admitted] = Batcher(batching_policy(settings, tokenizer.buckets))
        # Formed batches waiting for a slot: handed back by a failed slot, or drained from the batcher.
        self._ready: deque[FormedBatch[Admitted]] = deque()
        # Recent live posts and the active engine's labels: the shadow sample a hot swap is checked on.
        self.shadow: deque[tuple[tuple[int, ...], int]] = deque(maxlen=settings.admin.shadow_sample_size)
        # Called (once per outage) when no engine stream works; the engine manager may fall back to the CPU.
        self.on_engine_down: Callable[[], None] | None = None
        self._engine_down_reported = False
        self._closing = False
        self._tokenize_executor = ThreadPoolExecutor(1, "tokenize")
        self._tokenizing: deque[asyncio.Task[None]] = deque()
        # Fetches are tokenized and queued one after another, in fetch order (a batch's posts are then a
        # function of the fetches, not of which tokenization happened to finish first).
        self._tokenize_turn = asyncio.Lock()
        # Wakes dispatch() when the oldest queued post's timeout or window runs out, whatever the fetch loop does.
        self._flush_timer: asyncio.TimerHandle | None = None
        self._inference: set[asyncio.Task[None]] = set()

    @property
    def engine(self) -> Engine:
        """The engine new batches go to."""
        return self.pool.engine

    @property
    def busy(self) -> dict[str, int]:
        """Work still running: tokenizer jobs and engine calls (what a drain waits for)."""
        return {"tokenizing": len(self._tokenizing), "inference": len(self._inference)}

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
        if self.primary:
            self.metrics.set_engine(pool.engine.backend, pool.version)
        self.metrics.set_route_engine(self.route, pool.engine.backend, pool.version)
        self._engine_down_reported = False
        self.metrics.consumption_paused.set(0)
        paused = time.perf_counter() - started
        self.dispatch()
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
                self.dispatch()

    def fetch_wait_ms(self) -> int:
        """How long the next fetch may wait: until the next batch is due, at most ``MAX_FETCH_WAIT_MS``."""
        deadline = self.batcher.next_deadline(engine_idle=bool(self.pool.idle))
        if deadline is None:
            return MAX_FETCH_WAIT_MS
        return min(MAX_FETCH_WAIT_MS, max(1, int((deadline - self.clock()) * 1000)))

    # -- in: tokenize and queue ----------------------------------------------------------------

    async def submit(self, admitted: list[Admitted], keep: Callable[[int], bool]) -> None:
        """Tokenize ``admitted`` and queue the posts of the partitions ``keep`` still wants when done.

        Waits only while ``TOKENIZE_AHEAD`` fetches are already queued for tokenization (one at a time, in
        fetch order); the fetch loop goes on.
        """
        while len(self._tokenizing) >= TOKENIZE_AHEAD:
            await asyncio.wait([self._tokenizing[0]])
        texts = [a.post.text for a in admitted]

        async def queue_when_tokenized() -> None:
            try:
                async with self._tokenize_turn:
                    token_ids = await self._tokenize_in_turn(texts)
                    with self.metrics.stage("batch"):
                        now = self.clock()
                        # Partitions revoked meanwhile are asked about once per fetch, not once per post.
                        kept = {partition: keep(partition) for partition in {item.partition for item in admitted}}
                        items: Sequence[Admitted] = admitted
                        if not all(kept.values()):
                            chosen = [i for i, item in enumerate(admitted) if kept[item.partition]]
                            items, token_ids = [admitted[i] for i in chosen], [token_ids[i] for i in chosen]
                        self.batcher.add_many(items, token_ids, now)
                self.dispatch()
            except asyncio.CancelledError:
                raise
            except Exception as error:  # a tokenizer failure must stop the worker, as it did inline
                self._fail(error)

        task = asyncio.create_task(queue_when_tokenized())
        self._tokenizing.append(task)
        task.add_done_callback(self._tokenizing.remove)

    async def _tokenize_in_turn(self, texts: list[str]) -> list[tuple[int, ...]]:
        """Token ids of ``texts``: the fast path's on the event loop, chunk by chunk; the rest in the executor."""
        loop = asyncio.get_running_loop()
        if not self.tokenizer.has_fast_path:  # the Rust tokenizer releases the GIL: a thread runs in parallel
            return await loop.run_in_executor(self._tokenize_executor, self._tokenize, texts)
        encoded: list[tuple[int, ...]] = []
        slow: list[int] = []
        normalized: list[str] = []
        start = 0
        while start < len(texts):
            end, chars = start, 0
            while end < len(texts) and chars < TOKENIZE_CHUNK_CHARS:
                chars += len(texts[end])
                end += 1
            with self.metrics.stage("tokenize"):
                chunk, rest, rest_texts = self.tokenizer.encode_fast(texts[start:end])
            encoded += chunk
            slow += [start + index for index in rest]
            normalized += rest_texts
            start = end
            if start < len(texts):
                await asyncio.sleep(0)  # a fetch, a scored batch or a Redis answer may be waiting
        if normalized:
            rest_ids = await loop.run_in_executor(self._tokenize_executor, self._encode_normalized, normalized)
            for index, token_ids in zip(slow, rest_ids, strict=True):
                encoded[index] = token_ids
        return encoded

    def _tokenize(self, texts: list[str]) -> list[tuple[int, ...]]:
        with self.metrics.stage("tokenize"):
            return self.tokenizer.encode(texts)

    def _encode_normalized(self, normalized: list[str]) -> list[tuple[int, ...]]:
        with self.metrics.stage("tokenize"):
            return self.tokenizer.encode_normalized(normalized)

    # -- out: batches onto streams -------------------------------------------------------------

    def dispatch(self) -> None:
        """Start a batch on every free stream, as long as one is due."""
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

    def _arm_flush(self) -> None:
        """Call dispatch() when the batcher's next timeout or window is due (an engine slot is idle)."""
        if self._flush_timer is not None:
            self._flush_timer.cancel()
            self._flush_timer = None
        if self._closing or not self.pool.idle:
            return  # a slot coming free dispatches by itself
        deadline = self.batcher.next_deadline(engine_idle=True)
        if deadline is not None:
            delay = max(0.0, deadline - self.clock())
            self._flush_timer = asyncio.get_running_loop().call_later(delay, self.dispatch)

    def _record_batch(self, batch: FormedBatch[Admitted]) -> None:
        waited = batch.formed - min(e.arrived for e in batch.entries)
        self.metrics.record_batch(batch.bucket, batch.rows, batch.real_tokens, batch.reason.value, waited,
                                  self.route)

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
                self.sample_shadow(batch.entries, probabilities)
            # The stream is free once the batch is scored: the next batch need not wait for Redis.
            holding_stream = False
            pool.give_back(stream)
            self.dispatch()
            await self._on_scored(batch.entries, probabilities, pool.model)
        except Exception as error:  # a bug here must stop the worker, not vanish in a task
            self._fail(error)
        finally:
            if holding_stream:
                pool.give_back(stream)
                self.dispatch()

    def sample_shadow(self, entries: Sequence[Pending[Admitted]], probabilities: np.ndarray) -> None:
        """Keep a scored batch's newest posts and labels in the shadow sample (a hot swap's check)."""
        # Only the newest posts stay in the bounded sample: the tail of the batch is enough.
        keep = self.shadow.maxlen or 0
        if keep:  # one argmax for the tail, not one numpy call per post
            labels = probabilities[-keep:].argmax(axis=1).tolist()
            self.shadow.extend(zip((tuple(e.token_ids) for e in entries[-keep:]), labels, strict=True))

    async def _isolate_poison(self, batch: FormedBatch[Admitted]) -> None:
        """A batch fails on a working engine: halve it until the post at fault is alone, then hand it out.

        The other posts are scored as usual, so one bad post never stops the partition.
        """
        if batch.rows > 1:
            half = batch.rows // 2
            for part in (batch.entries[half:], batch.entries[:half]):
                self._ready.appendleft(FormedBatch(batch.bucket, part, batch.reason, batch.formed))
            self.metrics.batches_requeued.inc()
            return
        await self._on_poison(batch.entries[0].item)

    def _engine_down(self) -> None:
        if self._engine_down_reported:
            return
        self._engine_down_reported = True
        self.metrics.consumption_paused.set(1)
        log.error("no stream of %s works: consumption paused, nothing is committed",
                            self.engine.describe())
        if self.on_engine_down is not None:
            self.on_engine_down()

    # -- draining ------------------------------------------------------------------------------

    async def drain(self) -> None:
        """Score everything queued and wait for the batches in flight (the caller bounds the time)."""
        while self._tokenizing:  # fetched posts still in the tokenizer reach the batcher first
            await asyncio.wait(list(self._tokenizing))
        for batch in self.batcher.drain(self.clock()):
            self._record_batch(batch)
            self._ready.append(batch)
        while True:
            self.dispatch()
            if not self._inference:
                break  # everything scored, or no working stream left (then nothing is applied)
            await asyncio.gather(*list(self._inference), return_exceptions=True)

    def drop(self, partitions: set[int]) -> None:
        """Forget queued posts of ``partitions`` (revoked: they are the next owner's); others stay queued."""
        kept: deque[FormedBatch[Admitted]] = deque()
        for batch in [*self._ready, *self.batcher.drain(self.clock())]:
            entries = tuple(e for e in batch.entries if e.item.partition not in partitions)
            if entries:
                kept.append(FormedBatch(batch.bucket, entries, batch.reason, batch.formed))
        self._ready = kept

    def close(self) -> None:
        """No new batches from here on; running ones are cancelled, the engine's slots released."""
        # A cancelled batch's clean-up must not start another one.
        self._closing = True
        if self._flush_timer is not None:
            self._flush_timer.cancel()
        for task in [*self._tokenizing, *self._inference]:
            task.cancel()
        self.pool.close()
        self._tokenize_executor.shutdown(wait=False, cancel_futures=True)

