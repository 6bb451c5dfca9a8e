"""Pytest plugin: real Kafka-protocol (Tansu) and Redis-compatible (valkey) servers for tests.

Load it from the top-level conftest with ``pytest_plugins = ["tests.services"]``.

Fixtures:

* ``kafka`` (module): a running :class:`EmbeddedKafka`; use ``kafka.bootstrap_servers``. One broker
  per test module: Tansu keeps everything in memory and gets slower as it holds more topics and
  records, so a late module in a long session would otherwise inherit every earlier module's load.
* ``redis_server`` (session): a running :class:`EmbeddedRedis`; use ``redis_server.url``.
* ``topic_factory``: ``topic_factory(partitions=1, prefix="test") -> str`` creates a topic with a
  unique name on ``kafka``. Topics are never deleted: names are unique and storage is in memory.
* ``redis_factory``: the server is flushed (FLUSHALL) once when a test requests this fixture, so
  every test starts from an empty server, whatever code under test names its keys.
  ``redis_factory()`` returns a sync ``redis.Redis`` that is closed after the test;
  ``redis_factory(async_client=True)`` returns a ``redis.asyncio.Redis``, which binds to the
  event loop of its first command, so the test creates, uses and ``await client.aclose()``-s it
  inside one ``asyncio.run``. Extra keyword arguments go to ``from_url``.

Tansu consumer groups rebalance on the session timeout, so tests pass :data:`FAST_GROUP_CONFIG`
to ``AIOKafkaConsumer`` to keep joins and leaves to about a second.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import redis
import redis.asyncio

from stream_sentiment.embedded import EmbeddedKafka, EmbeddedRedis

FAST_GROUP_CONFIG: dict[str, int] = {"session_timeout_ms": 2000, "heartbeat_interval_ms": 500}


@pytest.fixture(scope="module")
def kafka() -> Iterator[EmbeddedKafka]:
    """A fresh Tansu broker for each test module (~60 ms to start), on a free loopback port."""
    with EmbeddedKafka() as broker:
        yield broker


@pytest.fixture(scope="session")
def redis_server() -> Iterator[EmbeddedRedis]:
    """One valkey-server for the whole session, on a free loopback port."""
    with EmbeddedRedis() as server:
        yield server


@pytest.fixture
def topic_factory(kafka: EmbeddedKafka) -> Callable[..., str]:
    """Create a uniquely named topic: ``topic_factory(partitions=1, prefix="test") -> name``."""

    def make(partitions: int = 1, prefix: str = "test") -> str:
        name = f"{prefix}-{uuid.uuid4().hex[:12]}"
        kafka.create_topic(name, partitions)
        return name

    return make


@pytest.fixture
def redis_factory(redis_server: EmbeddedRedis) -> Iterator[Callable[..., Any]]:
    """Flush the server, then hand out clients: ``redis_factory(async_client=False, **from_url_kwargs)``."""
    admin = redis.Redis.from_url(redis_server.url, socket_timeout=5)
    admin.flushall()
    sync_clients: list[redis.Redis] = [admin]

    def make(async_client: bool = False, **kwargs: Any) -> redis.Redis | redis.asyncio.Redis:
        kwargs = {"decode_responses": True, "socket_timeout": 5, **kwargs}
        if async_client:
            return redis.asyncio.Redis.from_url(redis_server.url, **kwargs)
        client = redis.Redis.from_url(redis_server.url, **kwargs)
        sync_clients.append(client)
        return client

    yield make
    for client in sync_clients:
        client.close()


async def consume_records(bootstrap: str, topic: str, count: int, group: str) -> list[Any]:
    """Read ``count`` records of ``topic`` from the start, in a fresh consumer group, within 30 s."""
    from aiokafka import AIOKafkaConsumer

    consumer = AIOKafkaConsumer(
        topic, bootstrap_servers=bootstrap, group_id=group, auto_offset_reset="earliest",
        enable_auto_commit=False, **FAST_GROUP_CONFIG,
    )
    await consumer.start()
    records: list[Any] = []
    try:
        async with asyncio.timeout(30):
            while len(records) < count:
                for batch in (await consumer.getmany(timeout_ms=500)).values():
                    records.extend(batch)
    finally:
        await consumer.stop()
    return records
