"""The measurement: what one run's child results add up to (a :class:`RunResult`), and how.

Per post, three latencies (see ``children.PostTimes``): end to end, from the Kafka record timestamp
(set when the producer appends the post) to the Redis write that counted it; its part append -> fetch
(the broker and the consumer's fetch loop); and fetch -> counted, the pipeline's own part (for our
workers: decode, tokenize, wait in a bucket, the engine call, the Redis write). Throughput: a backlog
run's posts counted until 90% of what was counted before the stop, over the time since the group was
released on it; a rate run's slope between 10% and 90%. CPU: per stage of our worker (busy time per
post) and per process class (CPU per post).
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from bench.gpu_e2e.setups import Setup

US = 1e6  # seconds -> microseconds


@dataclass
class RunResult:
    workload: str
    setup: str
    mode: str  # "backlog", "rate" or "matched"
    offered: float | None
    processes: int  # the set-up's processes: consumers, plus the engine server where used
    produced: int
    counted: int
    posts_per_s: float
    p50_ms: float | None = None
    p99_ms: float | None = None
    max_ms: float | None = None
    # Fetch -> counted per post: end to end without the broker's append -> fetch.
    internal_p50_ms: float | None = None
    internal_p99_ms: float | None = None
    saturated: bool = False  # a rate run still behind `grace` seconds after producing stopped
    drained: bool = True  # everything produced was counted before the run was stopped
    skipped: str = ""
    producer_rate: float | None = None
    producer_behind_s: float | None = None
    padding_efficiency: float | None = None
    mean_batch_rows: float | None = None
    engine_share: float | None = None
    gpu_util: float | None = None
    # Consumer time per post by stage, µs, summed over the set-up's consumers. Ours: decode, tokenize and
    # batch are CPU work in the worker; engine and redis are the wall time of those calls (awaited, so they
    # overlap other work). The transformers consumer: decode, pipeline (tokenize + model), redis.
    stage_us_per_post: dict[str, float] = field(default_factory=dict)
    # Process CPU (user + system) per post, µs: workers (the consumers), engine-server, producers, broker,
    # redis-server.
    cpu_us_per_post: dict[str, float] = field(default_factory=dict)
    flush_reasons: dict[str, float] = field(default_factory=dict)
    fence: dict[str, float] = field(default_factory=dict)
    offset_gaps: dict[str, float] = field(default_factory=dict)  # refetched / skipped (a skip loses posts)
    latency_parts_ms: dict[str, list[float]] = field(default_factory=dict)  # name -> [P50, P99]
    # The workers' garbage collections from `go` to the stop: count, longest and summed pause per worker.
    gc: dict[str, float] = field(default_factory=dict)
    engine_server: dict[str, float] = field(default_factory=dict)
    short_partitions: dict[str, Any] = field(default_factory=dict)  # partition -> produced, applied, held
    group_seconds: float = 0.0
    rebalances: int = 0
    wall_seconds: float = 0.0
    # --repeats: 0 for a cell's first run, n for its n-th repeat (the ratio table and targets use the first;
    # the repeats table the median of all)
    repeat: int = 0

    @property
    def exact(self) -> bool:
        return self.counted == self.produced

    def row_name(self) -> str:
        if self.mode == "backlog":
            return "backlog (max)"
        again = f"repeat {self.repeat}, " if self.repeat else ""
        return f"{again}{'matched ' if self.mode == 'matched' else ''}offered {self.offered:,.0f}/s"


def skipped_run(workload: str, setup: Setup, mode: str, rate: float, why: str) -> RunResult:
    return RunResult(workload, setup.name, mode, rate, setup.processes, 0, 0, 0.0, saturated=True, drained=False,
                     skipped=why)


def _percentiles_ms(samples: list[np.ndarray], quantiles: tuple[float, ...], digits: int) -> list[float] | None:
    values = np.concatenate(samples) * 1000 if samples else np.zeros(0)
    if not len(values):
        return None
    return [round(float(np.percentile(values, q)), digits) for q in quantiles]


def posts_per_second(mode: str, progress: list[tuple[float, int]]) -> float:
    """Backlog: posts counted by the first poll at >= 90% of what was counted before the stop, over the time
    since `go` (no tail of stragglers). Rate: the slope between 10% and 90% (producers start a bit after go)."""
    window = max(progress[-1][1], 1)
    low = progress[0] if mode == "backlog" else next((p for p in progress if p[1] >= 0.1 * window), progress[0])
    high = next((p for p in progress if p[1] >= 0.9 * window), progress[-1])
    if high[0] <= low[0]:
        low, high = progress[0], progress[-1]
    return (high[1] - low[1]) / max(high[0] - low[0], 1e-9)


def summarize(workload: str, setup: Setup, mode: str, rate: float | None, produced: dict[str, Any], counted: int,
              caught_up: bool, progress: list[tuple[float, int]], results: list[dict[str, Any]],
              infrastructure: dict[str, float], gpu_util: float | None, group_seconds: float,
              wall_seconds: float) -> RunResult:
    """One run's figures from its consumers' results, the producers' report and the processes' CPU."""
    per_post = 1 / max(counted, 1)
    stages: Counter[str] = Counter()
    for r in results:
        stages.update(r["stages"])
    busy = sum(stages.values())
    real = sum(r.get("real_tokens", 0) for r in results)
    computed = sum(r.get("computed_tokens", 0) for r in results)
    batches = rows = 0.0
    reasons: Counter[str] = Counter()
    fence: Counter[str] = Counter()
    gaps: Counter[str] = Counter()
    for r in results:
        for count, total in r.get("batches_by_bucket", {}).values():
            batches, rows = batches + count, rows + total
        reasons.update(r.get("flush_reasons", {}))
        fence.update(r.get("fence", {}))
        gaps.update(r.get("offset_gaps", {}))
    cpu = {"workers": sum(r["cpu_seconds"] for r in results), **infrastructure}
    if "cpu_seconds" in produced:
        cpu["producers"] = produced["cpu_seconds"]
    end_to_end = _percentiles_ms([r["latencies"] for r in results], (50, 99, 100), 1) or [None, None, None]
    internal = _percentiles_ms([r["internal"] for r in results if "internal" in r], (50, 99), 1) or [None, None]

    pauses = [r["gc_pauses"] for r in results if "gc_pauses" in r]
    collected = np.concatenate(pauses) * 1000 if pauses else np.zeros(0)
    gc_summary = {"collections": len(collected), "max_pause_ms": round(float(collected.max()), 1),
                  "pause_ms_per_worker": round(float(collected.sum()) / len(pauses), 1)} if len(collected) else {}
    parts: dict[str, list[float]] = {}
    for part in ("kafka", "bucket_wait", "engine", "redis", "apply_wait"):
        found = _percentiles_ms([r["parts"][part] for r in results if part in r.get("parts", {})], (50, 99), 2)
        if found:
            parts[part] = found

    return RunResult(
        workload=workload, setup=setup.name, mode=mode, offered=rate, processes=setup.processes,
        produced=int(produced["sent"]), counted=counted, posts_per_s=round(posts_per_second(mode, progress), 1),
        p50_ms=end_to_end[0], p99_ms=end_to_end[1], max_ms=end_to_end[2],
        internal_p50_ms=internal[0], internal_p99_ms=internal[1],
        saturated=rate is not None and not caught_up, drained=caught_up,
        producer_rate=round(produced["rate"], 1), producer_behind_s=round(produced["behind_s"], 3),
        padding_efficiency=round(real / computed, 3) if computed else None,
        mean_batch_rows=round(rows / batches, 1) if batches else None,
        engine_share=round(stages.get("engine", stages.get("pipeline", 0.0)) / busy, 3) if busy else None,
        gpu_util=gpu_util,
        stage_us_per_post={k: round(v * US * per_post, 2) for k, v in stages.items()},
        cpu_us_per_post={k: round(v * US * per_post, 2) for k, v in cpu.items()},
        flush_reasons={k: v for k, v in reasons.items() if v}, fence={k: v for k, v in fence.items() if v},
        offset_gaps={k: v for k, v in gaps.items() if v}, latency_parts_ms=parts, gc=gc_summary,
        group_seconds=round(group_seconds, 1), rebalances=sum(r["rebalances"] for r in results),
        wall_seconds=round(wall_seconds, 1),
    )
