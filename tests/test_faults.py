"""Faults outside the worker, ridden out or reported loudly, never silent: a Redis outage under load, a Redis
that lost its data, a broker whose log restarted below the marks."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import redis as redis_lib
from aiokafka import AIOKafkaProducer

from stream_sentiment.batching.tokenizer import PostTokenizer
from stream_sentiment.config import Settings
from stream_sentiment.embedded import EmbeddedKafka, EmbeddedRedis
from stream_sentiment.engines.onnxruntime_backend import OnnxRuntimeEngine
from stream_sentiment.metrics import PipelineMetrics
from stream_sentiment.service import read_stats
from stream_sentiment.worker import Worker
from tests.pipeline import produce_posts
from tests.services import FAST_GROUP_CONFIG

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture
def engine(engine_version):
    with OnnxRuntimeEngine(engine_version, streams=1, threads_per_stream=1) as active:
        yield active


async def _send(bootstrap: str, topic: str, posts: range, prefix: str = "p") -> None:
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap)
    await producer.start()
    try:
        for i in posts:
            await producer.send(topic, json.dumps({"id": f"{prefix}{i}", "text": f"post {i} is fine"}).encode(),
                                key=str(i).encode())
        await producer.flush()
    finally:
        await producer.stop()


async def _until(predicate, within: float, task: asyncio.Task, what: str) -> None:
    async with asyncio.timeout(within):
        while not predicate():
            if task.done():
                task.result()
                raise AssertionError(f"the worker stopped before {what}")
            await asyncio.sleep(0.2)


def test_a_60_second_redis_outage_under_load_pauses_the_worker_and_loses_nothing(
    kafka, topic_factory, engine, engine_version
):
    topic = topic_factory(partitions=2)
    kafka.create_topic(f"{topic}.dlq", 1)
    with EmbeddedRedis(persistent=True) as redis_server:
        settings = Settings.load(bootstrap_servers=kafka.bootstrap_servers, topic=topic, consumer_group=f"g-{topic}",
                                 redis_url=redis_server.url, redis_prefix="outage")
        metrics = PipelineMetrics()
        worker = Worker(settings, engine, PostTokenizer(engine_version), metrics=metrics)
        client = redis_lib.Redis.from_url(redis_server.url, decode_responses=True)

        def scored() -> int:
            try:
                return int(client.hget("outage:totals", "scored") or 0)
            except redis_lib.RedisError:
                return -1

        async def scenario() -> dict:
            stop = asyncio.Event()
            task = asyncio.create_task(worker.run(stop, consumer_options=FAST_GROUP_CONFIG))
            try:
                await _send(kafka.bootstrap_servers, topic, range(300))
                await _until(lambda: scored() >= 100, 60, task, "it scored")
                redis_server.halt()
                # Under load: posts keep arriving all through the outage.
                sending = asyncio.create_task(_send_slowly(kafka.bootstrap_servers, topic, range(300, 900), 55))
                await asyncio.sleep(5)
                during = {"ready": worker.readiness()["redis_up"], "down": metrics.value("stream_sentiment_redis_down"),
                          "alive": not task.done()}
                await asyncio.sleep(55)
                during["alive_at_60s"] = not task.done()
                redis_server.resume()
                await sending
                await _until(lambda: scored() >= 900, 90, task, "it caught up")
                await asyncio.sleep(1.5)  # anything counted twice would show now
                return {**during, "scored": scored(), "outages": metrics.value("stream_sentiment_redis_outages_total"),
                        "down_after": metrics.value("stream_sentiment_redis_down")}
            finally:
                stop.set()
                await asyncio.wait_for(task, 30)

        result = asyncio.run(scenario())
        marks = {int(p): int(m) for p, m in client.hgetall(f"outage:offsets:{topic}").items()}
        client.close()
    assert result["alive"] and result["alive_at_60s"]
    assert result["ready"] is False and result["down"] == 1  # readiness and the gauge said so meanwhile
    assert result["scored"] == 900  # nothing lost, nothing doubled
    assert sum(marks.values()) == 900
    assert result["outages"] == 1 and result["down_after"] == 0


async def _send_slowly(bootstrap: str, topic: str, posts: range, seconds: float) -> None:
    chunk = max(1, len(posts) // int(seconds))
    for start in range(posts.start, posts.stop, chunk):
        await _send(bootstrap, topic, range(start, min(start + chunk, posts.stop)))
        await asyncio.sleep(1)


def _run_worker(env: dict[str, str], log: Path) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "stream_sentiment.cli", "run"], cwd=REPO, env=env,
                            stdout=log.open("ab"), stderr=subprocess.STDOUT)


def _stats(settings: Settings) -> dict:
    try:
        return read_stats(settings)
    except redis_lib.RedisError:
        return {"scored": -1, "dead_lettered": -1}


def _wait(predicate, within: float, what: str, log: Path, process: subprocess.Popen | None = None) -> None:
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        if predicate():
            return
        if process is not None and process.poll() is not None:
            raise AssertionError(f"the worker exited ({process.returncode}) before {what}:\n{log.read_text()[-3000:]}")
        time.sleep(0.3)
    raise AssertionError(f"timed out waiting for {what}:\n{log.read_text()[-3000:]}")


def test_a_redis_restarted_empty_is_refused_with_exit_code_4_and_rebuilt_on_request(kafka, topic_factory, tmp_path):
    topic = topic_factory(partitions=2)
    kafka.create_topic(f"{topic}.dlq", 1)
    produced = asyncio.run(produce_posts(kafka.bootstrap_servers, topic, 200, 3, seed=41))
    log = tmp_path / "worker.log"
    with EmbeddedRedis() as redis_server:  # no persistence: a restart loses everything
        env = {
            **os.environ, "STREAM_SENTIMENT_BOOTSTRAP_SERVERS": kafka.bootstrap_servers,
            "STREAM_SENTIMENT_TOPIC": topic, "STREAM_SENTIMENT_CONSUMER_GROUP": f"g-{topic}",
            "STREAM_SENTIMENT_REDIS_URL": redis_server.url, "STREAM_SENTIMENT_REDIS_PREFIX": "lost",
            "STREAM_SENTIMENT_KAFKA_SESSION_TIMEOUT_MS": "2000", "STREAM_SENTIMENT_KAFKA_HEARTBEAT_INTERVAL_MS": "500",
            "STREAM_SENTIMENT_ADMIN__PORT": "0",
        }
        settings = Settings.load(bootstrap_servers=kafka.bootstrap_servers, topic=topic, redis_url=redis_server.url,
                                 redis_prefix="lost")
        worker = _run_worker(env, log)
        try:
            _wait(lambda: _stats(settings)["scored"] + _stats(settings)["dead_lettered"] == produced, 120,
                  "the first count", log, worker)
            time.sleep(1.5)  # the commit interval: Kafka now holds the group's offsets
            before = _stats(settings)
            redis_server.halt()
            redis_server.resume()  # empty
            asyncio.run(_send(kafka.bootstrap_servers, topic, range(20), prefix="after"))
            assert worker.wait(60) == 4, log.read_text()[-3000:]
        finally:
            if worker.poll() is None:
                worker.kill()
        output = log.read_text()
        assert "Redis lost the counts this group wrote" in output and "on_redis_loss" in output
        assert _stats(settings)["scored"] == 0  # nothing was counted on top of the empty Redis

        # Restarting the same way refuses again, at assignment this time.
        again = _run_worker(env, log)
        assert again.wait(60) == 4, log.read_text()[-3000:]

        rebuild = _run_worker({**env, "STREAM_SENTIMENT_RECOVERY__ON_REDIS_LOSS": "rebuild"}, log)
        try:
            _wait(lambda: _stats(settings)["scored"] + _stats(settings)["dead_lettered"] == produced + 20, 120,
                  "the rebuild", log, rebuild)
            time.sleep(1.0)
            rebuilt = _stats(settings)
        finally:
            rebuild.terminate()
            rebuild.wait(30)
    assert rebuilt["scored"] == before["scored"] + 20  # the retained log counted again, exactly once
    assert rebuilt["dead_lettered_by_reason"] == before["dead_lettered_by_reason"]
    assert rebuilt["by_label"]["negative"] >= before["by_label"]["negative"]


@pytest.mark.parametrize("policy", ["stop", "rebase"])
def test_a_broker_restarted_empty_is_reported_and_never_skipped_silently(
    redis_server, redis_factory, engine, engine_version, policy
):
    with EmbeddedKafka() as broker:
        topic = f"regress-{policy}"
        broker.create_topic(topic, 1)
        broker.create_topic(f"{topic}.dlq", 1)
        settings = Settings.load(
            bootstrap_servers=broker.bootstrap_servers, topic=topic, consumer_group=f"g-{topic}",
            redis_url=redis_server.url, redis_prefix=f"regress-{policy}",
            recovery={"on_offset_regression": policy},
        )
        metrics = PipelineMetrics()
        worker = Worker(settings, engine, PostTokenizer(engine_version), metrics=metrics)

        async def scenario() -> None:
            stop = asyncio.Event()
            task = asyncio.create_task(worker.run(stop, consumer_options=FAST_GROUP_CONFIG))
            try:
                await _send(broker.bootstrap_servers, topic, range(30))
                await _until(lambda: worker.scored >= 30, 60, task, "it scored")
                await asyncio.to_thread(broker.halt)
                await asyncio.to_thread(broker.resume)  # Tansu keeps nothing: an empty log
                await asyncio.to_thread(broker.create_topic, topic, 1)
                await asyncio.to_thread(broker.create_topic, f"{topic}.dlq", 1)
                await _send(broker.bootstrap_servers, topic, range(5), prefix="new")
                await _until(lambda: metrics.value("stream_sentiment_offset_regressions_total") >= 1, 90, task,
                             "the regression was seen")
                if policy == "rebase":
                    await _until(lambda: worker.scored >= 35, 60, task, "the new log was counted")
                else:
                    await asyncio.sleep(3)
            finally:
                stop.set()
                await asyncio.wait_for(task, 30)

        asyncio.run(scenario())
        stats = read_stats(settings)
    assert stats["offset_regressions"] == {"0": 1}
    if policy == "stop":
        assert stats["scored"] == 30 and worker.source.regressed == {0}  # not consumed, and said so
        assert stats["applied_offsets"] == {"0": 30}
    else:
        assert stats["scored"] == 35 and stats["applied_offsets"] == {"0": 5}

