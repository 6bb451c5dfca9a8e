"""The settings groups that say how to reach Kafka and Redis securely: TLS, SASL, ACL users.

Part of the one settings object (``config.Settings`` holds them as its ``kafka`` and ``redis`` groups);
they live in this module only so that ``config.py`` stays near 400 lines. ``clients.py`` turns them
into client arguments, so every Kafka and Redis client the project creates is configured alike.

Secrets are ``SecretStr`` (never in a repr, a log line or an error message) and come from the environment,
a config file or a ``*_file`` (a mounted secret); there is deliberately no command-line flag for them,
since a command line is visible to every user of the machine (``ps``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal, Self

from pydantic import BaseModel, ConfigDict, Field, SecretStr, model_validator

__all__ = ["KafkaSettings", "RedisSettings", "read_secret"]

KafkaProtocol = Literal["PLAINTEXT", "SSL", "SASL_PLAINTEXT", "SASL_SSL"]
SaslMechanism = Literal["PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512"]


class _Group(BaseModel):
    # Unknown keys are errors: a typo in a file or a <GROUP>__<KEY> variable must not silently mean "default".
    model_config = ConfigDict(frozen=True, extra="forbid")


def read_secret(value: SecretStr | None, file: Path | None) -> str | None:
    """The secret itself: read from ``file`` (surrounding whitespace stripped) when that is set.

    Raises OSError when the file cannot be read; callers name the setting in their message.
    """
    if file is not None:
        return file.read_text(encoding="utf-8").strip() or None
    return value.get_secret_value() if value is not None else None


def _one_secret(name: str, value: SecretStr | None, file: Path | None) -> None:
    if value is not None and not value.get_secret_value():
        raise ValueError(f"{name} must not be empty (leave it unset instead)")
    if value is not None and file is not None:
        raise ValueError(f"set {name} or {name}_file, not both")


def _cert_and_key(group: str, cert: Path | None, key: Path | None) -> None:
    if (cert is None) != (key is None):
        raise ValueError(f"{group}.ssl_cert_file and {group}.ssl_key_file go together (a client certificate "
                         "and its private key)")


class KafkaSettings(_Group):
    security_protocol: KafkaProtocol = Field(default="PLAINTEXT", description=(
        "How clients talk to the brokers: PLAINTEXT, SSL (TLS), SASL_PLAINTEXT or SASL_SSL (managed Kafka "
        "services want SASL_SSL). PLAINTEXT, as a local or compose broker has no TLS. Used by every Kafka client: "
        "worker, dead letters, `produce`, `topics create`."))
    ssl_ca_file: Path | None = Field(default=None, description=(
        "PEM file of the CA(s) that sign the brokers' certificates (SSL, SASL_SSL); unset = the system's CAs, "
        "which is right for a public managed service."))
    ssl_cert_file: Path | None = Field(default=None, description=(
        "PEM client certificate for brokers that require mutual TLS; with ssl_key_file. Unset = none sent."))
    ssl_key_file: Path | None = Field(default=None, description=(
        "PEM private key of ssl_cert_file (unencrypted; protect it with file permissions or a mounted secret)."))
    ssl_check_hostname: bool = Field(default=True, description=(
        "Check that a broker's certificate names the host connected to. On: otherwise any certificate the CA "
        "signed passes. Off only for brokers reached by an address their certificate lacks (the CA is still checked)."))
    sasl_mechanism: SaslMechanism | None = Field(default=None, description=(
        "SASL mechanism for SASL_PLAINTEXT / SASL_SSL: PLAIN, SCRAM-SHA-256 or SCRAM-SHA-512; required with them, "
        "as the right one depends on the cluster."))
    sasl_username: str | None = Field(default=None, min_length=1, description=(
        "SASL user name (SASL_PLAINTEXT / SASL_SSL); not a secret, so it may appear in error messages."))
    sasl_password: SecretStr | None = Field(default=None, description=(
        "SASL password, from the environment (STREAM_SENTIMENT_KAFKA__SASL_PASSWORD) or a config file; a secret, "
        "never logged and never a command-line flag. Not with sasl_password_file."))
    sasl_password_file: Path | None = Field(default=None, description=(
        "File holding the SASL password (e.g. a mounted secret), read at each connection set-up. "
        "Not with sasl_password."))

    @property
    def tls(self) -> bool:
        return self.security_protocol in ("SSL", "SASL_SSL")

    @property
    def sasl(self) -> bool:
        return self.security_protocol in ("SASL_PLAINTEXT", "SASL_SSL")

    @model_validator(mode="after")
    def _check(self) -> Self:
        _one_secret("kafka.sasl_password", self.sasl_password, self.sasl_password_file)
        _cert_and_key("kafka", self.ssl_cert_file, self.ssl_key_file)
        # A setting that would be silently ignored is a mistake: say so instead of connecting without it.
        tls_set = [name for name in ("ssl_ca_file", "ssl_cert_file") if getattr(self, name) is not None]
        if tls_set and not self.tls:
            raise ValueError(f"kafka.{tls_set[0]} is set but kafka.security_protocol is {self.security_protocol} "
                             "(no TLS): use SSL or SASL_SSL, or unset it")
        sasl_set = [name for name in ("sasl_mechanism", "sasl_username", "sasl_password", "sasl_password_file")
                    if getattr(self, name) is not None]
        if self.sasl:
            missing = [name for name, value in (("sasl_mechanism", self.sasl_mechanism),
                                                ("sasl_username", self.sasl_username)) if value is None]
            if self.sasl_password is None and self.sasl_password_file is None:
                missing.append("sasl_password (or sasl_password_file)")
            if missing:
                raise ValueError(f"kafka.security_protocol {self.security_protocol} needs kafka." +
                                 ", kafka.".join(missing))
        elif sasl_set:
            raise ValueError(f"kafka.{sasl_set[0]} is set but kafka.security_protocol is {self.security_protocol} "
                             "(no SASL): use SASL_PLAINTEXT or SASL_SSL, or unset it")
        return self

    def read_password(self) -> str | None:
        """The SASL password, read from ``sasl_password_file`` when that is set."""
        return read_secret(self.sasl_password, self.sasl_password_file)


class RedisSettings(_Group):
    outage_limit_seconds: float = Field(default=300.0, gt=0, description=(
        "How long a worker rides out Redis errors (consumption paused, not ready, retried with backoff) before "
        "it exits with code 3; 5 minutes covers a failover or a restart with persistence. A refused password or "
        "TLS certificate at start-up fails at once instead."))
    retry_max_seconds: float = Field(default=5.0, gt=0, description=(
        "Longest wait between retries while Redis is down (backoff doubles from 0.1 s up to this)."))
    username: str | None = Field(default=None, min_length=1, description=(
        "Redis ACL user (Redis 6+); unset = the `default` user. Needs a password. Overrides a user in redis_url."))
    password: SecretStr | None = Field(default=None, description=(
        "Redis password (of `username`, or of `default`), from the environment (STREAM_SENTIMENT_REDIS__PASSWORD) "
        "or a config file; a secret, never logged. Keep it out of redis_url. Not with password_file."))
    password_file: Path | None = Field(default=None, description=(
        "File holding the Redis password (e.g. a mounted secret), read at each client set-up. Not with password."))
    ssl_ca_file: Path | None = Field(default=None, description=(
        "PEM file of the CA(s) that sign the Redis server's certificate, for a `rediss://` redis_url; "
        "unset = the system's CAs."))
    ssl_cert_file: Path | None = Field(default=None, description=(
        "PEM client certificate for a Redis that requires one (`tls-auth-clients yes`); with ssl_key_file."))
    ssl_key_file: Path | None = Field(default=None, description=(
        "PEM private key of ssl_cert_file (unencrypted; protect it with file permissions or a mounted secret)."))
    ssl_check_hostname: bool = Field(default=True, description=(
        "Check that the Redis certificate names the host in redis_url. On; off only for a server reached by an "
        "address its certificate lacks (the CA is still checked)."))

    @model_validator(mode="after")
    def _check(self) -> Self:
        _one_secret("redis.password", self.password, self.password_file)
        _cert_and_key("redis", self.ssl_cert_file, self.ssl_key_file)
        if self.username is not None and self.password is None and self.password_file is None:
            raise ValueError("redis.username needs redis.password or redis.password_file (an ACL user signs in "
                             "with both)")
        return self

    @property
    def tls_files_set(self) -> list[str]:
        """The TLS settings given, which need a ``rediss://`` URL to mean anything."""
        return [name for name in ("ssl_ca_file", "ssl_cert_file") if getattr(self, name) is not None]

    def read_password(self) -> str | None:
        """The password, read from ``password_file`` when that is set."""
        return read_secret(self.password, self.password_file)
