"""The engine server's wire format: length-prefixed frames on a Unix stream socket.

A frame is ``<u32 little-endian length><kind byte><body>``, the length counting the kind
byte and the body. A connection opens with HELLO (JSON: which model, version, buckets and
batch size the client serves) answered by READY (JSON) or ERROR (UTF-8 text); then each INFER
(a token batch) is answered by LOGITS or ERROR, one at a time, in order. One connection
belongs to one client slot, so there is never more than one request in flight on it.

Token ids travel as int32 (the vocabulary is far below 2**31) and the attention mask as
uint8: 5 bytes per token instead of 16, since every batch crosses the socket twice.

Protocol 2 added the model to HELLO (language routing: a server hosts one model per route, and
a connection serves one of them); a protocol 1 HELLO names none and gets the server's default
model, so a worker of the previous release still connects.
"""

from __future__ import annotations

import asyncio
import json
import socket
import struct
from typing import Any

import numpy as np

from stream_sentiment.engines.base import TokenBatch

PROTOCOL = 2
PROTOCOLS = (1, 2)  # what a server accepts: 1 has no model in HELLO
HELLO, READY, INFER, LOGITS, ERROR = b"H", b"R", b"I", b"L", b"E"
# 256 rows x 256 tokens x 5 bytes is 320 KiB; anything near this bound is garbage or abuse.
MAX_FRAME_BYTES = 64 * 2**20
_LENGTH = struct.Struct("<I")
_SHAPE = struct.Struct("<II")


class WireError(ConnectionError):
    """The peer closed the connection, or sent something that is not a frame of this protocol."""


def frame(kind: bytes, *parts: bytes) -> bytes:
    """One frame's bytes: the length prefix, the kind byte and the body."""
    body = b"".join(parts)
    return _LENGTH.pack(1 + len(body)) + kind + body


def send_frame(sock: socket.socket, kind: bytes, *parts: bytes) -> None:
    sock.sendall(frame(kind, *parts))


def recv_frame(sock: socket.socket) -> tuple[bytes, memoryview]:
    """The next frame's kind and body; raises :class:`WireError` on EOF or an impossible length."""
    length = _frame_length(_recv_exact(sock, _LENGTH.size))
    body = memoryview(_recv_exact(sock, length))
    return bytes(body[:1]), body[1:]


async def recv_frame_on_loop(loop: asyncio.AbstractEventLoop, sock: socket.socket) -> tuple[bytes, memoryview]:
    """:func:`recv_frame` on a non-blocking socket, awaiting readiness on ``loop`` instead of blocking."""
    length = _frame_length(await _recv_exact_on_loop(loop, sock, _LENGTH.size))
    body = memoryview(await _recv_exact_on_loop(loop, sock, length))
    return bytes(body[:1]), body[1:]


def _frame_length(prefix: bytearray) -> int:
    (length,) = _LENGTH.unpack(prefix)
    if not 1 <= length <= MAX_FRAME_BYTES:
        raise WireError(f"frame of {length} bytes")
    return int(length)


async def _recv_exact_on_loop(loop: asyncio.AbstractEventLoop, sock: socket.socket, size: int) -> bytearray:
    buffer = bytearray(size)
    view = memoryview(buffer)
    received = 0
    while received < size:
        # sock_recv_into reads at once when data is there; it waits on the loop only when none is.
        count = await loop.sock_recv_into(sock, view[received:])
        if count == 0:
            raise WireError("connection closed by the peer")
        received += count
    return buffer


def _recv_exact(sock: socket.socket, size: int) -> bytearray:
    buffer = bytearray(size)
    view = memoryview(buffer)
    received = 0
    while received < size:
        count = sock.recv_into(view[received:])
        if count == 0:
            raise WireError("connection closed by the peer")
        received += count
    return buffer


def send_json(sock: socket.socket, kind: bytes, message: dict[str, Any]) -> None:
    send_frame(sock, kind, json.dumps(message).encode())


def parse_json(body: memoryview) -> dict[str, Any]:
    try:
        message = json.loads(bytes(body))
    except ValueError as error:
        raise WireError(f"not JSON: {error}") from None
    if not isinstance(message, dict):
        raise WireError("expected a JSON object")
    return message


def send_error(sock: socket.socket, text: str) -> None:
    send_frame(sock, ERROR, text.encode("utf-8", "replace"))


def batch_parts(batch: TokenBatch) -> tuple[bytes, bytes, bytes]:
    rows, bucket = batch.input_ids.shape
    return (_SHAPE.pack(rows, bucket), np.ascontiguousarray(batch.input_ids, dtype=np.int32).tobytes(),
            np.ascontiguousarray(batch.attention_mask, dtype=np.uint8).tobytes())


def parse_batch(body: memoryview) -> TokenBatch:
    if len(body) < _SHAPE.size:
        raise WireError("INFER frame too short")
    rows, bucket = _SHAPE.unpack(body[: _SHAPE.size])
    cells = rows * bucket
    if len(body) != _SHAPE.size + 5 * cells:
        raise WireError(f"INFER frame of {len(body)} bytes does not hold {rows} x {bucket} tokens")
    ids = np.frombuffer(body, dtype=np.int32, count=cells, offset=_SHAPE.size).reshape(rows, bucket)
    mask = np.frombuffer(body, dtype=np.uint8, count=cells, offset=_SHAPE.size + 4 * cells).reshape(rows, bucket)
    # The engines take int64 (the ONNX inputs' type); the copy also frees the frame buffer.
    return TokenBatch(ids.astype(np.int64), mask.astype(np.int64), bucket)


def logits_parts(logits: np.ndarray) -> tuple[bytes, bytes]:
    logits = np.ascontiguousarray(logits, dtype=np.float32)
    rows, labels = logits.shape
    return _SHAPE.pack(rows, labels), logits.tobytes()


def parse_logits(body: memoryview) -> np.ndarray:
    if len(body) < _SHAPE.size:
        raise WireError("LOGITS frame too short")
    rows, labels = _SHAPE.unpack(body[: _SHAPE.size])
    if len(body) != _SHAPE.size + 4 * rows * labels:
        raise WireError(f"LOGITS frame of {len(body)} bytes does not hold {rows} x {labels} floats")
    return np.frombuffer(body, dtype=np.float32, count=rows * labels, offset=_SHAPE.size).reshape(rows, labels).copy()
