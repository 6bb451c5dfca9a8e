"""What runs inside the bench's child processes: one role each (``CHILD_ROLES``), started with ``spawn``.

A child builds its role (loads and warms an engine, a transformers pipeline, or nothing), says ready,
then answers the parent's commands over a pipe until told to exit. Roles: our pipeline's worker
(``EngineWorkerProcess``: the real ``Worker``, a fresh one per run), the engine server
(``EngineServerProcess``: ``stream_sentiment.engines.server.EngineServer``), the transformers consumer
(baselines (a)/(b)), the Kafka-only consumer (the floor) and the producer.

What a run measures per post, in every consumer role: end to end (the Kafka record timestamp, set when
the producer appends it, to the Redis write that counted it) and its two parts, append -> fetch (the
broker and the consumer's fetch loop) and fetch -> counted (the pipeline itself): see :class:`PostTimes`.

Spawn imports this module by name (``bench.gpu_e2e.children``) in each child; the parent puts the
repository on ``sys.path``, which spawn hands to its children.
"""

from __future__ import annotations

import asyncio
import bisect
import contextlib
import ctypes
import gc
import itertools
import json
import logging
import math
import os
import signal
import sys
import threading
import time
import traceback
from collections import Counter
from collections.abc import Callable, Sequence
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

import numpy as np

from bench.gpu_e2e.common import (
    MODEL,
    REPO,
    STATUS_INTERVAL_S,
    VERSION,
    BenchError,
    EncoderShape,
    bench_version,
    encoder_flops,
    encoder_shape,
)
from bench.recording import RecordingHistogram, RecordingLabelledHistogram
from bench.stack_sampler import StackSampler
from stream_sentiment.batching.tokenizer import PostTokenizer, pad_to_bucket
from stream_sentiment.config import Settings
from stream_sentiment.engines.base import Engine, TokenBatch
from stream_sentiment.engines.manifest import EngineVersion
from stream_sentiment.metrics import STAGES, PipelineMetrics
from stream_sentiment.worker import COMMIT_INTERVAL_S, Worker

log = logging.getLogger("gpu_e2e")

PR_SET_PDEATHSIG = 1


class PostTimes:
    """Per post of one run: end to end, and its parts append -> fetch and fetch -> counted, in seconds.

    Records the worker's own two histograms, ``end_to_end_seconds`` (Kafka append -> Redis write) and
    ``pipeline_seconds`` (this worker's fetch -> Redis write), keeping every observation for exact
    percentiles. The sink observes both for the same posts in the same order, so their difference is each
    post's time in Kafka (append -> fetch). And ``apply_wait_seconds`` (the engine's answer -> Redis write):
    how long a scored post waited for its partition's earlier offsets, and the write.
    """

    def __init__(self, metrics: PipelineMetrics) -> None:
        self.end_to_end = RecordingHistogram(metrics.end_to_end)
        self.pipeline = RecordingHistogram(metrics.pipeline_latency)
        self.apply_wait = RecordingHistogram(metrics.apply_wait)
        metrics.end_to_end = self.end_to_end  # type: ignore[assignment]
        metrics.pipeline_latency = self.pipeline  # type: ignore[assignment]
        metrics.apply_wait = self.apply_wait  # type: ignore[assignment]

    def arrays(self) -> dict[str, np.ndarray]:
        """``latencies`` (end to end), ``internal`` (fetch -> counted), ``kafka`` (append -> fetch), ``apply_wait``
        (engine answer -> counted)."""
        end_to_end, internal = self.end_to_end.array(), self.pipeline.array()
        if len(internal) != len(end_to_end):  # a post without a fetch time: pair nothing rather than wrongly
            kafka = np.zeros(0)
        else:
            internal = np.minimum(internal, end_to_end)
            kafka = end_to_end - internal
        return {"latencies": end_to_end.astype(np.float32), "internal": internal.astype(np.float32),
                "kafka": kafka.astype(np.float32), "apply_wait": self.apply_wait.array().astype(np.float32)}


class HeldWorker(Worker):
    """A worker that joins the group at once but fetches nothing until ``go`` is set.

    The group forms while aiokafka's coordinator runs in the background; without the hold,
    the first member to join would drain part of a backlog alone before the others arrive.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.go = asyncio.Event()
        fetch = self.source.fetch

        async def held_fetch(timeout_ms: int, *, paused: bool) -> list[Any]:
            if not self.go.is_set():
                await asyncio.sleep(0.01)
                return []
            return await fetch(timeout_ms, paused=paused)

        self.source.fetch = held_fetch  # type: ignore[method-assign]


class RunChannel:
    """The parent's ``go`` / ``stop`` during a run, read on the run's event loop; status sent back."""

    def __init__(self, conn: Connection, go: asyncio.Event | None = None) -> None:
        self.conn = conn
        self.go = go if go is not None else asyncio.Event()
        self.stop = asyncio.Event()
        self.go_cpu = 0.0
        self.rebalances = 0  # assignment changes after ``go``: a rebalance in the middle of a measurement
        self._loop = asyncio.get_running_loop()
        self._loop.add_reader(conn.fileno(), self._readable)

    def _readable(self) -> None:
        while self.conn.poll():
            command = self.conn.recv()["cmd"]
            if command == "go" and not self.go.is_set():
                self.go_cpu = time.process_time()
                self.go.set()
            elif command == "stop":
                self.stop.set()

    def close(self) -> None:
        self._loop.remove_reader(self.conn.fileno())
        os.set_blocking(self.conn.fileno(), True)  # uvloop's add_reader leaves it non-blocking; recv() blocks

    async def report(self, partitions: Any, counted: Any) -> None:
        """Send the assignment every STATUS_INTERVAL_S until cancelled."""
        seen = None
        while True:
            current = partitions()
            if self.go.is_set() and seen is not None and current != seen:
                self.rebalances += 1
            seen = current
            self.conn.send({"event": "status", "partitions": current, "counted": counted()})
            await asyncio.sleep(STATUS_INTERVAL_S)

    def cpu_since_go(self) -> float:
        return time.process_time() - self.go_cpu if self.go.is_set() else 0.0


class GcPauses:
    """Every garbage collection's pause in this process while installed and ``counting()``, in seconds."""

    def __init__(self, counting: Callable[[], bool]) -> None:
        self.pauses: list[float] = []
        self._counting = counting
        self._started = 0.0

    def __enter__(self) -> GcPauses:
        gc.callbacks.append(self._callback)
        return self

    def __exit__(self, *exc: object) -> None:
        gc.callbacks.remove(self._callback)

    def _callback(self, phase: str, info: dict[str, int]) -> None:
        if phase == "start":
            self._started = time.perf_counter()
        elif self._counting():
            self.pauses.append(time.perf_counter() - self._started)


def _metric_sum(metric: Any, suffix: str, **labels: str) -> float:
    total = 0.0
    for family in metric.collect():
        for sample in family.samples:
            if sample.name.endswith(suffix) and all(sample.labels.get(k) == v for k, v in labels.items()):
                total += sample.value
    return total


def _consumer_options(command: dict[str, Any]) -> dict[str, Any]:
    """Group timing, every set-up's consumers alike (ours get their fetch sizes through their settings)."""
    return {"session_timeout_ms": command["session_timeout_ms"], "heartbeat_interval_ms": command["heartbeat_ms"]}


def _fetch_options(command: dict[str, Any]) -> dict[str, Any]:
    """The baselines' and the floor's fetch sizes: what ours get as kafka_fetch_max_wait_ms / kafka_fetch_min_bytes."""
    return {"fetch_max_wait_ms": command["fetch_max_wait_ms"], "fetch_min_bytes": command["fetch_min_bytes"]}


class EngineWorkerProcess:
    """One pipeline worker process: the engine stays loaded and warm across runs, a fresh Worker per run."""

    def __init__(self, index: int, options: dict[str, Any]) -> None:
        self.index = index
        self.options = options
        self.version = bench_version(options["engine_buckets"], options.get("model", MODEL))
        self.tokenizer = PostTokenizer(self.version)
        self.engine = self._open_engine(options)
        started = time.perf_counter()
        self.engine.activate()
        self.engine.warm_up()
        self.warm_up_seconds = time.perf_counter() - started

    def _open_engine(self, options: dict[str, Any]) -> Engine:
        if options.get("server_socket"):
            from stream_sentiment.engines.server_backend import EngineServerEngine

            return EngineServerEngine(self.version, options["streams"], socket_path=Path(options["server_socket"]),
                                      max_rows=options["max_rows"])
        if options["backend"] == "fixed":
            from bench.fixed_engine import LoopFixedEngine

            return LoopFixedEngine(self.version, options["streams"], latency_s=options["fixed_engine_ms"] / 1000)
        if options["backend"] == "torch-cuda":
            from stream_sentiment.engines.torch_backend import TorchCudaEngine

            return TorchCudaEngine(self.version, options["streams"], max_rows=options["max_rows"],
                                   forward=options.get("torch_forward", "padded"), max_tokens=options.get("max_tokens"))
        from stream_sentiment.engines.onnxruntime_backend import OnnxRuntimeEngine

        return OnnxRuntimeEngine(self.version, options["streams"], options["ort_threads"])

    def describe(self) -> dict[str, Any]:
        info: dict[str, Any] = {"backend": self.engine.backend, "streams": self.engine.streams,
                                "model": self.version.label, "buckets": list(self.version.manifest.buckets),
                                "warm_up_seconds": round(self.warm_up_seconds, 1)}
        info |= _device_info(self.engine)
        return info

    def handle(self, command: dict[str, Any], conn: Connection) -> dict[str, Any]:
        if command["cmd"] == "run":
            loop_factory = None
            if command.get("uvloop"):
                import uvloop

                loop_factory = uvloop.new_event_loop
            with asyncio.Runner(loop_factory=loop_factory) as runner:
                return runner.run(self._run(command, conn))
        if command["cmd"] == "predict":
            return {"labels": self._predict(command["texts"])}
        if command["cmd"] == "engine_only":
            return self._engine_only(command)
        raise ValueError(f"unknown command {command['cmd']!r}")

    def close(self) -> None:
        self.engine.deactivate()

    async def _run(self, command: dict[str, Any], conn: Connection) -> dict[str, Any]:
        settings = Settings.load(
            bootstrap_servers=command["bootstrap"], topic=command["topic"], consumer_group=command["group"],
            redis_url=command["redis_url"], redis_prefix=command["prefix"],
            engine=self._engine_settings(),
            batching=command["batching"],
            kafka_fetch_max_wait_ms=command["fetch_max_wait_ms"], kafka_fetch_min_bytes=command["fetch_min_bytes"],
        )
        metrics = PipelineMetrics()
        posts = PostTimes(metrics)
        parts = {"bucket_wait": RecordingLabelledHistogram(metrics.batch_wait),
                 "engine": RecordingLabelledHistogram(metrics.engine_latency),
                 "redis": RecordingHistogram(metrics.redis_apply)}
        metrics.batch_wait, metrics.engine_latency = parts["bucket_wait"], parts["engine"]  # type: ignore[assignment]
        metrics.redis_apply = parts["redis"]  # type: ignore[assignment]
        use_collector(python_gc=command["python_gc"])
        worker = HeldWorker(settings, self.engine, self.tokenizer, metrics=metrics)
        channel = RunChannel(conn, worker.go)
        run = asyncio.create_task(worker.run(channel.stop, consumer_options=_consumer_options(command)))
        reporter = asyncio.create_task(channel.report(lambda: sorted(worker.progress), lambda: worker.scored))
        collections = GcPauses(counting=worker.go.is_set)
        # BENCH_PROFILE_DIR: sample this worker's event-loop thread while it measures (bench/stack_sampler; lent
        # hosts refuse py-spy's ptrace), one file per worker and run, for bench/profile_summary.py.
        profile_dir = os.environ.get("BENCH_PROFILE_DIR")
        sampler: contextlib.AbstractContextManager[Any] = (
            StackSampler(active=worker.go.is_set) if profile_dir else contextlib.nullcontext())
        try:
            with collections, sampler:
                await run
        finally:
            if profile_dir and isinstance(sampler, StackSampler):
                sampler.write(Path(profile_dir) / f"{command['group']}-worker{self.index}.txt",
                              prefix=f'process {os.getpid()}:"role=worker {self.index} {command["group"]}"')
            reporter.cancel()
            await asyncio.gather(reporter, return_exceptions=True)
            channel.close()
        batches = {
            str(bucket): [_metric_sum(metrics.batch_rows, "_count", bucket=str(bucket)),
                          _metric_sum(metrics.batch_rows, "_sum", bucket=str(bucket))]
            for bucket in self.version.manifest.buckets
        }
        times = posts.arrays()
        return {
            "counted": worker.scored,
            "latencies": times["latencies"],
            "internal": times["internal"],
            "stages": {stage: metrics.value("stream_sentiment_stage_busy_seconds_total", {"stage": stage})
                       for stage in STAGES},
            "real_tokens": _metric_sum(metrics.batch_tokens, "_total", kind="real"),
            "computed_tokens": _metric_sum(metrics.batch_tokens, "_total", kind="computed"),
            "batches_by_bucket": {b: v for b, v in batches.items() if v[0]},
            "flush_reasons": {reason: _metric_sum(metrics.batches, "_total", reason=reason)
                              for reason in ("full", "window", "timeout", "drain")},
            "fence": {outcome: metrics.value("stream_sentiment_fence_outcomes_total", {"outcome": outcome})
                      for outcome in ("applied", "duplicate", "out_of_order")},
            "offset_gaps": {outcome: metrics.value("stream_sentiment_offset_gaps_total", {"outcome": outcome})
                            for outcome in ("refetched", "skipped")},
            "cpu_seconds": channel.cpu_since_go(),
            "rebalances": channel.rebalances,
            "gc_pauses": np.asarray(collections.pauses, dtype=np.float32),
            # Where a post's time goes: append -> fetch and answer -> counted per post; bucket wait, engine call,
            # Redis write per batch.
            "parts": {"kafka": times["kafka"], "apply_wait": times["apply_wait"],
                      **{name: h.array().astype(np.float32) for name, h in parts.items()}},
            # After the stop: what this worker still held per partition (a run that ended short says where).
            "partitions": {p: progress.summary() for p, progress in worker.progress.items()},
        }

    def _engine_settings(self) -> dict[str, Any]:
        """The worker's ``engine`` settings for the engine it is handed (the Worker does not open its own)."""
        engine = {"backend": self.engine.backend, "streams": self.engine.streams, "model": self.version.manifest.model,
                  "server_socket": self.options.get("server_socket")}
        if self.engine.backend == "fixed":
            # Called on the event loop as the engine server's client is: that backend's settings and call-cost
            # model; the socket is never opened.
            engine |= {"backend": "engine-server", "server_socket": "/dev/null/fixed-engine"}
        return engine

    def _predict(self, texts: list[str]) -> list[int]:
        token_ids = self.tokenizer.encode(texts)
        labels = [0] * len(texts)
        rows = self.options["max_rows"]
        for indices, batch in bucketed_batches(token_ids, self.version.manifest.buckets, lambda _: rows):
            for index, row in zip(indices, self.engine.infer(batch, 0), strict=True):
                labels[index] = int(np.argmax(row))
        return labels

    def _engine_only(self, command: dict[str, Any]) -> dict[str, Any]:
        return engine_only_run(self.engine, engine_only_batches(self.tokenizer, self.options["max_rows"], command),
                               command, encoder_shape(self.version))


def bucketed_batches(token_ids: Sequence[Sequence[int]], buckets: Sequence[int],
                     capacity: Any) -> list[tuple[list[int], TokenBatch]]:
    """Posts (by index) in batches of their smallest bucket, ``capacity(bucket)`` rows at most."""
    grid = sorted(buckets)
    by_bucket: dict[int, list[int]] = {}
    for index, ids in enumerate(token_ids):
        by_bucket.setdefault(grid[bisect.bisect_left(grid, max(1, len(ids)))], []).append(index)
    batches = []
    for bucket, indices in sorted(by_bucket.items()):
        rows = capacity(bucket)
        for start in range(0, len(indices), rows):
            chunk = indices[start:start + rows]
            batches.append((chunk, pad_to_bucket([token_ids[i] for i in chunk], bucket)))
    return batches


def _device_info(engine: Engine) -> dict[str, Any]:
    if engine.backend != "torch-cuda":
        return {}
    import torch

    return {"device": torch.cuda.get_device_name(), "torch": torch.__version__,
            "warm_up_stats": getattr(engine, "warm_up_stats", {})}


def engine_only_batches(tokenizer: PostTokenizer, max_rows: int,
                        command: dict[str, Any]) -> list[tuple[list[int], TokenBatch]]:
    """(d)'s workload: its posts (by index) pre-tokenized, in full batches of their bucket."""
    bodies = json.loads(Path(command["workload"]).read_text(encoding="utf-8"))["bodies"][: command["posts"]]
    token_ids = tokenizer.encode([json.loads(body)["text"] for body in bodies])
    max_tokens = command["max_tokens"]
    # The batcher's rule: a bucket's batch holds at most max_tokens padded tokens.
    return bucketed_batches(token_ids, command["buckets"], lambda bucket: max(1, min(max_rows, max_tokens // bucket)))


def forward_agreement(engines: dict[str, Engine], indexed: list[tuple[list[int], TokenBatch]]) -> dict[str, Any]:
    """Argmax agreement and logit differences of two engines over every post of (d)'s workload."""
    logits = {}
    for name, engine in engines.items():
        posts = sum(len(indices) for indices, _ in indexed)
        out = np.zeros((posts, len(engine.labels)), dtype=np.float32)
        for indices, batch in indexed:
            out[indices] = engine.logits(batch, 0)
        logits[name] = out
    (first, a), (second, b) = logits.items()
    diff = np.abs(a.astype(np.float64) - b.astype(np.float64))
    return {"compared": f"{first} vs {second}", "posts": len(a),
            "argmax_agreement": float((a.argmax(1) == b.argmax(1)).mean()),
            "disagreements": int((a.argmax(1) != b.argmax(1)).sum()),
            "max_abs_logit_diff": float(diff.max()), "mean_abs_logit_diff": float(diff.mean()),
            "finite": bool(np.isfinite(a).all() and np.isfinite(b).all())}


def computed_tokens(engine: Engine, batch: TokenBatch) -> tuple[float, float]:
    """Tokens the engine computes for ``batch``, and the sum of squared sequence lengths attention computes.

    Padded: ``rows x bucket`` cells, every row ``bucket`` long. Packed (``engine.torch_forward``): each
    call's real tokens rounded up to its token budget; attention only within each real post (the padding's
    short dummy sequences are left out of the attention term).
    """
    if getattr(engine, "forward", None) != "packed":
        return float(batch.rows * batch.bucket), float(batch.rows * batch.bucket**2)
    from stream_sentiment.engines.packing import budget_for
    from stream_sentiment.engines.torch_packed import row_chunks

    layout: Any = getattr(engine, "layout")  # noqa: B009 -- TorchCudaEngine's, not on the Engine interface
    lengths = batch.attention_mask.sum(axis=1)
    budgets = sum(budget_for(max(1, int(lengths[c].sum())), layout.budgets)
                  for c in row_chunks(lengths, layout.rows_capacity, layout.budgets[-1]))
    return float(budgets), float((lengths.astype(np.float64) ** 2).sum())


def engine_only_run(engine: Engine, indexed: list[tuple[list[int], TokenBatch]], command: dict[str, Any],
                    shape: EncoderShape) -> dict[str, Any]:
    """(d): full batches of pre-tokenized posts, one thread per engine stream, for ``seconds``.

    FLOPs per second are the encoder's of ``shape`` (the served model's layers and widths).
    """
    batches = [b for _, b in indexed]
    stats = [(b.rows, *computed_tokens(engine, b), float(b.attention_mask.sum()),
              float((b.attention_mask.sum(axis=1).astype(np.float64) ** 2).sum())) for b in batches]
    shapes = {(b.bucket, b.rows): b for b in batches}
    for stream in range(engine.streams):  # each shape once per stream: no first-call cost in the timing
        for batch in shapes.values():
            engine.infer(batch, stream)
    totals = np.zeros((engine.streams, 5))
    deadline = time.perf_counter() + command["seconds"]

    def drive(stream: int) -> None:
        # Each stream starts elsewhere in the mix of buckets, and goes round until the deadline.
        start = stream * len(batches) // engine.streams
        for position in itertools.cycle([*range(start, len(batches)), *range(start)]):
            engine.infer(batches[position], stream)
            totals[stream] += stats[position]
            if time.perf_counter() > deadline:
                return

    started = time.perf_counter()
    threads = [threading.Thread(target=drive, args=(s,)) for s in range(engine.streams)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    elapsed = time.perf_counter() - started
    posts, computed, computed_sq, real, real_sq = totals.sum(axis=0)
    return {"posts_per_s": posts / elapsed, "seconds": elapsed, "streams": engine.streams,
            "forward": getattr(engine, "forward", None),
            "batches": len(batches), "mean_rows": float(np.mean([b.rows for b in batches])),
            "computed_tokens_per_post": computed / posts, "real_tokens_per_post": real / posts,
            "computed_flops_per_s": encoder_flops(computed, computed_sq, shape) / elapsed,
            "real_flops_per_s": encoder_flops(real, real_sq, shape) / elapsed,
            "model": engine.version.label, "encoder": vars(shape)}


class EngineServerProcess:
    """The host's engine server (``stream-sentiment engine-server``): owns the GPU for the ``ours`` workers."""

    def __init__(self, index: int, options: dict[str, Any]) -> None:
        from stream_sentiment.engines.server import EngineServer
        from stream_sentiment.service import open_engine

        self.options = options
        self.settings = Settings.load(
            engine={"backend": options["backend"], "streams": options["streams"],
                    "server_socket": options["server_socket"], "threads_per_stream": options["ort_threads"],
                    "repository": str(REPO / "engines"), "model": options.get("model", MODEL), "version": VERSION,
                    "torch_forward": options.get("torch_forward", "padded")},
            batching={"buckets": options["engine_buckets"], "max_rows": options["max_rows"],
                      "max_tokens": max(8192, options["max_rows"] * max(options["engine_buckets"]))},
        )
        started = time.perf_counter()
        self.server = EngineServer(self.settings, open_engine).start()
        self.key = self.server.preload()
        self.warm_up_seconds = time.perf_counter() - started
        version, self.engine = self.server.loaded(self.key)
        self.version = version
        self.tokenizer = PostTokenizer(version)
        self.others: dict[str, Engine] = {}  # the other torch forwards (d) compares, built on first use
        self.shape = encoder_shape(version)

    def describe(self) -> dict[str, Any]:
        return {"backend": self.engine.backend, "streams": self.engine.streams, "pid": os.getpid(),
                "model": self.version.label, "encoder": vars(self.shape),
                "buckets": list(self.key.buckets), "warm_up_seconds": round(self.warm_up_seconds, 1),
                **_device_info(self.engine)}

    def handle(self, command: dict[str, Any], conn: Connection) -> dict[str, Any]:
        if command["cmd"] == "engine_only":
            return self._engine_only(command)
        if command["cmd"] == "gc":
            use_collector(python_gc=command["python_gc"])
            return {}
        if command["cmd"] == "stats":
            metrics = self.server.metrics
            return {"requests": _metric_sum(metrics.calls, "_total"), "batches": _metric_sum(metrics.batches, "_total"),
                    "rows": _metric_sum(metrics.rows, "_total"),
                    "call_seconds": _metric_sum(metrics.call_seconds, "_sum"),
                    "stream_wait_seconds": _metric_sum(metrics.stream_wait, "_sum")}
        raise ValueError(f"unknown command {command['cmd']!r}")

    def close(self) -> None:
        for engine in self.others.values():
            engine.deactivate()
        self.server.close()

    def _engine_only(self, command: dict[str, Any]) -> dict[str, Any]:
        """(d) on the served engine, and on each other torch forward in ``command["forwards"]`` (same batches).

        The result is the served engine's, with ``forwards`` (each forward's result) and
        ``forward_agreement`` (the first two forwards' answers on every post of the workload) beside it.
        """
        indexed = engine_only_batches(self.tokenizer, self.options["max_rows"], command)
        served = getattr(self.engine, "forward", None)
        forwards = [f for f in command.get("forwards") or () if f != served]
        if served is None or not forwards:
            return engine_only_run(self.engine, indexed, command, self.shape)
        result = engine_only_run(self.engine, indexed, command, self.shape)
        try:  # the other forward is a comparison: its failure is reported, not the end of the bench
            engines = {served: self.engine, **{f: self._other(f) for f in forwards}}
            result["forwards"] = {served: dict(result)} | {
                name: engine_only_run(engine, indexed, command, self.shape)
                for name, engine in engines.items() if name != served}
            result["forward_agreement"] = forward_agreement(dict(list(engines.items())[:2]), indexed)
        except Exception as error:
            log.exception("(d): the %s forward failed", forwards)
            result["forwards_error"] = f"{forwards}: {error!r}"[:2000]
        return result

    def _other(self, forward: Any) -> Engine:
        """A torch-cuda engine like the served one but with another forward, kept for the next workload."""
        if forward not in self.others:
            from stream_sentiment.engines.torch_backend import TorchCudaEngine

            served: Any = self.engine
            engine = TorchCudaEngine(self.version, served.streams, max_rows=served.max_rows, forward=forward,
                                     max_tokens=served.layout.budgets[-1])
            started = time.perf_counter()
            engine.activate()
            engine.warm_up()
            log.info("(d): %s forward ready in %.1f s: %s", forward, time.perf_counter() - started,
                     engine.warm_up_stats)
            self.others[forward] = engine
        return self.others[forward]


def hf_classifier(version: EngineVersion) -> Any:
    """The served model as a transformers ``PreTrainedModel``: BertModel, masked mean pooling, linear head.

    Weights are the engine's (dequantized from the committed INT8 ONNX, as the torch-cuda backend
    uses); the parameter names are the Hugging Face BERT names, so they load under ``bert.``.
    """
    import torch
    from torch import nn
    from transformers import BertConfig, BertModel, BertPreTrainedModel
    from transformers.modeling_outputs import SequenceClassifierOutput

    from stream_sentiment.engine_build.onnx_weights import weights_for_version
    from stream_sentiment.engines.minilm_torch import masked_mean

    weights = weights_for_version(version)
    labels = version.manifest.labels
    config = BertConfig(**weights.config, hidden_act="gelu", num_labels=len(labels),
                        id2label=dict(enumerate(labels)), label2id={label: i for i, label in enumerate(labels)})

    class MeanPooledBertForSequenceClassification(BertPreTrainedModel):  # type: ignore[misc]
        def __init__(self, config: Any) -> None:
            super().__init__(config)
            self.bert = BertModel(config, add_pooling_layer=False)
            self.classifier = nn.Linear(config.hidden_size, config.num_labels)
            self.post_init()

        def forward(self, input_ids: Any = None, attention_mask: Any = None, token_type_ids: Any = None,
                    **_: Any) -> Any:
            hidden = self.bert(input_ids=input_ids, attention_mask=attention_mask,
                               token_type_ids=token_type_ids).last_hidden_state
            pooled = masked_mean(hidden, attention_mask.to(hidden.dtype))  # the served model's pooling
            return SequenceClassifierOutput(logits=self.classifier(pooled))

    model = MeanPooledBertForSequenceClassification(config)
    state = {(k if k.startswith("classifier.") else f"bert.{k}"): torch.from_numpy(v)
             for k, v in weights.state_dict.items()}
    missing, unexpected = model.load_state_dict(state, strict=False)
    missing = [k for k in missing if not k.endswith(("position_ids", "token_type_ids"))]  # buffers, not weights
    if missing or unexpected:
        raise RuntimeError(f"baseline model: missing {missing}, unexpected {unexpected}")
    return model.to(device="cuda", dtype=torch.float16).eval()


class HfConsumerProcess:
    """Baselines (a)/(b): what a careful user writes with transformers, measured like the pipeline."""

    def __init__(self, index: int, options: dict[str, Any]) -> None:
        import warnings
        from concurrent.futures import ThreadPoolExecutor

        import torch
        import transformers

        from stream_sentiment.batching.normalization import get_normalizer

        if not torch.cuda.is_available():
            raise BenchError(f"torch {torch.__version__} sees no CUDA device")
        warnings.filterwarnings("ignore", message=".*pipelines sequentially on GPU.*")
        transformers.logging.set_verbosity_error()  # "model type not supported for text-classification": it is
        # minilm-sentiment only (cli refuses them for a workload of another model): the fallback below names
        # BERT's WordPiece special tokens, and hf_classifier builds a BERT on this model's weights.
        version = bench_version(None)
        try:
            tokenizer = transformers.AutoTokenizer.from_pretrained(str(version.path))
        except Exception:  # an older or newer transformers that cannot read the folder: the file itself
            tokenizer = transformers.PreTrainedTokenizerFast(tokenizer_file=str(version.tokenizer_path),
                                                             pad_token="[PAD]", cls_token="[CLS]", sep_token="[SEP]",
                                                             unk_token="[UNK]", mask_token="[MASK]")
        self.labels = version.manifest.labels
        self.max_length = version.manifest.max_length
        self.batch_size = options["batch_size"]
        self.fetch = max(32, 4 * self.batch_size)
        # The model's input contract: the same normalization the pipeline applies before tokenizing.
        self.normalize = get_normalizer(version.manifest.text_normalization)
        self.pipe = transformers.pipeline("text-classification", model=hf_classifier(version), tokenizer=tokenizer,
                                          device=0)
        self.versions = {"torch": torch.__version__, "transformers": transformers.__version__}
        self._executor = ThreadPoolExecutor(1, "pipeline")
        self.commit_interval = COMMIT_INTERVAL_S  # as our worker: same commit cost, same redelivery window
        self.classify(["warming up the baseline"] * 2 * self.batch_size)

    def describe(self) -> dict[str, Any]:
        return {"batch_size": self.batch_size, **self.versions}

    def classify(self, texts: list[str]) -> list[str]:
        outputs = self.pipe(texts, batch_size=self.batch_size, truncation=True, max_length=self.max_length)
        # top_k unset: one {"label", "score"} per text (some versions wrap it in a list).
        return [(out[0] if isinstance(out, list) else out)["label"] for out in outputs]

    def handle(self, command: dict[str, Any], conn: Connection) -> dict[str, Any]:
        if command["cmd"] == "run":
            return asyncio.run(self._run(command, conn))
        if command["cmd"] == "predict":
            return {"labels": [self.labels.index(label) for label in self.classify(
                [self.normalize(t) for t in command["texts"]])]}
        if command["cmd"] == "throughput":
            texts = [self.normalize(t) for t in command["texts"]]
            started = time.perf_counter()
            self.classify(texts)
            return {"posts_per_s": len(texts) / (time.perf_counter() - started)}
        raise ValueError(f"unknown command {command['cmd']!r}")

    def close(self) -> None:
        self._executor.shutdown(wait=False, cancel_futures=True)

    async def _run(self, command: dict[str, Any], conn: Connection) -> dict[str, Any]:
        from aiokafka import AIOKafkaConsumer
        from redis.asyncio import Redis

        consumer = AIOKafkaConsumer(
            command["topic"], bootstrap_servers=command["bootstrap"], group_id=command["group"],
            enable_auto_commit=False, auto_offset_reset="earliest", **_fetch_options(command),
            **_consumer_options(command),
        )
        redis = Redis.from_url(command["redis_url"])
        totals = f"{command['prefix']}:totals"
        channel = RunChannel(conn)
        counted = 0
        latencies: list[float] = []
        appended_to_fetched: list[float] = []
        fetched_to_counted: list[float] = []
        last_commit = 0.0
        stages = dict.fromkeys(("decode", "pipeline", "redis"), 0.0)
        loop = asyncio.get_running_loop()
        await consumer.start()
        reporter = asyncio.create_task(channel.report(
            lambda: sorted(tp.partition for tp in consumer.assignment()), lambda: counted))
        try:
            while not channel.stop.is_set():
                if not channel.go.is_set():
                    await asyncio.sleep(0.01)
                    continue
                fetched = await consumer.getmany(timeout_ms=100, max_records=self.fetch)
                records = [record for batch in fetched.values() for record in batch]
                if not records:
                    continue
                fetched_at = time.time()
                started = time.perf_counter()
                texts = [self.normalize(json.loads(record.value)["text"]) for record in records]
                decoded = time.perf_counter()
                # In a thread, as a careful user would: the event loop keeps heartbeating meanwhile.
                labels = await loop.run_in_executor(self._executor, self.classify, texts)
                scored = time.perf_counter()
                async with redis.pipeline(transaction=True) as pipe:
                    pipe.hincrby(totals, "scored", len(records))
                    for label, count in Counter(labels).items():
                        pipe.hincrby(totals, label, count)
                    await pipe.execute()
                written = time.time()
                if written - last_commit >= self.commit_interval:
                    await consumer.commit()
                    last_commit = written
                stages["decode"] += decoded - started
                stages["pipeline"] += scored - decoded
                stages["redis"] += time.perf_counter() - scored
                counted += len(records)
                kafka = [fetched_at - record.timestamp / 1000 for record in records]
                appended_to_fetched += kafka
                latencies += [written - fetched_at + delay for delay in kafka]
                fetched_to_counted += [written - fetched_at] * len(records)
        finally:
            reporter.cancel()
            await asyncio.gather(reporter, return_exceptions=True)
            channel.close()
            await consumer.stop()
            await redis.aclose()
        return {"counted": counted, "latencies": np.asarray(latencies, dtype=np.float32),
                "internal": np.asarray(fetched_to_counted, dtype=np.float32),
                "parts": {"kafka": np.asarray(appended_to_fetched, dtype=np.float32)}, "stages": stages,
                "cpu_seconds": channel.cpu_since_go(), "rebalances": channel.rebalances}


class KafkaOnlyConsumerProcess(HfConsumerProcess):
    """The floor: the baselines' consumer loop with no model -- decode, count in Redis, commit."""

    def __init__(self, index: int, options: dict[str, Any]) -> None:
        from concurrent.futures import ThreadPoolExecutor

        self.labels = ("neutral",)
        self.fetch = 2000
        self.normalize = str
        self.versions = {}
        self._executor = ThreadPoolExecutor(1, "count")
        self.commit_interval = COMMIT_INTERVAL_S  # as our worker: the broker's floor, not a commit per fetch

    def describe(self) -> dict[str, Any]:
        return {}

    def classify(self, texts: list[str]) -> list[str]:
        return ["neutral"] * len(texts)


class ProducerProcess:
    """Sends a share of a run's posts, paced to its share of the offered rate, with unique ids."""

    def __init__(self, index: int, options: dict[str, Any]) -> None:
        self.index = index
        self._bodies: dict[str, list[bytes]] = {}

    def describe(self) -> dict[str, Any]:
        return {}

    def close(self) -> None:
        pass

    def handle(self, command: dict[str, Any], conn: Connection) -> dict[str, Any]:
        if command["cmd"] != "produce":
            raise ValueError(f"unknown command {command['cmd']!r}")
        path = command["workload"]
        if path not in self._bodies:
            self._bodies[path] = [b.encode() for b in json.loads(Path(path).read_text(encoding="utf-8"))["bodies"]]
        return asyncio.run(self._produce(command, self._bodies[path]))

    async def _produce(self, c: dict[str, Any], bodies: list[bytes]) -> dict[str, Any]:
        from aiokafka import AIOKafkaProducer

        count, rate, partitions, topic = c["count"], c["rate"], c["partitions"], c["topic"]
        producer = AIOKafkaProducer(bootstrap_servers=c["bootstrap"], linger_ms=c["linger_ms"],
                                    max_batch_size=c["max_batch_bytes"])
        await producer.start()
        try:
            head = b'{"id": "' + c["id_prefix"].encode() + b"-"
            tick = max(0.001, c["linger_ms"] / 1000)
            partition = self.index % partitions
            await asyncio.sleep(max(0.0, c["start_at"] - time.time()))
            cpu, started = time.process_time(), time.monotonic()
            sent, behind = 0, 0.0
            deliveries, targets = [], []
            while sent < count:
                if rate is None:
                    due = min(count, sent + 256)
                else:
                    elapsed = time.monotonic() - started
                    due = min(count, int(elapsed * rate) + 1)
                    behind = max(behind, elapsed - sent / rate)
                for i in range(sent, due):
                    body = bodies[(c["offset"] + i) % len(bodies)]
                    deliveries.append(await producer.send(topic, head + str(i).encode() + b'", ' + body[1:],
                                                          partition=partition))
                    targets.append(partition)
                # Each tick's posts go to one partition, the next tick's to the next: real batches, all partitions.
                partition = (partition + 1) % partitions
                sent = due
                if rate is None:
                    await asyncio.sleep(0)  # let the sender task ship full batches
                elif sent < count:
                    # Paced per tick, not per post: a tick's posts go to one partition in one request, as
                    # Kafka's sticky partitioner does. Per post, a paced producer sends a request for each
                    # one or two posts, and the broker's cost is per request (Tansu burnt ~12 cores on
                    # 50k posts/s sent that way).
                    elapsed = time.monotonic() - started
                    await asyncio.sleep(max(0.0, (math.floor(elapsed / tick) + 1) * tick - elapsed,
                                            sent / rate - elapsed))
            seconds = time.monotonic() - started
            await producer.flush()
            results = await asyncio.gather(*deliveries, return_exceptions=True)
        finally:
            await producer.stop()
        failed = [r for r in results if isinstance(r, BaseException)]
        if failed:
            log.warning("%d of %d sends failed, e.g. %r", len(failed), sent, failed[0])
        per_partition = Counter(p for p, r in zip(targets, results, strict=True) if not isinstance(r, BaseException))
        return {"sent": sent - len(failed), "failed": len(failed), "seconds": seconds,
                "cpu_seconds": time.process_time() - cpu, "behind_s": behind, "per_partition": dict(per_partition)}


CHILD_ROLES = {"engine-worker": EngineWorkerProcess, "engine-server": EngineServerProcess,
               "hf-consumer": HfConsumerProcess, "kafka-consumer": KafkaOnlyConsumerProcess,
               "producer": ProducerProcess}


def _die_with_parent() -> None:
    """Linux: SIGKILL this process when the parent dies, however it dies (nothing else would clean up)."""
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)


def use_collector(*, python_gc: bool) -> None:
    """The garbage collector for the next run: the service's (start-up heap frozen) or CPython's as it comes."""
    from stream_sentiment.interpreter import settle_heap, use_settled_collector

    use_settled_collector(not python_gc)
    settle_heap()  # a no-op with CPython's collector


def child_main(role: str, index: int, conn: Connection, options: dict[str, Any]) -> None:
    """A child's life: build (load, warm up), say ready, then answer commands until ``exit`` or EOF."""
    _die_with_parent()
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the parent's to handle; it stops us in order
    logging.basicConfig(level=logging.WARNING, format=f"[{role} {index}] %(levelname)s %(name)s: %(message)s")
    handler: Any = None
    if role in ("engine-worker", "engine-server"):
        from stream_sentiment.interpreter import tune_interpreter

        tune_interpreter()  # as `stream-sentiment run` and `engine-server` do
        if options.get("switch_interval_ms"):
            sys.setswitchinterval(options["switch_interval_ms"] / 1000)
    try:
        handler = CHILD_ROLES[role](index, options)
        if role in ("engine-worker", "engine-server"):
            use_collector(python_gc=False)  # the engine is loaded and warm: as the service, settle the heap
        conn.send({"event": "ready", **handler.describe()})
        while True:
            command = conn.recv()
            if command["cmd"] == "exit":
                break
            conn.send({"event": "result", **handler.handle(command, conn)})
    except EOFError:
        pass  # the parent is gone
    except BaseException:
        with contextlib.suppress(Exception):
            conn.send({"event": "error", "traceback": traceback.format_exc()})
        sys.exit(1)
    finally:
        if handler is not None:
            with contextlib.suppress(Exception):
                handler.close()

