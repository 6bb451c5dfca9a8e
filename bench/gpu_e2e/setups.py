"""The set-ups one bench run compares: what each runs, with how many processes, batched how.

Every Kafka set-up consumes the same topic from the same producers, broker and Redis, one set-up after
another in one run (a fresh broker per run). ``ours`` is the pipeline as served; the others change one
thing each, or are what a user would write instead:

* ``ours``        -- length buckets (``--buckets``) formed by ``--formation`` (default ``least-cost``: neighbouring
  buckets merged when a call's fixed cost outweighs the padding), ``--workers`` worker processes + one engine server.
* ``ours-buckets`` -- ``ours`` with each bucket its own batch (the ``buckets`` formation, the service default).
* ``ours-own``    -- the same workers, each with its own engine on the GPU (no engine server: every
  worker is its own CUDA context, and the GPU time-slices between them).
* ``ours-coarse`` -- ``ours`` with the committed manifest's buckets (32/64/128/256).
* ``ours-python-gc`` -- ``ours`` with CPython's garbage collector as it comes in the workers and the engine
  server (no start-up heap frozen, young collections every 700 allocations).
* ``ours-uvloop`` -- ``ours`` with the workers on uvloop's event loop (where ``uvloop`` is installed).
* ``pad-to-max``  -- (c) ``ours`` with every batch padded to the max length (one bucket).
* ``dynamic-pad`` -- (e) ``ours`` taking posts in arrival order, each batch padded to its longest post
  (see :func:`dynamic_padding`).
* ``hf-b64``      -- (b) a careful user's consumers: aiokafka getmany -> transformers
  ``pipeline("text-classification", batch_size=64)`` (FP16, GPU) -> Redis HINCRBY -> commit once a second
  (``COMMIT_INTERVAL_S``, as our worker), in as many processes as ``ours`` has (``--workers`` + 1).
* ``hf-b1``       -- (a) the same with batch size 1, in ``--b1-workers`` processes (1: the naive reference).
* ``engine-only`` -- (d) pre-tokenized full batches straight into the engine server's engine, no Kafka or
  Redis: posts/s and the fraction of the card's dense FP16 peak for this model's FLOPs.
* ``kafka-only``  -- the floor: the same producers and broker, ``--workers`` consumers that only decode
  each record and count it in Redis (no tokenizer, no model; commit once a second).

``--setup-batching NAME=JSON`` merges batching settings into one set-up's (e.g. a setting that lands
after this file was written), so a device call can try it without a change here.

Every workload runs ``--setups``, narrowed where ``--workload-setups NAME=SETUPS`` names it (by default the
Chinese ``zh`` workload: ``ours`` and ``engine-only``, see ``DEFAULT_WORKLOAD_SETUPS``). Our set-ups and
the floor serve any model; the transformers baselines load ``minilm-sentiment`` only (``ONLY_MINILM``).
"""

from __future__ import annotations

import argparse
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from stream_sentiment.worker import COMMIT_INTERVAL_S

SETUP_NAMES = ("ours", "ours-buckets", "ours-own", "ours-coarse", "ours-python-gc", "ours-uvloop", "pad-to-max",
               "dynamic-pad", "hf-b64", "hf-b1", "engine-only", "kafka-only")
DEFAULT_SETUPS = ("ours", "ours-own", "pad-to-max", "dynamic-pad", "hf-b64", "hf-b1", "engine-only", "kafka-only")
# The transformers baselines and their pipeline batch sizes.
BASELINE_KINDS = {"hf-b64": 64, "hf-b1": 1}
# Dynamic padding's stand-in grid: a bucket every this many tokens.
DYNAMIC_STEP = 8
# Ours pads on the same grid as (e), a bucket every 8 tokens, so that least-cost formation is (e)'s batch
# wherever one call is cheapest and splits it only where the cost model says a split pays. With the
# earlier 11 buckets (16, 24, 32, 40, 48, 64, 96, 112, 128, 160, 256) a merged batch was padded up to the
# next of those, coarser than (e) above 48 tokens: at 0.8x (e)'s drain rate ours kept 63% of computed
# tokens real on long posts against (e)'s 70% (docs/gpu-e2e-h200-repeats3-run6.json), and its P99 lost.
# bench/scheduler_sim.py, with the sink's per-partition prefix rule: ties (e) below saturation, drains as
# before on a backlog (long posts: 69.6k vs 67.4k/s simulated).
DEFAULT_BUCKETS = tuple(range(2 * DYNAMIC_STEP, 257, DYNAMIC_STEP))
# The order set-ups run in, per workload: baselines first, as the matched-rate runs need their drain rates.
RUN_ORDER = ("kafka-only", "hf-b1", "hf-b64", "pad-to-max", "dynamic-pad", "ours-buckets", "ours-coarse", "ours-own",
             "ours-python-gc", "ours-uvloop", "ours")
# Ours is compared at equal offered load against these (each at --matched x its drain rate).
MATCHED_BASELINES = ("hf-b64", "pad-to-max", "dynamic-pad")
# What --repeats runs again at each equal-load cell: ours and the baselines its P99 is judged against there.
REPEATED = ("ours", "pad-to-max", "dynamic-pad")
# The set-ups a workload runs where --workload-setups does not say: the Chinese posts on the 12-layer
# multilingual engine, end to end and engine only (beside the English workloads' full comparison).
DEFAULT_WORKLOAD_SETUPS: dict[str, tuple[str, ...]] = {"zh": ("ours", "engine-only")}
# Set-ups that serve minilm-sentiment whatever the workload: the transformers baselines build a BERT and
# its WordPiece tokenizer from that engine's folder.
ONLY_MINILM = ("hf-b64", "hf-b1")


@dataclass
class Setup:
    name: str
    label: str
    kind: str  # "engine" (our Worker), "hf" (the transformers consumer) or "floor" (consume and count only)
    processes: int  # consumer processes, plus the engine server where the set-up uses it
    description: str  # what runs, in words, with its process count (for the report)
    batching: dict[str, Any] = field(default_factory=dict)
    backlog_cap: int | None = None  # a slow baseline needs fewer posts to show its rate
    served: bool = True  # an "engine" set-up's workers use the engine server (else each its own engine)
    python_gc: bool = False  # CPython's collector as it comes, not stream_sentiment.interpreter's
    uvloop: bool = False  # the workers' event loop is uvloop's, not asyncio's
    consumers: int = 0  # processes in the consumer group (the engine server is not a member)


def dynamic_padding(batching: dict[str, Any], largest: int) -> tuple[dict[str, Any], str]:
    """(e): our workers and engine server, batches in arrival order padded to their longest post; in words.

    The batcher's ``arrival`` formation takes posts in arrival order whatever their length and pads a batch to
    the smallest bucket holding its longest post; with a bucket every ``DYNAMIC_STEP`` tokens that is the longest
    post rounded up to a multiple of 8 (the engine keeps one CUDA graph per bucket and row count).
    """
    grid = sorted(set(range(DYNAMIC_STEP, largest, DYNAMIC_STEP)) | {largest})
    return ({**batching, "buckets": grid, "formation": "arrival"},
            f"arrival order, each batch padded to its longest post rounded up to {DYNAMIC_STEP} tokens "
            f"({len(grid)} buckets)")


def build_setups(args: argparse.Namespace, manifest_buckets: Sequence[int]) -> dict[str, Setup]:
    """The set-ups named in ``args.setups`` (``engine-only`` is not a Kafka set-up: it has none)."""
    batching = {"max_rows": args.max_rows, "max_tokens": args.max_tokens, "window_ms": args.window_ms,
                "timeout_ms": args.timeout_ms, "max_in_flight_posts": max(args.max_in_flight, args.max_rows),
                "merge_smaller_on_timeout": not args.no_merge}
    largest = max(manifest_buckets)
    bucketed = {**batching, "buckets": sorted(set(args.buckets) | {largest}), "formation": args.formation}
    dynamic, dynamic_words = dynamic_padding(batching, largest)
    workers = args.workers
    served = f"{workers} worker processes + 1 engine server"

    def ours(name: str, label: str, words: str, batches: dict[str, Any], **kw: Any) -> Setup:
        own = kw.get("served", True) is False
        return Setup(name, label, "engine", workers if own else workers + 1,
                     f"{workers} worker processes, each with its own engine" if own else f"{served}; {words}",
                     batches, consumers=workers, **kw)

    hf = f"aiokafka -> transformers pipeline (FP16, GPU) -> Redis, commit every {COMMIT_INTERVAL_S:g} s"
    candidates = {
        "ours": ours("ours", f"ours ({args.formation})", f"{args.formation} formation, buckets {bucketed['buckets']}",
                     bucketed),
        "ours-buckets": ours("ours-buckets", "ours (one batch per bucket)", f"buckets {bucketed['buckets']}",
                             {**bucketed, "formation": "buckets"}),
        "ours-own": ours("ours-own", "ours, an engine per worker", "", bucketed, served=False),
        "ours-coarse": ours("ours-coarse", "ours, manifest buckets", f"buckets {list(manifest_buckets)}",
                            {**batching, "buckets": list(manifest_buckets)}),
        "ours-python-gc": ours("ours-python-gc", "ours, CPython's GC", "CPython's collector", bucketed,
                               python_gc=True),
        "ours-uvloop": ours("ours-uvloop", "ours, uvloop", "workers on uvloop", bucketed, uvloop=True),
        "pad-to-max": ours("pad-to-max", "(c) ours, pad to max", f"one bucket, {largest}",
                           {**batching, "buckets": [largest]}),
        "dynamic-pad": ours("dynamic-pad", "(e) ours, dynamic padding", dynamic_words, dynamic),
        "hf-b64": Setup("hf-b64", "(b) HF pipeline, batch 64", "hf", args.baseline_workers,
                        f"{args.baseline_workers} consumer processes: {hf}, batch size 64",
                        backlog_cap=args.posts, consumers=args.baseline_workers),
        "hf-b1": Setup("hf-b1", "(a) HF pipeline, batch 1", "hf", args.b1_workers,
                       f"{args.b1_workers} consumer process(es): {hf}, batch size 1",
                       backlog_cap=min(args.posts, 20000), consumers=args.b1_workers),
        "kafka-only": Setup("kafka-only", "Kafka + Redis only (floor)", "floor", workers,
                            f"{workers} consumer processes: decode, count in Redis, commit every "
                            f"{COMMIT_INTERVAL_S:g} s", consumers=workers),
    }
    chosen = {name: setup for name, setup in candidates.items() if name in args.setups}
    for name, extra in args.setup_batching.items():
        if name in chosen:
            chosen[name].batching = {**chosen[name].batching, **extra}
            chosen[name].description += f"; batching overrides {extra}"
    return chosen


def workload_plan(workloads: Sequence[str], setups: Sequence[str],
                  narrowed: Mapping[str, Sequence[str]]) -> dict[str, list[str]]:
    """The set-ups each workload runs, in ``setups``' order: all of them, or those ``narrowed`` names for it."""
    return {w: [s for s in setups if w not in narrowed or s in narrowed[w]] for w in workloads}


def engine_buckets(setups: Iterable[Setup], default: Sequence[int]) -> list[int]:
    """Every bucket these engine set-ups batch by (the one engine they share must have each)."""
    chosen = {int(b) for s in setups if s.kind == "engine" for b in (s.batching.get("buckets") or ())}
    return sorted(chosen or set(default))


def engine_only_description(args: argparse.Namespace) -> str:
    forwards = [args.torch_forward, *(f for f in args.engine_only_forwards if f != args.torch_forward)]
    torch = (f"; torch forward(s) {', '.join(forwards)} (served: {args.torch_forward}), each on the same batches"
             if args.backend == "torch-cuda" else "")
    return (f"the engine server's engine ({args.server_streams} CUDA stream(s)), one thread per stream, "
            f"pre-tokenized full batches, no Kafka or Redis{torch}")
