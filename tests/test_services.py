"""The embedded Tansu broker and valkey server are real, usable, and leave nothing behind."""

from __future__ import annotations

import asyncio
import os
import socket
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import redis
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition

from stream_sentiment import embedded
from stream_sentiment.embedded import EmbeddedKafka, EmbeddedRedis, pid_alive, port_is_free
from tests.services import FAST_GROUP_CONFIG

# Harmless once the top-level conftest loads the plugin too: pytest registers a module once.

TIMEOUT = 60.0  # outer bound for each async scenario


def _run(coro: Any) -> Any:
    return asyncio.run(asyncio.wait_for(coro, TIMEOUT))


def _processes_on(port: int) -> list[int]:
    """Pids whose command line names 127.0.0.1:port (tansu's listener URL, valkey's process title)."""
    needle = f"127.0.0.1:{port}".encode()
    pids = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if needle in (entry / "cmdline").read_bytes():
                    pids.append(int(entry.name))
            except OSError:
                continue
    return pids


@pytest.fixture
def squatted_port() -> Iterator[int]:
    """A port that some other process already listens on."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen()
        yield sock.getsockname()[1]


async def _consume(consumer: AIOKafkaConsumer, expected: int, idle_polls: int = 0) -> list[Any]:
    """Fetch until `expected` records arrived, then `idle_polls` more polls to catch extras."""
    records: list[Any] = []
    while len(records) < expected:
        for batch in (await consumer.getmany(timeout_ms=500)).values():
            records.extend(batch)
    for _ in range(idle_polls):
        for batch in (await consumer.getmany(timeout_ms=300)).values():
            records.extend(batch)
    return records


def test_kafka_keyed_messages_round_trip_through_a_consumer_group(
    kafka: EmbeddedKafka, topic_factory: Callable[..., str]
) -> None:
    topic = topic_factory(partitions=3)
    group = f"group-{topic}"

    def consumer() -> AIOKafkaConsumer:
        return AIOKafkaConsumer(
            topic, bootstrap_servers=kafka.bootstrap_servers, group_id=group, enable_auto_commit=False,
            auto_offset_reset="earliest", **FAST_GROUP_CONFIG,
        )

    async def scenario() -> None:
        producer = AIOKafkaProducer(bootstrap_servers=kafka.bootstrap_servers, acks=1, enable_idempotence=False)
        await producer.start()
        try:
            assert await producer.partitions_for(topic) == {0, 1, 2}
            sent = [
                await producer.send(topic, key=f"user-{i % 10}".encode(), value=f"message-{i}".encode())
                for i in range(100)
            ]
            produced = [await future for future in sent]
        finally:
            await producer.stop()
        partition_of = {f"message-{i}": meta.partition for i, meta in enumerate(produced)}
        key_partitions: dict[str, set[int]] = {}
        for i, meta in enumerate(produced):
            key_partitions.setdefault(f"user-{i % 10}", set()).add(meta.partition)
        assert all(len(parts) == 1 for parts in key_partitions.values())  # a key always lands on one partition
        assert len({meta.partition for meta in produced}) > 1

        first = consumer()
        await first.start()
        try:
            records = await _consume(first, 100)
            await first.commit()
            committed = {p: await first.committed(TopicPartition(topic, p)) for p in range(3)}
        finally:
            await first.stop()
        assert sorted(r.value.decode() for r in records) == sorted(partition_of)
        assert all(partition_of[r.value.decode()] == r.partition for r in records)
        for p in range(3):
            in_partition = [r for r in records if r.partition == p]
            assert [r.offset for r in in_partition] == list(range(len(in_partition)))  # in order, no gaps
            assert committed[p] == len(in_partition)

        # The group resumes from its committed offsets: only new messages, nothing re-delivered.
        producer = AIOKafkaProducer(bootstrap_servers=kafka.bootstrap_servers, acks=1, enable_idempotence=False)
        await producer.start()
        try:
            for i in range(5):
                await producer.send_and_wait(topic, key=f"late-{i}".encode(), value=f"late-{i}".encode())
        finally:
            await producer.stop()
        second = consumer()
        await second.start()
        try:
            late = await _consume(second, 5, idle_polls=2)
        finally:
            await second.stop()
        assert sorted(r.value.decode() for r in late) == [f"late-{i}" for i in range(5)]

    _run(scenario())


def test_redis_commands_and_transactions(redis_factory: Callable[..., Any]) -> None:
    client: redis.Redis = redis_factory()
    assert client.dbsize() == 0  # the factory starts every test from an empty server
    client.set("greeting", "hello", ex=60)
    assert client.get("greeting") == "hello"

    with client.pipeline(transaction=True) as pipe:  # MULTI ... EXEC
        pipe.incr("counter").incrby("counter", 41).rpush("log", "a", "b").lrange("log", 0, -1)
        assert pipe.execute() == [1, 42, 2, ["a", "b"]]

    # WATCH makes EXEC fail when another client changed the key in between: real server semantics.
    other = redis_factory()
    with client.pipeline(transaction=True) as pipe:
        pipe.watch("counter")
        other.set("counter", 0)
        pipe.multi()
        pipe.set("counter", 100)
        with pytest.raises(redis.WatchError):
            pipe.execute()
    assert client.get("counter") == "0"

    async def scenario() -> None:
        aclient = redis_factory(async_client=True)
        try:
            await aclient.set("async-key", "value")
            async with aclient.pipeline(transaction=True) as pipe:
                results = await pipe.get("async-key").delete("async-key").exists("async-key").execute()
            assert results == ["value", 1, 0]
        finally:
            await aclient.aclose()

    _run(scenario())


def test_topic_factory_names_are_unique(kafka: EmbeddedKafka, topic_factory: Callable[..., str]) -> None:
    names = {topic_factory(prefix="unique") for _ in range(3)}
    assert len(names) == 3
    with pytest.raises(RuntimeError, match="could not create topic"):
        kafka.create_topic(names.pop())  # Tansu rejects a second create: the names really are new topics


def test_stop_leaves_no_process_and_frees_the_ports() -> None:
    with EmbeddedKafka() as kafka, EmbeddedRedis() as server:
        kafka.create_topic("lifecycle", partitions=2)
        client = redis.Redis.from_url(server.url, socket_timeout=5)
        assert client.ping()
        client.close()
        started = {kafka.pid: kafka.port, server.pid: server.port}
        workdirs = [kafka.workdir, server.workdir]
        assert all(pid_alive(pid) and _processes_on(port) == [pid] for pid, port in started.items())
        assert not any(port_is_free(port) for port in started.values())

    for pid, port in started.items():
        assert not pid_alive(pid)
        with pytest.raises(ProcessLookupError):
            os.killpg(pid, 0)  # nothing left in the process group either
        assert port_is_free(port)
        assert _processes_on(port) == []
    assert not any(path.exists() for path in workdirs)
    assert not kafka.running and not server.running
    kafka.stop()  # idempotent
    server.stop()


@pytest.mark.parametrize("service", [EmbeddedKafka, EmbeddedRedis])
def test_a_taken_port_fails_with_the_server_output(
    service: type[EmbeddedKafka | EmbeddedRedis], squatted_port: int
) -> None:
    instance = service(port=squatted_port, startup_timeout=10)
    with pytest.raises(RuntimeError, match=r"(?i)addr.*in.?use"):
        instance.start()
    assert not instance.running
    assert _processes_on(squatted_port) == []


def test_start_retries_on_a_fresh_port_when_the_picked_one_was_taken(
    squatted_port: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Simulates losing the race between free_port() and the server's own bind.
    ports = iter([squatted_port, embedded.free_port()])
    monkeypatch.setattr(embedded, "free_port", lambda: next(ports))
    with EmbeddedKafka() as kafka:
        assert kafka.port != squatted_port
        kafka.create_topic("after-retry")
    assert _processes_on(squatted_port) == []


def test_atexit_stops_servers_the_program_forgot_to_stop() -> None:
    script = (
        "from stream_sentiment.embedded import EmbeddedKafka, EmbeddedRedis\n"
        "k, r = EmbeddedKafka().start(), EmbeddedRedis().start()\n"
        "print(k.pid, k.port, r.pid, r.port)\n"
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60, check=True)
    kafka_pid, kafka_port, redis_pid, redis_port = map(int, result.stdout.split())
    assert not pid_alive(kafka_pid) and not pid_alive(redis_pid)
    assert port_is_free(kafka_port) and port_is_free(redis_port)
