"""Process-level wiring: open the configured engine, run a worker until a signal, read stats."""

from __future__ import annotations

import asyncio
import signal
from typing import Any

from stream_sentiment.aggregation.buckets import LABELS, RedisKeys
from stream_sentiment.batching.tokenizer import PostTokenizer
from stream_sentiment.config import Settings
from stream_sentiment.engines.base import BackendUnavailableError, Engine
from stream_sentiment.engines.manifest import EngineRepository, EngineVersion


def open_engine(settings: Settings) -> tuple[EngineVersion, Engine]:
    """The configured engine version (checksums verified) and its backend, not yet activated."""
    engine_settings = settings.engine
    version = EngineRepository(engine_settings.repository, engine_settings.model).load(engine_settings.version)
    if engine_settings.backend != "onnxruntime":
        raise BackendUnavailableError(
            f"backend {engine_settings.backend!r} is not available in this build; use onnxruntime"
        )
    from stream_sentiment.engines.onnxruntime_backend import OnnxRuntimeEngine

    engine = OnnxRuntimeEngine(version, engine_settings.streams, engine_settings.threads_per_stream)
    return version, engine


def stop_on_signals(stop: asyncio.Event) -> None:
    """SIGINT and SIGTERM set ``stop``, so the worker drains, applies and commits before exiting."""
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, stop.set)


async def run_worker(settings: Settings, stop: asyncio.Event) -> None:
    """Open and warm the configured engine, run one worker until ``stop`` is set, release the engine."""
    from stream_sentiment.worker import Worker

    version, engine = open_engine(settings)
    with engine:
        engine.warm_up()
        await Worker(settings, engine, PostTokenizer(version)).run(stop)


async def serve(settings: Settings) -> None:
    """Run one worker until SIGINT/SIGTERM, then drain, apply and commit."""
    stop = asyncio.Event()
    stop_on_signals(stop)
    await run_worker(settings, stop)


def read_stats(settings: Settings) -> dict[str, Any]:
    """Totals from Redis: what ``stream-sentiment stats --json`` prints."""
    from redis import Redis

    keys = RedisKeys(settings.redis_prefix)
    client = Redis.from_url(settings.redis_url, decode_responses=True, socket_timeout=5)
    try:
        totals = client.hgetall(keys.totals)
        reasons = client.hgetall(keys.dead_letters)
        marks = client.hgetall(keys.offsets(settings.topic))
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
    }
