"""Secured test services: a TLS front (Debian's stunnel4) for the embedded broker, Debian's redis-server with
TLS and an ACL user, and the certificates for both, made by the ``openssl`` command for each test session.

These need binaries that pip cannot install; tests that use them skip, saying which and how to install it
(``apt-get install -y stunnel4 redis-server``), where one is missing.
"""

from __future__ import annotations

import contextlib
import shutil
import signal
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
import redis

from stream_sentiment.embedded import LOOPBACK, EmbeddedKafka, free_port

INSTALL_HINT = "apt-get install -y stunnel4 redis-server"
REDIS_USER = "pipeline"
REDIS_PREFIX = "ss"


def require_binary(*names: str) -> str:
    """The first of ``names`` on PATH, or skip the test saying how to get it."""
    for name in names:
        path = shutil.which(name)
        if path:
            return path
    pytest.skip(f"needs {' or '.join(names)} (Debian: {INSTALL_HINT}), which is not installed here")


@dataclass(frozen=True)
class Certificates:
    """A test CA, a server certificate for 127.0.0.1 and localhost, a client certificate, and an unrelated CA."""

    ca: Path
    server_cert: Path
    server_key: Path
    client_cert: Path
    client_key: Path
    other_ca: Path


def _openssl(*args: str, cwd: Path) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True, timeout=60)


def make_certificates(folder: Path) -> Certificates:
    """EC P-256 keys (fast to make), valid for two days."""
    require_binary("openssl")
    folder.mkdir(parents=True, exist_ok=True)
    ec = ("-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes")
    for ca in ("ca", "other-ca"):
        _openssl("req", "-x509", *ec, "-keyout", f"{ca}.key", "-out", f"{ca}.pem", "-days", "2",
                 "-subj", f"/CN=stream-sentiment test {ca}", cwd=folder)
    (folder / "server.ext").write_text("subjectAltName=IP:127.0.0.1,DNS:localhost\n")
    for name, subject, extensions in (("server", "/CN=localhost", ["-extfile", "server.ext"]),
                                      ("client", "/CN=stream-sentiment-client", [])):
        _openssl("req", *ec, "-keyout", f"{name}.key", "-out", f"{name}.csr", "-subj", subject, cwd=folder)
        _openssl("x509", "-req", "-in", f"{name}.csr", "-CA", "ca.pem", "-CAkey", "ca.key", "-CAcreateserial",
                 "-out", f"{name}.pem", "-days", "2", *extensions, cwd=folder)
    for key in folder.glob("*.key"):
        key.chmod(0o600)
    return Certificates(folder / "ca.pem", folder / "server.pem", folder / "server.key", folder / "client.pem",
                        folder / "client.key", folder / "other-ca.pem")


def _wait_for_port(port: int, proc: subprocess.Popen[bytes], log: Path, timeout: float = 20.0) -> None:
    import socket

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{proc.args[0]} exited with {proc.returncode}:\n{log.read_text(errors='replace')}")
        with contextlib.suppress(OSError), socket.create_connection((LOOPBACK, port), timeout=0.5):
            return
        time.sleep(0.05)
    raise RuntimeError(f"{proc.args[0]} did not listen on {port} within {timeout}s:\n{log.read_text(errors='replace')}")


def _stop(proc: subprocess.Popen[bytes] | None) -> None:
    if proc is None or proc.poll() is not None:
        return
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout=5)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(timeout=5)


class TlsKafka:
    """The embedded Tansu broker behind stunnel: TLS on ``port``, client certificates required (mutual TLS).

    Tansu advertises the stunnel port, so clients stay on TLS after bootstrapping. The broker's own
    plaintext port (``kafka.bootstrap_servers``) serves topic creation with Tansu's CLI.
    """

    def __init__(self, certs: Certificates, folder: Path) -> None:
        self.binary = require_binary("stunnel4", "stunnel")
        self.certs = certs
        self.folder = folder
        self.port = free_port()
        self.kafka = EmbeddedKafka(advertised_port=self.port)
        self._proc: subprocess.Popen[bytes] | None = None

    @property
    def bootstrap_servers(self) -> str:
        return f"{LOOPBACK}:{self.port}"

    def __enter__(self) -> TlsKafka:
        self.kafka.start()
        try:
            config = self.folder / "stunnel.conf"
            log = self.folder / "stunnel.log"
            config.write_text(
                f"foreground = yes\npid =\noutput = {log}\n[kafka]\n"
                f"accept = {LOOPBACK}:{self.port}\nconnect = {LOOPBACK}:{self.kafka.port}\n"
                f"cert = {self.certs.server_cert}\nkey = {self.certs.server_key}\n"
                f"CAfile = {self.certs.ca}\nverifyChain = yes\n")
            log.touch()
            self._proc = subprocess.Popen([self.binary, str(config)], stdin=subprocess.DEVNULL,
                                          stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
            _wait_for_port(self.port, self._proc, log)
        except BaseException:
            self.__exit__()
            raise
        return self

    def __exit__(self, *exc_info: object) -> None:
        _stop(self._proc)
        self.kafka.stop()


class TlsRedis:
    """Debian's redis-server: TLS only (no plaintext port), client certificates required, the ``default`` user
    off and one ACL user limited to the ``ss:*`` keys and channels."""

    def __init__(self, certs: Certificates, folder: Path, password: str) -> None:
        self.binary = require_binary("redis-server")
        self.certs = certs
        self.folder = folder
        self.password = password
        self.port = free_port()
        self._proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"rediss://{LOOPBACK}:{self.port}/0"

    def __enter__(self) -> TlsRedis:
        self.folder.mkdir(parents=True, exist_ok=True)
        acl = self.folder / "users.acl"
        acl.write_text(f"user default off\nuser {REDIS_USER} on >{self.password} ~{REDIS_PREFIX}:* "
                       f"&{REDIS_PREFIX}:* +@all\n")
        log = self.folder / "redis.log"
        with log.open("wb") as output:
            self._proc = subprocess.Popen(
                [self.binary, "--port", "0", "--tls-port", str(self.port), "--bind", LOOPBACK,
                 "--tls-cert-file", str(self.certs.server_cert), "--tls-key-file", str(self.certs.server_key),
                 "--tls-ca-cert-file", str(self.certs.ca), "--tls-auth-clients", "yes", "--aclfile", str(acl),
                 "--save", "", "--appendonly", "no", "--daemonize", "no", "--dir", str(self.folder)],
                stdin=subprocess.DEVNULL, stdout=output, stderr=subprocess.STDOUT)
        try:
            _wait_for_port(self.port, self._proc, log)
        except RuntimeError as error:
            _stop(self._proc)
            if "TLS" in str(error) and "not" in str(error):
                pytest.skip(f"this redis-server was built without TLS: {error}")
            raise
        return self

    def client(self, **options: object) -> redis.Redis:
        """A client signed in as the ACL user, over mutual TLS."""
        return redis.Redis.from_url(
            self.url, username=REDIS_USER, password=self.password, ssl_ca_certs=str(self.certs.ca),
            ssl_certfile=str(self.certs.client_cert), ssl_keyfile=str(self.certs.client_key), **options)

    def __exit__(self, *exc_info: object) -> None:
        _stop(self._proc)
