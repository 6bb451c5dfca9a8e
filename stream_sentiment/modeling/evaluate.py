"""``stream-sentiment evaluate``: score a labelled file with an engine version and report metrics.

Accepts JSONL (``{"text": ..., "label": "negative|neutral|positive"}`` per line)
or the VADER ``tweets_GroundTruth.txt`` format (``id<TAB>mean rating<TAB>text``)
directly. Prints a progress bar on stderr and the JSON report as the last line
of stdout.
"""

from __future__ import annotations

import sys
from pathlib import Path

from stream_sentiment.batching.tokenizer import PostTokenizer
from stream_sentiment.engines.base import Engine
from stream_sentiment.engines.manifest import EngineVersion, load_engine_version
from stream_sentiment.engines.scoring import (  # noqa: F401 (DataFormatError, score_token_ids: re-exported)
    DataFormatError,
    read_jsonl_labelled,
    score_texts,
    score_token_ids,
)
from stream_sentiment.modeling.corpora import LABELS, parse_vader_lines
from stream_sentiment.modeling.metrics import classification_report


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
    return read_jsonl_labelled(path, LABELS)


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


def attach_golden_set(folder: Path, *sources: Path) -> dict[str, object]:
    """Copy the golden set(s) into a version folder as one file and score it there: the manifest's
    ``golden`` entry.

    The sets are written for this project (no corpus text), so they may ship with every version.
    Call ``write_manifest`` afterwards: the copy must be pinned by its checksum.
    """
    lines = [line for source in sources for line in source.read_text(encoding="utf-8").splitlines() if line.strip()]
    (folder / GOLDEN_FILE).write_text("\n".join(lines) + "\n", encoding="utf-8")
    texts, gold = read_labelled_file(folder / GOLDEN_FILE)
    version = load_engine_version(folder, verify=False)
    with open_engine(version) as engine:
        probabilities = score_texts(engine, PostTokenizer(version), texts)
    report = classification_report(gold, probabilities)
    return {"file": GOLDEN_FILE, "n": len(texts), "accuracy": report["accuracy"]}
