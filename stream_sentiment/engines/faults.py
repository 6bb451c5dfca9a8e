"""Fault injection for tests: an engine wrapper whose calls fail on purpose.

Enabled only by the settings ``engine.fault_every_kth_call`` and
``engine.fault_broken_stream`` (unset in production). A GPU fault cannot be
produced on demand on our machines, so this is how the recovery path -- rebuild,
retry, a stream leaving rotation, consumption pausing -- is exercised against a
real engine, broker and Redis.
"""

from __future__ import annotations

import threading

import numpy as np

from stream_sentiment.engines.base import Engine, EngineError, TokenBatch


class FaultInjectingEngine(Engine):
    """Delegates to ``inner``, failing every ``every_kth_call``-th call of each stream and every call on
    ``broken_stream``.

    Warm-up bypasses the faults: they are armed for live traffic only. Rebuilding a
    broken stream rebuilds the inner one but does not mend it (a permanent fault).
    """

    backend = "fault-injecting"

    def __init__(self, inner: Engine, *, every_kth_call: int | None = None, broken_stream: int | None = None) -> None:
        super().__init__(inner.version, inner.streams)
        self.inner = inner
        self.every_kth_call = every_kth_call
        self.broken_stream = broken_stream
        self.calls = [0] * inner.streams  # per stream: each slot fails on its own every k-th call
        self.injected = 0
        self._lock = threading.Lock()

    def describe(self) -> str:
        return f"{self.inner.describe()} with injected faults"

    def warm_up(self, rows: int = 1) -> None:
        self.inner.warm_up(rows)

    def _activate_impl(self) -> None:
        self.inner.activate()

    def max_rows_for(self, bucket: int) -> int | None:
        return self.inner.max_rows_for(bucket)

    def _infer_impl(self, batch: TokenBatch, stream: int) -> np.ndarray:
        with self._lock:
            self.calls[stream] += 1
            call = self.calls[stream]
            fail = stream == self.broken_stream or (self.every_kth_call is not None and call % self.every_kth_call == 0)
            self.injected += fail
        if fail:
            raise EngineError(f"injected fault on stream {stream} (call {call})")
        return self.inner._infer_impl(batch, stream)

    def _rebuild_impl(self, stream: int) -> None:
        self.inner.rebuild(stream)

    def _deactivate_impl(self) -> None:
        self.inner.deactivate()
