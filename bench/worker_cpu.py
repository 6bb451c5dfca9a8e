"""A worker's CPU per post, stage by stage, without a broker or a GPU.

Kafka record batches as a broker sends them (built by aiokafka's own record builder, one producer
tick of records per batch) go through aiokafka's own unpacking and the real worker's code, one fetch
at a time and one stage after another, so each stage's process CPU time (``time.process_time``:
every thread, so the Rust tokenizer's threads count too) is its own:

* ``kafka``     -- aiokafka's unpacking of the fetched record batches into ``ConsumerRecord`` objects
  (``PartitionRecords``, what ``getmany`` hands out; the network and the fetch protocol are not in it);
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
stand-in consumer that hands out the records), everything concurrent as in production, as fast as
it goes (a backlog); its CPU per post against the sum of the stages shows what the event loop's tasks
and awaits add. And ``paced``: the loop again, but records arrive at ``--rate`` posts/s (a GPU host's
share per worker: 50,000 tweets/s over 8 workers) in producer batches of ``--producer-batch``, a
fetch takes what has arrived, the batching is the GPU bench's and the engine takes ``--engine-ms``
per call (a sleep: no CPU) on two streams: small fetches and small batches, where per-fetch and
per-batch costs weigh as they do live. It reports CPU per post, batches, Redis calls and ranges per
1,000 posts, the pipeline-internal latency (fetch -> counted in Redis) P50/P99 and, apart, how long records
waited to be fetched after they arrived (what ``--fetch-interval-ms``, ``kafka_fetch_min_interval_ms``, adds).
Every run checks Redis counted each post exactly once.

Workloads: ``tweets`` (the sample tweets, with topic and region) and ``long`` (four tweets
joined: ~100 tokens). Settings are a GPU worker's (``bench/gpu_e2e``: 256 rows, two
partitions per worker).

    python bench/worker_cpu.py [--posts 20000] [--fetch 500] [--repeat 3] [--rate 6250] [--json out.json]
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
import struct
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench.fixed_engine import FixedEngine, LoopFixedEngine  # noqa: E402
from bench.gpu_e2e.setups import DEFAULT_BUCKETS, dynamic_padding  # noqa: E402
from bench.recording import RecordingHistogram  # noqa: E402
from stream_sentiment.batching.tokenizer import PostTokenizer, fast_path_loop, pad_to_bucket  # noqa: E402
from stream_sentiment.config import Settings  # noqa: E402
from stream_sentiment.embedded import EmbeddedRedis  # noqa: E402
from stream_sentiment.engines.base import Engine  # noqa: E402
from stream_sentiment.engines.manifest import EngineRepository  # noqa: E402
from stream_sentiment.interpreter import tune_interpreter  # noqa: E402
from stream_sentiment.metrics import PipelineMetrics  # noqa: E402
from stream_sentiment.source.replay import sample_posts  # noqa: E402
from stream_sentiment.worker import Worker  # noqa: E402

MODEL = "minilm-sentiment"
STAGES = ("kafka", "decode", "tokenize", "batch", "engine", "scored", "sink")
MODES = ("staged", "loop", "paced")
PARTITIONS = 2
MAX_ROWS = 256
# Kafka append times: a minute of stream, so posts spread over buckets as a live stream's do.
T0 = 1_700_000_000.0
# The paced mode's batching: bench/gpu_e2e's defaults for `ours` (its buckets, least-cost formation,
# an 8 ms window, a 2 ms timeout, smaller buckets merged into a timeout batch, 32,768 padded tokens).
PACED_BUCKETS = DEFAULT_BUCKETS
MAX_BUCKET = PACED_BUCKETS[-1]
PACED_BATCHING = {"max_rows": MAX_ROWS, "max_tokens": 32768, "window_ms": 8.0, "timeout_ms": 2.0,
                  "formation": "least-cost", "merge_smaller_on_timeout": True, "buckets": list(PACED_BUCKETS),
                  # The engine server's cost model (batching.cost), not the settings' default CPU backend's.
                  "call_cost_us": 1000.0, "token_cost_ns": 100.0}
# Records per producer batch in the paced mode: bench/gpu_e2e's two producers at 50,000/s send each 2 ms tick's
# posts (50) to one partition of 16, so a worker with two partitions gets a batch of ~50 every ~8 ms.
PRODUCER_BATCH = 50


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


class RecordLog:
    """The topic's log as a broker holds it: per partition, record batches of one producer tick each.

    Post ``index`` goes to partition ``index % PARTITIONS``; each batch holds ``per_batch`` consecutive records
    of one partition (a producer tick's), encoded by aiokafka's own record builder, with its base offset set as a
    broker sets it. ``unpack`` turns fetched batches into ``ConsumerRecord`` objects the way ``getmany`` does.
    """

    def __init__(self, topic: str, values: list[bytes], per_batch: int, rate: float) -> None:
        from aiokafka.record.default_records import DefaultRecordBatchBuilder

        self.topic = topic
        # partition -> [(base offset, records, encoded batch)]
        self.batches: dict[int, list[tuple[int, int, bytes]]] = {p: [] for p in range(PARTITIONS)}
        by_partition: dict[int, list[tuple[int, bytes]]] = {p: [] for p in range(PARTITIONS)}
        for index, value in enumerate(values):
            by_partition[index % PARTITIONS].append((index, value))
        for partition, records in by_partition.items():
            for start in range(0, len(records), per_batch):
                builder = DefaultRecordBatchBuilder(magic=2, compression_type=0, is_transactional=0, producer_id=-1,
                                                    producer_epoch=-1, base_sequence=-1, batch_size=1 << 24)
                chunk = records[start:start + per_batch]
                for delta, (index, value) in enumerate(chunk):
                    builder.append(delta, timestamp=int((T0 + index / rate) * 1000), key=None, value=value, headers=[])
                # The base offset leads the batch, outside its CRC: a broker writes it on append.
                encoded = struct.pack(">q", start) + bytes(builder.build())[8:]
                self.batches[partition].append((start, len(chunk), encoded))

    def unpack(self, partition: int, encoded: bytes, fetch_offset: int) -> list[Any]:
        """aiokafka's unpacking of fetched record batches (CRC checked) into its ``ConsumerRecord`` objects."""
        from aiokafka import TopicPartition
        from aiokafka.consumer.fetcher import PartitionRecords
        from aiokafka.record.memory_records import MemoryRecords

        tp = TopicPartition(self.topic, partition)
        return list(PartitionRecords(tp, MemoryRecords(encoded), [], fetch_offset, None, None, True, 0))


def fetches(log: RecordLog, per_fetch: int) -> Iterator[tuple[dict[int, tuple[int, bytes]], int]]:
    """Fetches of about ``per_fetch`` records, partitions alternating batch by batch: {partition: (first
    offset, the batches' bytes)} and the records in it."""
    queues = {p: list(batches) for p, batches in log.batches.items()}
    position = dict.fromkeys(queues, 0)
    while any(position[p] < len(queues[p]) for p in queues):
        fetched: dict[int, tuple[int, bytes]] = {}
        count = 0
        while count < per_fetch and any(position[p] < len(queues[p]) for p in queues):
            for partition, batches in queues.items():
                if position[partition] >= len(batches) or count >= per_fetch:
                    continue
                base, records, encoded = batches[position[partition]]
                position[partition] += 1
                first, body = fetched.get(partition, (base, b""))
                fetched[partition] = (first, body + encoded)
                count += records
        yield fetched, count


class FakeConsumer:
    """The few aiokafka consumer calls the worker's fetch loop makes, over the log's record batches.

    ``arrivals`` (paced mode): the monotonic time each fetch's records are there to be fetched; ``getmany``
    waits for them up to its timeout, as a consumer waits for the broker. Without it, every fetch is there at once.
    """

    def __init__(self, log: RecordLog, per_fetch: int, arrivals: list[float] | None = None) -> None:
        from aiokafka import TopicPartition

        self.log = log
        self._tps = {p: TopicPartition(log.topic, p) for p in range(PARTITIONS)}
        self._assigned = set(self._tps.values())
        self._fetches = list(fetches(log, per_fetch))
        self._next = 0
        self._arrivals = arrivals
        self._high: dict[Any, int] = {}
        self._paused: set[Any] = set()
        # Paced mode: how long each fetched record waited in the "broker" after it arrived (seconds, per record).
        self.waits: list[float] = []

    def assignment(self) -> set[Any]:
        return self._assigned

    def pause(self, *partitions: Any) -> None:
        self._paused.update(partitions)

    def resume(self, *partitions: Any) -> None:
        self._paused.difference_update(partitions)

    def take_fetch(self) -> tuple[dict[int, tuple[int, bytes]], int] | None:
        """The next fetch's record batches, unpacked by the caller (the staged mode times that apart)."""
        if self._next >= len(self._fetches):
            return None
        self._next += 1
        return self._fetches[self._next - 1]

    def unpack(self, fetched: dict[int, tuple[int, bytes]]) -> dict[Any, list[Any]]:
        batches = {}
        for partition, (first, encoded) in fetched.items():
            records = self.log.unpack(partition, encoded, first)
            tp = self._tps[partition]
            self._high[tp] = records[-1].offset + 1
            batches[tp] = records
        return batches

    async def getmany(self, timeout_ms: int = 0, max_records: int | None = None) -> dict[Any, list[Any]]:
        # Backpressure pauses every partition at once; the records wait (the fetches are not split by partition).
        if self._paused or self._next >= len(self._fetches):
            await asyncio.sleep(timeout_ms / 1000)
            return {}
        if self._arrivals is None:
            fetched = self.take_fetch()
            assert fetched is not None
            return self.unpack(fetched[0])
        wait = self._arrivals[self._next] - time.monotonic()
        if wait > timeout_ms / 1000:
            await asyncio.sleep(timeout_ms / 1000)
            return {}
        if wait > 0:
            await asyncio.sleep(wait)
        # Everything that has arrived, up to max_records, as a consumer that fell behind gets it.
        merged: dict[int, tuple[int, bytes]] = {}
        count, now = 0, time.monotonic()
        while (self._next < len(self._fetches) and self._arrivals[self._next] <= now
               and (not count or count + self._fetches[self._next][1] <= (max_records or 500))):
            fetched, records = self._fetches[self._next]
            self.waits += [now - self._arrivals[self._next]] * records
            self._next += 1
            count += records
            for partition, (first, encoded) in fetched.items():
                start, body = merged.get(partition, (first, b""))
                merged[partition] = (start, body + encoded)
        return self.unpack(merged)

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


async def new_worker(redis_url: str, engine: Engine, tokenizer: PostTokenizer, name: str, consumer: FakeConsumer,
                     batching: dict[str, Any] | None = None, fetch_min_interval_ms: float = 0) -> Worker:
    batching = batching or {"max_rows": MAX_ROWS, "max_tokens": MAX_ROWS * max(tokenizer.buckets),
                            "max_in_flight_posts": 10_000}
    settings = Settings.load(topic=name, consumer_group=name, redis_url=redis_url, redis_prefix=name,
                             batching=batching, kafka_fetch_min_interval_ms=fetch_min_interval_ms)
    worker = Worker(settings, engine, tokenizer, metrics=PipelineMetrics())
    worker.source.consumer = consumer
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

    while (fetched := consumer.take_fetch()) is not None:
        done = timer.measure("kafka")
        batches = consumer.unpack(fetched[0])
        done()
        done = timer.measure("decode")
        admitted = source._admit(batches)
        done()
        done = timer.measure("tokenize")
        token_ids = scheduler._tokenize([a.post.text for a in admitted])
        done()
        done = timer.measure("batch")
        now = scheduler.clock()
        scheduler.batcher.add_many(admitted, token_ids, now)
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
    polls = 0
    while worker.sink.scored < count:
        await worker._poll_once()
        polls += 1
        if polls > 1_000_000:
            raise AssertionError("the loop does not finish")
    await worker._drain(30.0)
    seconds = time.process_time() - started
    got = await counted(worker)
    if got != count:
        raise AssertionError(f"Redis counted {got} posts of {count}")
    return seconds


def per_1k(worker: Worker, count: int) -> dict[str, float]:
    """What the per-batch costs are spread over: batches, Redis calls and the ranges they wrote per 1,000 posts."""
    metrics = worker.metrics
    return {"batches_per_1k": sum(s.value for s in metrics.batches.collect()[0].samples
                                  if s.name.endswith("_total")) * 1000 / count,
            "redis_calls_per_1k": sum(s.value for s in metrics.redis_apply.collect()[0].samples
                                      if s.name.endswith("_count")) * 1000 / count,
            "ranges_per_1k": sum(s.value for s in metrics.fence.collect()[0].samples
                                 if s.name.endswith("_total")) * 1000 / count}


def paced_arrivals(consumer: FakeConsumer, rate: float, start: float) -> list[float]:
    """When each of ``consumer``'s fetches is complete, with its records arriving at ``rate`` posts/s."""
    arrivals, total = [], 0
    for _, records in consumer._fetches:
        total += records
        arrivals.append(start + total / rate)
    return arrivals


async def run(args: argparse.Namespace) -> dict[str, Any]:
    repository = EngineRepository(REPO / "engines", MODEL)
    version = repository.load("v1")
    tokenizer = PostTokenizer(version)
    engine = FixedEngine(version)
    engine.activate()
    # The paced mode's engine: the GPU bench's fine buckets, two slots, a GPU's time per call.
    paced_batching: dict[str, Any] = {**PACED_BATCHING, "max_in_flight_posts": 10_000, "window_ms": args.window_ms,
                                      "timeout_ms": args.timeout_ms, "formation": args.formation}
    if args.formation == "arrival":  # bench/gpu_e2e's (e): a bucket every 8 tokens, batches in arrival order
        paced_batching, _ = dynamic_padding(paced_batching, MAX_BUCKET)
    paced_version = version.serving(sorted(set(paced_batching["buckets"]) | set(version.manifest.buckets)))
    paced_tokenizer = PostTokenizer(paced_version)
    paced_class = LoopFixedEngine if args.engine_call == "loop" else FixedEngine
    paced_engine = paced_class(paced_version, 2, latency_s=args.engine_ms / 1000)
    paced_engine.activate()
    results: dict[str, Any] = {}
    runs = itertools.count()
    with EmbeddedRedis() as redis:
        for workload in args.workloads:
            values = workload_values(workload, args.posts)
            staged_runs: list[dict[str, float]] = []
            loop_runs: list[float] = []
            paced_runs: list[float] = []
            calls: dict[str, float] = {}
            latency: dict[str, float] = {}
            for _ in range(args.repeat):
                for mode in args.modes:
                    name = f"cpu-{workload}-{next(runs)}"
                    if mode == "paced":
                        # One producer batch per fetch: at low rates the broker answers a fetch as soon as
                        # anything is there.
                        consumer = FakeConsumer(RecordLog(name, values, args.producer_batch, args.rate),
                                                args.producer_batch)
                        worker = await new_worker(redis.url, paced_engine, paced_tokenizer, name, consumer,
                                                  paced_batching,
                                                  fetch_min_interval_ms=args.fetch_interval_ms)
                        internal = RecordingHistogram(worker.metrics.pipeline_latency)
                        worker.metrics.pipeline_latency = internal  # type: ignore[assignment]
                        consumer._arrivals = paced_arrivals(consumer, args.rate, time.monotonic() + 0.05)
                    else:
                        consumer = FakeConsumer(RecordLog(name, values, args.fetch, rate=1000.0), args.fetch)
                        worker = await new_worker(redis.url, engine, tokenizer, name, consumer)
                    gc.collect()
                    try:
                        if mode == "staged":
                            staged_runs.append(await staged(worker, len(values)))
                        elif mode == "loop":
                            loop_runs.append(await looped(worker, len(values)))
                            calls.update({f"loop_{k}": v for k, v in per_1k(worker, len(values)).items()})
                        else:
                            paced_runs.append(await looped(worker, len(values)))
                            calls.update({f"paced_{k}": v for k, v in per_1k(worker, len(values)).items()})
                            p50, p99 = np.percentile(internal.array(), [50, 99]) * 1000
                            # Arrival -> fetch: what a fetch interval adds, outside the internal latency.
                            w50, w99 = np.percentile(consumer.waits, [50, 99]) * 1000
                            latency = {"paced_internal_p50_ms": p50, "paced_internal_p99_ms": p99,
                                       "paced_fetch_wait_p50_ms": w50, "paced_fetch_wait_p99_ms": w99}
                    finally:
                        worker.scheduler.close()
                        await worker._redis.aclose()
            per_post: dict[str, float] = {}
            if staged_runs:
                per_post = {stage: round(1e6 * statistics.median(r[stage] for r in staged_runs) / len(values), 1)
                            for stage in STAGES}
                per_post["sum"] = round(sum(per_post[s] for s in STAGES), 1)
            for mode, seconds in (("loop", loop_runs), ("paced", paced_runs)):
                if seconds:
                    per_post[mode] = round(1e6 * statistics.median(seconds) / len(values), 1)
                    per_post[f"{mode}_min"] = round(1e6 * min(seconds) / len(values), 1)
            per_post.update({name: round(value, 1) for name, value in (calls | latency).items()})
            results[workload] = per_post
            shown = ", ".join(f"{k} {v}" for k, v in per_post.items())
            print(f"{workload:>6} (us/post; per_1k: per 1,000 posts): {shown}", flush=True)
    engine.deactivate()
    paced_engine.deactivate()
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--posts", type=int, default=20000, help="posts per run")
    parser.add_argument("--fetch", type=int, default=500, help="records per fetch (staged and loop)")
    parser.add_argument("--repeat", type=int, default=3, help="runs per workload and mode (the median counts)")
    parser.add_argument("--rate", type=float, default=6250.0,
                        help="paced: posts/s arriving at the worker (50,000/s over 8 workers)")
    parser.add_argument("--engine-ms", type=float, default=1.5, help="paced: the engine's time per call")
    parser.add_argument("--engine-call", choices=("loop", "thread"), default="loop",
                        help="paced: the engine called on the event loop (as the engine server's client is) or on "
                             "slot threads (as the in-process backends are)")
    parser.add_argument("--producer-batch", type=int, default=PRODUCER_BATCH,
                        help="paced: records per producer batch, one batch per fetch")
    parser.add_argument("--formation", choices=("least-cost", "buckets", "arrival"), default="least-cost",
                        help="paced: batching.formation (arrival: bench/gpu_e2e's dynamic padding, a bucket every 8)")
    parser.add_argument("--window-ms", type=float, default=PACED_BATCHING["window_ms"],
                        help="paced: batching.window_ms")
    parser.add_argument("--timeout-ms", type=float, default=PACED_BATCHING["timeout_ms"],
                        help="paced: batching.timeout_ms (how long a post waits while an engine slot is idle)")
    parser.add_argument("--fetch-interval-ms", type=float, default=0.0,
                        help="paced: kafka_fetch_min_interval_ms (least time between fetches; 0 = none)")
    parser.add_argument("--modes", type=lambda s: s.split(","), default=list(MODES), help=f"of {','.join(MODES)}")
    parser.add_argument("--workloads", type=lambda s: s.split(","), default=["tweets", "long"])
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args()
    # A misspelt mode would otherwise run as `paced`, the branch that takes whatever is not staged or loop.
    unknown = sorted(set(args.modes) - set(MODES))
    if unknown:
        parser.error(f"unknown --modes {unknown}: choose from {', '.join(MODES)}")
    os.environ.setdefault("PYTHONHASHSEED", "0")
    tune_interpreter()  # the serving processes' GIL switch interval and collector settings
    results = asyncio.run(run(args))
    print(f"\nus of process CPU per post (median of {args.repeat}); paced at {args.rate:,.0f} posts/s, engine "
          f"{args.engine_ms} ms per call; machine: {platform.processor() or platform.machine()}, {os.cpu_count()} "
          f"cores; python {platform.python_version()}; tokenizer fast path loop: {fast_path_loop()}")
    columns = [c for c in (*STAGES, "sum", "loop", "paced") if any(c in r for r in results.values())]
    print("| workload | " + " | ".join(columns) + " |")
    print("|---|" + "---:|" * len(columns))
    for workload, per_post in results.items():
        print(f"| {workload} | " + " | ".join(str(per_post.get(c, "")) for c in columns) + " |")
    if args.json:
        args.json.write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
