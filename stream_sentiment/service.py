"""Process-level wiring: open the configured engine, run a worker until a signal, read stats."""

from __future__ import annotations

import asyncio
import signal
from typing import Any

from stream_sentiment.aggregation.buckets import LABELS, RedisKeys
from stream_sentiment.batching.routing import RoutedEngines, RoutePlan, plan_routes, route_settings
from stream_sentiment.batching.tokenizer import PostTokenizer
from stream_sentiment.clients import async_redis_client, check_redis, redis_client
from stream_sentiment.config import Settings
from stream_sentiment.engines.base import BackendUnavailableError, Engine
from stream_sentiment.engines.manifest import EngineRepository, EngineVersion
from stream_sentiment.interpreter import settle_heap, tune_interpreter
from stream_sentiment.metrics import PipelineMetrics


def open_engine(
    settings: Settings, version: str | None = None, backend: str | None = None, *, inject_faults: bool = True
) -> tuple[EngineVersion, Engine]:
    """An engine version (checksums verified) on a backend, not yet activated.

    The version serves ``batching.buckets`` when they are set (see :meth:`EngineVersion.serving`), so
    the engine warms up, and captures graphs for, exactly the shapes the batcher will form.

    Args:
        settings: the service settings; ``engine.*`` says which version, backend and streams.
        version: another version of the same repository (a hot swap), by name.
        backend: another backend (the CPU fallback), e.g. ``onnxruntime``.
        inject_faults: apply the ``engine.fault_*`` test settings; the CPU fallback stands for
            another device, so it is opened without them.
    """
    engine_settings = settings.engine
    repository = EngineRepository(engine_settings.repository, engine_settings.model)
    loaded = repository.load(version or engine_settings.version)
    if settings.batching.buckets is not None:
        loaded = loaded.serving(settings.batching.buckets)
    backend = backend or engine_settings.backend
    engine: Engine
    if backend == "onnxruntime":
        from stream_sentiment.engines.onnxruntime_backend import OnnxRuntimeEngine

        engine = OnnxRuntimeEngine(loaded, engine_settings.streams, engine_settings.threads_per_stream)
    elif backend == "tensorrt":
        from stream_sentiment.batching.batcher import BatchingPolicy
        from stream_sentiment.engines.tensorrt_backend import TensorRTEngine

        # The batcher's limits: a plan whose profiles take fewer rows than it forms is refused at activation.
        batching = settings.batching
        policy = BatchingPolicy(buckets=tuple(loaded.manifest.buckets), max_rows=batching.max_rows,
                                max_tokens=batching.max_tokens)
        engine = TensorRTEngine(loaded, engine_settings.streams, batching=policy)
    elif backend == "torch-cuda":
        from stream_sentiment.engines.torch_backend import TorchCudaEngine

        # Graphs are captured for batch sizes up to the batcher's largest batch, not beyond.
        engine = TorchCudaEngine(loaded, engine_settings.streams, max_rows=settings.batching.max_rows,
                                 forward=engine_settings.torch_forward, max_tokens=settings.batching.max_tokens)
    elif backend == "engine-server":
        from stream_sentiment.engines.server_backend import EngineServerEngine

        assert engine_settings.server_socket is not None  # the settings validator requires it
        # The socket gives up a little before the slot pool does: a timed-out socket is a failure the pool
        # rebuilds from (a reconnect), a call the pool timed out loses its slot for good.
        engine = EngineServerEngine(loaded, engine_settings.streams, socket_path=engine_settings.server_socket,
                                    max_rows=settings.batching.max_rows, timeout_s=0.9 * engine_settings.call_timeout_s)
    else:  # the settings type admits no other value; a guard for callers passing strings
        raise BackendUnavailableError(f"unknown backend {backend!r}")
    faults = engine_settings.fault_every_kth_call is not None or engine_settings.fault_broken_stream is not None
    if inject_faults and faults:
        from stream_sentiment.engines.faults import FaultInjectingEngine

        engine = FaultInjectingEngine(engine, every_kth_call=engine_settings.fault_every_kth_call,
                                      broken_stream=engine_settings.fault_broken_stream)
    return loaded, engine


async def open_routes(settings: Settings, plan: RoutePlan, serving: list[Engine]) -> RoutedEngines:
    """Open, activate and warm every route's engine but the default route's (``engine.routes``).

    Each is appended to ``serving`` as soon as it is active, so the caller deactivates it whatever fails
    next. A route's manifest that lacks a language routed to it is refused by the worker.
    """
    loop = asyncio.get_running_loop()
    engines: dict[str, tuple[Engine, PostTokenizer]] = {}
    for name, target in plan.targets.items():
        if name == plan.default:
            continue
        version, engine = open_engine(route_settings(settings, target))
        plan.check_manifest(name, version.manifest)  # before minutes of warming up an engine refused anyway
        await loop.run_in_executor(None, engine.activate)
        serving.append(engine)
        await loop.run_in_executor(None, engine.warm_up)
        engines[name] = (engine, PostTokenizer(version))
    return RoutedEngines(plan, engines)


def stop_on_signals(stop: asyncio.Event) -> None:
    """SIGINT and SIGTERM set ``stop``, so the worker drains, applies and commits before exiting."""
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, stop.set)


async def run_worker(settings: Settings, stop: asyncio.Event) -> None:
    """Open and warm the configured engine, then run one worker and its admin server until ``stop`` is set.

    The admin server (``/healthz``, ``/readyz``, ``/metrics``, ``/admin/*``, the ``/alerts`` page) listens on
    ``admin.host:admin.port``. With ``metrics_port`` set, ``/metrics`` is also served on that
    port by itself.
    """
    from stream_sentiment.admin.engines import EngineManager
    from stream_sentiment.admin.routes import RoutedEngineManager
    from stream_sentiment.admin.server import AdminServer
    from stream_sentiment.views.queries import AnalystQueries
    from stream_sentiment.views.web import AlertPage, page_settings
    from stream_sentiment.worker import Worker

    tune_interpreter()
    metrics = PipelineMetrics()
    server = metrics.serve(settings.metrics_port, settings.admin.host) if settings.metrics_port is not None else None
    redis = async_redis_client(settings)
    try:
        # A password or certificate Redis refuses fails now, before the engine loads, not after the outage limit.
        await check_redis(redis, settings.redis_url)
        # Unknown route targets are refused before any engine loads.
        plan = plan_routes(settings)
        version, engine = open_engine(settings)
        loop = asyncio.get_running_loop()
        await loop.run_in_executor(None, engine.activate)
        serving = [engine]
        try:
            await loop.run_in_executor(None, engine.warm_up)
            routes = await open_routes(settings, plan, serving) if plan.routed else None
            worker = Worker(settings, engine, PostTokenizer(version), routes=routes, metrics=metrics)
            manager: EngineManager | RoutedEngineManager = (
                RoutedEngineManager(settings, worker, open_engine, redis) if worker.plan is not None
                else EngineManager(settings, worker, open_engine, redis))
            queries = AnalystQueries(redis, RedisKeys(settings.redis_prefix), settings.aggregation.bucket_seconds)
            views = AlertPage(queries, page_settings(settings))
            settle_heap()  # all of the above lives as long as the process: out of the collector's way
            async with AdminServer(settings.admin, manager, metrics, views):
                try:
                    await worker.run(stop)
                finally:
                    serving.append(worker.engine)  # a hot swap may have replaced the first engine
                    serving += [scheduler.engine for scheduler in worker.routes.values()]
                    await manager.close()
        finally:
            for active in serving:
                active.deactivate()  # idempotent
    finally:
        await redis.aclose()
        if server is not None:
            server.close()


async def serve(settings: Settings) -> None:
    """Run one worker until SIGINT/SIGTERM, then drain, apply and commit."""
    stop = asyncio.Event()
    stop_on_signals(stop)
    await run_worker(settings, stop)


def serve_engines(settings: Settings, *, preload: bool = True) -> None:
    """Run the host's engine server until SIGINT/SIGTERM (``stream-sentiment engine-server``).

    With ``preload`` the configured version (``engine.version``, ``batching.buckets``, ``batching.max_rows``),
    and each ``engine.routes`` model's, is loaded and warmed before the socket is created, so the first worker
    does not wait and a socket that accepts means warm engines (compose's healthcheck relies on that).
    """
    import threading

    from stream_sentiment.engines.server import EngineServer

    tune_interpreter()
    stop = threading.Event()
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, lambda *_: stop.set())
    server = EngineServer(settings, open_engine)
    try:
        if preload:
            server.preload()
        settle_heap()
        server.start()
        print(f"engine server ready on {server.socket_path}: {server.hosted()}", flush=True)
        stop.wait()
    finally:
        server.close()


def read_stats(settings: Settings) -> dict[str, Any]:
    """Totals from Redis: what ``stream-sentiment stats --json`` prints."""
    keys = RedisKeys(settings.redis_prefix)
    client = redis_client(settings, decode_responses=True, socket_timeout=5)
    try:
        totals = client.hgetall(keys.totals)
        reasons = client.hgetall(keys.dead_letters)
        marks = client.hgetall(keys.offsets(settings.topic))
        regressions = client.hgetall(keys.offset_regressions(settings.topic))
    finally:
        client.close()
    return {
        "topic": settings.topic,
        "scored": int(totals.get("scored", 0)),
        "by_label": {label: int(totals.get(label, 0)) for label in LABELS},
        "late": int(totals.get("late", 0)),
        "dead_lettered": int(totals.get("dead_lettered", 0)),
        "dead_lettered_by_reason": {reason: int(n) for reason, n in sorted(reasons.items())},
        "applied_offsets": {str(p): int(m) for p, m in sorted(marks.items(), key=lambda kv: int(kv[0]))},
        # Partitions whose log was found to restart below the applied mark, and how often (recovery settings).
        "offset_regressions": {str(p): int(n) for p, n in sorted(regressions.items(), key=lambda kv: int(kv[0]))},
    }
