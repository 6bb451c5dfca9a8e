"""``kafka_fetch_min_bytes``: the broker (real Tansu) holds a fetch until that much data or the max wait, so posts
trickling in come in fewer, larger fetches; by default each fetch takes what is there at once. Either way every
post is counted once (real Redis)."""

from __future__ import annotations

import asyncio
import json

import pytest
import redis as redis_lib
from aiokafka import AIOKafkaProducer

from stream_sentiment.batching.tokenizer import PostTokenizer
from stream_sentiment.config import Settings
from stream_sentiment.engines.onnxruntime_backend import OnnxRuntimeEngine
from stream_sentiment.metrics import PipelineMetrics
from stream_sentiment.worker import Worker
from tests.services import FAST_GROUP_CONFIG

POSTS = 12
GAP_S = 0.04  # between two posts: 12 posts over ~0.5 s
# How long the broker may hold a fetch. Tansu holds even a 1-byte fetch about half of it (Kafka answers at once),
# so the contrast below is 2:1 rather than 12:5.
MAX_WAIT_MS = 100


@pytest.fixture(scope="module")
def engine(engine_version):
    with OnnxRuntimeEngine(engine_version, streams=1, threads_per_stream=1) as active:
        yield active


def _fetch_sizes(kafka, topic_factory, redis_server, engine, engine_version, **fetch: int) -> tuple[list[int], int]:
    """Posts produced one at a time, GAP_S apart, to a running worker: the sizes of its non-empty fetches, and
    what Redis counted."""
    topic = topic_factory(partitions=1)
    kafka.create_topic(f"{topic}.dlq", 1)
    prefix = f"minbytes-{topic}"
    settings = Settings.load(bootstrap_servers=kafka.bootstrap_servers, topic=topic, consumer_group=f"g-{topic}",
                             redis_url=redis_server.url, redis_prefix=prefix, kafka_fetch_max_wait_ms=MAX_WAIT_MS,
                             **fetch)
    worker = Worker(settings, engine, PostTokenizer(engine_version), metrics=PipelineMetrics())
    sizes: list[int] = []

    async def scenario() -> None:
        stop = asyncio.Event()
        task = asyncio.create_task(worker.run(stop, consumer_options=FAST_GROUP_CONFIG))
        try:
            async with asyncio.timeout(30):
                while not worker.progress:  # the group has formed and the partition is this worker's
                    assert not task.done(), task.result()
                    await asyncio.sleep(0.05)
            consumer = worker.source.consumer
            getmany = consumer.getmany

            async def recorded(*args, **kwargs):  # the real fetch, its size noted
                batches = await getmany(*args, **kwargs)
                if batches:
                    sizes.append(sum(len(records) for records in batches.values()))
                return batches

            consumer.getmany = recorded
            await asyncio.sleep(3 * MAX_WAIT_MS / 1000)  # a fetch already waiting ends before the first post
            producer = AIOKafkaProducer(bootstrap_servers=kafka.bootstrap_servers, linger_ms=0)
            await producer.start()
            try:
                # On a fixed schedule, so a slow broker answer does not stretch the trickle (and add fetches).
                started = asyncio.get_running_loop().time()
                for i in range(POSTS):
                    await asyncio.sleep(max(0.0, started + i * GAP_S - asyncio.get_running_loop().time()))
                    await producer.send_and_wait(topic, json.dumps({"id": f"p{i}", "text": f"post {i}"}).encode())
            finally:
                await producer.stop()
            async with asyncio.timeout(30):
                while worker.scored < POSTS:
                    assert not task.done(), task.result()
                    await asyncio.sleep(0.05)
        finally:
            stop.set()
            await asyncio.wait_for(task, 30)

    asyncio.run(scenario())
    client = redis_lib.Redis.from_url(redis_server.url, decode_responses=True)
    counted = int(client.hget(f"{prefix}:totals", "scored") or 0)
    client.close()
    return sizes, counted


def test_a_minimum_fetch_size_gathers_trickling_posts_into_fewer_fetches(
    kafka, topic_factory, redis_server, engine, engine_version
):
    assert Settings.load().kafka_fetch_min_bytes == 1  # Kafka's default: answer as soon as anything is there
    at_once, counted_at_once = _fetch_sizes(kafka, topic_factory, redis_server, engine, engine_version)
    gathered, counted_gathered = _fetch_sizes(kafka, topic_factory, redis_server, engine, engine_version,
                                              kafka_fetch_min_bytes=1_000_000)
    assert counted_at_once == counted_gathered == POSTS
    assert sum(at_once) == sum(gathered) == POSTS
    # Held the full 100 ms, a fetch takes two or three of the posts produced 40 ms apart; answered sooner, most
    # come alone (measured: 5 fetches against 10).
    assert len(gathered) <= POSTS // 2, gathered
    assert 1.5 * len(gathered) <= len(at_once), (at_once, gathered)
