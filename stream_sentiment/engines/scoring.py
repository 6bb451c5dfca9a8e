"""Scoring labelled texts with an engine, on the serving side: golden sets, evaluation, hot-swap checks.

Batches go through the pipeline's own batcher (one queue per length bucket), so an engine is
measured as the service runs it. The admin endpoint validates a candidate engine with these
(golden set, shadow sample); ``stream-sentiment evaluate`` builds its reports on them. Serving
code imports this module, never the training code in ``modeling/``.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np

from stream_sentiment.batching.batcher import Batcher, BatchingPolicy
from stream_sentiment.batching.tokenizer import PostTokenizer, pad_to_bucket
from stream_sentiment.engines.base import Engine


class DataFormatError(ValueError):
    """A line of a labelled file cannot be read; the message names the line."""


def read_jsonl_labelled(path: Path, labels: Sequence[str]) -> tuple[list[str], list[str]]:
    """Texts and gold labels from JSONL lines ``{"text": ..., "label": ...}`` (a label one of ``labels``)."""
    texts, gold = [], []
    for number, line in enumerate(path.read_text(encoding="utf-8", errors="replace").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as error:
            raise DataFormatError(f"{path}:{number}: not JSON: {error}") from None
        if not isinstance(record, dict) or not isinstance(record.get("text"), str):
            raise DataFormatError(f"{path}:{number}: needs a string field 'text'")
        if record.get("label") not in labels:
            raise DataFormatError(f"{path}:{number}: 'label' must be one of {list(labels)}")
        texts.append(record["text"])
        gold.append(record["label"])
    return texts, gold


def score_texts(
    engine: Engine,
    tokenizer: PostTokenizer,
    texts: Sequence[str],
    *,
    max_rows: int = 64,
    progress: Callable[[int], None] | None = None,
) -> np.ndarray:
    """Probabilities for ``texts``, batched per length bucket by the pipeline's own batcher."""
    return score_token_ids(engine, tokenizer.encode(texts), tokenizer.buckets, max_rows=max_rows, progress=progress)


def score_token_ids(
    engine: Engine,
    token_ids: Sequence[Sequence[int]],
    buckets: Sequence[int],
    *,
    max_rows: int = 64,
    stream: int = 0,
    progress: Callable[[int], None] | None = None,
) -> np.ndarray:
    """Probabilities for already tokenized posts, batched per length bucket, on one engine stream."""
    policy = BatchingPolicy(buckets=tuple(buckets), max_rows=max_rows, max_tokens=max_rows * max(buckets))
    batcher: Batcher[int] = Batcher(policy)
    for index, ids in enumerate(token_ids):
        batcher.add(index, ids, now=0.0)
    probabilities = np.zeros((len(token_ids), len(engine.labels)), dtype=np.float32)
    for formed in batcher.drain(now=0.0):
        # An engine with a smaller limit at this bucket (a TensorRT plan's profile) gets the batch in parts.
        step = min(formed.rows, engine.max_rows_for(formed.bucket) or formed.rows)
        for start in range(0, formed.rows, step):
            entries = formed.entries[start:start + step]
            rows = [entry.item for entry in entries]
            tokens = pad_to_bucket([e.token_ids for e in entries], formed.bucket)
            probabilities[rows] = engine.infer(tokens, stream)
            if progress:
                progress(len(rows))
    return probabilities
