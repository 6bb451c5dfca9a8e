"""Engine hot swap under steady load: cutover pauses and latency during activate/rollback cycles.

The embedded broker and Redis, one worker on the INT8 CPU engine, real tweets
produced at ``--rate`` posts/s. Phases with no swaps (``--steady`` seconds in all, the
baseline), then ``--cycles`` rounds of ``activate v2`` + ``rollback`` through the
engine manager (v2 is a copy of the committed version under another name: the
full load / warm-up / golden-set / shadow validation path runs), then a tail.
Steady and swapping phases alternate over ``--rounds`` rounds.
Prints, from one run: P50/P99 end-to-end latency (Kafka record timestamp ->
Redis write, per post) in the steady phase and during the cycles, their ratio,
every cutover pause (dispatch paused for the flip), activation times, and
whether Redis counted every produced post exactly once.

    python bench/hot_swap.py [--rate 100] [--steady 40] [--cycles 20] [--rounds 8] [--backend onnxruntime]
                             [--json out.json]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from stream_sentiment.admin.engines import EngineManager  # noqa: E402
from stream_sentiment.batching.tokenizer import PostTokenizer  # noqa: E402
from stream_sentiment.config import Settings  # noqa: E402
from stream_sentiment.embedded import EmbeddedKafka, EmbeddedRedis  # noqa: E402
from stream_sentiment.engines.manifest import EngineManifest, write_manifest  # noqa: E402
from stream_sentiment.metrics import PipelineMetrics  # noqa: E402
from stream_sentiment.service import open_engine  # noqa: E402
from stream_sentiment.source.replay import sample_posts  # noqa: E402
from stream_sentiment.worker import Worker  # noqa: E402

COMMITTED = REPO / "engines" / "minilm-sentiment" / "v1"
PARTITIONS = 3
WARM_UP_S = 3.0  # the first posts pay for lazy start-up; not measured


class TimedLatencies:
    """Stands in for the end-to-end histogram: keeps (when, latency) for every post."""

    def __init__(self, inner: Any) -> None:
        self.inner = inner
        self.samples: list[tuple[float, float]] = []

    def observe(self, value: float) -> None:
        self.samples.append((time.monotonic(), value))
        self.inner.observe(value)


def _repository(root: Path) -> Path:
    import shutil

    for name in ("v1", "v2"):
        folder = root / "minilm-sentiment" / name
        shutil.copytree(COMMITTED, folder, ignore=shutil.ignore_patterns("plans"))
        data = {**json.loads((folder / "manifest.json").read_text()), "version": name}
        write_manifest(folder, EngineManifest.from_dict(data))
    return root


async def _produce(bootstrap: str, topic: str, rate: float, stop: asyncio.Event) -> int:
    from aiokafka import AIOKafkaProducer

    producer = AIOKafkaProducer(bootstrap_servers=bootstrap)
    await producer.start()
    posts = (json.dumps(p).encode() for p in sample_posts(seed=3))
    sent = 0
    started = time.monotonic()
    try:
        while not stop.is_set():
            delay = started + sent / rate - time.monotonic()
            if delay > 0:
                await asyncio.sleep(delay)
            await producer.send(topic, next(posts), key=str(sent).encode())
            sent += 1
        await producer.flush()
    finally:
        await producer.stop()
    return sent


def _percentiles(samples: list[tuple[float, float]], phases: list[tuple[float, float]]) -> dict[str, float]:
    values = np.asarray([v for t, v in samples if any(start <= t < end for start, end in phases)]) * 1000
    if not len(values):
        return {"n": 0}
    return {"n": len(values), "p50_ms": round(float(np.percentile(values, 50)), 1),
            "p99_ms": round(float(np.percentile(values, 99)), 1), "max_ms": round(float(values.max()), 1)}


async def _run(args: argparse.Namespace, kafka: EmbeddedKafka, redis_server: EmbeddedRedis, root: Path) -> dict:
    from redis.asyncio import Redis

    topic = "hot-swap"
    kafka.create_topic(topic, PARTITIONS)
    kafka.create_topic(f"{topic}.dlq", 1)
    settings = Settings.load(bootstrap_servers=kafka.bootstrap_servers, topic=topic, consumer_group=topic,
                             redis_url=redis_server.url, redis_prefix=topic,
                             engine={"repository": root, "backend": args.backend})
    metrics = PipelineMetrics()
    latencies = TimedLatencies(metrics.end_to_end)
    metrics.end_to_end = latencies  # type: ignore[assignment]
    _, engine = open_engine(settings)
    engine.activate()
    engine.warm_up()
    worker = Worker(settings, engine, PostTokenizer(engine.version), metrics=metrics)
    redis = Redis.from_url(redis_server.url, decode_responses=True)
    manager = EngineManager(settings, worker, open_engine, redis)
    stop_worker, stop_producing = asyncio.Event(), asyncio.Event()
    running = asyncio.create_task(worker.run(stop_worker, consumer_options={"session_timeout_ms": 2000,
                                                                           "heartbeat_interval_ms": 500}))
    while len(worker.progress) < PARTITIONS:
        await asyncio.sleep(0.05)
    producing = asyncio.create_task(_produce(kafka.bootstrap_servers, topic, args.rate, stop_producing))
    await asyncio.sleep(WARM_UP_S)
    # Steady and swapping phases alternate, so a slow drift (the test broker gets slower as its
    # in-memory log grows) weighs on both alike instead of on whichever phase comes last.
    steady_phases: list[tuple[float, float]] = []
    cycle_phases: list[tuple[float, float]] = []
    answers = []
    per_round = -(-args.cycles // args.rounds)
    cycle = 0
    while cycle < args.cycles:
        started = time.monotonic()
        await asyncio.sleep(args.steady / args.rounds)
        steady_phases.append((started, time.monotonic()))
        started = time.monotonic()
        for _ in range(min(per_round, args.cycles - cycle)):
            began = time.monotonic()
            activated = await manager.activate("v2")
            activated["seconds"] = round(time.monotonic() - began, 3)
            await asyncio.sleep(args.gap)
            rolled = await manager.rollback()
            await asyncio.sleep(args.gap)
            answers += [activated, rolled]
            cycle += 1
            print(f"cycle {cycle}: activate {activated['seconds']} s (pause {activated['pause_seconds'] * 1e3:.3f} "
                  f"ms), rollback pause {rolled['pause_seconds'] * 1e3:.3f} ms", flush=True)
        cycle_phases.append((started, time.monotonic()))
    await asyncio.sleep(args.tail)
    stop_producing.set()
    produced = await producing
    async with asyncio.timeout(60):
        while int(await redis.hget(f"{topic}:totals", "scored") or 0) < produced:
            await asyncio.sleep(0.1)
    counted = int(await redis.hget(f"{topic}:totals", "scored") or 0)
    stop_worker.set()
    await running
    await manager.close()
    for active in (engine, worker.engine):
        active.deactivate()
    await redis.aclose()
    pauses = [a["pause_seconds"] * 1000 for a in answers]
    steady = _percentiles(latencies.samples, steady_phases)
    during = _percentiles(latencies.samples, cycle_phases)
    return {
        "rate": args.rate, "cycles": args.cycles, "produced": produced, "counted": counted,
        "steady": steady, "during_cycles": during,
        "p99_ratio": round(during["p99_ms"] / steady["p99_ms"], 2) if steady.get("p99_ms") else None,
        "cutover_pause_ms": {"n": len(pauses), "p50": round(float(np.median(pauses)), 3),
                             "max": round(max(pauses), 3)},
        "activation_seconds": {"first": answers[0]["seconds"],
                               "median": float(np.median([a["seconds"] for a in answers[::2]]))},
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rate", type=float, default=100.0, help="posts/s produced throughout")
    parser.add_argument("--steady", type=float, default=40.0, help="seconds without swaps, over all rounds")
    parser.add_argument("--cycles", type=int, default=20)
    parser.add_argument("--rounds", type=int, default=8, help="steady and swapping phases alternate this often")
    parser.add_argument("--gap", type=float, default=0.5, help="seconds between an activation and its rollback")
    parser.add_argument("--tail", type=float, default=3.0)
    parser.add_argument("--backend", default="onnxruntime", choices=["onnxruntime", "torch-cuda", "tensorrt"])
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    import onnxruntime

    with tempfile.TemporaryDirectory() as tmp, EmbeddedKafka() as kafka, EmbeddedRedis() as redis_server:
        result = asyncio.run(_run(args, kafka, redis_server, _repository(Path(tmp))))
    print(f"\nmachine: {platform.machine()}, {os.cpu_count()} cores; python {platform.python_version()}; "
          f"onnxruntime {onnxruntime.__version__}; backend {args.backend}; {args.rate:g} posts/s; "
          f"{args.cycles} activate+rollback cycles")
    steady, during = result["steady"], result["during_cycles"]
    print("| phase | posts | P50 ms | P99 ms | max ms |\n|---|---:|---:|---:|---:|")
    for name, phase in (("steady", steady), ("during cycles", during)):
        print(f"| {name} | {phase['n']} | {phase['p50_ms']} | {phase['p99_ms']} | {phase['max_ms']} |")
    pause = result["cutover_pause_ms"]
    print(f"\nP99 during cycles / steady: {result['p99_ratio']}×; cutover pause over {pause['n']} cutovers: "
          f"median {pause['p50']} ms, max {pause['max']} ms; activation (load+warm-up+validation) first "
          f"{result['activation_seconds']['first']} s, then median {result['activation_seconds']['median']} s")
    print(f"exactly once: counted {result['counted']} == produced {result['produced']}: "
          f"{result['counted'] == result['produced']}")
    if args.json:
        args.json.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
