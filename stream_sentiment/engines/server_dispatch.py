"""The engine server's hosted engines: a request queue per engine, one dispatcher thread per stream.

Each engine stream has one dispatcher thread (so a stream is never shared): it takes
the oldest waiting request and, with it, the other waiting requests of the same length
bucket, up to the largest batch -- requests from several workers then share one graph
replay, and the more the GPU is behind, the fuller its calls. Nothing waits to be
merged: a request that finds a stream idle runs at once. A call that fails is retried
request by request, so only a request that fails alone is answered with ERROR (the
client's slot pool retries or isolates the post, as for any engine failure); a stream
whose rebuild fails leaves rotation, and with none left every request is answered with
ERROR, so workers fall back or pause.

The sockets, the handshake and which engines are loaded are :mod:`stream_sentiment.engines.server`'s.
"""

from __future__ import annotations

import contextlib
import logging
import socket
import threading
import time
from collections import deque
from dataclasses import dataclass, field

import numpy as np
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, ProcessCollector

from stream_sentiment.engines import wire
from stream_sentiment.engines.base import Engine, TokenBatch
from stream_sentiment.engines.manifest import EngineVersion
from stream_sentiment.interpreter import settle_heap

log = logging.getLogger(__name__)

# Latency buckets for one engine call on a GPU: tens of microseconds to a slow, large batch.
CALL_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.002, 0.004, 0.008, 0.016, 0.032, 0.064, 0.128, 0.5, 2.0)


class EngineServerMetrics:
    """The server's Prometheus metrics, in a registry of their own."""

    def __init__(self) -> None:
        self.registry = r = CollectorRegistry()
        ns = "stream_sentiment"
        ProcessCollector(registry=r)
        self.calls = Counter("engine_server_calls", "Requests answered, by outcome (ok, engine_error, bad_request).",
                             ["outcome"], namespace=ns, registry=r)
        # By model: with language routing a server hosts one model per route, and a route is named by its model.
        self.batches = Counter("engine_server_batches", "Engine calls on the device, by model: requests / batches "
                               "is how many requests shared a call.", ["model"], namespace=ns, registry=r)
        self.rows = Counter("engine_server_rows", "Posts scored by the engine server, by model.", ["model"],
                            namespace=ns, registry=r)
        self.call_seconds = Histogram("engine_server_call_seconds", "One engine call on the device, copies "
                                      "included, by model.", ["model"], buckets=CALL_BUCKETS, namespace=ns,
                                      registry=r)
        self.stream_wait = Histogram("engine_server_stream_wait_seconds",
                                     "How long a request waited for an engine stream, by model.", ["model"],
                                     buckets=CALL_BUCKETS, namespace=ns, registry=r)
        self.clients = Gauge("engine_server_clients", "Open client connections (worker slots).",
                             namespace=ns, registry=r)
        self.engines = Gauge("engine_server_engines", "Engines loaded (one per model, version and shape set).",
                             namespace=ns, registry=r)
        self.lost_streams = Gauge("engine_server_lost_streams", "Engine streams out of rotation, over all engines.",
                                  namespace=ns, registry=r)


@dataclass(frozen=True)
class EngineKey:
    """What a client serves: an engine is shared only by clients asking for the same model, version and shapes.

    With language routing each route's model has engines of its own: requests of two models never meet in
    one queue, so a device call never mixes engines.
    """

    model: str
    version: str
    buckets: tuple[int, ...]
    max_rows: int


@dataclass(eq=False)
class Client:
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
class Request:
    batch: TokenBatch
    client: Client
    metrics: EngineServerMetrics
    queued: float = field(default_factory=time.perf_counter)

    def answer(self, logits: np.ndarray) -> None:
        self.metrics.calls.labels("ok").inc()
        self.client.send(wire.LOGITS, *wire.logits_parts(logits))

    def fail(self, error: str) -> None:
        self.metrics.calls.labels("engine_error").inc()
        self.client.error(error)


@dataclass(eq=False)
class HostedEngine:
    """One loaded engine, the requests waiting for it and the threads of its streams."""

    key: EngineKey
    version: EngineVersion
    engine: Engine
    vocabulary: int
    metrics: EngineServerMetrics
    pending: deque[Request] = field(default_factory=deque)
    ready: threading.Condition = field(default_factory=threading.Condition)
    lost: set[int] = field(default_factory=set)
    dispatchers: list[threading.Thread] = field(default_factory=list)
    clients: int = 0
    pinned: bool = False
    closing: bool = False
    # This model's series, looked up once rather than per call.
    _rows: Counter = field(init=False, repr=False)
    _batches: Counter = field(init=False, repr=False)
    _call_seconds: Histogram = field(init=False, repr=False)
    _stream_wait: Histogram = field(init=False, repr=False)

    def __post_init__(self) -> None:
        model = self.key.model
        self._rows, self._batches = self.metrics.rows.labels(model), self.metrics.batches.labels(model)
        self._call_seconds = self.metrics.call_seconds.labels(model)
        self._stream_wait = self.metrics.stream_wait.labels(model)

    @property
    def working(self) -> bool:
        return len(self.lost) < self.engine.streams

    def take_group(self) -> list[Request]:
        """The oldest waiting request and the later ones of its bucket that fit beside it (lock held)."""
        first = self.pending.popleft()
        group, rows = [first], first.batch.rows
        for request in list(self.pending):
            if request.batch.bucket == first.batch.bucket and rows + request.batch.rows <= self.key.max_rows:
                self.pending.remove(request)
                group.append(request)
                rows += request.batch.rows
        return group

    def start(self) -> None:
        """Start one dispatcher thread per engine stream."""
        for stream in range(self.engine.streams):
            thread = threading.Thread(target=self._dispatch, args=(stream,), daemon=True,
                                      name=f"engine-server-{self.key.model}-{self.key.version}-stream-{stream}")
            thread.start()
            self.dispatchers.append(thread)

    def submit(self, request: Request) -> None:
        """Queue a checked request for a stream thread, which answers it (one handoff, not two)."""
        with self.ready:
            if self.working:
                self.pending.append(request)
                self.ready.notify()
                return
        request.fail(f"no stream of {self.engine.describe()} works on the engine server")

    def unload(self, join_timeout_s: float) -> None:
        """Answer what waits, stop the stream threads (each within ``join_timeout_s``), release the engine."""
        with self.ready:
            self.closing = True
            self.ready.notify_all()
        for thread in self.dispatchers:
            thread.join(join_timeout_s)
        self.engine.deactivate()
        settle_heap()  # it may have been frozen with the start-up heap: only a collection after an unfreeze frees it

    def _dispatch(self, stream: int) -> None:
        """One stream's thread: run the next group of waiting requests, until unloaded or out of rotation."""
        while True:
            with self.ready:
                while not self.pending and not self.closing:
                    self.ready.wait()
                if self.closing:
                    while self.pending:  # unloading: answer, rather than leave clients to their timeouts
                        self.pending.popleft().fail(f"{self.engine.describe()} is being unloaded")
                    return
                group = self.take_group()
            self._run(stream, group)
            if stream in self.lost:
                with self.ready:
                    if not self.working:  # the last stream: nobody else will answer these
                        while self.pending:
                            self.pending.popleft().fail(f"no stream of {self.engine.describe()} works")
                return

    def _run(self, stream: int, group: list[Request], *, retry: bool = False) -> None:
        started = time.perf_counter()
        if not retry:
            for request in group:
                self._stream_wait.observe(started - request.queued)
        if len(group) == 1:
            batch = group[0].batch
        else:
            batch = TokenBatch(np.concatenate([r.batch.input_ids for r in group]),
                               np.concatenate([r.batch.attention_mask for r in group]), group[0].batch.bucket)
        try:
            logits = self.engine.logits(batch, stream)
        except Exception as error:
            self._rebuild(stream, error)
            if len(group) > 1 and stream not in self.lost:
                for request in group:  # alone, so only the request at fault gets the error
                    self._run(stream, [request], retry=True)
                return
            for request in group:
                request.fail(f"{type(error).__name__}: {error}")
            return
        self._call_seconds.observe(time.perf_counter() - started)
        self._batches.inc()
        self._rows.inc(batch.rows)
        offset = 0
        for request in group:
            request.answer(logits[offset:offset + request.batch.rows])
            offset += request.batch.rows

    def _rebuild(self, stream: int, error: BaseException) -> None:
        log.warning("%s stream %d failed (%s): rebuilding", self.engine.describe(), stream, error)
        try:
            self.engine.rebuild(stream)
        except Exception:
            log.exception("%s stream %d could not be rebuilt: out of rotation", self.engine.describe(), stream)
            with self.ready:
                self.lost.add(stream)
            self.metrics.lost_streams.inc()
