"""Stand-ins for the worker's histograms that keep every observation, for exact percentiles in a bench.

Each wraps the real histogram (which still counts, so the worker's metrics stay whole) and keeps the
values; ``observe_many`` takes a range at once, as the checkpointing sink observes them.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from stream_sentiment.metrics import observe_many


class RecordingHistogram:
    """A histogram that also keeps every observation (seconds)."""

    def __init__(self, inner: Any) -> None:
        self.inner = inner
        self.samples: list[float] = []

    def observe(self, value: float) -> None:
        self.samples.append(value)
        self.inner.observe(value)

    def observe_many(self, values: Any) -> None:
        self.samples.extend(np.asarray(values, dtype=np.float64).tolist())
        observe_many(self.inner, values)

    def array(self) -> np.ndarray:
        return np.asarray(self.samples, dtype=np.float64)


class RecordingLabelledHistogram(RecordingHistogram):
    """The same for a labelled histogram: every child's observations in one list (labels dropped)."""

    def labels(self, *values: str) -> RecordingLabelledHistogram:
        child = RecordingLabelledHistogram(self.inner.labels(*values))
        child.samples = self.samples
        return child
