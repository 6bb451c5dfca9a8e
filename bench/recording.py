"""Stand-ins for the worker's histograms that keep every observation, for exact percentiles in a bench.

Each wraps the real histogram (which still counts, so the worker's metrics stay whole) and keeps the
values; ``observe_many`` takes a range at once, as the checkpointing sink observes them, and keeps the
range's array as it is (no per-value Python objects): the bench's own bookkeeping is counted in the
worker's CPU per post, so it is kept as small as the worker's.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from stream_sentiment.metrics import observe_many


class RecordingHistogram:
    """A histogram that also keeps every observation (seconds), in the order observed."""

    def __init__(self, inner: Any) -> None:
        self.inner = inner
        self._chunks: list[np.ndarray | float] = []

    def observe(self, value: float) -> None:
        self._chunks.append(value)
        self.inner.observe(value)

    def observe_many(self, values: Any) -> None:
        values = np.asarray(values, dtype=np.float64)
        self._chunks.append(values)
        observe_many(self.inner, values)

    def array(self) -> np.ndarray:
        if not self._chunks:
            return np.zeros(0, dtype=np.float64)
        return np.concatenate([np.atleast_1d(np.asarray(chunk, dtype=np.float64)) for chunk in self._chunks])

    @property
    def samples(self) -> list[float]:
        """Every observation, as a list."""
        return self.array().tolist()


class RecordingLabelledHistogram(RecordingHistogram):
    """The same for a labelled histogram: every child's observations in one list (labels dropped)."""

    def labels(self, *values: str) -> RecordingLabelledHistogram:
        child = RecordingLabelledHistogram(self.inner.labels(*values))
        child._chunks = self._chunks
        return child
