"""The engine server: one process owns the GPU and scores batches for every worker on the host.

Why a separate process: one Python worker process decodes, tokenizes and aggregates far
fewer posts per second than one GPU scores, so a GPU host runs several workers. Each
with its own engine, every worker is its own CUDA context, and the GPU time-slices
between contexts: a four-row batch then waits for the other processes' slices, which
is most of the end-to-end latency at moderate load (``docs/benchmarks-log.md``). Here the
workers keep the CPU work and send their token batches (``backend = "engine-server"``)
to this one process, which runs them on its engine's CUDA streams in one context.

The server is driven by its clients. A client connection (one per client slot) opens
with HELLO naming the model, engine version, length buckets and largest batch it
serves; the server loads and warms that engine on first request -- a hot swap on a
worker asks for the new version the same way -- and keeps it while any connection
uses it. Versions are names in the server's own engine repository (never paths), and
the model file's sha256 must equal the client's, so both sides serve the same bytes.

Language routing (``engine.routes``): the server hosts the models its own settings
name -- ``engine.model`` and each route's -- with the same routes as the workers', so
a routed worker's connections for each route reach that route's engine. Each model's
engines have their own request queue and streams (a device call never mixes models),
and a worker's hot swap of one route loads and releases versions of that route's model
only. A worker asking for a model the server does not host is refused at its HELLO,
i.e. when its engine activates at start-up or in a hot swap, never batch by batch.

Each connection has its own thread, which only reads requests and writes answers.
Each engine stream has one dispatcher thread, which merges waiting requests of one
length bucket into a call and answers them (:mod:`stream_sentiment.engines.server_dispatch`).

The socket file is created mode 0600 in its folder: only the server's own user (the
workers run as the same user) can connect.
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
import stat
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, Self

from prometheus_client.exposition import start_http_server

from stream_sentiment.batching.routing import plan_routes
from stream_sentiment.config import Settings
from stream_sentiment.engines import wire
from stream_sentiment.engines.base import Engine
from stream_sentiment.engines.manifest import VERSION_PATTERN, EngineRepository, EngineRepositoryError, EngineVersion
from stream_sentiment.engines.server_dispatch import Client, EngineKey, EngineServerMetrics, HostedEngine, Request

log = logging.getLogger(__name__)

OpenEngine = Callable[[Settings], tuple[EngineVersion, Engine]]
SERVER_BACKEND = "engine-server"


class EngineServer:
    """Serves ``settings.engine.backend`` engines to ``engine-server`` clients on a Unix socket.

    Args:
        settings: the server's settings: ``engine.backend`` (the device backend), ``engine.streams``,
            ``engine.repository``/``model``, ``engine.routes`` (the models hosted beside ``model``)
            and ``engine.server_socket``.
        open_engine: ``settings -> (version, engine)``, not yet activated (``service.open_engine``);
            called with ``engine.model``, ``engine.version``, ``batching.buckets`` and
            ``batching.max_rows`` set to a client's request.
        metrics: where to count; new ones when not given.
    """

    def __init__(self, settings: Settings, open_engine: OpenEngine, *,
                 metrics: EngineServerMetrics | None = None) -> None:
        if settings.engine.backend == SERVER_BACKEND:
            raise ValueError("the engine server needs a device backend (torch-cuda, tensorrt, onnxruntime) in "
                             "engine.backend, not engine-server")
        if settings.engine.server_socket is None:
            raise ValueError("the engine server needs engine.server_socket (STREAM_SENTIMENT_ENGINE__SERVER_SOCKET)")
        self.settings = settings
        # The hosted models and the version of each to preload: the default one and each route's (unknown
        # models or versions in engine.routes are refused here, before anything listens).
        self.plan = plan_routes(settings)
        self.socket_path = Path(settings.engine.server_socket)
        self.open_engine = open_engine
        self.metrics = metrics if metrics is not None else EngineServerMetrics()
        self._hosted: dict[EngineKey, HostedEngine] = {}
        # Loads are rare and slow; one at a time keeps GPU memory predictable. Serving never takes it.
        self._load_lock = threading.Lock()
        self._listener: socket.socket | None = None
        self._connections: set[socket.socket] = set()
        self._connections_lock = threading.Lock()
        self._threads: list[threading.Thread] = []
        self._closing = threading.Event()

    # -- life cycle ----------------------------------------------------------------------------

    def start(self) -> Self:
        """Listen on the socket (a stale file left by a dead server is replaced; a live one is an error)."""
        path = self.socket_path
        path.parent.mkdir(parents=True, exist_ok=True)
        if path.exists() or path.is_symlink():
            if not stat.S_ISSOCK(path.lstat().st_mode):
                raise FileExistsError(f"{path} exists and is not a socket")
            if _answers(path):
                raise OSError(f"an engine server already listens on {path}")
            path.unlink()
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        old_umask = os.umask(0o177)  # the socket is born 0600: no window in which others could connect
        try:
            listener.bind(str(path))
        finally:
            os.umask(old_umask)
        listener.listen(64)
        listener.settimeout(0.2)  # accept() wakes up to notice close()
        self._listener = listener
        self._spawn(self._accept_loop, "engine-server-accept")
        if self.settings.metrics_port:
            # On the admin bind address (loopback by default), as a worker serves its own metrics.
            start_http_server(self.settings.metrics_port, addr=self.settings.admin.host, registry=self.metrics.registry)
        log.info("engine server (%s, %d stream(s) per engine, models %s) listening on %s",
                 self.settings.engine.backend, self.settings.engine.streams, self.models, path)
        return self

    @property
    def models(self) -> list[str]:
        """The models this server hosts: ``engine.model`` first, then each route's."""
        return list(self.plan.targets)

    def preload(self) -> EngineKey:
        """Load and warm every hosted model's configured version now and keep them, so workers find them ready.

        Returns the default model's key (``engine.model``/``engine.version``); the routes' are in :meth:`hosted`.
        """
        settings = self.settings
        keys = []
        for target in self.plan.targets.values():  # the default first
            buckets = settings.batching.buckets
            if buckets is None:  # as the workers' engines: each model's own manifest buckets
                repository = EngineRepository(settings.engine.repository, target.model)
                buckets = repository.load(target.version).manifest.buckets
            key = EngineKey(target.model, target.version, tuple(buckets), settings.batching.max_rows)
            self._acquire(key, expected_sha256=None, pin=True)
            keys.append(key)
        return keys[0]

    def loaded(self, key: EngineKey) -> tuple[EngineVersion, Engine]:
        """The version and engine hosted under ``key`` (e.g. what :meth:`preload` returned)."""
        with self._load_lock:
            hosted = self._hosted[key]
            return hosted.version, hosted.engine

    def close(self) -> None:
        """Stop accepting, drop every connection, release every engine, remove the socket."""
        self._closing.set()
        if self._listener is not None:
            self._listener.close()
        with self._connections_lock:
            for connection in self._connections:
                with contextlib.suppress(OSError):
                    connection.shutdown(socket.SHUT_RDWR)
        for thread in self._threads:
            thread.join(5)
        with self._load_lock:
            for hosted in self._hosted.values():
                self._unload(hosted)
            self._hosted.clear()
            self.metrics.engines.set(0)
        with contextlib.suppress(FileNotFoundError):
            if self._listener is not None:
                self.socket_path.unlink()

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def hosted(self) -> list[dict[str, Any]]:
        """What is loaded: model, version, buckets, rows, clients, lost streams (for logs and tests)."""
        with self._load_lock:
            return [{"model": k.model, "version": k.version, "buckets": list(k.buckets), "max_rows": k.max_rows,
                     "clients": h.clients, "pinned": h.pinned, "lost_streams": sorted(h.lost)}
                    for k, h in self._hosted.items()]

    # -- engines -------------------------------------------------------------------------------

    def _acquire(self, key: EngineKey, expected_sha256: str | None, *, pin: bool = False) -> HostedEngine:
        """The hosted engine for ``key``, loaded if need be, counted as used by one more client (or pinned)."""
        with self._load_lock:
            hosted = self._hosted.get(key)
            if hosted is None:
                hosted = self._load(key)
                self._hosted[key] = hosted
                self.metrics.engines.set(len(self._hosted))
            if expected_sha256 is not None:
                manifest = hosted.version.manifest
                actual = manifest.files.get(manifest.model_file)
                if actual != expected_sha256:
                    self._release_locked(hosted, counted=False)
                    raise EngineRepositoryError(
                        f"the engine server's {hosted.version.label} has model sha256 {actual}, the worker's "
                        f"{expected_sha256}: the two repositories hold different builds")
            if pin:
                hosted.pinned = True
            else:
                hosted.clients += 1
            return hosted

    def _load(self, key: EngineKey) -> HostedEngine:
        engine_settings = self.settings.engine.model_copy(update={"model": key.model, "version": key.version})
        batching = self.settings.batching.model_copy(update={"buckets": key.buckets, "max_rows": key.max_rows})
        settings = self.settings.model_copy(update={"engine": engine_settings, "batching": batching})
        version, engine = self.open_engine(settings)
        started = time.perf_counter()
        engine.activate_warm()
        log.info("loaded %s for buckets %s, %d rows in %.1f s", engine.describe(), list(key.buckets), key.max_rows,
                 time.perf_counter() - started)
        from tokenizers import Tokenizer

        vocabulary = Tokenizer.from_file(str(version.tokenizer_path)).get_vocab_size()
        hosted = HostedEngine(key, version, engine, vocabulary, self.metrics)
        hosted.start()
        return hosted

    def _unload(self, hosted: HostedEngine) -> None:
        hosted.unload(self.settings.engine.call_timeout_s)

    def _release(self, hosted: HostedEngine) -> None:
        with self._load_lock:
            self._release_locked(hosted, counted=True)

    def _release_locked(self, hosted: HostedEngine, *, counted: bool) -> None:
        if counted:
            hosted.clients -= 1
        if hosted.clients <= 0 and not hosted.pinned and self._hosted.get(hosted.key) is hosted:
            # The last worker let go (a finished hot swap's old version): free its GPU memory.
            del self._hosted[hosted.key]
            self.metrics.engines.set(len(self._hosted))
            self._unload(hosted)
            log.info("released %s", hosted.engine.describe())

    # -- connections ---------------------------------------------------------------------------

    def _spawn(self, target: Callable[..., None], name: str, *args: Any) -> None:
        thread = threading.Thread(target=target, args=args, name=name, daemon=True)
        thread.start()
        self._threads = [t for t in self._threads if t.is_alive()] + [thread]

    def _accept_loop(self) -> None:
        assert self._listener is not None
        while not self._closing.is_set():
            try:
                connection, _ = self._listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return  # closed
            connection.settimeout(None)
            with self._connections_lock:
                self._connections.add(connection)
            self._spawn(self._serve, "engine-server-client", connection)

    def _serve(self, connection: socket.socket) -> None:
        hosted: HostedEngine | None = None
        self.metrics.clients.inc()
        try:
            hosted = self._handshake(connection)
            if hosted is None:
                return
            client = Client(connection)
            while not self._closing.is_set():
                kind, body = wire.recv_frame(connection)
                if kind != wire.INFER:
                    client.error(f"expected INFER, got {kind!r}")
                    return
                self._queue(client, hosted, body)
        except (wire.WireError, OSError):
            pass  # the worker went away (or the server is closing): nothing to answer
        except Exception:
            log.exception("engine server connection failed")
        finally:
            self.metrics.clients.dec()
            with self._connections_lock:
                self._connections.discard(connection)
            with contextlib.suppress(OSError):
                connection.close()
            if hosted is not None:
                self._release(hosted)

    def _handshake(self, connection: socket.socket) -> HostedEngine | None:
        kind, body = wire.recv_frame(connection)
        if kind != wire.HELLO:
            wire.send_error(connection, f"expected HELLO, got {kind!r}")
            return None
        try:
            hello = wire.parse_json(body)
            key, sha256 = _parse_hello(hello, self.settings.batching.max_rows, self.settings.engine.model)
            if key.model not in self.plan.targets:
                raise ValueError(
                    f"this engine server hosts {self.models}, not {key.model!r}: give the server the workers' "
                    "engine.model and engine.routes, so it hosts every route's model")
            hosted = self._acquire(key, sha256)
        except Exception as error:  # a bad request or a failed load: the worker gets the reason
            log.warning("refused a client: %s", error)
            self.metrics.calls.labels("bad_request").inc()
            wire.send_error(connection, f"{type(error).__name__}: {error}")
            return None
        engine = hosted.engine
        try:
            wire.send_json(connection, wire.READY, {
                "protocol": wire.PROTOCOL, "model": hosted.key.model, "backend": engine.backend,
                "streams": engine.streams,
                "labels": list(engine.labels), "describe": engine.describe(),
            })
        except OSError:
            self._release(hosted)  # the worker left during the load: it holds nothing
            raise
        return hosted

    def _queue(self, client: Client, hosted: HostedEngine, body: memoryview) -> None:
        """Check a request and hand it to the engine's stream threads (:meth:`HostedEngine.submit`)."""
        try:
            batch = wire.parse_batch(body)
        except wire.WireError as error:
            self.metrics.calls.labels("bad_request").inc()
            client.error(str(error))
            return
        key = hosted.key
        problem = None
        if batch.bucket not in key.buckets or not 1 <= batch.rows <= key.max_rows:
            problem = (f"a {batch.rows} x {batch.bucket} batch is outside what this client announced "
                       f"(buckets {list(key.buckets)}, 1 to {key.max_rows} rows)")
        elif batch.input_ids.min() < 0 or batch.input_ids.max() >= hosted.vocabulary:
            # Out-of-range ids would trip a device-side assert, and this process serves every worker.
            problem = f"token ids outside the vocabulary (0 to {hosted.vocabulary - 1})"
        elif batch.attention_mask.max() > 1:
            problem = "attention mask values other than 0 and 1"
        if problem is not None:
            self.metrics.calls.labels("bad_request").inc()
            client.error(problem)
            return
        hosted.submit(Request(batch, client, self.metrics))

def _parse_hello(hello: dict[str, Any], max_rows_limit: int, default_model: str) -> tuple[EngineKey, str | None]:
    """The client's request, checked; ``max_rows_limit`` (the server's ``batching.max_rows``) bounds the
    buffers and graphs a client can make the server allocate; a protocol 1 client asks for ``default_model``."""
    protocol = hello.get("protocol")
    if type(protocol) is not int or protocol not in wire.PROTOCOLS:  # True == 1 and 1.0 == 1: not a protocol
        raise ValueError(f"protocol {protocol!r}, this server speaks {list(wire.PROTOCOLS)}")
    model = hello.get("model") if protocol >= 2 else default_model
    if not isinstance(model, str) or not VERSION_PATTERN.fullmatch(model):
        raise ValueError(f"model must be a plain model name, got {model!r}")
    version, buckets, max_rows = hello.get("version"), hello.get("buckets"), hello.get("max_rows")
    if not isinstance(version, str) or not VERSION_PATTERN.fullmatch(version):
        raise ValueError(f"version must be a plain version name, got {version!r}")
    if not isinstance(buckets, list) or not buckets or not all(isinstance(b, int) and b > 0 for b in buckets):
        raise ValueError(f"buckets must be positive integers, got {buckets!r}")
    if not isinstance(max_rows, int) or not 1 <= max_rows <= max_rows_limit:
        raise ValueError(f"max_rows must be an integer from 1 to the server's batching.max_rows "
                         f"({max_rows_limit}), got {max_rows!r}")
    sha256 = hello.get("model_sha256")
    return EngineKey(model, version, tuple(buckets), max_rows), sha256 if isinstance(sha256, str) else None


def _answers(path: Path) -> bool:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
        probe.settimeout(1.0)
        try:
            probe.connect(str(path))
        except OSError:
            return False
    return True
