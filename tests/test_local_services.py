"""``stream-sentiment services`` and ``topics create`` on the real embedded broker and Redis-compatible server."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from stream_sentiment.embedded import EmbeddedKafka, port_is_free
from tests.services import consume_records

REPO = Path(__file__).resolve().parents[1]


def _env(**variables: str) -> dict[str, str]:
    env = {key: value for key, value in os.environ.items() if not key.startswith("STREAM_SENTIMENT_")}
    return {**env, "PYTHONPATH": str(REPO), **variables}


def _cli(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "stream_sentiment.cli", *args], env=env, cwd=REPO,
                          capture_output=True, text=True, timeout=120, check=False)


def test_topics_create_is_idempotent_and_refuses_another_partition_count(kafka: EmbeddedKafka) -> None:
    env = _env(STREAM_SENTIMENT_BOOTSTRAP_SERVERS=kafka.bootstrap_servers, STREAM_SENTIMENT_TOPIC="reviews")
    first = _cli("topics", "create", "--partitions", "4", env=env)
    assert first.returncode == 0, first.stderr
    assert first.stdout.splitlines() == ["created reviews (4 partitions, replication factor 1)",
                                         "created reviews.dlq (1 partition, replication factor 1)"]
    again = _cli("topics", "create", "--partitions", "4", env=env)
    assert again.returncode == 0, again.stderr
    assert again.stdout.splitlines() == ["reviews exists (4 partitions): left as it is",
                                         "reviews.dlq exists (1 partition): left as it is"]
    other = _cli("topics", "create", "--partitions", "6", env=env)
    assert other.returncode == 2
    assert "reviews exists with 4 partitions, not 6" in other.stderr and "Traceback" not in other.stderr
    dlq = _cli("topics", "create", "--partitions", "4", "--dlq-partitions", "2", env=env)
    assert dlq.returncode == 2 and "reviews.dlq exists with 1 partition, not 2" in dlq.stderr


def test_topics_create_follows_the_dlq_topic_setting(kafka: EmbeddedKafka) -> None:
    env = _env(STREAM_SENTIMENT_BOOTSTRAP_SERVERS=kafka.bootstrap_servers, STREAM_SENTIMENT_DLQ_TOPIC="rejects")
    result = _cli("topics", "create", "--topic", "orders", "--partitions", "2", "--no-dlq", env=env)
    assert result.returncode == 0 and result.stdout.splitlines() == ["created orders (2 partitions, "
                                                                     "replication factor 1)"]
    result = _cli("topics", "create", "--topic", "orders", "--partitions", "2", env=env)
    assert result.returncode == 0 and "created rejects (1 partition" in result.stdout


def test_topics_create_without_a_broker_exits_3_naming_kafka() -> None:
    from stream_sentiment.embedded import free_port

    result = _cli("topics", "create", env=_env(STREAM_SENTIMENT_BOOTSTRAP_SERVERS=f"127.0.0.1:{free_port()}"))
    assert result.returncode == 3
    assert "stream-sentiment topics: Kafka: nothing listens on 127.0.0.1:" in result.stderr


def _wait_for(path: Path, proc: subprocess.Popen[str], timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        assert proc.poll() is None, proc.communicate()
        assert time.monotonic() < deadline, "services did not write its env file"
        time.sleep(0.1)


def _env_file(path: Path) -> dict[str, str]:
    lines = [line for line in path.read_text().splitlines() if line and not line.startswith("#")]
    return dict(line.split("=", 1) for line in lines)


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_services_runs_both_servers_with_the_topics_until_a_signal(tmp_path: Path, signum: int) -> None:
    env_file = tmp_path / "local.env"
    proc = subprocess.Popen(
        [sys.executable, "-m", "stream_sentiment.cli", "services", "--topic", "tweets", "--partitions", "2",
         "--env-file", str(env_file)], env=_env(), cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        _wait_for(env_file, proc)
        variables = _env_file(env_file)
        assert sorted(variables) == ["STREAM_SENTIMENT_BOOTSTRAP_SERVERS", "STREAM_SENTIMENT_REDIS_URL",
                                     "STREAM_SENTIMENT_TOPIC"]
        assert variables["STREAM_SENTIMENT_TOPIC"] == "tweets"
        # The variables point the commands at working services with the topics made.
        env = _env(**variables)
        assert _cli("stats", "--json", env=env).returncode == 0
        created = _cli("topics", "create", "--partitions", "2", env=env)
        assert created.stdout.splitlines() == ["tweets exists (2 partitions): left as it is",
                                               "tweets.dlq exists (1 partition): left as it is"]
        produced = _cli("produce", "--count", "5", "--rate", "0", "--no-progress", env=env)
        assert produced.returncode == 0, produced.stderr
        records = asyncio.run(consume_records(variables["STREAM_SENTIMENT_BOOTSTRAP_SERVERS"], "tweets", 5, "check"))
        assert len(records) == 5
        ports = [int(variables["STREAM_SENTIMENT_BOOTSTRAP_SERVERS"].rsplit(":", 1)[1]),
                 int(variables["STREAM_SENTIMENT_REDIS_URL"].rsplit(":", 1)[1].split("/")[0])]
    finally:
        proc.send_signal(signum)
        out, err = proc.communicate(timeout=30)
    assert proc.returncode == 0, err
    assert "export STREAM_SENTIMENT_BOOTSTRAP_SERVERS=" in out and "services: stopping" in out
    assert not env_file.exists()  # its ports are gone with the servers: no stale file to load
    deadline = time.monotonic() + 10
    while not all(port_is_free(port) for port in ports):
        assert time.monotonic() < deadline, "a server outlived services"
        time.sleep(0.1)


def test_services_exits_3_when_a_chosen_port_is_taken(tmp_path: Path) -> None:
    import socket

    with socket.socket() as squatter:
        squatter.bind(("127.0.0.1", 0))
        squatter.listen()
        taken = squatter.getsockname()[1]
        result = _cli("services", "--redis-port", str(taken), "--env-file", str(tmp_path / "x.env"), env=_env())
    assert result.returncode == 3, result.stderr
    assert "stream-sentiment services: valkey exited" in result.stderr
    assert not (tmp_path / "x.env").exists()
