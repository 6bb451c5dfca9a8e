"""``engine-server``: a worker's engine whose batches run in the host's engine server process.

Each slot is a Unix-socket connection to ``stream-sentiment engine-server``
(:mod:`stream_sentiment.engines.server`) with one request in flight at a time, so a slot
keeps the Engine contract: one call at a time, never shared. A call is only socket I/O,
so the worker's slot pool makes it on its event loop (``infer_on_loop``, the slot's
connection switched to non-blocking) instead of handing every batch to a slot thread and
back; calls from threads (warm-up, a hot swap's validation) use it blocking. Activation asks the
server for this worker's model, version, buckets and largest batch (the server loads
and warms it if no other worker already did; a model it does not host -- a route the
server was not given -- is refused there, at start-up or in a hot swap). With language
routing each route's engine is one of these, with connections of its own. Rebuilding
a slot reconnects, so a slot recovers from a server restart; a dead or unreachable
server is an engine failure like a GPU fault, handled by the slot pool (retry,
rotation, pause or CPU fallback).
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
from pathlib import Path
from typing import Any

import numpy as np

from stream_sentiment.engines import wire
from stream_sentiment.engines.base import BackendUnavailableError, Engine, EngineError, TokenBatch
from stream_sentiment.engines.manifest import EngineVersion


class EngineServerEngine(Engine):
    """Scores on the engine server at ``socket_path`` with ``streams`` connections.

    Args:
        version: the verified version this worker serves (buckets included).
        streams: client slots, i.e. batches this worker may have in flight at once.
        socket_path: the server's Unix socket (``engine.server_socket``).
        max_rows: the largest batch this worker forms (``batching.max_rows``).
        timeout_s: longest a connect or an answer may take before the call counts as failed.
    """

    backend = "engine-server"
    scores_on_event_loop = True

    def __init__(self, version: EngineVersion, streams: int = 1, *, socket_path: Path, max_rows: int,
                 timeout_s: float = 30.0) -> None:
        super().__init__(version, streams)
        self.socket_path = Path(socket_path)
        self.max_rows = max_rows
        self.timeout_s = timeout_s
        self.server_info: dict[str, Any] = {}
        # One connection per slot, blocking (with the call timeout) for calls on a thread -- activation's warm-up,
        # a hot swap's validation -- and non-blocking once the event loop calls on it (``infer_on_loop``).
        self._connections: list[socket.socket | None] = []

    def describe(self) -> str:
        served = self.server_info.get("describe", "not connected")
        return f"{self.backend} engine {self.version.label} at {self.socket_path} ({served}; {self.streams} slot(s))"

    def _activate_impl(self) -> None:
        if not self.socket_path.exists():
            raise BackendUnavailableError(
                f"no engine server at {self.socket_path}: start `stream-sentiment engine-server` on this host "
                "(with engine.backend set to the device backend) or point engine.server_socket at its socket")
        self._connections = [None] * self.streams
        try:
            for stream in range(self.streams):
                self._connections[stream] = self._connect()
        except BaseException:
            self._close_all()
            raise

    def _connect(self) -> socket.socket:
        connection = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        # A cold server loads and warms the version before it answers HELLO (CUDA graphs: seconds).
        connection.settimeout(max(self.timeout_s, 300.0))
        try:
            connection.connect(str(self.socket_path))
            wire.send_json(connection, wire.HELLO, self._hello())
            kind, body = wire.recv_frame(connection)
            self.server_info = self._ready_info(kind, body)
        except OSError as error:
            connection.close()
            raise EngineError(f"engine server at {self.socket_path}: {error}") from error
        except BaseException:
            connection.close()
            raise
        connection.settimeout(self.timeout_s)
        return connection

    def _hello(self) -> dict[str, Any]:
        manifest = self.version.manifest
        return {
            "protocol": wire.PROTOCOL, "model": manifest.model, "version": manifest.version,
            "buckets": list(manifest.buckets),
            "max_rows": self.max_rows, "model_sha256": manifest.files.get(manifest.model_file),
        }

    def _ready_info(self, kind: bytes, body: memoryview) -> dict[str, Any]:
        """The server's READY answer to HELLO, checked against this version; EngineError otherwise."""
        manifest = self.version.manifest
        if kind == wire.ERROR:
            raise EngineError(f"engine server refused {self.version.label}: {bytes(body).decode(errors='replace')}")
        if kind != wire.READY:
            raise EngineError(f"engine server answered HELLO with {kind!r}")
        info = wire.parse_json(body)
        if info.get("model") != manifest.model:
            raise EngineError(f"engine server answered for model {info.get('model')!r}, not {manifest.model!r}")
        if tuple(info.get("labels", ())) != manifest.labels:
            raise EngineError(f"engine server labels {info.get('labels')} differ from {list(manifest.labels)}")
        return info

    def _infer_impl(self, batch: TokenBatch, stream: int) -> np.ndarray:
        connection = self._connections[stream]
        if connection is None:
            raise EngineError(f"stream {stream} has no connection to the engine server; rebuild it")
        if connection.gettimeout() != self.timeout_s:
            connection.settimeout(self.timeout_s)  # blocking again after calls on the event loop
        try:
            wire.send_frame(connection, wire.INFER, *wire.batch_parts(batch))
            kind, body = wire.recv_frame(connection)
        except OSError as error:  # WireError included: the server died or hung; this connection is done
            self._drop(stream)
            raise EngineError(f"engine server at {self.socket_path}: {error}") from error
        return self._logits(kind, body, batch, stream)

    async def _infer_on_loop_impl(self, batch: TokenBatch, stream: int) -> np.ndarray:
        connection = self._connections[stream]
        if connection is None:
            raise EngineError(f"stream {stream} has no connection to the engine server; rebuild it")
        if connection.gettimeout() != 0.0:
            connection.setblocking(False)  # the loop's from now on (a thread's call sets its timeout back)
        loop = asyncio.get_running_loop()
        try:
            await loop.sock_sendall(connection, wire.frame(wire.INFER, *wire.batch_parts(batch)))
            kind, body = await wire.recv_frame_on_loop(loop, connection)
        except OSError as error:  # WireError included: the server died or hung; this connection is done
            self._drop(stream)
            raise EngineError(f"engine server at {self.socket_path}: {error}") from error
        except BaseException:
            # Cancelled (a call timeout, a shutdown) with a frame half sent or half read: the connection's
            # place in the protocol is unknown, so it goes, and rebuilding the slot opens a new one.
            self._drop(stream)
            raise
        return self._logits(kind, body, batch, stream)

    def _logits(self, kind: bytes, body: memoryview, batch: TokenBatch, stream: int) -> np.ndarray:
        """The logits of an answer to INFER on ``stream``: an ERROR answer leaves the connection usable, an answer
        of another kind drops it (the protocol is out of step)."""
        if kind == wire.ERROR:
            raise EngineError(f"engine server: {bytes(body).decode(errors='replace')}")
        if kind != wire.LOGITS:
            self._drop(stream)
            raise EngineError(f"engine server answered INFER with {kind!r}")
        logits = wire.parse_logits(body)
        if logits.shape != (batch.rows, len(self.labels)):
            raise EngineError(f"engine server returned {logits.shape} logits for {batch.rows} rows")
        return logits

    def _rebuild_impl(self, stream: int) -> None:
        self._drop(stream)
        self._connections[stream] = self._connect()

    def _drop(self, stream: int) -> None:
        connection, self._connections[stream] = self._connections[stream], None
        if connection is not None:
            with contextlib.suppress(OSError):
                connection.close()

    def _close_all(self) -> None:
        for stream in range(len(self._connections)):
            self._drop(stream)

    def _deactivate_impl(self) -> None:
        self._close_all()
        self._connections = []
