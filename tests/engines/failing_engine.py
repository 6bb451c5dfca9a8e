"""An engine wrapper for tests that fails on one input: a post the engine cannot handle.

A real engine scores everything else; any batch holding ``token`` raises, as a kernel or
device-side assert would. Used to test that such a post is isolated and dead-lettered
while the engine stream stays in rotation.
"""

from __future__ import annotations

import numpy as np

from stream_sentiment.engines.base import Engine, EngineError, TokenBatch


class FailsOnToken(Engine):
    """Scores with ``inner``, but fails any batch holding token id ``token``."""

    backend = "fails-on-token"

    def __init__(self, inner: Engine, token: int) -> None:
        super().__init__(inner.version, inner.streams)
        self.inner, self.token = inner, token

    def _activate_impl(self) -> None:
        self.inner.activate()

    def _infer_impl(self, batch: TokenBatch, stream: int) -> np.ndarray:
        if (batch.input_ids == self.token).any():
            raise EngineError("device-side assert on this input")
        return self.inner._infer_impl(batch, stream)

    def _rebuild_impl(self, stream: int) -> None:
        self.inner.rebuild(stream)

    def _deactivate_impl(self) -> None:
        self.inner.deactivate()
