"""Whether a loaded candidate engine may replace the active one: the checks of a hot swap.

A candidate version, loaded and warmed up on its own slots, is validated while the
active engine keeps serving:

* its tokenizer must be the running one (queued posts were tokenized with it);
* its accuracy on the golden set shipped in its folder must be within
  ``admin.golden_tolerance`` of what its manifest recorded at build time (a
  broken file, wrong label order or bad conversion shows here);
* on a shadow sample of recent live posts it must agree with the active
  engine on at least ``admin.min_shadow_agreement`` of them.

Scoring for validation takes turns with live batches (:meth:`CandidateValidator.score_in_background`).
"""

from __future__ import annotations

import asyncio
import functools
import time
from collections.abc import Callable, Sequence
from contextlib import AbstractAsyncContextManager
from typing import Any, Protocol

import numpy as np

from stream_sentiment.admin.control import ValidationFailedError
from stream_sentiment.batching.tokenizer import PostTokenizer
from stream_sentiment.config import Settings
from stream_sentiment.engines.base import Engine
from stream_sentiment.engines.slots import SlotPool
from stream_sentiment.metrics import PipelineMetrics

# Validation posts scored per chunk: a few milliseconds of CPU, short enough not to hold up a live batch.
VALIDATION_CHUNK_ROWS = 8
# A saturated worker is never idle; validation waits at most this long per chunk, then goes ahead.
IDLE_WAIT_LIMIT_S = 0.5


class ServedEngine(Protocol):
    """What a hot swap acts on: a worker (its default route) or one route's scheduler (``Worker.route``)."""

    metrics: PipelineMetrics
    tokenizer: PostTokenizer
    on_engine_down: Callable[[], None] | None

    @property
    def pool(self) -> SlotPool: ...

    @property
    def engine(self) -> Engine: ...

    @property
    def shadow(self) -> Sequence[tuple[tuple[int, ...], int]]: ...

    def new_pool(self, engine: Engine) -> SlotPool: ...

    def swap_pool(self, pool: SlotPool) -> tuple[SlotPool, float]: ...

    def engine_time(self, wait_limit: float) -> AbstractAsyncContextManager[None]: ...


class CandidateValidator:
    """Validates candidate engines for ``worker`` (or one route of it) against ``settings.admin``'s thresholds."""

    def __init__(self, settings: Settings, worker: ServedEngine) -> None:
        self.settings = settings
        self.worker = worker

    async def validate(self, pool: SlotPool, previous: dict[str, Any] | None = None) -> dict[str, Any]:
        """Tokenizer identity, golden-set accuracy and shadow agreement; ``passed`` and a ``reason`` if not.

        ``previous`` is this loaded engine's last report: its golden score is reused (the shadow
        sample, recent live traffic, is always scored again).
        """
        from stream_sentiment.engines.scoring import read_jsonl_labelled

        admin = self.settings.admin
        manifest = pool.engine.version.manifest
        running = self.worker.tokenizer.version.manifest
        report: dict[str, Any] = {"passed": False}
        # Labels too: the worker reads column 0 as P(negative) and counts by the running label order.
        mismatched = [key for key in ("tokenizer_file", "text_normalization", "max_length", "buckets", "labels")
                      if getattr(manifest, key) != getattr(running, key)]
        if manifest.files.get(manifest.tokenizer_file) != running.files.get(running.tokenizer_file):
            mismatched.append("tokenizer checksum")
        if mismatched:
            report["reason"] = (f"it differs from the running version in {', '.join(mismatched)}; "
                                "start workers with the new version instead of hot-swapping")
            return report
        engine_rows = getattr(pool.engine, "max_rows", None)
        if engine_rows and engine_rows < self.settings.batching.max_rows:
            report["reason"] = (f"it takes at most {engine_rows} rows per batch, the worker forms up to "
                                f"{self.settings.batching.max_rows}; rebuild it for batching.max_rows")
            return report
        if not manifest.golden:
            report["reason"] = "its manifest has no golden set to validate against"
            return report
        expected = float(manifest.golden["accuracy"])
        if previous is not None and "golden" in previous:
            # Same loaded engine, same files: its golden score cannot have changed since it was loaded.
            report["golden"] = {**previous["golden"], "scored_at_load": True}
            accuracy = previous["golden"]["accuracy"]
        else:
            texts, gold = read_jsonl_labelled(pool.engine.version.file(manifest.golden["file"]), manifest.labels)
            probabilities = await self.score_in_background(pool, self.worker.tokenizer.encode(texts))
            labels = list(manifest.labels)
            hits = [labels[int(i)] == g for i, g in zip(probabilities.argmax(1), gold, strict=True)]
            accuracy = round(float(np.mean(hits)), 4)
            report["golden"] = {"n": len(texts), "accuracy": accuracy, "manifest_accuracy": expected}
        if accuracy < expected - admin.golden_tolerance:
            report["reason"] = (f"golden-set accuracy {accuracy:.3f} is more than {admin.golden_tolerance} below "
                                f"the {expected:.3f} its manifest records")
            return report
        shadow = list(self.worker.shadow)
        if len(shadow) < admin.min_shadow_posts:
            report["shadow"] = {"skipped": f"only {len(shadow)} recent live posts (< {admin.min_shadow_posts})"}
        else:
            shadow_ids = [list(ids) for ids, _ in shadow]
            scored = await self.score_in_background(pool, shadow_ids)
            agreement = float(np.mean(scored.argmax(1) == np.array([label for _, label in shadow])))
            report["shadow"] = {"n": len(shadow), "agreement": round(agreement, 4)}
            if agreement < admin.min_shadow_agreement:
                report["reason"] = (f"it agrees with the active engine on {agreement:.1%} of {len(shadow)} recent "
                                    f"posts, below {admin.min_shadow_agreement:.0%}")
                return report
        report["passed"] = True
        return report

    async def score_in_background(self, pool: SlotPool, token_ids: Sequence[Sequence[int]]) -> np.ndarray:
        """Score validation posts in small chunks, resting between them, so live batches keep the cores.

        On a CPU host the candidate and the active engine share the same cores; a burst of validation
        work would stall live batches for as long as it runs. So each chunk is a few milliseconds and
        takes a turn on the active engine's time (``Worker.engine_time``: when it is idle, or after a
        bounded wait so a saturated worker still validates), and the rest after it keeps validation
        to ``admin.validation_duty_cycle`` of the time.
        """
        from stream_sentiment.engines.scoring import score_token_ids

        loop = asyncio.get_running_loop()
        buckets = pool.engine.version.manifest.buckets
        duty = self.settings.admin.validation_duty_cycle
        step = VALIDATION_CHUNK_ROWS
        parts = []
        stream = pool.take()  # a slot of the candidate's own, which nothing else uses meanwhile
        if stream is None:
            raise ValidationFailedError("no idle engine stream to validate on")
        try:
            for start in range(0, len(token_ids), step):
                chunk = token_ids[start:start + step]
                async with self.worker.engine_time(IDLE_WAIT_LIMIT_S):
                    began = time.perf_counter()
                    parts.append(await loop.run_in_executor(
                        None, functools.partial(score_token_ids, pool.engine, chunk, buckets, stream=stream)))
                    spent = time.perf_counter() - began
                await asyncio.sleep(spent * (1 / duty - 1))
        finally:
            pool.give_back(stream)
        return np.concatenate(parts) if parts else np.zeros((0, len(pool.engine.labels)), dtype=np.float32)
