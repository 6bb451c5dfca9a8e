"""Secured deployments for real: the embedded broker behind TLS (stunnel, client certificates required) and
Debian's redis-server with TLS, client certificates and an ACL user limited to the ``ss:*`` keys.

The clients' helpers, then the commands themselves (``topics create``, ``run``, ``produce``, ``stats``,
``alerts``, ``top``) as subprocesses configured only through ``STREAM_SENTIMENT_*`` variables and files;
a wrong CA or password must fail at once with exit code 3 and a message naming the side and the reason.
Skipped where stunnel4 or redis-server is not installed (``apt-get install -y stunnel4 redis-server``).
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from stream_sentiment.clients import (
    ServiceConnectionError,
    describe_redis_error,
    kafka_consumer,
    kafka_producer,
    redis_client,
    start_kafka,
)
from stream_sentiment.config import Settings
from tests.secured import REDIS_PREFIX, REDIS_USER, Certificates, TlsKafka, TlsRedis, make_certificates

REPO = Path(__file__).resolve().parents[1]
PASSWORD = f"pw-{uuid.uuid4().hex}"  # a value that could not appear in any output by chance


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> Certificates:
    return make_certificates(tmp_path_factory.mktemp("certs"))


@pytest.fixture(scope="module")
def tls_kafka(certs: Certificates, tmp_path_factory: pytest.TempPathFactory) -> Iterator[TlsKafka]:
    with TlsKafka(certs, tmp_path_factory.mktemp("stunnel")) as front:
        yield front


@pytest.fixture(scope="module")
def tls_redis(certs: Certificates, tmp_path_factory: pytest.TempPathFactory) -> Iterator[TlsRedis]:
    with TlsRedis(certs, tmp_path_factory.mktemp("redis"), PASSWORD) as server:
        yield server


def _kafka_settings(front: TlsKafka, certs: Certificates, **changes: Any) -> dict[str, Any]:
    return {"security_protocol": "SSL", "ssl_ca_file": certs.ca, "ssl_cert_file": certs.client_cert,
            "ssl_key_file": certs.client_key, **changes}


def _redis_settings(certs: Certificates, **changes: Any) -> dict[str, Any]:
    return {"username": REDIS_USER, "password": PASSWORD, "ssl_ca_file": certs.ca,
            "ssl_cert_file": certs.client_cert, "ssl_key_file": certs.client_key, **changes}


def _run(coro: Any) -> Any:
    return asyncio.run(asyncio.wait_for(coro, 60))


# -- the helpers, in process -----------------------------------------------------------------------


def test_kafka_clients_produce_and_consume_over_mutual_tls(tls_kafka: TlsKafka, certs: Certificates) -> None:
    topic = f"tls-{uuid.uuid4().hex[:8]}"
    tls_kafka.kafka.create_topic(topic, 1)
    settings = Settings.load(bootstrap_servers=tls_kafka.bootstrap_servers, kafka=_kafka_settings(tls_kafka, certs))

    async def scenario() -> list[bytes]:
        producer = kafka_producer(settings)
        await start_kafka(producer, settings)
        try:
            await producer.send_and_wait(topic, b"over tls")
        finally:
            await producer.stop()
        consumer = kafka_consumer(settings, topic, group_id=f"g-{topic}", auto_offset_reset="earliest")
        await start_kafka(consumer, settings)
        try:
            batches = await consumer.getmany(timeout_ms=10000)
        finally:
            await consumer.stop()
        return [record.value for records in batches.values() for record in records]

    assert _run(scenario()) == [b"over tls"]


@pytest.mark.parametrize(("changes", "reason"), [
    ({"ssl_ca_file": "other_ca"}, "is not trusted"),  # a CA that did not sign the broker's certificate
    ({"ssl_cert_file": None, "ssl_key_file": None}, "closed the connection"),  # no client certificate
    ({"security_protocol": "PLAINTEXT", "ssl_ca_file": None, "ssl_cert_file": None, "ssl_key_file": None},
     "closed the connection"),  # plaintext to a TLS listener
])
def test_a_refused_kafka_connection_names_kafka_and_the_reason(
    tls_kafka: TlsKafka, certs: Certificates, changes: dict[str, Any], reason: str
) -> None:
    changes = {key: getattr(certs, value) if value == "other_ca" else value for key, value in changes.items()}
    settings = Settings.load(bootstrap_servers=tls_kafka.bootstrap_servers,
                             kafka=_kafka_settings(tls_kafka, certs, **changes))

    async def start() -> None:
        await start_kafka(kafka_producer(settings), settings)

    started = time.monotonic()
    with pytest.raises(ServiceConnectionError) as raised:
        _run(start())
    assert raised.value.side == "Kafka" and reason in str(raised.value), raised.value
    assert tls_kafka.bootstrap_servers in str(raised.value)  # which address refused
    assert time.monotonic() - started < 30  # fails fast, no endless retry


def test_redis_client_signs_in_as_the_acl_user_over_mutual_tls(tls_redis: TlsRedis, certs: Certificates) -> None:
    settings = Settings.load(redis_url=tls_redis.url, redis=_redis_settings(certs))
    client = redis_client(settings, decode_responses=True, socket_timeout=5)
    try:
        assert client.acl_whoami() == REDIS_USER
        assert client.set(f"{REDIS_PREFIX}:probe", "1")
    finally:
        client.close()


@pytest.mark.parametrize(("changes", "reason"), [
    ({"password": "wrong"}, "refused the credentials"),
    ({"ssl_ca_file": "other_ca"}, "CERTIFICATE_VERIFY_FAILED"),
    ({"ssl_cert_file": None, "ssl_key_file": None}, "TLS with"),  # the server requires a client certificate
])
def test_a_refused_redis_connection_names_redis_and_the_reason(
    tls_redis: TlsRedis, certs: Certificates, changes: dict[str, Any], reason: str
) -> None:
    changes = {key: certs.other_ca if value == "other_ca" else value for key, value in changes.items()}
    settings = Settings.load(redis_url=tls_redis.url, redis=_redis_settings(certs, **changes))
    client = redis_client(settings, socket_timeout=5)
    try:
        with pytest.raises(Exception) as raised:
            client.ping()
    finally:
        client.close()
    failure = describe_redis_error(raised.value, settings.redis_url)
    assert failure is not None and failure.side == "Redis" and reason in str(failure), raised.value
    assert PASSWORD not in str(failure)


# -- the commands, as an operator runs them -----------------------------------------------------------


def _secured_env(tls_kafka: TlsKafka, tls_redis: TlsRedis, certs: Certificates, folder: Path,
                 topic: str) -> dict[str, str]:
    password_file = folder / "redis-password"
    password_file.write_text(PASSWORD + "\n")
    password_file.chmod(0o600)
    env = {key: value for key, value in os.environ.items() if not key.startswith("STREAM_SENTIMENT_")}
    prefix = "STREAM_SENTIMENT_"
    env.update({
        "PYTHONPATH": str(REPO),
        f"{prefix}BOOTSTRAP_SERVERS": tls_kafka.bootstrap_servers, f"{prefix}TOPIC": topic,
        f"{prefix}CONSUMER_GROUP": f"group-{topic}", f"{prefix}REDIS_URL": tls_redis.url,
        f"{prefix}KAFKA__SECURITY_PROTOCOL": "SSL", f"{prefix}KAFKA__SSL_CA_FILE": str(certs.ca),
        f"{prefix}KAFKA__SSL_CERT_FILE": str(certs.client_cert), f"{prefix}KAFKA__SSL_KEY_FILE": str(certs.client_key),
        f"{prefix}REDIS__USERNAME": REDIS_USER, f"{prefix}REDIS__PASSWORD_FILE": str(password_file),
        f"{prefix}REDIS__SSL_CA_FILE": str(certs.ca), f"{prefix}REDIS__SSL_CERT_FILE": str(certs.client_cert),
        f"{prefix}REDIS__SSL_KEY_FILE": str(certs.client_key),
        f"{prefix}ADMIN__PORT": "0", f"{prefix}KAFKA_SESSION_TIMEOUT_MS": "2000",
        f"{prefix}KAFKA_HEARTBEAT_INTERVAL_MS": "500",
    })
    return env


def _cli(env: dict[str, str], *args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "stream_sentiment.cli", *args], env=env, cwd=REPO,
                          capture_output=True, text=True, timeout=timeout, check=False)


def test_every_command_works_against_tls_kafka_and_tls_redis_with_an_acl_user(
    tls_kafka: TlsKafka, tls_redis: TlsRedis, certs: Certificates, tmp_path: Path
) -> None:
    topic = f"secured-{uuid.uuid4().hex[:8]}"
    env = _secured_env(tls_kafka, tls_redis, certs, tmp_path, topic)
    created = _cli(env, "topics", "create", "--partitions", "2")
    assert created.returncode == 0, created.stderr
    assert f"created {topic} (2 partitions" in created.stdout and f"created {topic}.dlq" in created.stdout

    log = (tmp_path / "worker.log").open("w+")
    worker = subprocess.Popen([sys.executable, "-m", "stream_sentiment.cli", "run"], env=env, cwd=REPO,
                              stdout=log, stderr=subprocess.STDOUT, text=True)
    try:
        bad = tmp_path / "bad.jsonl"
        bad.write_text('{"id": "b1", "text": ""}\nnot json\n')
        produced = _cli(env, "produce", "--count", "150", "--rate", "0", "--no-progress")
        assert produced.returncode == 0, produced.stderr
        sent = json.loads(produced.stdout.splitlines()[-1])["sent"]
        rejected = _cli(env, "produce", "--file", str(bad), "--rate", "0", "--no-progress")
        assert rejected.returncode == 0, rejected.stderr
        sent += json.loads(rejected.stdout.splitlines()[-1])["sent"]
        assert sent == 152

        deadline = time.monotonic() + 180
        stats: dict[str, Any] = {}
        while time.monotonic() < deadline and worker.poll() is None:
            answer = _cli(env, "stats", "--json")
            assert answer.returncode == 0, answer.stderr
            stats = json.loads(answer.stdout)
            if stats["scored"] + stats["dead_lettered"] >= sent:
                break
            time.sleep(1)
        assert worker.poll() is None, Path(log.name).read_text()
        assert (stats["scored"], stats["dead_lettered"]) == (150, 2), stats

        for args in (("alerts", "--last", "3"), ("top", "--once")):
            shown = _cli(env, *args)
            assert shown.returncode == 0, (args, shown.stderr)
    finally:
        worker.send_signal(signal.SIGTERM)
        assert worker.wait(timeout=60) == 0, Path(log.name).read_text()
    output = Path(log.name).read_text()
    assert "assigned" in output and PASSWORD not in output
    # The ACL user has only the ss:* keys and channels: the worker (counts, marks, alert judge) needs no more.
    assert "NOPERM" not in output and "no permissions" not in output, output


@pytest.mark.parametrize(("command", "variable", "value", "side", "reason"), [
    (("stats", "--json"), "REDIS__SSL_CA_FILE", "other_ca", "Redis", "CERTIFICATE_VERIFY_FAILED"),
    (("alerts", "--last", "1"), "REDIS__PASSWORD", PASSWORD[::-1], "Redis", "refused the credentials"),
    (("produce", "--count", "1", "--no-progress"), "KAFKA__SSL_CA_FILE", "other_ca", "Kafka", "is not trusted"),
    (("topics", "create"), "KAFKA__SSL_CA_FILE", "other_ca", "Kafka", "is not trusted"),
    (("run",), "REDIS__PASSWORD", PASSWORD[::-1], "Redis", "refused the credentials"),
    (("run",), "KAFKA__SSL_CA_FILE", "other_ca", "Kafka", "is not trusted"),
])
def test_a_wrong_ca_or_password_fails_fast_with_exit_code_3(
    tls_kafka: TlsKafka, tls_redis: TlsRedis, certs: Certificates, tmp_path: Path,
    command: tuple[str, ...], variable: str, value: str, side: str, reason: str,
) -> None:
    env = _secured_env(tls_kafka, tls_redis, certs, tmp_path, f"wrong-{uuid.uuid4().hex[:8]}")
    if variable == "REDIS__PASSWORD":
        del env["STREAM_SENTIMENT_REDIS__PASSWORD_FILE"]  # the environment variable instead of the file
    env[f"STREAM_SENTIMENT_{variable}"] = str(certs.other_ca) if value == "other_ca" else value
    started = time.monotonic()
    result = _cli(env, *command, timeout=90)
    assert result.returncode == 3, (result.stdout, result.stderr)
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith(f"stream-sentiment {command[0]}: {side}: ") and reason in last, result.stderr
    assert "Traceback" not in result.stderr
    assert PASSWORD not in result.stderr + result.stdout and PASSWORD[::-1] not in result.stderr + result.stdout
    assert time.monotonic() - started < 60
