"""Helpers for tests that run workers against the suite's broker and Redis."""

from __future__ import annotations

import asyncio
import json
import random
from pathlib import Path

from aiokafka import AIOKafkaProducer
from redis import Redis

from stream_sentiment.config import Settings
from stream_sentiment.worker import Worker
from tests.services import FAST_GROUP_CONFIG

MALFORMED = [b"\xff", b"{", b"[]", b'{"id": "x"}', b'{"id": "x", "text": "  "}', b'{"id": 1, "text": "a"}']


def pipeline_settings(
    kafka, topic_factory, redis_server, prefix: str, partitions: int, **overrides
) -> tuple[str, Settings]:
    """A fresh topic with its dead-letter topic, and settings pointing a worker group at it."""
    topic = topic_factory(partitions=partitions)
    kafka.create_topic(f"{topic}.dlq", 1)
    settings = Settings.load(
        bootstrap_servers=kafka.bootstrap_servers, topic=topic, consumer_group=f"g-{topic}",
        redis_url=redis_server.url, redis_prefix=prefix, **overrides,
    )
    return topic, settings


async def produce_posts(bootstrap: str, topic: str, valid: int, malformed_rounds: int, seed: int) -> int:
    rng = random.Random(seed)
    values = [json.dumps({"id": f"p{seed}-{i}", "text": f"post number {i} {'awful' if i % 3 else 'lovely'}",
                          "topic": rng.choice(["a", "b"])}).encode() for i in range(valid)]
    values += MALFORMED * malformed_rounds
    rng.shuffle(values)
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap)
    await producer.start()
    try:
        for index, value in enumerate(values):
            await producer.send(topic, value=value, key=str(index).encode())
        await producer.flush()
    finally:
        await producer.stop()
    return len(values)


async def run_until(worker: Worker, redis: Redis, prefix: str, scored: int, dead: int, within: float) -> None:
    stop = asyncio.Event()
    task = asyncio.create_task(worker.run(stop, consumer_options=FAST_GROUP_CONFIG))
    try:
        async with asyncio.timeout(within):
            while True:
                totals = redis.hgetall(f"{prefix}:totals")
                if int(totals.get("scored", 0)) >= scored and int(totals.get("dead_lettered", 0)) >= dead:
                    break
                if task.done():
                    task.result()
                await asyncio.sleep(0.2)
    finally:
        stop.set()
        await asyncio.wait_for(task, 30)


SAMPLES_ZH = Path(__file__).resolve().parents[1] / "stream_sentiment" / "source" / "samples_zh.jsonl"
ENGLISH = ["the flight was delayed again and nobody told us anything", "lovely crew, smooth landing, thank you",
           "my parcel arrived two days early, great service", "worst customer support I have dealt with"]


def mixed_language_posts(chinese: int, english: int) -> list[dict[str, object]]:
    """Chinese sample posts (half tagged `zh-CN`, half known by their script, repeated past the samples' count)
    between English ones (a third tagged `en`)."""
    zh = [json.loads(line)["text"] for line in SAMPLES_ZH.read_text(encoding="utf-8").splitlines()]
    documents: list[dict[str, object]] = []
    for index in range(max(chinese, english)):
        if index < english:
            documents.append({"id": f"en{index}", "text": f"{ENGLISH[index % len(ENGLISH)]} #{index}",
                              "ts": 1_700_000_000 + index, **({"lang": "en"} if index % 3 == 0 else {})})
        if index < chinese:
            documents.append({"id": f"zh{index}", "text": zh[index % len(zh)], "ts": 1_700_000_000 + index,
                              **({"lang": "zh-CN"} if index % 2 else {})})
    return documents


async def produce_documents(bootstrap: str, topic: str, documents: list[dict[str, object]]) -> None:
    """Each document as a JSON record, keyed by its position (spread over the partitions)."""
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap)
    await producer.start()
    try:
        for index, document in enumerate(documents):
            await producer.send(topic, value=json.dumps(document, ensure_ascii=False).encode(),
                                key=str(index).encode())
        await producer.flush()
    finally:
        await producer.stop()


def lang_counts(redis: Redis, prefix: str) -> dict[str, int]:
    """Posts counted per `lang` in Redis (every bucket of the lang dimension)."""
    counts: dict[str, int] = {}
    for key in redis.scan_iter(f"{prefix}:agg:lang:*"):
        language = key.split(":")[3]
        counts[language] = counts.get(language, 0) + int(redis.hget(key, "posts") or 0)
    return counts
