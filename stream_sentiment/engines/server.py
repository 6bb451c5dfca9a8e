"""The engine server: one process owns the GPU and scores batches for every worker on the host.

Why a separate process: one Python worker process decodes, tokenizes and aggregates far
fewer posts per second than one GPU scores, so a GPU host runs several workers. Each
with its own engine, every worker is its own CUDA context, and the GPU time-slices
between contexts: a four-row batch then waits for the other processes' slices, which
is most of the end-to-end latency at moderate load (``docs/benchmarks.md``). Here the
workers keep the CPU work and send their token batches (``backend = "engine-server"``)
to this one process, which runs them on its engine's CUDA streams in one context.

The server is driven by its clients. A client connection (one per client slot) opens
with HELLO naming the engine version, the length buckets and the largest batch it
serves; the server loads and warms that engine on first request -- a hot swap on a
worker asks for the new version the same way -- and keeps it while any connection
uses it. Versions are names in the server's own engine repository (never paths), and
the model file's sha256 must equal the client's, so both sides serve the same bytes.

Each connection has its own thread, which only reads requests and writes answers.
Each engine stream has one dispatcher thread (so a stream is never shared): it takes
the oldest waiting request and, with it, the other waiting requests of the same length
bucket, up to the largest batch -- requests from several workers then share one graph
replay, and the more the GPU is behind, the fuller its calls. Nothing waits to be
merged: a request that finds a stream idle runs at once. A call that fails is retried
request by request, so only a request that fails alone is answered with ERROR (the
client's slot pool retries or isolates the post, as for any engine failure); a stream
whose rebuild fails leaves rotation, and with none left every request is answered with
ERROR, so workers fall back or pause.

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
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Self

import numpy as np
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, ProcessCollector
from prometheus_client.exposition import start_http_server

from stream_sentiment.config import Settings
from stream_sentiment.engines import wire
from stream_sentiment.engines.base import Engine, TokenBatch
from stream_sentiment.engines.manifest import VERSION_PATTERN, EngineRepository, EngineRepositoryError, EngineVersion
from stream_sentiment.interpreter import settle_heap

log = logging.getLogger(__name__)

OpenEngine = Callable[[Settings], tuple[EngineVersion, Engine]]
SERVER_BACKEND = "engine-server"
# Latency buckets for one engine call on a GPU: tens of microseconds to a slow, large batch.
CALL_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.002, 0.004, 0.008, 0.016, 0.032, 0.064, 0.128, 0.5, 2.0)


@dataclass(frozen=True)
class EngineKey:
    """What a client serves: an engine is shared only by clients asking for the same shapes."""

    version: str
    buckets: tuple[int, ...]
    max_rows: int


@dataclass(eq=False)
class _Client:
    """One connection's socket; answers come from whichever stream thread ran the request."""

    connection: socket.socket
    # The protocol has one request in flight per connection; the lock keeps a client that pipelines
    # anyway from getting two answers interleaved byte by byte.
    sending: threading.Lock = field(default_factory=threading.Lock)

    def send(self, kind: bytes, *parts: bytes) -> None:
        with self.sending:
            try:
                wire.send_frame(self.connection, kind, *parts)
            except OSError:
                # Gone, or the frame went out half: either way the connection is done. Shutting it makes
                # a client still waiting see EOF now (and reconnect) instead of after its timeout.
                with contextlib.suppress(OSError):
                    self.connection.shutdown(socket.SHUT_RDWR)

    def error(self, text: str) -> None:
        self.send(wire.ERROR, text.encode("utf-8", "replace"))


@dataclass(eq=False)
class _Request:
    batch: TokenBatch
    client: _Client
    metrics: EngineServerMetrics
    queued: float = field(default_factory=time.perf_counter)

    def answer(self, logits: np.ndarray) -> None:
        self.metrics.calls.labels("ok").inc()
        self.client.send(wire.LOGITS, *wire.logits_parts(logits))

    def fail(self, error: str) -> None:
        self.metrics.calls.labels("engine_error").inc()
        self.client.error(error)


@dataclass(eq=False)
class _Hosted:
    key: EngineKey
    version: EngineVersion
    engine: Engine
    vocabulary: int
    pending: deque[_Request] = field(default_factory=deque)
    ready: threading.Condition = field(default_factory=threading.Condition)
    lost: set[int] = field(default_factory=set)
    dispatchers: list[threading.Thread] = field(default_factory=list)
    clients: int = 0
    pinned: bool = False
    closing: bool = False

    @property
    def working(self) -> bool:
        return len(self.lost) < self.engine.streams

    def take_group(self) -> list[_Request]:
        """The oldest waiting request and the later ones of its bucket that fit beside it (lock held)."""
        first = self.pending.popleft()
        group, rows = [first], first.batch.rows
        for request in list(self.pending):
            if request.batch.bucket == first.batch.bucket and rows + request.batch.rows <= self.key.max_rows:
                self.pending.remove(request)
                group.append(request)
                rows += request.batch.rows
        return group


class EngineServerMetrics:
    """The server's Prometheus metrics, in a registry of their own."""

    def __init__(self) -> None:
        self.registry = r = CollectorRegistry()
        ns = "stream_sentiment"
        ProcessCollector(registry=r)
        self.calls = Counter("engine_server_calls", "Requests answered, by outcome (ok, engine_error, bad_request).",
                             ["outcome"], namespace=ns, registry=r)
        self.batches = Counter("engine_server_batches", "Engine calls on the device: requests / batches is how "
                               "many requests shared a call.", namespace=ns, registry=r)
        self.rows = Counter("engine_server_rows", "Posts scored by the engine server.", namespace=ns, registry=r)
        self.call_seconds = Histogram("engine_server_call_seconds", "One engine call on the device, copies included.",
                                      buckets=CALL_BUCKETS, namespace=ns, registry=r)
        self.stream_wait = Histogram("engine_server_stream_wait_seconds",
                                     "How long a request waited for an engine stream.",
                                     buckets=CALL_BUCKETS, namespace=ns, registry=r)
        self.clients = Gauge("engine_server_clients", "Open client connections (worker slots).",
                             namespace=ns, registry=r)
        self.engines = Gauge("engine_server_engines", "Engines loaded (one per version and shape set).",
                             namespace=ns, registry=r)
        self.lost_streams = Gauge("engine_server_lost_streams", "Engine streams out of rotation, over all engines.",
                                  namespace=ns, registry=r)


class EngineServer:
    """Serves ``settings.engine.backend`` engines to ``engine-server`` clients on a Unix socket.

    Args:
        settings: the server's settings: ``engine.backend`` (the device backend), ``engine.streams``,
            ``engine.repository``/``model`` and ``engine.server_socket``.
        open_engine: ``settings -> (version, engine)``, not yet activated (``service.open_engine``);
            called with ``engine.version``, ``batching.buckets`` and ``batching.max_rows`` set to a
            client's request.
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
        self.socket_path = Path(settings.engine.server_socket)
        self.open_engine = open_engine
        self.metrics = metrics if metrics is not None else EngineServerMetrics()
        self._hosted: dict[EngineKey, _Hosted] = {}
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
        log.info("engine server (%s, %d stream(s) per engine) listening on %s", self.settings.engine.backend,
                 self.settings.engine.streams, path)
        return self

    def preload(self) -> EngineKey:
        """Load and warm the configured version now and keep it, so the first worker finds it ready."""
        settings = self.settings
        buckets = settings.batching.buckets
        if buckets is None:
            repository = EngineRepository(settings.engine.repository, settings.engine.model)
            buckets = repository.load(settings.engine.version).manifest.buckets
        key = EngineKey(settings.engine.version, tuple(buckets), settings.batching.max_rows)
        self._acquire(key, expected_sha256=None, pin=True)
        return key

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
        """What is loaded: version, buckets, rows, clients, lost streams (for logs and tests)."""
        with self._load_lock:
            return [{"version": k.version, "buckets": list(k.buckets), "max_rows": k.max_rows,
                     "clients": h.clients, "pinned": h.pinned, "lost_streams": sorted(h.lost)}
                    for k, h in self._hosted.items()]

    # -- engines -------------------------------------------------------------------------------

    def _acquire(self, key: EngineKey, expected_sha256: str | None, *, pin: bool = False) -> _Hosted:
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

    def _load(self, key: EngineKey) -> _Hosted:
        engine_settings = self.settings.engine.model_copy(update={"version": key.version})
        batching = self.settings.batching.model_copy(update={"buckets": key.buckets, "max_rows": key.max_rows})
        settings = self.settings.model_copy(update={"engine": engine_settings, "batching": batching})
        version, engine = self.open_engine(settings)
        started = time.perf_counter()
        engine.activate_warm()
        log.info("loaded %s for buckets %s, %d rows in %.1f s", engine.describe(), list(key.buckets), key.max_rows,
                 time.perf_counter() - started)
        from tokenizers import Tokenizer

        vocabulary = Tokenizer.from_file(str(version.tokenizer_path)).get_vocab_size()
        hosted = _Hosted(key, version, engine, vocabulary)
        for stream in range(engine.streams):
            thread = threading.Thread(target=self._dispatch, args=(hosted, stream), daemon=True,
                                      name=f"engine-server-{key.version}-stream-{stream}")
            thread.start()
            hosted.dispatchers.append(thread)
        return hosted

    def _unload(self, hosted: _Hosted) -> None:
        with hosted.ready:
            hosted.closing = True
            hosted.ready.notify_all()
        for thread in hosted.dispatchers:
            thread.join(self.settings.engine.call_timeout_s)
        hosted.engine.deactivate()
        settle_heap()  # it may have been frozen with the start-up heap: only a collection after an unfreeze frees it

    def _release(self, hosted: _Hosted) -> None:
        with self._load_lock:
            self._release_locked(hosted, counted=True)

    def _release_locked(self, hosted: _Hosted, *, counted: bool) -> None:
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
        hosted: _Hosted | None = None
        self.metrics.clients.inc()
        try:
            hosted = self._handshake(connection)
            if hosted is None:
                return
            client = _Client(connection)
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

    def _handshake(self, connection: socket.socket) -> _Hosted | None:
        kind, body = wire.recv_frame(connection)
        if kind != wire.HELLO:
            wire.send_error(connection, f"expected HELLO, got {kind!r}")
            return None
        try:
            hello = wire.parse_json(body)
            key, sha256 = _parse_hello(hello, self.settings.batching.max_rows)
            hosted = self._acquire(key, sha256)
        except Exception as error:  # a bad request or a failed load: the worker gets the reason
            log.warning("refused a client: %s", error)
            self.metrics.calls.labels("bad_request").inc()
            wire.send_error(connection, f"{type(error).__name__}: {error}")
            return None
        engine = hosted.engine
        try:
            wire.send_json(connection, wire.READY, {
                "protocol": wire.PROTOCOL, "backend": engine.backend, "streams": engine.streams,
                "labels": list(engine.labels), "describe": engine.describe(),
            })
        except OSError:
            self._release(hosted)  # the worker left during the load: it holds nothing
            raise
        return hosted

    def _queue(self, client: _Client, hosted: _Hosted, body: memoryview) -> None:
        """Check a request and queue it for a stream thread, which answers it (one handoff, not two)."""
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
        request = _Request(batch, client, self.metrics)
        with hosted.ready:
            if hosted.working:
                hosted.pending.append(request)
                hosted.ready.notify()
                return
        request.fail(f"no stream of {hosted.engine.describe()} works on the engine server")

    def _dispatch(self, hosted: _Hosted, stream: int) -> None:
        """One stream's thread: run the next group of waiting requests, until unloaded or out of rotation."""
        while True:
            with hosted.ready:
                while not hosted.pending and not hosted.closing:
                    hosted.ready.wait()
                if hosted.closing:
                    while hosted.pending:  # unloading: answer, rather than leave clients to their timeouts
                        hosted.pending.popleft().fail(f"{hosted.engine.describe()} is being unloaded")
                    return
                group = hosted.take_group()
            self._run(hosted, stream, group)
            if stream in hosted.lost:
                with hosted.ready:
                    if not hosted.working:  # the last stream: nobody else will answer these
                        while hosted.pending:
                            hosted.pending.popleft().fail(f"no stream of {hosted.engine.describe()} works")
                return

    def _run(self, hosted: _Hosted, stream: int, group: list[_Request], *, retry: bool = False) -> None:
        started = time.perf_counter()
        if not retry:
            for request in group:
                self.metrics.stream_wait.observe(started - request.queued)
        if len(group) == 1:
            batch = group[0].batch
        else:
            batch = TokenBatch(np.concatenate([r.batch.input_ids for r in group]),
                               np.concatenate([r.batch.attention_mask for r in group]), group[0].batch.bucket)
        try:
            logits = hosted.engine.logits(batch, stream)
        except Exception as error:
            self._rebuild(hosted, stream, error)
            if len(group) > 1 and stream not in hosted.lost:
                for request in group:  # alone, so only the request at fault gets the error
                    self._run(hosted, stream, [request], retry=True)
                return
            for request in group:
                request.fail(f"{type(error).__name__}: {error}")
            return
        self.metrics.call_seconds.observe(time.perf_counter() - started)
        self.metrics.batches.inc()
        self.metrics.rows.inc(batch.rows)
        offset = 0
        for request in group:
            request.answer(logits[offset:offset + request.batch.rows])
            offset += request.batch.rows

    def _rebuild(self, hosted: _Hosted, stream: int, error: BaseException) -> None:
        log.warning("%s stream %d failed (%s): rebuilding", hosted.engine.describe(), stream, error)
        try:
            hosted.engine.rebuild(stream)
        except Exception:
            log.exception("%s stream %d could not be rebuilt: out of rotation", hosted.engine.describe(), stream)
            with hosted.ready:
                hosted.lost.add(stream)
            self.metrics.lost_streams.inc()


def _parse_hello(hello: dict[str, Any], max_rows_limit: int) -> tuple[EngineKey, str | None]:
    """The client's request, checked; ``max_rows_limit`` (the server's ``batching.max_rows``) bounds the
    buffers and graphs a client can make the server allocate."""
    if hello.get("protocol") != wire.PROTOCOL:
        raise ValueError(f"protocol {hello.get('protocol')!r}, this server speaks {wire.PROTOCOL}")
    version, buckets, max_rows = hello.get("version"), hello.get("buckets"), hello.get("max_rows")
    if not isinstance(version, str) or not VERSION_PATTERN.match(version):
        raise ValueError(f"version must be a plain version name, got {version!r}")
    if not isinstance(buckets, list) or not buckets or not all(isinstance(b, int) and b > 0 for b in buckets):
        raise ValueError(f"buckets must be positive integers, got {buckets!r}")
    if not isinstance(max_rows, int) or not 1 <= max_rows <= max_rows_limit:
        raise ValueError(f"max_rows must be an integer from 1 to the server's batching.max_rows "
                         f"({max_rows_limit}), got {max_rows!r}")
    sha256 = hello.get("model_sha256")
    return EngineKey(version, tuple(buckets), max_rows), sha256 if isinstance(sha256, str) else None


def _answers(path: Path) -> bool:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
        probe.settimeout(1.0)
        try:
            probe.connect(str(path))
        except OSError:
            return False
    return True
