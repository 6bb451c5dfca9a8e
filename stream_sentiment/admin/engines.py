"""Engine versions in a running worker: load, validate, cut over, roll back, fall back.

One activation at a time. A candidate version is loaded in the background
(checksums verified, every bucket shape warmed up on every slot) while the
active engine keeps serving, then validated:

* its tokenizer must be the running one (queued posts were tokenized with it);
* its accuracy on the golden set shipped in its folder must be within
  ``admin.golden_tolerance`` of what its manifest recorded at build time (a
  broken file, wrong label order or bad conversion shows here);
* on a shadow sample of recent live posts it must agree with the active
  engine on at least ``admin.min_shadow_agreement`` of them.

Then the worker flips to it (``Worker.swap_pool``); batches already running
finish on the old engine, which stays loaded as the standby for
``rollback``. A refused candidate is released and the active engine never
stopped serving. Every activation, rollback, refusal and fallback is appended
to the Redis stream ``<prefix>:engine-events`` and counted in the metrics.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import json
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from stream_sentiment.admin.control import (
    ActivationInProgressError,
    EngineState,
    InvalidVersionNameError,
    NothingToRollBackError,
    UnknownVersionError,
    ValidationFailedError,
)
from stream_sentiment.config import Settings
from stream_sentiment.engines.base import Engine
from stream_sentiment.engines.manifest import VERSION_PATTERN, EngineRepository, EngineVersion
from stream_sentiment.engines.slots import SlotPool
from stream_sentiment.interpreter import settle_heap
from stream_sentiment.worker import Worker

log = logging.getLogger(__name__)
EVENTS_MAX_LEN = 10_000
# Validation posts scored per chunk: a few milliseconds of CPU, short enough not to hold up a live batch.
VALIDATION_CHUNK_ROWS = 8
# A saturated worker is never idle; validation waits at most this long per chunk, then goes ahead.
IDLE_WAIT_LIMIT_S = 0.5
OpenEngine = Callable[..., tuple[EngineVersion, Engine]]


@dataclass
class LoadedVersion:
    version: str
    state: EngineState
    pool: SlotPool | None = None
    loaded_seconds: float | None = None
    validation: dict[str, Any] = field(default_factory=dict)


class EngineManager:
    """Implements :class:`stream_sentiment.admin.control.EngineControl` for one worker.

    Args:
        settings: the service settings (engine repository, admin validation thresholds).
        worker: the worker whose engine is managed; its current engine is the active version.
        open_engine: ``(settings, version=, backend=) -> (EngineVersion, Engine)``, not yet activated.
        redis: an asyncio Redis client for the events stream (None: events are only logged).
    """

    def __init__(self, settings: Settings, worker: Worker, open_engine: OpenEngine, redis: Any = None) -> None:
        self.settings = settings
        self.worker = worker
        self.open_engine = open_engine
        self.redis = redis
        self.repository = EngineRepository(settings.engine.repository, settings.engine.model)
        self.events_key = f"{settings.redis_prefix}:engine-events"
        active = worker.pool.version
        self.loaded: dict[str, LoadedVersion] = {active: LoadedVersion(active, EngineState.ACTIVE, worker.pool)}
        self.active = active
        self.standby: str | None = None
        self._lock = asyncio.Lock()
        self._activating: str | None = None
        self._background: set[asyncio.Task[Any]] = set()
        self._publish_states()
        worker.on_engine_down = self._on_engine_down

    # -- EngineControl ----------------------------------------------------------------------------

    def list_engines(self) -> dict[str, Any]:
        engines = []
        for version in sorted(set(self.repository.versions()) | set(self.loaded)):
            entry = self.loaded.get(version)
            row: dict[str, Any] = {"version": version, "state": (entry.state if entry else EngineState.RETIRED).value}
            if entry is not None and entry.pool is not None:
                engine = entry.pool.engine
                row.update(backend=engine.backend, streams=engine.streams, lost_streams=sorted(entry.pool.lost),
                           loaded_seconds=entry.loaded_seconds, validation=entry.validation or None)
            engines.append(row)
        return {"active": self.active, "standby": self.standby, "activating": self._activating, "engines": engines}

    async def activate(self, version: str) -> dict[str, Any]:
        if not VERSION_PATTERN.fullmatch(version) or version in (".", ".."):
            raise InvalidVersionNameError(f"{version!r} is not a version name")
        if self._lock.locked():
            raise ActivationInProgressError(f"an activation ({self._activating}) is already running")
        async with self._lock:
            self._activating = version
            try:
                return await self._activate(version)
            finally:
                self._activating = None

    async def rollback(self) -> dict[str, Any]:
        if self._lock.locked():
            raise ActivationInProgressError(f"an activation ({self._activating}) is running")
        async with self._lock:
            standby = self.loaded.get(self.standby) if self.standby else None
            if standby is None or standby.pool is None or not standby.pool.healthy:
                raise NothingToRollBackError("no standby engine is loaded to roll back to")
            previous = self.active
            pause = self._cut_over(standby)
            await self._event("rolled_back", standby.version, previous=previous, pause_seconds=pause)
            self.worker.metrics.engine_swaps.labels("rollback", "ok").inc()
            return {"active": self.active, "previous": previous, "pause_seconds": pause}

    def readiness(self) -> tuple[bool, dict[str, Any]]:
        details = self.worker.readiness()
        details["activating"] = self._activating
        # Not ready while no engine stream works or Redis does not answer: fetching is paused either way.
        ready = bool(details["engine_working"]) and bool(details["redis_up"])
        return ready, details

    # -- activation steps ---------------------------------------------------------------------------

    async def _activate(self, version: str) -> dict[str, Any]:
        if version not in self.repository.versions():
            raise UnknownVersionError(f"no version {version!r} in {self.repository.root / self.repository.model}")
        if version == self.active:
            return {"active": version, "changed": False}
        candidate = self.loaded.get(version)
        newly_loaded = candidate is None or candidate.pool is None
        cut_over = False
        try:
            if newly_loaded:
                candidate = await self._load(version)
            assert candidate is not None and candidate.pool is not None
            if not candidate.pool.healthy:
                lost = sorted(candidate.pool.lost)
                raise ValidationFailedError(f"{version} has no working engine stream (lost: {lost})")
            await candidate.pool.drained()  # a standby may still be finishing batches on its slots
            candidate.validation = await self._validate(candidate.pool, candidate.validation or None)
            if not candidate.validation["passed"]:
                raise ValidationFailedError(candidate.validation["reason"])
            previous = self.active
            pause = self._cut_over(candidate)
            cut_over = True
        except Exception as error:  # any failure while loading or validating refuses the candidate
            reason = error.reason if isinstance(error, ValidationFailedError) else f"{type(error).__name__}: {error}"
            self.worker.metrics.engine_swaps.labels("activate", "refused").inc()
            await self._event("refused", version, reason=reason, active=self.active)
            raise ValidationFailedError(reason) from error
        finally:
            if newly_loaded and not cut_over and version in self.loaded:
                # A refused (or cancelled) candidate must not keep its memory and threads.
                await asyncio.shield(self._release(version))
        self.worker.metrics.engine_swaps.labels("activate", "ok").inc()
        await self._event("activated", version, previous=previous, pause_seconds=pause,
                          loaded_seconds=candidate.loaded_seconds, validation=candidate.validation)
        return {"active": version, "previous": previous, "changed": True, "pause_seconds": pause,
                "validation": candidate.validation}

    async def _load(self, version: str) -> LoadedVersion:
        entry = LoadedVersion(version, EngineState.LOADING)
        self.loaded[version] = entry
        self._publish_states()
        started = time.perf_counter()

        try:
            engine = await self._open_warm(version)
        except BaseException:
            del self.loaded[version]
            self._publish_states()
            raise
        entry.pool = self.worker.new_pool(engine)
        entry.loaded_seconds = round(time.perf_counter() - started, 3)
        entry.state = EngineState.WARM
        self._publish_states()
        return entry

    async def _open_warm(self, version: str, **options: Any) -> Engine:
        """Open, activate and warm up ``version`` off the event loop; nothing is left active on failure."""

        def load() -> Engine:
            _, engine = self.open_engine(self.settings, version=version, **options)
            engine.activate_warm()
            return engine

        return await asyncio.get_running_loop().run_in_executor(None, load)

    async def _validate(self, pool: SlotPool, previous: dict[str, Any] | None = None) -> dict[str, Any]:
        """Tokenizer identity, golden-set accuracy and shadow agreement; ``passed`` and a ``reason`` if not.

        ``previous`` is this loaded engine's last report: its golden score is reused (the shadow
        sample, recent live traffic, is always scored again).
        """
        from stream_sentiment.engines.scoring import read_jsonl_labelled

        admin = self.settings.admin
        manifest = pool.engine.version.manifest
        running = self.worker.tokenizer.version.manifest
        report: dict[str, Any] = {"passed": False}
        # Labels too: the worker reads column 0 as P(negative) and counts by the running label order.
        mismatched = [key for key in ("tokenizer_file", "text_normalization", "max_length", "buckets", "labels")
                      if getattr(manifest, key) != getattr(running, key)]
        if manifest.files.get(manifest.tokenizer_file) != running.files.get(running.tokenizer_file):
            mismatched.append("tokenizer checksum")
        if mismatched:
            report["reason"] = (f"it differs from the running version in {', '.join(mismatched)}; "
                                "start workers with the new version instead of hot-swapping")
            return report
        engine_rows = getattr(pool.engine, "max_rows", None)
        if engine_rows and engine_rows < self.settings.batching.max_rows:
            report["reason"] = (f"it takes at most {engine_rows} rows per batch, the worker forms up to "
                                f"{self.settings.batching.max_rows}; rebuild it for batching.max_rows")
            return report
        if not manifest.golden:
            report["reason"] = "its manifest has no golden set to validate against"
            return report
        expected = float(manifest.golden["accuracy"])
        if previous is not None and "golden" in previous:
            # Same loaded engine, same files: its golden score cannot have changed since it was loaded.
            report["golden"] = {**previous["golden"], "scored_at_load": True}
            accuracy = previous["golden"]["accuracy"]
        else:
            texts, gold = read_jsonl_labelled(pool.engine.version.file(manifest.golden["file"]), manifest.labels)
            probabilities = await self._score_in_background(pool, self.worker.tokenizer.encode(texts))
            labels = list(manifest.labels)
            hits = [labels[int(i)] == g for i, g in zip(probabilities.argmax(1), gold, strict=True)]
            accuracy = round(float(np.mean(hits)), 4)
            report["golden"] = {"n": len(texts), "accuracy": accuracy, "manifest_accuracy": expected}
        if accuracy < expected - admin.golden_tolerance:
            report["reason"] = (f"golden-set accuracy {accuracy:.3f} is more than {admin.golden_tolerance} below "
                                f"the {expected:.3f} its manifest records")
            return report
        shadow = list(self.worker.shadow)
        if len(shadow) < admin.min_shadow_posts:
            report["shadow"] = {"skipped": f"only {len(shadow)} recent live posts (< {admin.min_shadow_posts})"}
        else:
            shadow_ids = [list(ids) for ids, _ in shadow]
            scored = await self._score_in_background(pool, shadow_ids)
            agreement = float(np.mean(scored.argmax(1) == np.array([label for _, label in shadow])))
            report["shadow"] = {"n": len(shadow), "agreement": round(agreement, 4)}
            if agreement < admin.min_shadow_agreement:
                report["reason"] = (f"it agrees with the active engine on {agreement:.1%} of {len(shadow)} recent "
                                    f"posts, below {admin.min_shadow_agreement:.0%}")
                return report
        report["passed"] = True
        return report

    async def _score_in_background(self, pool: SlotPool, token_ids: Sequence[Sequence[int]]) -> np.ndarray:
        """Score validation posts in small chunks, resting between them, so live batches keep the cores.

        On a CPU host the candidate and the active engine share the same cores; a burst of validation
        work would stall live batches for as long as it runs. So each chunk is a few milliseconds and
        takes a turn on the active engine's time (``Worker.engine_time``: when it is idle, or after a
        bounded wait so a saturated worker still validates), and the rest after it keeps validation
        to ``admin.validation_duty_cycle`` of the time.
        """
        from stream_sentiment.engines.scoring import score_token_ids

        loop = asyncio.get_running_loop()
        buckets = pool.engine.version.manifest.buckets
        duty = self.settings.admin.validation_duty_cycle
        step = VALIDATION_CHUNK_ROWS
        parts = []
        stream = pool.take()  # a slot of the candidate's own, which nothing else uses meanwhile
        if stream is None:
            raise ValidationFailedError("no idle engine stream to validate on")
        try:
            for start in range(0, len(token_ids), step):
                chunk = token_ids[start:start + step]
                async with self.worker.engine_time(IDLE_WAIT_LIMIT_S):
                    began = time.perf_counter()
                    parts.append(await loop.run_in_executor(
                        None, functools.partial(score_token_ids, pool.engine, chunk, buckets, stream=stream)))
                    spent = time.perf_counter() - began
                await asyncio.sleep(spent * (1 / duty - 1))
        finally:
            pool.give_back(stream)
        return np.concatenate(parts) if parts else np.zeros((0, len(pool.engine.labels)), dtype=np.float32)

    def _cut_over(self, target: LoadedVersion) -> float:
        """Flip the worker to ``target``; the old active becomes the standby once its batches finish."""
        assert target.pool is not None
        old_pool, pause = self.worker.swap_pool(target.pool)
        self.worker.metrics.cutover_pause.observe(pause)
        previous = self.loaded[self.active]
        previous.state = EngineState.DRAINING
        target.state = EngineState.ACTIVE
        stale = self.standby if self.standby not in (None, target.version, previous.version) else None
        self.active, self.standby = target.version, previous.version
        if stale is not None:
            self._spawn(self._release(stale))
        self._spawn(self._settle(previous, old_pool))
        self._publish_states()
        return pause

    async def _settle(self, entry: LoadedVersion, pool: SlotPool) -> None:
        await pool.drained()
        if entry.state is EngineState.DRAINING:
            entry.state = EngineState.WARM
            self._publish_states()

    async def _release(self, version: str) -> None:
        entry = self.loaded.pop(version, None)
        if entry is None or entry.pool is None:
            return
        entry.state = EngineState.RETIRED
        await entry.pool.drained()
        await self._close_pool(entry.pool)
        self._publish_states()

    # -- failure recovery ---------------------------------------------------------------------------

    def _on_engine_down(self) -> None:
        if self.settings.engine.cpu_fallback and self.worker.engine.backend != "onnxruntime":
            self._spawn(self._fall_back_to_cpu(self.worker.pool))

    async def _fall_back_to_cpu(self, failed_pool: SlotPool) -> None:
        """No stream of the active engine works: score the same version on ONNX Runtime."""
        async with self._lock:
            if self.worker.pool is not failed_pool or failed_pool.healthy:
                return  # an activation or rollback replaced the failed engine meanwhile
            version = self.active

            try:
                engine = await self._open_warm(version, backend="onnxruntime", inject_faults=False)
            except Exception as error:
                log.exception("CPU fallback failed; consumption stays paused")
                await self._event("fallback_failed", version, reason=str(error))
                return
            failed = self.loaded[version]
            old_pool, pause = self.worker.swap_pool(self.worker.new_pool(engine))
            failed.state = EngineState.RETIRED
            fallback = LoadedVersion(version, EngineState.ACTIVE, self.worker.pool)
            self.loaded[version] = fallback
            self._spawn(self._close_failed_pool(old_pool))
            self.worker.metrics.engine_swaps.labels("fallback", "ok").inc()
            await self._event("fallback", version, backend="onnxruntime", pause_seconds=pause)
            self._publish_states()

    async def _close_pool(self, pool: SlotPool) -> None:
        """Stop the pool's slot threads, then release its engine; both off the event loop."""
        loop = asyncio.get_running_loop()
        await loop.run_in_executor(None, pool.close)  # waits (bounded) for calls still running
        await loop.run_in_executor(None, pool.engine.deactivate)
        settle_heap()  # an engine frozen with the start-up heap is freed only by a collection after an unfreeze

    async def _close_failed_pool(self, pool: SlotPool) -> None:
        with contextlib.suppress(Exception):  # it is broken already; release what can be released
            await self._close_pool(pool)

    # -- bookkeeping ----------------------------------------------------------------------------------

    def _spawn(self, coroutine: Any) -> None:
        task = asyncio.create_task(coroutine)
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    def _publish_states(self) -> None:
        gauge = self.worker.metrics.engine_state
        gauge.clear()
        for entry in self.loaded.values():
            gauge.labels(entry.version, entry.state.value).set(1)

    async def _event(self, event: str, version: str, **details: Any) -> None:
        fields = {"event": event, "version": version, "at": f"{time.time():.3f}",
                  **{k: v if isinstance(v, str) else json.dumps(v) for k, v in details.items()}}
        log.info("engine event %s", fields)
        if self.redis is None:
            return
        try:
            await self.redis.xadd(self.events_key, fields, maxlen=EVENTS_MAX_LEN, approximate=True)
        except Exception:  # the swap happened; a lost audit entry must not undo it
            log.exception("could not append to %s", self.events_key)

    async def close(self) -> None:
        for task in list(self._background):
            task.cancel()
        await asyncio.gather(*self._background, return_exceptions=True)
        for version in [v for v in self.loaded if v != self.active]:
            entry = self.loaded.pop(version)
            if entry.pool is not None:
                await self._close_pool(entry.pool)
