"""Engine-only speed of several INT8 engine versions on this CPU: the same batches, alternating rounds.

The VADER test tweets go through the pipeline's batcher (length buckets, ``--rows`` per batch) as
in ``cpu_int8_vs_fp32.py``; each engine scores the same batches in turn, ``--rounds`` times, with
the same threads, so a busy machine slows all of them alike. No Kafka, no Redis, no tokenizing in
the timed part: this is the ceiling the engine puts on a worker (``cpu_e2e.py`` measures the
whole pipeline). Used to choose the fast student's depth (speed does not depend on the weights).

    python bench/engine_speed.py engines/minilm-sentiment/v1 engines/minilm-fast/v2 [--rounds 5]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))

from cpu_int8_vs_fp32 import make_batches, time_round  # noqa: E402

from stream_sentiment.batching.tokenizer import PostTokenizer  # noqa: E402
from stream_sentiment.engines.manifest import load_engine_version  # noqa: E402
from stream_sentiment.engines.onnxruntime_backend import OnnxRuntimeEngine  # noqa: E402
from stream_sentiment.modeling.corpora import read_vader_tweets  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("versions", type=Path, nargs="+", help="engine version folders (the first is the baseline)")
    parser.add_argument("--corpora-dir", type=Path, default=REPO / ".cache/corpora")
    parser.add_argument("--rows", type=int, default=64, help="rows per batch (the service's max_rows)")
    parser.add_argument("--batches", type=int, default=40)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    versions = [load_engine_version(path) for path in args.versions]
    texts = [t.text for t in read_vader_tweets(args.corpora_dir)]
    batches = make_batches(PostTokenizer(versions[0]), texts, args.rows)[: args.batches]
    engines = {str(path): OnnxRuntimeEngine(v, threads_per_stream=args.threads)
               for path, v in zip(args.versions, versions, strict=True)}
    throughput: dict[str, list[float]] = {name: [] for name in engines}
    for engine in engines.values():
        engine.activate()
        time_round(engine, batches[:3])  # warm-up
    for _ in range(args.rounds):
        for name, engine in engines.items():
            throughput[name].append(len(batches) * args.rows / sum(time_round(engine, batches)))
    baseline = statistics.median(throughput[str(args.versions[0])])
    results = {name: {"posts_per_s": round(statistics.median(values), 1),
                      "rounds": [round(v, 1) for v in values],
                      "ratio_vs_first": round(statistics.median(values) / baseline, 2)}
               for name, values in throughput.items()}
    mix = {bucket: sum(b.bucket == bucket for b in batches) for bucket in sorted({b.bucket for b in batches})}
    print(f"{len(batches)} batches x {args.rows} tweets (per bucket {mix}), {args.rounds} rounds, {args.threads} "
          f"threads, {platform.processor() or platform.machine()}, {os.cpu_count()} cores")
    print(json.dumps(results, indent=2))
    if args.json:
        args.json.write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
