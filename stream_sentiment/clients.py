"""Every Kafka and Redis client the project creates, built in one place from the settings.

The ``kafka`` settings group (security protocol, TLS files, SASL) and the ``redis`` group (ACL user,
password, TLS files) reach each client through these helpers, so a secured deployment is configured
once and no client is left on plaintext by accident. A connection that fails for a reason retrying
cannot fix (a certificate the CA does not sign, a refused password) becomes a
:class:`ServiceConnectionError` naming the side and the reason, which the CLI turns into exit code 3.

aiokafka only logs why a bootstrap failed and raises "Unable to bootstrap"; :func:`start_kafka` then
opens one connection itself with the same options to find the reason.
"""

from __future__ import annotations

import asyncio
import contextlib
import ssl
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit, urlunsplit

from stream_sentiment.connection_settings import KafkaSettings

if TYPE_CHECKING:
    import redis
    import redis.asyncio

    from stream_sentiment.config import Settings

__all__ = [
    "ServiceConfigError", "ServiceConnectionError", "async_redis_client", "check_redis", "describe_redis_error",
    "diagnose_kafka", "kafka_admin", "kafka_consumer", "kafka_options", "kafka_producer", "redacted_url",
    "redis_client", "redis_options", "start_kafka",
]  # fmt: skip

# How long the diagnosis of a failed Kafka start waits for one connection; a TLS or SASL exchange takes well under.
DIAGNOSIS_TIMEOUT_S = 10.0
# The start-up check of Redis: a server that does not answer by then is left to the worker's outage handling.
PING_TIMEOUT_S = 10.0


class ServiceConnectionError(Exception):
    """Kafka or Redis cannot be used: ``side`` ("Kafka" or "Redis") and a reason a person can act on."""

    def __init__(self, side: str, reason: str) -> None:
        super().__init__(f"{side}: {reason}")
        self.side = side
        self.reason = reason


class ServiceConfigError(ValueError):
    """A TLS or secret file named in the settings cannot be read (exit code 2, like other bad settings)."""

    def __init__(self, side: str, reason: str) -> None:
        super().__init__(f"{side}: {reason}")
        self.side = side


def _secret(side: str, setting: str, read: Any) -> str | None:
    try:
        return read()  # type: ignore[no-any-return]
    except OSError as error:
        raise ServiceConfigError(side, f"cannot read {setting}: {error}") from None


def _readable(side: str, setting: str, path: Path | None) -> str | None:
    if path is None:
        return None
    try:
        with path.open("rb"):
            pass
    except OSError as error:
        raise ServiceConfigError(side, f"cannot read {setting}: {error}") from None
    return str(path)


# -- Kafka ------------------------------------------------------------------------------------------


def kafka_ssl_context(kafka: KafkaSettings) -> ssl.SSLContext:
    """A verifying TLS context: the CA file (or the system's CAs), the client certificate, the hostname check."""
    cafile = _readable("Kafka", "kafka.ssl_ca_file", kafka.ssl_ca_file)
    certfile = _readable("Kafka", "kafka.ssl_cert_file", kafka.ssl_cert_file)
    keyfile = _readable("Kafka", "kafka.ssl_key_file", kafka.ssl_key_file)
    try:
        context = ssl.create_default_context(cafile=cafile)
        if certfile is not None:
            context.load_cert_chain(certfile, keyfile)
    except ssl.SSLError as error:
        raise ServiceConfigError("Kafka", f"cannot load the TLS files (kafka.ssl_*): {error}") from None
    # Off still verifies the chain against the CA (verify_mode stays CERT_REQUIRED).
    context.check_hostname = kafka.ssl_check_hostname
    return context


def kafka_security_options(kafka: KafkaSettings) -> dict[str, Any]:
    """aiokafka's keyword arguments for the ``kafka`` settings group (the same for every client kind)."""
    options: dict[str, Any] = {"security_protocol": kafka.security_protocol}
    if kafka.tls:
        options["ssl_context"] = kafka_ssl_context(kafka)
    if kafka.sasl:
        options["sasl_mechanism"] = kafka.sasl_mechanism
        # aiokafka takes these two for SCRAM too, despite the names.
        options["sasl_plain_username"] = kafka.sasl_username
        options["sasl_plain_password"] = _secret("Kafka", "kafka.sasl_password_file", kafka.read_password)
    return options


def kafka_options(settings: Settings) -> dict[str, Any]:
    """Bootstrap servers and security options for a client of the configured cluster."""
    return {"bootstrap_servers": settings.bootstrap_servers, **kafka_security_options(settings.kafka)}


def kafka_producer(settings: Settings, **options: Any) -> Any:
    """An ``AIOKafkaProducer`` for the configured cluster (not started: use :func:`start_kafka`)."""
    from aiokafka import AIOKafkaProducer

    return AIOKafkaProducer(**kafka_options(settings), **options)


def kafka_consumer(settings: Settings, *topics: str, **options: Any) -> Any:
    """An ``AIOKafkaConsumer`` for the configured cluster (not started: use :func:`start_kafka`)."""
    from aiokafka import AIOKafkaConsumer

    return AIOKafkaConsumer(*topics, **kafka_options(settings), **options)


def kafka_admin(settings: Settings, **options: Any) -> Any:
    """An ``AIOKafkaAdminClient`` for the configured cluster (not started: use :func:`start_kafka`)."""
    from aiokafka.admin import AIOKafkaAdminClient

    return AIOKafkaAdminClient(**kafka_options(settings), **options)


async def start_kafka(client: Any, settings: Settings) -> None:
    """Start an aiokafka client; on failure, stop it and raise :class:`ServiceConnectionError` with the reason."""
    try:
        await client.start()
    except Exception as error:  # KafkaConnectionError, or an exception from inside a failed SASL exchange
        with contextlib.suppress(Exception):
            await (client.close() if hasattr(client, "close") else client.stop())
        reason = await diagnose_kafka(settings)
        raise ServiceConnectionError("Kafka", reason or f"{type(error).__name__}: {error}") from error


def _hosts(bootstrap_servers: str) -> list[tuple[str, int]]:
    hosts = []
    for part in bootstrap_servers.split(","):
        host, _, port = part.strip().rpartition(":")
        if part.strip():
            hosts.append((host.strip("[]") or part.strip(), int(port) if port.isdigit() else 9092))
    return hosts


async def diagnose_kafka(settings: Settings) -> str | None:
    """Why no bootstrap server accepts a connection with these settings; None if one does."""
    from aiokafka.conn import create_conn
    from aiokafka.protocol.metadata import MetadataRequest

    options = kafka_security_options(settings.kafka)
    reasons = []
    for host, port in _hosts(settings.bootstrap_servers):
        address = f"{host}:{port}"
        try:
            conn = await asyncio.wait_for(
                create_conn(host, port, request_timeout_ms=int(DIAGNOSIS_TIMEOUT_S * 1000), **options),
                DIAGNOSIS_TIMEOUT_S)
        except Exception as error:  # every failure is a reason to report
            reasons.append(_kafka_reason(settings.kafka, address, error))
            continue
        try:  # what a bootstrap asks first; a broker that wants SASL refuses it on a plain connection
            request = MetadataRequest[0]([]) if isinstance(MetadataRequest, list) else MetadataRequest([])
            await asyncio.wait_for(conn.send(request), DIAGNOSIS_TIMEOUT_S)
        except Exception as error:
            reasons.append(f"{address} accepted the connection but not the first request ({error or type(error)}; "
                           f"security_protocol {settings.kafka.security_protocol}): the broker may require SASL "
                           "authentication or TLS")
            continue
        finally:
            conn.close()
        return None
    return "; ".join(reasons) or f"no bootstrap server in {settings.bootstrap_servers!r}"


def _kafka_reason(kafka: KafkaSettings, address: str, error: Exception) -> str:
    from aiokafka.errors import KafkaConnectionError, KafkaError

    protocol = kafka.security_protocol
    if isinstance(error, ssl.SSLCertVerificationError):
        hint = ("kafka.ssl_check_hostname" if "hostname" in str(error.verify_message).lower()
                else "kafka.ssl_ca_file")
        return f"the TLS certificate of {address} is not trusted ({error.verify_message}): check {hint}"
    if isinstance(error, ssl.SSLError):
        return (f"TLS handshake with {address} failed ({error.reason or error}): is it a TLS listener "
                f"(security_protocol {protocol}), and does it want a client certificate (kafka.ssl_cert_file)?")
    if isinstance(error, ConnectionRefusedError):
        return f"nothing listens on {address} (connection refused): check bootstrap_servers"
    if isinstance(error, OSError):
        return f"cannot connect to {address}: {error}"
    if isinstance(error, TimeoutError):
        return f"no answer from {address} within {DIAGNOSIS_TIMEOUT_S:g}s (security_protocol {protocol})"
    if kafka.sasl:
        # aiokafka raises what it tripped over (a KeyError on a SCRAM error reply, a closed connection when the
        # broker offers no such mechanism); the broker's own reason stays in its log.
        detail = (str(error) if isinstance(error, KafkaError) and not isinstance(error, KafkaConnectionError)
                  else f"the broker rejected the exchange: {type(error).__name__} {error}")
        return (f"SASL {kafka.sasl_mechanism} authentication as {kafka.sasl_username!r} at {address} failed "
                f"({detail}): check the user name and password, that the broker enables {kafka.sasl_mechanism}, "
                f"and that the listener speaks {kafka.security_protocol}")
    if isinstance(error, KafkaConnectionError):
        return (f"{address} closed the connection while connecting (security_protocol {protocol}): the listener may "
                "want another security_protocol, or a client certificate (kafka.ssl_cert_file)")
    return f"cannot connect to {address}: {type(error).__name__}: {error}"


# -- Redis ------------------------------------------------------------------------------------------


def redacted_url(url: str) -> str:
    """``url`` without a password in it, for messages and logs."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    user = parts.username or ""
    host = parts.netloc.rpartition("@")[2]
    return urlunsplit(parts._replace(netloc=f"{user}:***@{host}"))


def redis_options(settings: Settings) -> dict[str, Any]:
    """redis-py's keyword arguments for the ``redis`` settings group (with ``from_url(settings.redis_url)``)."""
    group = settings.redis
    options: dict[str, Any] = {}
    password = _secret("Redis", "redis.password_file", group.read_password)
    if password is not None:
        options["password"] = password
        if group.username is not None:
            options["username"] = group.username
    if settings.redis_url.startswith("rediss://"):
        # Checked here, as redis-py would report a missing file only as a failed connection.
        options["ssl_ca_certs"] = _readable("Redis", "redis.ssl_ca_file", group.ssl_ca_file)
        options["ssl_certfile"] = _readable("Redis", "redis.ssl_cert_file", group.ssl_cert_file)
        options["ssl_keyfile"] = _readable("Redis", "redis.ssl_key_file", group.ssl_key_file)
        options["ssl_cert_reqs"] = "required"
        options["ssl_check_hostname"] = group.ssl_check_hostname
    return options


def redis_client(settings: Settings, **options: Any) -> redis.Redis:
    """A synchronous client of the configured Redis (extra options, e.g. ``decode_responses``, win)."""
    from redis import Redis

    return Redis.from_url(settings.redis_url, **{**redis_options(settings), **options})


def async_redis_client(settings: Settings, **options: Any) -> redis.asyncio.Redis:
    """An asyncio client of the configured Redis; it connects on its first command, in that event loop."""
    from redis.asyncio import Redis

    return Redis.from_url(settings.redis_url, **{**redis_options(settings), **options})


def describe_redis_error(error: BaseException, url: str | None = None) -> ServiceConnectionError | None:
    """A :class:`ServiceConnectionError` for a failure no retry fixes (credentials, TLS, ACL), else None."""
    from redis.exceptions import AuthenticationError, NoPermissionError
    from redis.exceptions import ConnectionError as RedisConnectionError

    where = redacted_url(url) if url else "the server"
    text = str(error)
    if isinstance(error, AuthenticationError):
        return ServiceConnectionError("Redis", f"{where} refused the credentials ({text}): check redis.username "
                                               "and redis.password / redis.password_file")
    if isinstance(error, NoPermissionError):
        return ServiceConnectionError("Redis", f"the ACL user lacks a permission ({text}): grant it the keys "
                                               "<prefix>:* and channels <prefix>:* with +@all (see docs/security.md)")
    if isinstance(error, RedisConnectionError) and ("SSL" in text or "_ssl.c" in text):
        hint = ("redis.ssl_ca_file" if "CERTIFICATE_VERIFY_FAILED" in text and "hostname" not in text.lower()
                else "redis.ssl_check_hostname" if "hostname" in text.lower()
                else "redis.ssl_cert_file / redis.ssl_key_file (the server may require a client certificate)")
        return ServiceConnectionError("Redis", f"TLS with {where} failed ({text}): check {hint}")
    return None


async def check_redis(client: redis.asyncio.Redis, url: str) -> None:
    """Fail fast on credentials or TLS the server refuses; a Redis merely down is left to the caller's retries."""
    from redis.exceptions import RedisError

    try:
        async with asyncio.timeout(PING_TIMEOUT_S):
            await client.ping()
    except (TimeoutError, RedisError, OSError) as error:
        failure = describe_redis_error(error, url)
        if failure is not None:
            raise failure from error
