"""Engines with no model, for benches that measure the pipeline's CPU without a GPU.

Each row's logits are a fixed function of its token ids, varied as a model's are (labels mixed, scores
distinct), so what depends on them -- label counts, which posts are kept as samples -- costs what it
costs live. Used by ``bench/worker_cpu.py`` and by ``bench/gpu_e2e --backend fixed`` (each worker its own
engine: the pipeline on a real broker and Redis, profiled on a machine without a GPU).
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

import numpy as np

from stream_sentiment.engines.base import Engine, TokenBatch


class FixedEngine(Engine):
    """No model: each row's logits are a fixed function of its token ids (only the worker's CPU is measured).

    Varied as a model's are (labels mixed, scores distinct), so what depends on them -- label counts,
    which posts are kept as samples -- costs what it costs live. ``latency_s``: each call also waits
    that long (a sleep in the slot's thread: a GPU's time, which costs the worker no CPU).
    """

    backend = "fixed"
    PHASES = np.array([1.0, 1.7, 2.3])

    def __init__(self, *args: Any, latency_s: float = 0.0, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.latency_s = latency_s

    def _activate_impl(self) -> None:
        pass

    def _infer_impl(self, batch: TokenBatch, stream: int) -> np.ndarray:
        if self.latency_s:
            time.sleep(self.latency_s)
        return self.fixed_logits(batch)

    def fixed_logits(self, batch: TokenBatch) -> np.ndarray:
        return 2.0 * np.sin(batch.input_ids.sum(axis=1, dtype=np.float64)[:, None] * self.PHASES)

    def _rebuild_impl(self, stream: int) -> None:
        pass

    def _deactivate_impl(self) -> None:
        pass


class LoopFixedEngine(FixedEngine):
    """:class:`FixedEngine` called on the event loop (``scores_on_event_loop``, as the engine server's client is):
    the GPU's time is an ``asyncio.sleep``, so what differs from the thread-called one is the hand-off per call."""

    scores_on_event_loop = True

    async def _infer_on_loop_impl(self, batch: TokenBatch, stream: int) -> np.ndarray:
        if self.latency_s:
            await asyncio.sleep(self.latency_s)
        return self.fixed_logits(batch)
