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
