"""The engine interface every backend implements.

Modelled on Polygraphy's runners: public ``activate()`` / ``infer()`` /
``deactivate()`` wrap ``_impl`` hooks and guard the lifecycle, so a backend
only writes the parts that differ. An engine owns ``streams`` independent
execution slots (an ONNX Runtime session, a TensorRT execution context on its
own CUDA stream, a CUDA-graph set); a slot is used by one thread at a time and
never shared, which is what TensorRT requires of execution contexts.

Engines see only :class:`TokenBatch` value objects, never posts or Kafka
records, so they are testable without a broker.
"""

from __future__ import annotations

import abc
from dataclasses import dataclass
from typing import ClassVar

import numpy as np

from stream_sentiment.engines.manifest import EngineVersion


@dataclass(frozen=True)
class TokenBatch:
    """Token ids padded to one bucket length: the only thing an engine is given.

    Attributes:
        input_ids: ``int64 [rows, bucket]``, zero-padded.
        attention_mask: ``int64 [rows, bucket]``, 1 for real tokens.
        bucket: the padded length (a manifest bucket).
    """

    input_ids: np.ndarray
    attention_mask: np.ndarray
    bucket: int

    @property
    def rows(self) -> int:
        return int(self.input_ids.shape[0])

    @property
    def real_tokens(self) -> int:
        return int(self.attention_mask.sum())

    @property
    def computed_tokens(self) -> int:
        return self.rows * self.bucket


class EngineError(RuntimeError):
    """An engine call failed; the slot may need :meth:`Engine.rebuild`."""


class BackendUnavailableError(EngineError):
    """The backend's runtime (tensorrt, torch with CUDA, ...) is not installed or has no device."""


class Engine(abc.ABC):
    """A loaded model version that scores token batches on ``streams`` independent slots.

    Args:
        version: a verified engine-repository version.
        streams: number of independent execution slots.
    """

    backend: ClassVar[str]
    #: Whether :meth:`infer_on_loop` works: a backend whose call is only I/O (the engine server's socket) scores
    #: on the worker's event loop, sparing each call the hand-off to a slot thread and back.
    scores_on_event_loop: ClassVar[bool] = False

    def __init__(self, version: EngineVersion, streams: int = 1) -> None:
        if streams < 1:
            raise ValueError("an engine needs at least one stream")
        self.version = version
        self.streams = streams
        self.is_active = False

    @property
    def labels(self) -> tuple[str, ...]:
        return self.version.manifest.labels

    def activate(self) -> None:
        """Load the model and create every execution slot."""
        if self.is_active:
            raise EngineError(f"{self.describe()} is already active")
        self._activate_impl()
        self.is_active = True

    def activate_warm(self) -> None:
        """Activate and warm up; on a failure in the warm-up nothing is left active."""
        self.activate()
        try:
            self.warm_up()
        except BaseException:
            self.deactivate()
            raise

    def warm_up(self, rows: int = 1) -> None:
        """Run every bucket shape once on every slot, so no live batch pays for lazy init."""
        for stream in range(self.streams):
            for bucket in self.version.manifest.buckets:
                ids = np.zeros((rows, bucket), dtype=np.int64)
                mask = np.ones((rows, bucket), dtype=np.int64)
                self.infer(TokenBatch(ids, mask, bucket), stream)

    def infer(self, batch: TokenBatch, stream: int = 0) -> np.ndarray:
        """Class probabilities ``float32 [rows, len(labels)]`` for one bucketed batch.

        Blocking: the pipeline calls it from a worker thread, one thread per slot.
        """
        return softmax(self.logits(batch, stream))

    def logits(self, batch: TokenBatch, stream: int = 0) -> np.ndarray:
        """The raw model outputs ``[rows, len(labels)]`` behind :meth:`infer` (the engine server sends these)."""
        self._check_call(batch, stream)
        return self._infer_impl(batch, stream)

    async def infer_on_loop(self, batch: TokenBatch, stream: int = 0) -> np.ndarray:
        """:meth:`infer` as a coroutine on the running event loop, for backends with ``scores_on_event_loop``.

        Cancelling it (a timeout, a shutdown) leaves the slot usable: the backend drops what the call had half
        done. Slot ``stream`` is still used by one call at a time, on the loop or on a thread, never both.
        """
        self._check_call(batch, stream)
        return softmax(await self._infer_on_loop_impl(batch, stream))

    def _check_call(self, batch: TokenBatch, stream: int) -> None:
        if not self.is_active:
            raise EngineError(f"{self.describe()} is not active")
        if not 0 <= stream < self.streams:
            raise EngineError(f"stream {stream} out of range 0..{self.streams - 1}")
        if batch.bucket not in self.version.manifest.buckets:
            raise EngineError(f"bucket {batch.bucket} is not one of {self.version.manifest.buckets}")

    async def _infer_on_loop_impl(self, batch: TokenBatch, stream: int) -> np.ndarray:
        """Return logits ``[rows, labels]`` without blocking the loop (only where ``scores_on_event_loop``)."""
        raise EngineError(f"{self.backend} engines score on slot threads, not on the event loop")

    def max_rows_for(self, bucket: int) -> int | None:
        """The most rows one call takes at ``bucket``; None: any number (the batcher's limits apply)."""
        return None

    def rebuild(self, stream: int) -> None:
        """Throw away one slot's state and create it again (after a failed call)."""
        if not self.is_active:
            raise EngineError(f"{self.describe()} is not active")
        self._rebuild_impl(stream)

    def deactivate(self) -> None:
        """Release every slot and the model; idempotent."""
        if self.is_active:
            try:
                self._deactivate_impl()
            finally:
                self.is_active = False

    def describe(self) -> str:
        return f"{self.backend} engine {self.version.label} ({self.streams} stream(s))"

    def __enter__(self) -> Engine:
        self.activate()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.deactivate()

    @abc.abstractmethod
    def _activate_impl(self) -> None: ...

    @abc.abstractmethod
    def _infer_impl(self, batch: TokenBatch, stream: int) -> np.ndarray:
        """Return logits ``[rows, labels]``."""

    @abc.abstractmethod
    def _rebuild_impl(self, stream: int) -> None: ...

    @abc.abstractmethod
    def _deactivate_impl(self) -> None: ...


def softmax(logits: np.ndarray) -> np.ndarray:
    logits = np.asarray(logits, dtype=np.float32)
    shifted = logits - logits.max(axis=-1, keepdims=True)
    exp = np.exp(shifted)
    return exp / exp.sum(axis=-1, keepdims=True)
