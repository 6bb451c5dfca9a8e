"""`stream-sentiment run` as a real process: SIGKILLed mid-stream and restarted, still exactly once."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from tests.pipeline import produce_posts

REPO = Path(__file__).resolve().parents[1]


def _worker(env: dict[str, str], log: Path) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "stream_sentiment.cli", "run"], cwd=REPO, env=env,
        stdout=log.open("ab"), stderr=subprocess.STDOUT,
    )


def _stats(env: dict[str, str]) -> dict:
    out = subprocess.run(
        [sys.executable, "-m", "stream_sentiment.cli", "stats", "--json"],
        cwd=REPO, env=env, capture_output=True, text=True, check=True,
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


def _wait_for(env: dict[str, str], predicate, within: float, process: subprocess.Popen, log: Path) -> dict:
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        stats = _stats(env)
        if predicate(stats):
            return stats
        assert process.poll() is None, f"worker exited early:\n{log.read_text()[-3000:]}"
        time.sleep(0.3)
    raise AssertionError(f"timed out; last stats {stats}\n{log.read_text()[-3000:]}")


def test_sigkill_mid_stream_and_restart_still_counts_exactly_once(kafka, topic_factory, redis_server, tmp_path):
    topic = topic_factory(partitions=3)
    kafka.create_topic(f"{topic}.dlq", 1)
    env = {
        **os.environ,
        "STREAM_SENTIMENT_BOOTSTRAP_SERVERS": kafka.bootstrap_servers,
        "STREAM_SENTIMENT_TOPIC": topic,
        "STREAM_SENTIMENT_CONSUMER_GROUP": f"g-{topic}",
        "STREAM_SENTIMENT_REDIS_URL": redis_server.url,
        "STREAM_SENTIMENT_REDIS_PREFIX": f"kill-{topic}",
        "STREAM_SENTIMENT_KAFKA_SESSION_TIMEOUT_MS": "2000",
        "STREAM_SENTIMENT_KAFKA_HEARTBEAT_INTERVAL_MS": "500",
        # Small batches and commits that lag: the kill lands between Redis writes and commits.
        "STREAM_SENTIMENT_BATCHING__MAX_ROWS": "8",
        "STREAM_SENTIMENT_ADMIN__PORT": "0",  # any free port: CI machines may use 8081
    }
    produced = asyncio.run(produce_posts(kafka.bootstrap_servers, topic, 1500, 10, seed=3))
    valid, dead = 1500, produced - 1500
    log = tmp_path / "worker.log"

    first = _worker(env, log)
    try:
        partial = _wait_for(env, lambda s: s["scored"] >= 150, 120, first, log)
    finally:
        first.send_signal(signal.SIGKILL)
        first.wait(10)
    assert partial["scored"] < valid, "the worker finished before it could be killed mid-stream"

    second = _worker(env, log)
    try:
        final = _wait_for(env, lambda s: s["scored"] >= valid and s["dead_lettered"] >= dead, 120, second, log)
        time.sleep(1.0)  # anything counted twice would show up now
        final = _stats(env)
    finally:
        second.send_signal(signal.SIGTERM)
        assert second.wait(30) == 0, log.read_text()[-3000:]
    assert final["scored"] == valid
    assert sum(final["by_label"].values()) == valid
    assert final["dead_lettered"] == dead
    assert sum(final["applied_offsets"].values()) == produced


def test_a_routed_worker_sigkilled_mid_stream_still_counts_each_post_once_under_its_lang(
    kafka, topic_factory, redis_server, tmp_path
):
    """`engine.routes` through the service path (both engines opened, warmed, checked): zh on the multilingual
    engine, the rest on MiniLM; a SIGKILL mid-stream and a restart change nothing (issue 15's acceptance)."""
    from redis import Redis

    from tests.pipeline import lang_counts, mixed_language_posts, produce_documents

    topic = topic_factory(partitions=2)
    kafka.create_topic(f"{topic}.dlq", 1)
    prefix = f"kill-{topic}"
    env = {
        **os.environ,
        "STREAM_SENTIMENT_BOOTSTRAP_SERVERS": kafka.bootstrap_servers,
        "STREAM_SENTIMENT_TOPIC": topic,
        "STREAM_SENTIMENT_CONSUMER_GROUP": f"g-{topic}",
        "STREAM_SENTIMENT_REDIS_URL": redis_server.url,
        "STREAM_SENTIMENT_REDIS_PREFIX": prefix,
        "STREAM_SENTIMENT_KAFKA_SESSION_TIMEOUT_MS": "2000",
        "STREAM_SENTIMENT_KAFKA_HEARTBEAT_INTERVAL_MS": "500",
        "STREAM_SENTIMENT_BATCHING__MAX_ROWS": "8",
        "STREAM_SENTIMENT_ADMIN__PORT": "0",
        "STREAM_SENTIMENT_ENGINE__ROUTES": '{"zh": "multilingual-sentiment/v1"}',
    }
    documents = mixed_language_posts(chinese=96, english=144)
    asyncio.run(produce_documents(kafka.bootstrap_servers, topic, documents))
    log = tmp_path / "worker.log"
    redis = Redis.from_url(redis_server.url, decode_responses=True)

    first = _worker(env, log)
    try:  # Redis polled here, not through `stats` (a process start per look): the worker is fast on 240 posts
        deadline = time.monotonic() + 120
        while int(redis.hget(f"{prefix}:totals", "scored") or 0) < 30:
            assert first.poll() is None and time.monotonic() < deadline, log.read_text()[-3000:]
            time.sleep(0.02)
    finally:
        first.send_signal(signal.SIGKILL)
        first.wait(10)
    partial = int(redis.hget(f"{prefix}:totals", "scored") or 0)
    assert partial < len(documents), "the worker finished before it could be killed mid-stream"

    second = _worker(env, log)
    try:
        _wait_for(env, lambda s: s["scored"] >= len(documents), 120, second, log)
        time.sleep(1.0)  # anything counted twice would show up now
        final = _stats(env)
    finally:
        second.send_signal(signal.SIGTERM)
        assert second.wait(30) == 0, log.read_text()[-3000:]
    assert final["scored"] == len(documents) and final["dead_lettered"] == 0
    assert sum(final["applied_offsets"].values()) == len(documents)
    try:
        assert lang_counts(redis, prefix) == {"en": 144, "zh": 96}
    finally:
        redis.close()
