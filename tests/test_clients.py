"""The security settings and the client helpers every Kafka and Redis client is built with.

SASL as far as it can be tested here: Tansu (the only Kafka-protocol broker installable here) requires
authentication with ``--authentication``, but its users can only be created through an authenticated
connection and its storage is in memory, so no user can exist and no SASL sign-in can succeed; its
build has no PLAIN mechanism either. So these tests check that the settings reach aiokafka's
constructors exactly, and that a real SCRAM exchange with that broker runs and its refusal is reported
as a Kafka SASL failure with exit code 3. A successful SASL sign-in is not tested.
"""

from __future__ import annotations

import asyncio
import os
import socket
import ssl
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from pydantic import ValidationError

from stream_sentiment.clients import (
    ServiceConfigError,
    ServiceConnectionError,
    kafka_admin,
    kafka_consumer,
    kafka_producer,
    redacted_url,
    redis_options,
    start_kafka,
)
from stream_sentiment.config import Settings, settings_table
from stream_sentiment.embedded import LOOPBACK, EmbeddedKafka

REPO = Path(__file__).resolve().parents[1]
SECRET = "correct-horse-battery-staple"


def _sasl(mechanism: str = "SCRAM-SHA-512", **changes: Any) -> dict[str, Any]:
    return {"security_protocol": "SASL_PLAINTEXT", "sasl_mechanism": mechanism, "sasl_username": "alice",
            "sasl_password": SECRET, **changes}


# -- settings -----------------------------------------------------------------------------------------


@pytest.mark.parametrize(("kafka", "message"), [
    ({"security_protocol": "SASL_SSL"}, "needs kafka.sasl_mechanism, kafka.sasl_username, kafka.sasl_password"),
    (_sasl(sasl_password=None), "needs kafka.sasl_password"),
    (_sasl(sasl_password_file="/run/secrets/kafka"), "not both"),
    ({"security_protocol": "SSL", "sasl_username": "alice"}, "kafka.sasl_username is set but"),
    ({"ssl_ca_file": "/etc/ca.pem"}, "kafka.ssl_ca_file is set but kafka.security_protocol is PLAINTEXT"),
    ({"security_protocol": "SSL", "ssl_cert_file": "/etc/client.pem"}, "go together"),
    (_sasl(sasl_password=""), "must not be empty"),
    (_sasl(sasl_mechanism="GSSAPI"), "sasl_mechanism"),
])
def test_kafka_security_settings_refuse_what_would_be_ignored_or_missing(kafka: dict[str, Any], message: str) -> None:
    with pytest.raises(ValidationError, match=message):
        Settings.load(kafka=kafka)


@pytest.mark.parametrize(("overrides", "message"), [
    ({"redis": {"ssl_ca_file": "/etc/ca.pem"}}, "redis_url is not rediss://"),
    ({"redis": {"username": "pipeline"}}, "needs redis.password"),
    ({"redis": {"password": "x", "password_file": "/run/secrets/redis"}}, "not both"),
    ({"redis_url": "rediss://h:6380/0", "redis": {"ssl_key_file": "/k.pem"}}, "go together"),
])
def test_redis_security_settings_refuse_contradictions(overrides: dict[str, Any], message: str) -> None:
    with pytest.raises(ValidationError, match=message):
        Settings.load(**overrides)


def test_secrets_come_from_the_environment_and_never_show(monkeypatch: pytest.MonkeyPatch) -> None:
    for key, value in {"KAFKA__SECURITY_PROTOCOL": "SASL_SSL", "KAFKA__SASL_MECHANISM": "SCRAM-SHA-256",
                       "KAFKA__SASL_USERNAME": "alice", "KAFKA__SASL_PASSWORD": SECRET,
                       "REDIS__USERNAME": "pipeline", "REDIS__PASSWORD": SECRET[::-1]}.items():
        monkeypatch.setenv(f"STREAM_SENTIMENT_{key}", value)
    settings = Settings.load()
    assert settings.kafka.read_password() == SECRET and settings.redis.read_password() == SECRET[::-1]
    shown = repr(settings) + str(settings) + settings.model_dump_json() + settings_table()
    assert SECRET not in shown and SECRET[::-1] not in shown


def test_no_command_takes_a_secret_on_its_command_line() -> None:
    from stream_sentiment.cli import build_parser

    parser = build_parser()
    flags = set()
    stack = [parser]
    while stack:
        current = stack.pop()
        for action in current._actions:
            flags.update(action.option_strings)
            if isinstance(action, type(parser._subparsers._group_actions[0])):  # type: ignore[union-attr]
                stack.extend(action.choices.values())  # type: ignore[union-attr]
    assert flags and not [flag for flag in flags if "password" in flag or flag.endswith("-token")]


# -- what reaches aiokafka and redis-py ------------------------------------------------------------------


@pytest.mark.parametrize("mechanism", ["PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512"])
def test_sasl_settings_reach_every_kafka_client_constructor(mechanism: str, tmp_path: Path) -> None:
    password_file = tmp_path / "kafka-password"
    password_file.write_text(f"{SECRET}\n")  # as a mounted secret often ends
    settings = Settings.load(bootstrap_servers="broker-1:9093,broker-2:9093", kafka=_sasl(
        mechanism, security_protocol="SASL_SSL", sasl_password=None, sasl_password_file=password_file,
        ssl_check_hostname=False))

    async def build() -> list[Any]:
        producer = kafka_producer(settings, acks="all")
        consumer = kafka_consumer(settings, "posts", group_id="g")
        admin = kafka_admin(settings)
        clients = [producer.client, consumer._client, admin._client]
        await consumer.stop()
        await producer.stop()
        await admin.close()
        return clients

    for client in asyncio.run(build()):
        assert client._security_protocol == "SASL_SSL"
        assert (client._sasl_mechanism, client._sasl_plain_username, client._sasl_plain_password) == (
            mechanism, "alice", SECRET)
        context = client._ssl_context
        assert isinstance(context, ssl.SSLContext)
        assert context.verify_mode == ssl.CERT_REQUIRED and context.check_hostname is False
        assert sorted(host for host, *_ in client.hosts) == ["broker-1", "broker-2"]  # aiokafka shuffles them


def test_plaintext_clients_get_no_tls_and_no_sasl() -> None:
    async def build() -> Any:
        producer = kafka_producer(Settings.load())
        await producer.stop()
        return producer.client

    client = asyncio.run(build())
    assert client._security_protocol == "PLAINTEXT" and client._ssl_context is None
    assert client._sasl_plain_password is None


def test_an_unreadable_tls_or_secret_file_names_its_side_and_setting(tmp_path: Path) -> None:
    settings = Settings.load(kafka={"security_protocol": "SSL", "ssl_ca_file": tmp_path / "missing.pem"})
    with pytest.raises(ServiceConfigError, match=r"^Kafka: cannot read kafka.ssl_ca_file"):
        kafka_producer(settings)
    settings = Settings.load(redis={"password_file": tmp_path / "missing"})
    with pytest.raises(ServiceConfigError, match=r"^Redis: cannot read redis.password_file"):
        redis_options(settings)


def test_redis_options_carry_the_acl_user_and_tls_files(tmp_path: Path) -> None:
    ca = tmp_path / "ca.pem"
    ca.write_text("not parsed here")
    settings = Settings.load(redis_url="rediss://cache:6380/0",
                             redis={"username": "pipeline", "password": SECRET, "ssl_ca_file": ca})
    assert redis_options(settings) == {
        "username": "pipeline", "password": SECRET, "ssl_ca_certs": str(ca), "ssl_certfile": None,
        "ssl_keyfile": None, "ssl_cert_reqs": "required", "ssl_check_hostname": True}
    assert redis_options(Settings.load()) == {}


def test_urls_in_messages_lose_their_password() -> None:
    assert redacted_url(f"rediss://pipeline:{SECRET}@cache:6380/0") == "rediss://pipeline:***@cache:6380/0"
    assert redacted_url("redis://127.0.0.1:6379/0") == "redis://127.0.0.1:6379/0"


# -- a real SCRAM exchange with a broker that requires authentication ---------------------------------------


class _AuthenticatingKafka(EmbeddedKafka):
    """Tansu with ``--authentication``: it answers nothing before a SASL sign-in, so ready = accepting connections."""

    def _command(self, port: int, workdir: Path) -> list[str]:
        return [*super()._command(port, workdir), "--authentication"]

    def _answers(self, port: int) -> bool:
        try:
            with socket.create_connection((LOOPBACK, port), timeout=0.5):
                return True
        except OSError:
            return False


@pytest.fixture(scope="module")
def authenticating_kafka() -> Iterator[EmbeddedKafka]:
    with _AuthenticatingKafka() as broker:
        yield broker


@pytest.mark.parametrize("mechanism", ["SCRAM-SHA-256", "SCRAM-SHA-512", "PLAIN"])
def test_a_refused_sasl_sign_in_is_a_kafka_sasl_failure(authenticating_kafka: EmbeddedKafka, mechanism: str) -> None:
    settings = Settings.load(bootstrap_servers=authenticating_kafka.bootstrap_servers, kafka=_sasl(mechanism))

    async def start() -> None:
        await start_kafka(kafka_producer(settings), settings)

    with pytest.raises(ServiceConnectionError) as raised:
        asyncio.run(asyncio.wait_for(start(), 60))
    message = str(raised.value)
    assert message.startswith(f"Kafka: SASL {mechanism} authentication as 'alice' at "), message
    assert SECRET not in message


def test_plaintext_to_a_broker_that_requires_sasl_says_so(authenticating_kafka: EmbeddedKafka) -> None:
    settings = Settings.load(bootstrap_servers=authenticating_kafka.bootstrap_servers)

    async def start() -> None:
        await start_kafka(kafka_producer(settings), settings)

    with pytest.raises(ServiceConnectionError, match="may require SASL authentication"):
        asyncio.run(asyncio.wait_for(start(), 60))


def test_the_cli_exits_3_when_the_broker_refuses_the_sasl_sign_in(authenticating_kafka: EmbeddedKafka) -> None:
    env = {key: value for key, value in os.environ.items() if not key.startswith("STREAM_SENTIMENT_")}
    env.update({"PYTHONPATH": str(REPO), "STREAM_SENTIMENT_BOOTSTRAP_SERVERS": authenticating_kafka.bootstrap_servers,
                "STREAM_SENTIMENT_KAFKA__SECURITY_PROTOCOL": "SASL_PLAINTEXT",
                "STREAM_SENTIMENT_KAFKA__SASL_MECHANISM": "SCRAM-SHA-256",
                "STREAM_SENTIMENT_KAFKA__SASL_USERNAME": "alice", "STREAM_SENTIMENT_KAFKA__SASL_PASSWORD": SECRET})
    result = subprocess.run([sys.executable, "-m", "stream_sentiment.cli", "topics", "create"], env=env, cwd=REPO,
                            capture_output=True, text=True, timeout=120, check=False)
    assert result.returncode == 3, result.stderr
    assert "topics: Kafka: SASL SCRAM-SHA-256 authentication as 'alice'" in result.stderr
    assert SECRET not in result.stderr + result.stdout and "Traceback" not in result.stderr
