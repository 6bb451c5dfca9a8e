"""An active engine's streams as schedulable slots, with failure recovery.

The worker hands a bucketed batch to an idle slot; the slot's own thread runs
the blocking ``Engine.infer`` (one thread per slot, so a session or execution
context is never shared), and the event loop only awaits the result. An engine
whose call is only I/O (``scores_on_event_loop``: the engine server's client) is
called on the event loop itself, which spares each call two thread hand-offs.

When a call fails -- an exception, a CUDA error, or no answer within the call
timeout -- the slot is rebuilt (``Engine.rebuild``) and the batch retried, a
bounded number of times. When the retries are spent, a one-row probe tells the
device from the input: if the slot scores the probe, the batch itself is at
fault (:class:`PoisonBatchError`: the worker splits it and dead-letters the post
that fails alone), and the slot stays; otherwise the failures count against the
slot, and a slot that keeps failing leaves rotation ("lost"): its batch is
handed back to the worker for another slot, and ``/readyz`` says so. A slot
whose call timed out is lost at once: its thread may still be stuck in the
call, so it cannot be rebuilt safely.
"""

from __future__ import annotations

import asyncio
import logging
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np

from stream_sentiment.engines.base import Engine, EngineError, TokenBatch
from stream_sentiment.metrics import PipelineMetrics

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class RecoveryPolicy:
    """How hard a slot tries before giving a batch up.

    Attributes:
        max_retries: rebuild-and-retry rounds per batch on the same slot.
        max_consecutive_failures: failed calls in a row after which the slot is lost.
        call_timeout: seconds an engine call may take before it counts as failed.
    """

    max_retries: int = 2
    max_consecutive_failures: int = 3
    call_timeout: float = 30.0


class SlotFailedError(EngineError):
    """A batch could not be scored on this slot; the caller should try another one."""

    def __init__(self, stream: int, lost: bool, cause: BaseException) -> None:
        super().__init__(f"stream {stream} failed{' and left rotation' if lost else ''}: {cause}")
        self.stream = stream
        self.lost = lost


class PoisonBatchError(SlotFailedError):
    """The batch fails on a slot that scores a probe batch fine: the input, not the device, is at fault."""

    def __init__(self, stream: int, cause: BaseException) -> None:
        super().__init__(stream, False, cause)


class SlotPool:
    """The slots of one activated engine: which are idle, which are lost, how many batches run."""

    def __init__(self, engine: Engine, metrics: PipelineMetrics, policy: RecoveryPolicy | None = None) -> None:
        self.engine = engine
        manifest = engine.version.manifest
        # ``model/version``: what logs, metrics and alerts name.
        self.engine_name = f"{manifest.model}/{manifest.version}"
        # The model the posts this pool scores are counted under in their buckets (the version is not: which
        # version scored a post depends on when a hot swap cut over). The manifest's one string object, so the
        # per-post bookkeeping compares it by identity.
        self.model = manifest.model
        self.metrics = metrics
        self.policy = policy or RecoveryPolicy()
        self.idle: list[int] = list(range(engine.streams))
        self.lost: set[int] = set()
        self.in_flight = 0
        self._failures = [0] * engine.streams
        self._executors = [ThreadPoolExecutor(1, f"{engine.backend}-{i}") for i in range(engine.streams)]
        self._drained = asyncio.Event()
        self._drained.set()

    @property
    def version(self) -> str:
        return self.engine.version.manifest.version

    @property
    def healthy(self) -> bool:
        return len(self.lost) < self.engine.streams

    def take(self) -> int | None:
        """An idle slot, marked busy; None when every slot is busy or lost."""
        if not self.idle:
            return None
        self.in_flight += 1
        self._drained.clear()
        return self.idle.pop()

    def give_back(self, stream: int) -> None:
        if stream not in self.lost:
            self.idle.append(stream)
        self.in_flight -= 1
        if self.in_flight == 0:
            self._drained.set()

    async def drained(self) -> None:
        """Wait until no batch runs on this engine (after a cutover, before it becomes the standby)."""
        await self._drained.wait()

    async def score(self, batch: TokenBatch, stream: int) -> np.ndarray:
        """Probabilities for ``batch`` on slot ``stream``, rebuilding and retrying on failure.

        Raises:
            SlotFailedError: the retries ran out, or the slot left rotation; the batch was not scored.
        """
        attempt = 0
        while True:
            started = time.perf_counter()
            try:
                probabilities = await self._call(batch, stream)
            except Exception as error:  # any backend fault: exception types differ per backend
                self._record_failure(stream, error)
                if isinstance(error, TimeoutError):
                    # A thread may still be stuck in the call; on the event-loop path none is, but a server
                    # that let a call run past the timeout is not answering, and rotation treats both alike.
                    self._lose(stream, error)
                    raise SlotFailedError(stream, True, error) from error
                if attempt < self.policy.max_retries:
                    attempt += 1
                    if not await self._rebuild(stream):
                        raise SlotFailedError(stream, True, error) from error
                    self.metrics.engine_retries.inc()
                    continue
                # Retries spent: the device, or this batch? A slot that scores a probe is fine.
                if await self._probe(stream):
                    self._failures[stream] = 0
                    raise PoisonBatchError(stream, error) from error
                if self._failures[stream] >= self.policy.max_consecutive_failures:
                    self._lose(stream, error)
                    raise SlotFailedError(stream, True, error) from error
                raise SlotFailedError(stream, False, error) from error
            elapsed = time.perf_counter() - started
            self._failures[stream] = 0
            self.metrics.stage_seconds.labels("engine").inc(elapsed)
            self.metrics.engine_latency.labels(str(batch.bucket)).observe(elapsed)
            return probabilities

    async def _call(self, batch: TokenBatch, stream: int) -> np.ndarray:
        """One engine call on slot ``stream``, bounded by the call timeout (TimeoutError past it)."""
        if self.engine.scores_on_event_loop:
            # No thread: a timeout cancels the call, and the engine drops the half-used connection.
            async with asyncio.timeout(self.policy.call_timeout):
                return await self.engine.infer_on_loop(batch, stream)
        future = asyncio.get_running_loop().run_in_executor(self._executors[stream], self.engine.infer, batch, stream)
        return await asyncio.wait_for(future, self.policy.call_timeout)

    async def _probe(self, stream: int) -> bool:
        """Score one padding-only row of the smallest bucket on ``stream``: does the slot work at all?"""
        bucket = self.engine.version.manifest.buckets[0]
        probe = TokenBatch(np.zeros((1, bucket), dtype=np.int64), np.ones((1, bucket), dtype=np.int64), bucket)
        try:
            await self._call(probe, stream)
        except Exception as error:
            self._record_failure(stream, error)
            return False
        return True

    def _record_failure(self, stream: int, error: BaseException) -> None:
        self._failures[stream] += 1
        self.metrics.engine_failures.labels(self.version, str(stream)).inc()
        log.warning("%s stream %d failed (%d in a row): %s", self.engine.describe(), stream,
                    self._failures[stream], error)

    async def _rebuild(self, stream: int) -> bool:
        loop = asyncio.get_running_loop()
        try:
            await loop.run_in_executor(self._executors[stream], self.engine.rebuild, stream)
        except Exception as error:
            self._lose(stream, error)
            return False
        self.metrics.engine_rebuilds.labels(self.version, str(stream)).inc()
        return True

    def _lose(self, stream: int, error: BaseException) -> None:
        if stream not in self.lost:
            self.lost.add(stream)
            log.error("%s stream %d left rotation: %s", self.engine.describe(), stream, error)
        self.metrics.streams_lost.labels(self.version).set(len(self.lost))

    def close(self, wait_s: float = 10.0) -> None:
        """Stop the slot threads, waiting up to ``wait_s`` for calls still running.

        A call whose awaiting task was cancelled (shutdown, a drain deadline) may still be
        running on its thread; releasing the engine under it would free buffers in use. A call
        stuck past ``wait_s`` is abandoned.
        """
        for executor in self._executors:
            executor.shutdown(wait=False, cancel_futures=True)
        deadline = time.monotonic() + wait_s
        for executor in self._executors:
            for thread in list(getattr(executor, "_threads", ())):
                thread.join(max(0.0, deadline - time.monotonic()))
