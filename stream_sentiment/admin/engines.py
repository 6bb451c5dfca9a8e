"""Engine versions in a running worker: load, validate, cut over, roll back, fall back.

One activation at a time. A candidate version is loaded in the background
(checksums verified, every bucket shape warmed up on every slot) while the
active engine keeps serving, then validated (tokenizer identity, golden-set
accuracy, shadow agreement with the active engine: ``admin.validation``).

Then the worker flips to it (``Worker.swap_pool``); batches already running
finish on the old engine, which stays loaded as the standby for
``rollback``. A refused candidate is released and the active engine never
stopped serving. Every activation, rollback, refusal and fallback is appended
to the Redis stream ``<prefix>:engine-events`` and counted in the metrics.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from stream_sentiment.admin.control import (
    ActivationInProgressError,
    EngineState,
    InvalidVersionNameError,
    NothingToRollBackError,
    UnknownVersionError,
    ValidationFailedError,
)
from stream_sentiment.admin.validation import CandidateValidator, ServedEngine
from stream_sentiment.batching.routing import route_settings
from stream_sentiment.config import Settings
from stream_sentiment.engines.base import Engine
from stream_sentiment.engines.manifest import VERSION_PATTERN, EngineRepository, EngineVersion
from stream_sentiment.engines.slots import SlotPool
from stream_sentiment.interpreter import settle_heap
from stream_sentiment.worker import Worker

log = logging.getLogger(__name__)
EVENTS_MAX_LEN = 10_000
OpenEngine = Callable[..., tuple[EngineVersion, Engine]]


@dataclass
class LoadedVersion:
    version: str
    state: EngineState
    pool: SlotPool | None = None
    loaded_seconds: float | None = None
    validation: dict[str, Any] = field(default_factory=dict)


class EngineManager:
    """Implements :class:`stream_sentiment.admin.control.EngineControl` for one worker, or one route of it.

    Args:
        settings: the service settings (engine repository, admin validation thresholds).
        worker: the worker whose engine is managed; its current engine is the active version.
        open_engine: ``(settings, version=, backend=) -> (EngineVersion, Engine)``, not yet activated.
        redis: an asyncio Redis client for the events stream (None: events are only logged).
        route: the route (``engine.routes``) whose engine is managed: versions of its model, swapped on its
            scheduler alone; unset = the default route (the worker's ``engine``).
    """

    def __init__(self, settings: Settings, worker: Worker, open_engine: OpenEngine, redis: Any = None,
                 *, route: str | None = None) -> None:
        self.worker = worker
        self.primary = route is None or route == worker.scheduler.route
        self.route = worker.scheduler.route if route is None else route
        served: ServedEngine = worker if self.primary else worker.route(self.route)
        if not self.primary:
            assert worker.plan is not None  # a second route exists only with a plan
            settings = route_settings(settings, worker.plan.targets[self.route])  # its model's repository
        self.settings = settings
        self.served = served
        self.open_engine = open_engine
        self.redis = redis
        self.repository = EngineRepository(settings.engine.repository, settings.engine.model)
        self.validator = CandidateValidator(settings, served)
        self.events_key = f"{settings.redis_prefix}:engine-events"
        active = served.pool.version
        self.loaded: dict[str, LoadedVersion] = {active: LoadedVersion(active, EngineState.ACTIVE, served.pool)}
        self.active = active
        self.standby: str | None = None
        self._lock = asyncio.Lock()
        self._activating: str | None = None
        self._background: set[asyncio.Task[Any]] = set()
        self._publish_states()
        served.on_engine_down = self._on_engine_down

    @property
    def activating(self) -> str | None:
        """The version being activated now, if any."""
        return self._activating

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
            candidate.validation = await self.validator.validate(candidate.pool, candidate.validation or None)
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
        entry.pool = self.served.new_pool(engine)
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

    def _cut_over(self, target: LoadedVersion) -> float:
        """Flip the worker to ``target``; the old active becomes the standby once its batches finish."""
        assert target.pool is not None
        old_pool, pause = self.served.swap_pool(target.pool)
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
        if self.settings.engine.cpu_fallback and self.served.engine.backend != "onnxruntime":
            self._spawn(self._fall_back_to_cpu(self.served.pool))

    async def _fall_back_to_cpu(self, failed_pool: SlotPool) -> None:
        """No stream of the active engine works: score the same version on ONNX Runtime."""
        async with self._lock:
            if self.served.pool is not failed_pool or failed_pool.healthy:
                return  # an activation or rollback replaced the failed engine meanwhile
            version = self.active

            try:
                engine = await self._open_warm(version, backend="onnxruntime", inject_faults=False)
            except Exception as error:
                log.exception("CPU fallback failed; consumption stays paused")
                await self._event("fallback_failed", version, reason=str(error))
                return
            failed = self.loaded[version]
            old_pool, pause = self.served.swap_pool(self.served.new_pool(engine))
            failed.state = EngineState.RETIRED
            fallback = LoadedVersion(version, EngineState.ACTIVE, self.served.pool)
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
        if not self.primary:
            # engine_state has no route label (its series are the default route's); a route's versions and
            # states are in its list_engines() and its engine events.
            return
        gauge = self.worker.metrics.engine_state
        gauge.clear()
        for entry in self.loaded.values():
            gauge.labels(entry.version, entry.state.value).set(1)

    async def _event(self, event: str, version: str, **details: Any) -> None:
        if not self.primary:
            details = {"route": self.route, **details}
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
