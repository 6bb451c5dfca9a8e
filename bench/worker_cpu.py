"""A worker's CPU per post, stage by stage, without a broker or a GPU.

Pre-built Kafka records (aiokafka's own ``ConsumerRecord``) go through the real
worker's code, one fetch at a time and one stage after another, so each stage's
process CPU time (``time.process_time``: every thread, so the Rust tokenizer's
threads count too) is its own:

* ``decode``    -- the source's decode and validation of a fetch (``KafkaSource._admit``);
* ``tokenize``  -- the scheduler's tokenization of the fetch (what runs in its executor);
* ``batch``     -- queueing in the length buckets, forming batches and their metrics;
* ``engine``    -- padding to the bucket, the slot pool's call of a trivial engine (logits a
  fixed function of the token ids: no model), the shadow sample and the probabilities handed on;
* ``scored``    -- the worker's scored-batch bookkeeping (posts finished in their partitions);
* ``sink``      -- applying the finished ranges: increments, the Redis payload, the fenced
  Lua call to a real valkey (its server's CPU is not the worker's, so not counted) and the
  applied counters.

Then ``loop``: the same records through the worker's own fetch loop (``_poll_once`` with a
stand-in consumer that hands out the records), everything concurrent as in production; its
CPU per post against the sum of the stages shows what the event loop's tasks and awaits add.
Every run checks Redis counted each post exactly once.

Workloads: ``tweets`` (the sample tweets, with topic and region) and ``long`` (four tweets
joined: ~100 tokens). Settings are a GPU worker's (``bench/gpu_e2e``: 256 rows, two
partitions per worker).

    python bench/worker_cpu.py [--posts 20000] [--fetch 500] [--repeat 3] [--json out.json]
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import itertools
import json
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from stream_sentiment.batching.tokenizer import PostTokenizer, pad_to_bucket  # noqa: E402
from stream_sentiment.config import Settings  # noqa: E402
from stream_sentiment.embedded import EmbeddedRedis  # noqa: E402
from stream_sentiment.engines.base import Engine, TokenBatch  # noqa: E402
from stream_sentiment.engines.manifest import EngineRepository  # noqa: E402
from stream_sentiment.metrics import PipelineMetrics  # noqa: E402
from stream_sentiment.source.replay import sample_posts  # noqa: E402
from stream_sentiment.worker import Worker  # noqa: E402

MODEL = "minilm-sentiment"
STAGES = ("decode", "tokenize", "batch", "engine", "scored", "sink")
PARTITIONS = 2
MAX_ROWS = 256
# Kafka append times: a minute of stream, so posts spread over buckets as a live stream's do.
T0 = 1_700_000_000.0


class FixedEngine(Engine):
    """No model: each row's logits are a fixed function of its token ids (only the worker's CPU is measured).

    Varied as a model's are (labels mixed, scores distinct), so what depends on them -- label counts,
    which posts are kept as samples -- costs what it costs live.
    """

    backend = "fixed"
    PHASES = np.array([1.0, 1.7, 2.3])

    def _activate_impl(self) -> None:
        pass

    def _infer_impl(self, batch: TokenBatch, stream: int) -> np.ndarray:
        return 2.0 * np.sin(batch.input_ids.sum(axis=1, dtype=np.float64)[:, None] * self.PHASES)

    def _rebuild_impl(self, stream: int) -> None:
        pass

    def _deactivate_impl(self) -> None:
        pass


def workload_values(workload: str, count: int) -> list[bytes]:
    """Record values: sample tweets, or four of them joined (``long``)."""
    posts = sample_posts(seed=0)
    values = []
    for index in range(count):
        post = next(posts)
        if workload == "long":
            post["text"] = " ".join([post["text"], *(next(posts)["text"] for _ in range(3))])
        post["id"] = f"{workload}-{index}"
        values.append(json.dumps(post).encode())
    return values


def fetches(topic: str, values: list[bytes], per_fetch: int, rate: float) -> Iterator[dict[Any, list[Any]]]:
    """What ``getmany`` returns: ``per_fetch`` records spread over the partitions in offset order."""
    from aiokafka import TopicPartition
    from aiokafka.structs import ConsumerRecord

    offsets = [0] * PARTITIONS
    for start in range(0, len(values), per_fetch):
        batch: dict[Any, list[Any]] = {}
        for index in range(start, min(start + per_fetch, len(values))):
            partition = index % PARTITIONS
            value = values[index]
            record = ConsumerRecord(topic, partition, offsets[partition], int((T0 + index / rate) * 1000), 0, None,
                                    value, None, -1, len(value), ())
            offsets[partition] += 1
            batch.setdefault(TopicPartition(topic, partition), []).append(record)
        yield batch


class FakeConsumer:
    """The few aiokafka consumer calls the worker's fetch loop makes, over pre-built fetches."""

    def __init__(self, topic: str, batches: Iterator[dict[Any, list[Any]]]) -> None:
        from aiokafka import TopicPartition

        self._assigned = {TopicPartition(topic, p) for p in range(PARTITIONS)}
        self._batches = batches
        self._high: dict[Any, int] = {}
        self._paused: set[Any] = set()

    def assignment(self) -> set[Any]:
        return self._assigned

    def pause(self, *partitions: Any) -> None:
        self._paused.update(partitions)

    def resume(self, *partitions: Any) -> None:
        self._paused.difference_update(partitions)

    async def getmany(self, timeout_ms: int = 0, max_records: int | None = None) -> dict[Any, list[Any]]:
        # Backpressure pauses every partition at once; the records wait (the fetches are not split by partition).
        batch = None if self._paused else next(self._batches, None)
        if batch is None:
            await asyncio.sleep(timeout_ms / 1000)
            return {}
        for tp, records in batch.items():
            self._high[tp] = records[-1].offset + 1
        return batch

    def highwater(self, tp: Any) -> int | None:
        return self._high.get(tp)

    async def commit(self, offsets: Any) -> None:
        pass


class Timer:
    """Process CPU seconds per stage."""

    def __init__(self) -> None:
        self.seconds = dict.fromkeys(STAGES, 0.0)

    def measure(self, stage: str) -> Callable[[], None]:
        started = time.process_time()

        def done() -> None:
            self.seconds[stage] += time.process_time() - started
        return done


async def new_worker(redis_url: str, engine: Engine, tokenizer: PostTokenizer, name: str,
                     values: list[bytes], per_fetch: int) -> Worker:
    settings = Settings.load(topic=name, consumer_group=name, redis_url=redis_url, redis_prefix=name,
                             batching={"max_rows": MAX_ROWS, "max_tokens": MAX_ROWS * max(tokenizer.buckets),
                                       "max_in_flight_posts": max(10_000, 4 * per_fetch)})
    worker = Worker(settings, engine, tokenizer, metrics=PipelineMetrics())
    worker.source.consumer = FakeConsumer(name, fetches(name, values, per_fetch, rate=1000.0))
    partitions = list(range(PARTITIONS))
    states = await worker.sink.assign(partitions, f"bench-{name}")
    for partition in partitions:
        worker.sink.track(partition, states[partition].mark if partition in states else 0, None,
                          in_redis=partition in states)
    return worker


async def counted(worker: Worker) -> int:
    return int(await worker._redis.hget(worker.keys.totals, "scored") or 0)


async def staged(worker: Worker, count: int) -> dict[str, float]:
    """One stage after another, fetch by fetch: CPU seconds per stage."""
    timer = Timer()
    source, scheduler, sink = worker.source, worker.scheduler, worker.sink
    consumer = source.consumer
    pool = scheduler.pool
    # The scored callback's own bookkeeping is measured apart from the sink's apply it ends with.
    apply_ready = worker._apply_ready

    async def no_apply(**_: Any) -> None:
        return None

    while True:
        batches = await consumer.getmany()
        if not batches:
            break
        done = timer.measure("decode")
        admitted = source._admit(batches)
        done()
        done = timer.measure("tokenize")
        token_ids = scheduler._tokenize([a.post.text for a in admitted])
        done()
        done = timer.measure("batch")
        now = scheduler.clock()
        for item, ids in zip(admitted, token_ids, strict=True):
            scheduler.batcher.add(item, ids, now)
        formed = []
        while (batch := scheduler.batcher.poll(now, engine_idle=False)) is not None:
            scheduler._record_batch(batch)
            formed.append(batch)
        # What the window would flush later: the rest, as drain batches (the bench has no clock to wait on).
        for batch in scheduler.batcher.drain(now):
            scheduler._record_batch(batch)
            formed.append(batch)
        done()
        for batch in formed:
            done = timer.measure("engine")
            stream = pool.take()
            assert stream is not None
            tokens = pad_to_bucket([e.token_ids for e in batch.entries], batch.bucket)
            probabilities = await pool.score(tokens, stream)
            scheduler.sample_shadow(batch.entries, probabilities)
            pool.give_back(stream)
            done()
            done = timer.measure("scored")
            worker._apply_ready = no_apply  # type: ignore[method-assign]
            await worker._scored(batch.entries, probabilities, pool.engine_name)
            worker._apply_ready = apply_ready  # type: ignore[method-assign]
            done()
            done = timer.measure("sink")
            await sink.apply_ready()
            done()
    done = timer.measure("sink")
    await sink.apply_ready(force_commit=True)
    done()
    got = await counted(worker)
    if got != count:
        raise AssertionError(f"Redis counted {got} posts of {count}")
    return timer.seconds


async def looped(worker: Worker, count: int) -> float:
    """The worker's own fetch loop, concurrent as in production: CPU seconds for every post."""
    started = time.process_time()
    fetched = 0
    while True:
        await worker._poll_once()
        if worker.sink.scored >= count:
            break
        fetched += 1
        if fetched > 100_000:
            raise AssertionError("the loop does not finish")
    await worker._drain(30.0)
    seconds = time.process_time() - started
    got = await counted(worker)
    if got != count:
        raise AssertionError(f"Redis counted {got} posts of {count}")
    return seconds


async def run(args: argparse.Namespace) -> dict[str, Any]:
    version = EngineRepository(REPO / "engines", MODEL).load("v1")
    tokenizer = PostTokenizer(version)
    engine = FixedEngine(version)
    engine.activate()
    results: dict[str, Any] = {}
    runs = itertools.count()
    with EmbeddedRedis() as redis:
        for workload in args.workloads:
            values = workload_values(workload, args.posts)
            staged_runs: list[dict[str, float]] = []
            loop_runs: list[float] = []
            loop_calls: dict[str, float] = {}
            for _ in range(args.repeat):
                for mode in ("staged", "loop"):
                    worker = await new_worker(redis.url, engine, tokenizer, f"cpu-{workload}-{next(runs)}", values,
                                              args.fetch)
                    gc.collect()
                    try:
                        if mode == "staged":
                            staged_runs.append(await staged(worker, len(values)))
                        else:
                            loop_runs.append(await looped(worker, len(values)))
                            # What the per-batch costs are spread over: batches and Redis writes per 1,000 posts.
                            metrics = worker.metrics
                            loop_calls = {
                                "loop_batches_per_1k": sum(s.value for s in metrics.batches.collect()[0].samples
                                                           if s.name.endswith("_total")) * 1000 / len(values),
                                "loop_redis_writes_per_1k": sum(s.value for s in metrics.fence.collect()[0].samples
                                                                if s.name.endswith("_total")) * 1000 / len(values)}
                    finally:
                        worker.scheduler.close()
                        await worker._redis.aclose()
            per_post = {stage: round(1e6 * min(r[stage] for r in staged_runs) / len(values), 1) for stage in STAGES}
            per_post["sum"] = round(sum(per_post[s] for s in STAGES), 1)
            per_post["loop"] = round(1e6 * min(loop_runs) / len(values), 1)
            per_post["loop_median"] = round(1e6 * statistics.median(loop_runs) / len(values), 1)
            per_post.update({name: round(value, 1) for name, value in loop_calls.items()})
            results[workload] = per_post
            shown = ", ".join(f"{k} {v}" for k, v in per_post.items())
            print(f"{workload:>6} (us/post; per_1k: per 1,000 posts): {shown}", flush=True)
    engine.deactivate()
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--posts", type=int, default=20000, help="posts per run")
    parser.add_argument("--fetch", type=int, default=500, help="records per fetch")
    parser.add_argument("--repeat", type=int, default=3, help="runs per workload and mode (the fastest counts)")
    parser.add_argument("--workloads", type=lambda s: s.split(","), default=["tweets", "long"])
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args()
    os.environ.setdefault("PYTHONHASHSEED", "0")
    results = asyncio.run(run(args))
    print(f"\nus of process CPU per post (fastest of {args.repeat}); machine: "
          f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores; python {platform.python_version()}")
    print("| workload | " + " | ".join(STAGES) + " | sum | loop |")
    print("|---|" + "---:|" * (len(STAGES) + 2))
    for workload, per_post in results.items():
        print(f"| {workload} | " + " | ".join(str(per_post[s]) for s in (*STAGES, "sum", "loop")) + " |")
    if args.json:
        args.json.write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
