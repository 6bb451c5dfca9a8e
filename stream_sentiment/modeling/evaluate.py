"""``stream-sentiment evaluate``: score a labelled file with an engine version and report metrics.

Accepts JSONL (``{"text": ..., "label": "negative|neutral|positive"}`` per line)
or the VADER ``tweets_GroundTruth.txt`` format (``id<TAB>mean rating<TAB>text``)
directly. Prints a progress bar on stderr and the JSON report as the last line
of stdout.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np

from stream_sentiment.batching.batcher import Batcher, BatchingPolicy
from stream_sentiment.batching.tokenizer import PostTokenizer, pad_to_bucket
from stream_sentiment.engines.base import Engine
from stream_sentiment.engines.manifest import EngineVersion, load_engine_version
from stream_sentiment.modeling.corpora import LABELS, parse_vader_lines
from stream_sentiment.modeling.metrics import classification_report


class DataFormatError(ValueError):
    """A line of the evaluation file cannot be read; the message names the line."""


def read_labelled_file(path: Path) -> tuple[list[str], list[str]]:
    """Texts and gold labels from JSONL or a VADER ground-truth file (detected from the first line)."""
    lines = path.read_text(encoding="utf-8", errors="replace").splitlines()
    first = next((line for line in lines if line.strip()), "")
    if not first.lstrip().startswith("{"):
        try:
            rated = parse_vader_lines(lines)
        except ValueError as error:
            raise DataFormatError(f"{path}: neither JSONL nor id<TAB>rating<TAB>text: {error}") from None
        return [r.text for r in rated], [r.label for r in rated]
    texts, labels = [], []
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as error:
            raise DataFormatError(f"{path}:{number}: not JSON: {error}") from None
        if not isinstance(record, dict) or not isinstance(record.get("text"), str):
            raise DataFormatError(f"{path}:{number}: needs a string field 'text'")
        if record.get("label") not in LABELS:
            raise DataFormatError(f"{path}:{number}: 'label' must be one of {list(LABELS)}")
        texts.append(record["text"])
        labels.append(record["label"])
    return texts, labels


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
    for batch in batcher.drain(now=0.0):
        rows = [entry.item for entry in batch.entries]
        tokens = pad_to_bucket([e.token_ids for e in batch.entries], batch.bucket)
        probabilities[rows] = engine.infer(tokens, stream)
        if progress:
            progress(len(rows))
    return probabilities


def open_engine(version: EngineVersion, threads: int | None = None) -> Engine:
    """The CPU engine for a version folder (evaluation always runs on ONNX Runtime)."""
    from stream_sentiment.engines.onnxruntime_backend import OnnxRuntimeEngine

    return OnnxRuntimeEngine(version, streams=1, threads_per_stream=threads)


def evaluate(engine_dir: Path, data: Path, *, show_progress: bool = True) -> dict[str, object]:
    version = load_engine_version(engine_dir)
    texts, gold = read_labelled_file(data)
    if not texts:
        raise DataFormatError(f"{data}: no labelled lines")
    tokenizer = PostTokenizer(version)
    from tqdm import tqdm

    with open_engine(version) as engine, tqdm(
        total=len(texts), desc="evaluate", unit="post", file=sys.stderr, disable=not show_progress
    ) as bar:
        probabilities = score_texts(engine, tokenizer, texts, progress=bar.update)
    report = classification_report(gold, probabilities)
    return {
        "engine": version.label,
        "engine_version": version.manifest.version,
        "precision": version.manifest.precision,
        "data": str(data),
        **report,
    }


GOLDEN_FILE = "golden.jsonl"


def attach_golden_set(folder: Path, source: Path) -> dict[str, object]:
    """Copy the golden set into a version folder and score it there: the manifest's ``golden`` entry.

    The set is written for this project (no corpus text), so it may ship with every version.
    Call ``write_manifest`` afterwards: the copy must be pinned by its checksum.
    """
    texts, gold = read_labelled_file(source)
    (folder / GOLDEN_FILE).write_text(source.read_text(encoding="utf-8"), encoding="utf-8")
    version = load_engine_version(folder, verify=False)
    with open_engine(version) as engine:
        probabilities = score_texts(engine, PostTokenizer(version), texts)
    report = classification_report(gold, probabilities)
    return {"file": GOLDEN_FILE, "n": len(texts), "accuracy": report["accuracy"]}
