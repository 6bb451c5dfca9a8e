"""INT8 vs FP32 ONNX Runtime on this machine's CPU: batches of 32 real tweets.

The VADER test tweets go through the pipeline's own batcher (one queue per
length bucket, 32 rows per batch), so each batch is 32 tweets of one bucket
padded to that bucket, as in the service. Both engines run in the same process, in
alternating rounds, with the same threads; the table reports posts/s and
per-batch latency, and the INT8/FP32 ratio from this run.

    python bench/cpu_int8_vs_fp32.py [--fp32 build/engines/minilm-sentiment/v1-fp32] [--rounds 5]

Without --fp32 (the FP32 export is not committed), the FP32 side is the INT8
graph with its Q/DQ nodes stripped: the same float operations as the FP32
export.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from stream_sentiment.batching.batcher import Batcher, BatchingPolicy  # noqa: E402
from stream_sentiment.batching.tokenizer import PostTokenizer, pad_to_bucket  # noqa: E402
from stream_sentiment.engine_build.qdq_rewrite import strip_quantization  # noqa: E402
from stream_sentiment.engines.base import TokenBatch  # noqa: E402
from stream_sentiment.engines.manifest import load_engine_version  # noqa: E402
from stream_sentiment.engines.onnxruntime_backend import OnnxRuntimeEngine  # noqa: E402
from stream_sentiment.modeling.corpora import read_vader_tweets  # noqa: E402


class _StrippedFp32Engine(OnnxRuntimeEngine):
    backend = "onnxruntime-fp32-from-int8"

    def _load_model(self) -> bytes | str:
        return strip_quantization(self.version.model_path)


def make_batches(tokenizer: PostTokenizer, texts: list[str], rows: int) -> list[TokenBatch]:
    """Full batches of ``rows`` tweets each, formed by the pipeline's batcher; interleaved by bucket."""
    policy = BatchingPolicy(buckets=tokenizer.buckets, max_rows=rows, max_tokens=rows * tokenizer.buckets[-1])
    batcher: Batcher[int] = Batcher(policy)
    for index, ids in enumerate(tokenizer.encode(texts)):
        batcher.add(index, ids, now=0.0)
    formed = [b for b in batcher.drain(now=0.0) if b.rows == rows]
    by_bucket: dict[int, list[TokenBatch]] = {}
    for batch in formed:
        by_bucket.setdefault(batch.bucket, []).append(pad_to_bucket([e.token_ids for e in batch.entries], batch.bucket))
    # Round-robin over buckets so any prefix of the list keeps the overall bucket mix.
    mixed: list[TokenBatch] = []
    while any(by_bucket.values()):
        mixed.extend(queue.pop(0) for queue in by_bucket.values() if queue)
    return mixed


def time_round(engine: OnnxRuntimeEngine, batches: list[TokenBatch]) -> list[float]:
    latencies = []
    for batch in batches:
        started = time.perf_counter()
        engine.infer(batch)
        latencies.append(time.perf_counter() - started)
    return latencies


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--int8", type=Path, default=REPO / "engines/minilm-sentiment/v1")
    parser.add_argument("--fp32", type=Path, default=None, help="FP32 engine version folder")
    parser.add_argument("--corpora-dir", type=Path, default=REPO / ".cache/corpora")
    parser.add_argument("--rows", type=int, default=32)
    parser.add_argument("--batches", type=int, default=120, help="at most this many batches (all full)")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--json", type=Path, default=None, help="also write the results here")
    args = parser.parse_args()

    int8_version = load_engine_version(args.int8)
    texts = [t.text for t in read_vader_tweets(args.corpora_dir)]
    batches = make_batches(PostTokenizer(int8_version), texts, args.rows)[: args.batches]
    engines = {"int8": OnnxRuntimeEngine(int8_version, threads_per_stream=args.threads)}
    if args.fp32:
        engines["fp32"] = OnnxRuntimeEngine(load_engine_version(args.fp32), threads_per_stream=args.threads)
        fp32_source = f"FP32 export {args.fp32}"
    else:
        engines["fp32"] = _StrippedFp32Engine(int8_version, threads_per_stream=args.threads)
        fp32_source = "INT8 graph with Q/DQ stripped"
    latencies: dict[str, list[float]] = {name: [] for name in engines}
    throughput: dict[str, list[float]] = {name: [] for name in engines}
    for engine in engines.values():
        engine.activate()
        time_round(engine, batches[:5])  # warm-up
    for _ in range(args.rounds):
        for name, engine in engines.items():
            round_latencies = time_round(engine, batches)
            latencies[name].extend(round_latencies)
            throughput[name].append(len(batches) * args.rows / sum(round_latencies))

    posts = {name: statistics.median(values) for name, values in throughput.items()}
    mix = {bucket: sum(b.bucket == bucket for b in batches) for bucket in sorted({b.bucket for b in batches})}
    print(f"{len(batches)} batches x {args.rows} tweets (batches per bucket {mix}), {args.rounds} rounds, "
          f"{args.threads} threads, onnxruntime {ort.__version__}, {platform.processor() or platform.machine()}")
    print(f"FP32 side: {fp32_source}")
    print(f"{'engine':<8}{'posts/s':>10}{'p50 ms/batch':>14}{'p99 ms/batch':>14}{'vs fp32':>9}")
    results = {}
    for name in ("fp32", "int8"):
        p50 = float(np.percentile(latencies[name], 50) * 1000)
        p99 = float(np.percentile(latencies[name], 99) * 1000)
        ratio = posts[name] / posts["fp32"]
        results[name] = {"posts_per_s": round(posts[name], 1), "p50_ms": round(p50, 2), "p99_ms": round(p99, 2),
                         "ratio_vs_fp32": round(ratio, 2)}
        print(f"{name:<8}{posts[name]:>10.0f}{p50:>14.1f}{p99:>14.1f}{ratio:>8.2f}x")
    if args.json:
        args.json.write_text(json.dumps({"fp32_source": fp32_source, "results": results}, indent=2) + "\n")


if __name__ == "__main__":
    main()
