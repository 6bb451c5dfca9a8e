"""The parent process's bench: starts every child, then drives each run of each set-up and workload.

Each model has its own engine server and workers (``ModelChildren``), started together; a workload runs
on its model's, with the set-ups ``workload_plan`` gives it: the baselines' pipeline-only checks, the
engine-only run, then each Kafka set-up in ``RUN_ORDER``: a backlog drain (the sustained maximum) and
each ``--rates`` step for ``--seconds`` (a step above 1.2x the set-up's drain rate is reported saturated,
not run); then ours and the baselines in ``MATCHED_BASELINES`` once more at ``--matched`` x the
baseline's drain rate, so P99s are compared at the same offered load; with ``--repeats N``, each such cell
of ours and of (c) and (e) runs N times in all, ours first on odd repeats and last on even ones (one run's P99
at these loads moves more between runs minutes apart than ours and the baselines differ). Every run gets a fresh broker
(Tansu's cost grows with what it holds), checks that Redis counted exactly what was produced, and
releases the consumer group only once it has formed. The figures come from ``measure``, the tables
from ``report``.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import sys
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from bench.gpu_e2e.common import MODEL, BenchError, bench_version, fp16_peak_tflops
from bench.gpu_e2e.measure import RunResult, skipped_run, summarize
from bench.gpu_e2e.processes import Child, GpuSampler, proc_cpu_seconds
from bench.gpu_e2e.report import acceptance, render_workload, write_json
from bench.gpu_e2e.setups import (
    BASELINE_KINDS,
    DEFAULT_BUCKETS,
    MATCHED_BASELINES,
    REPEATED,
    RUN_ORDER,
    Setup,
    engine_buckets,
    workload_plan,
)
from bench.gpu_e2e.workloads import WORKLOAD_MODELS, Workload, models_of

# A rate above this multiple of a set-up's drain rate cannot be sustained: reported, not run.
SKIP_ABOVE_CAPACITY = 1.2
POLL_INTERVAL_S = 0.05  # Redis totals while a run goes: the drain-time resolution


@dataclass
class ModelChildren:
    """One model's processes: its engine server and workers (an engine and its tokenizer are per process)."""

    model: str
    engine_server: Child | None = None
    workers: list[Child] = field(default_factory=list)  # engine-server clients
    own_workers: list[Child] = field(default_factory=list)  # each with its own engine

    @property
    def children(self) -> list[Child]:
        return self.workers + self.own_workers + ([self.engine_server] if self.engine_server is not None else [])


class Bench:
    def __init__(self, args: argparse.Namespace, setups: dict[str, Setup]) -> None:
        self.args = args
        self.setups = setups
        # Which set-ups run on which workload (``--workload-setups`` narrows ``--setups``, e.g. zh's).
        self.plan = workload_plan(args.workloads, list(setups) + (["engine-only"] if "engine-only" in args.setups
                                                                  else []), args.workload_setups)
        self.run_ids = itertools.count()
        self.models = {model: ModelChildren(model) for model in models_of(args.workloads)}
        self.consumers: list[Child] = []  # kafka-only
        self.baselines: dict[str, list[Child]] = {}
        self.producers: list[Child] = []
        self.skipped: dict[str, str] = {}
        self.cleanup: list[Any] = []
        self.redis_url = ""
        self.redis_pid: int | None = None
        self.started = time.monotonic()
        # Everything measured so far, rewritten to --json after every run: a time limit still leaves results.
        self.report: dict[str, Any] = {"workloads": {}}

    def checkpoint(self) -> None:
        write_json(self.args.json, self.report)

    @property
    def children(self) -> list[Child]:
        return ([c for group in self.models.values() for c in group.children] + self.consumers + self.producers
                + [c for group in self.baselines.values() for c in group])

    def say(self, text: str) -> None:
        print(f"[{time.monotonic() - self.started:6.1f} s] {text}", flush=True)

    # -- children ---------------------------------------------------------------------------

    def planned(self, model: str | None = None) -> set[str]:
        """The set-ups some workload (of ``model``, where given) runs."""
        return {s for w, names in self.plan.items() if model in (None, WORKLOAD_MODELS[w]) for s in names}

    async def spawn(self, context: Any, socket_folder: Path) -> None:
        """Start every child; each model's engine server first, as its clients connect while they start.

        A model's engine server gets every bucket its set-ups batch by; an engine per worker only those
        of the set-ups that use one (each of those engines captures its own CUDA graphs). Every model's
        children start together, so their engines warm up at the same time.
        """
        args = self.args
        options = {"backend": args.backend, "streams": args.streams, "max_rows": args.max_rows,
                   "ort_threads": args.ort_threads, "switch_interval_ms": args.switch_interval_ms,
                   "torch_forward": args.torch_forward, "max_tokens": args.max_tokens,
                   "fixed_engine_ms": args.fixed_engine_ms}
        workers: list[tuple[ModelChildren, dict[str, Any] | None, dict[str, Any] | None]] = []
        for model, group in self.models.items():
            planned = self.planned(model)
            engine = [s for s in self.setups.values() if s.kind == "engine" and s.name in planned]
            mine = {**options, "model": model}

            def buckets(served: bool, engine: list[Setup] = engine, model: str = model) -> list[int]:
                chosen = engine_buckets([s for s in engine if s.served is served], DEFAULT_BUCKETS)
                return list(bench_version(chosen, model).manifest.buckets)

            socket_path = str(socket_folder / f"{model}.sock")
            if any(s.served for s in engine) or "engine-only" in planned:
                server_options = {**mine, "engine_buckets": buckets(True), "streams": args.server_streams,
                                  "server_socket": socket_path}
                group.engine_server = Child(context, "engine-server", 0, server_options,
                                            "engine server" if model == MODEL else f"engine server ({model})")
            served = ({**mine, "engine_buckets": buckets(True), "server_socket": socket_path}
                      if any(s.served for s in engine) else None)
            alone = {**mine, "engine_buckets": buckets(False)} if any(not s.served for s in engine) else None
            workers.append((group, served, alone))

        async def ready(group: ModelChildren) -> None:
            server = group.engine_server
            assert server is not None
            server.info = await server.expect("ready", args.startup_timeout)
            self.say(f"{server.name} ready: {server.info.get('model', group.model)} on "
                     f"{server.info.get('device', server.info['backend'])}, {server.info['streams']} stream(s), "
                     f"warm-up {server.info['warm_up_seconds']} s")

        # Every model's engine server warms up at the same time; workers connect once theirs listens.
        await asyncio.gather(*(ready(g) for g in self.models.values() if g.engine_server is not None))
        for group, served, alone in workers:
            prefix = "" if group.model == MODEL else f"{group.model} "  # the English model's keep their names
            if served:
                group.workers = [Child(context, "engine-worker", i, served, f"{prefix}worker {i}")
                                 for i in range(args.workers)]
            if alone:
                group.own_workers = [Child(context, "engine-worker", i, alone, f"{prefix}own-engine worker {i}")
                                     for i in range(args.workers)]
        if "kafka-only" in self.planned():
            self.consumers = [Child(context, "kafka-consumer", i, {}, f"consumer {i}") for i in range(args.workers)]
        for name in (s.name for s in self.setups.values() if s.kind == "hf" and s.name in self.planned()):
            options = {"batch_size": BASELINE_KINDS[name]}
            self.baselines[name] = [Child(context, "hf-consumer", i, options, f"{name} {i}")
                                    for i in range(self.setups[name].consumers)]
        self.producers = [Child(context, "producer", i, {}, f"producer {i}") for i in range(args.producers)]

    async def wait_ready(self) -> None:
        timeout = self.args.startup_timeout

        async def ready(child: Child) -> None:
            child.info = await child.expect("ready", timeout)

        engine_workers = [g for m in self.models.values() for g in (m.workers, m.own_workers) if g]
        await asyncio.gather(*(ready(c) for c in [*itertools.chain(*engine_workers), *self.consumers, *self.producers]))
        for group in engine_workers:
            info = group[0].info
            self.say(f"{len(group)} {group[0].name.rsplit(' ', 1)[0]}(s) ready: {info.get('model', '')} on "
                     f"{info.get('device', info['backend'])}, {info['streams']} slot(s), "
                     f"warm-up {max(c.info['warm_up_seconds'] for c in group)} s")
        for name, group in list(self.baselines.items()):
            try:
                await asyncio.gather(*(ready(c) for c in group))
            except BenchError as error:  # a baseline that cannot start is reported, the rest goes on
                print(error, file=sys.stderr, flush=True)
                self.skipped[name] = str(error).strip().splitlines()[-1]
                self.say(f"{name} skipped: {self.skipped[name]}")
                for child in group:
                    child.stop()
                del self.baselines[name]
                self.setups.pop(name, None)

    def stop_children(self) -> None:
        for child in self.children:
            child.stop()

    def kill_children(self) -> None:
        for child in self.children:
            child.kill()

    def members(self, setup: Setup, model: str) -> list[Child]:
        """The consumer group of ``setup`` on a workload of ``model`` (the floor and baselines: one for all)."""
        if setup.kind == "engine":
            group = self.models[model]
            return group.workers if setup.served else group.own_workers
        return self.consumers if setup.kind == "floor" else self.baselines[setup.name]

    # -- one run ----------------------------------------------------------------------------

    async def produce(self, bootstrap: str, topic: str, workload: Workload, count: int,
                      rate: float | None) -> dict[str, float]:
        producers = self.producers[: max(1, min(len(self.producers), count))]
        shares = [count // len(producers) + (1 if i < count % len(producers) else 0) for i in range(len(producers))]
        run = next(self.run_ids)
        start_at = time.time() + 0.3  # all producers start together
        commands = [(producer, {
            "cmd": "produce", "bootstrap": bootstrap, "topic": topic, "workload": str(workload.path),
            "count": share, "rate": None if rate is None else rate / len(producers), "partitions": self.args.partitions,
            "linger_ms": self.args.linger_ms, "max_batch_bytes": 65536, "id_prefix": f"r{run}p{i}",
            "offset": run * 7919 + i * len(workload.texts) // len(producers), "start_at": start_at,
        }) for i, (producer, share) in enumerate(zip(producers, shares, strict=True))]
        limit = 120.0 + count / 5000 if rate is None else count / rate + 60.0
        results = await asyncio.gather(*(producer.ask(command, limit) for producer, command in commands))
        seconds = max(r["seconds"] for r in results)
        per_partition: Counter[int] = Counter()
        for r in results:
            per_partition.update(r["per_partition"])
        return {"sent": sum(r["sent"] for r in results), "failed": sum(r["failed"] for r in results),
                "per_partition": dict(per_partition),
                "seconds": seconds,
                "rate": sum(r["sent"] for r in results) / max(seconds, 1e-9),
                "cpu_seconds": sum(r["cpu_seconds"] for r in results),
                "behind_s": max(r["behind_s"] for r in results)}

    async def wait_for_group(self, members: list[Child]) -> float:
        """Seconds until every member holds a share and together they hold each partition exactly once."""
        partitions, started = self.args.partitions, time.monotonic()
        stable: tuple[tuple[int, ...], ...] | None = None
        stable_since = 0.0
        while True:
            for member in members:
                member.check()
            shares = tuple(tuple(m.status["partitions"]) if m.status else () for m in members)
            owned = sorted(itertools.chain.from_iterable(shares))
            formed = owned == list(range(partitions)) and (partitions < len(members) or all(shares))
            now = time.monotonic()
            if formed and shares == stable:
                if now - stable_since >= 0.4:  # no rebalance in flight
                    return now - started
            else:
                stable, stable_since = (shares if formed else None), now
            if now - started > self.args.group_timeout:
                raise BenchError(f"the consumer group did not form within {self.args.group_timeout:g} s; "
                                 f"partitions per member: {shares}")
            await asyncio.sleep(0.05)

    async def run(self, workload: Workload, setup: Setup, mode: str, rate: float | None) -> RunResult:
        from redis.asyncio import Redis

        from stream_sentiment.embedded import EmbeddedKafka

        args = self.args
        count = args.posts if rate is None else int(rate * args.seconds)
        if rate is None and setup.backlog_cap:
            count = min(count, setup.backlog_cap)
        name = f"{workload.name}-{setup.name}-{next(self.run_ids)}"
        wall_started = time.monotonic()
        redis = Redis.from_url(self.redis_url)
        with EmbeddedKafka() as kafka:  # fresh per run: Tansu's cost grows with what it holds
            try:
                return await self._run(kafka, redis, name, workload, setup, mode, rate, count, wall_started)
            except BenchError as error:
                self.kill_children()  # before the broker stops under them (producers would retry for long)
                raise BenchError(f"{workload.name} / {setup.name} / {mode} {rate or ''}: {error}") from None
            except BaseException:
                self.kill_children()
                raise
            finally:
                await redis.aclose()

    async def _run(self, kafka: Any, redis: Any, name: str, workload: Workload, setup: Setup, mode: str,
                   rate: float | None, count: int, wall_started: float) -> RunResult:
        args, members = self.args, self.members(setup, workload.model)
        kafka.create_topic(name, args.partitions)
        kafka.create_topic(f"{name}.dlq", 1)
        produced: dict[str, float] = {}
        if rate is None:
            produced = await self.produce(kafka.bootstrap_servers, name, workload, count, None)
        command = {"cmd": "run", "bootstrap": kafka.bootstrap_servers, "topic": name, "group": name,
                   "redis_url": self.redis_url, "prefix": name, "batching": setup.batching,
                   "fetch_max_wait_ms": args.fetch_max_wait_ms,
                   "fetch_min_bytes": args.fetch_min_bytes, "session_timeout_ms": args.session_timeout_ms,
                   "heartbeat_ms": max(100, args.session_timeout_ms // 4), "python_gc": setup.python_gc,
                   "uvloop": setup.uvloop}
        server = self.models[workload.model].engine_server if setup.kind == "engine" and setup.served else None
        if server is not None:
            await server.ask({"cmd": "gc", "python_gc": setup.python_gc}, 60)
        for member in members:
            member.status = None
            member.send(command)
        group_seconds = await self.wait_for_group(members)
        server_pid = server.info.get("pid") if server is not None else None
        server_before = (await server.ask({"cmd": "stats"}, 30)) if server is not None else {}
        infrastructure = {"broker": proc_cpu_seconds(kafka.pid), "redis-server": proc_cpu_seconds(self.redis_pid),
                          "engine-server": proc_cpu_seconds(server_pid)}
        sampler = GpuSampler()
        sampler.start()
        producing: asyncio.Task[dict[str, float]] | None = None
        try:
            for member in members:
                member.send({"cmd": "go"})
            started = time.monotonic()
            if rate is not None:
                producing = asyncio.create_task(self.produce(kafka.bootstrap_servers, name, workload, count, rate))
            progress: list[tuple[float, int]] = [(started, 0)]
            # Backlog: until drained or the drain limit; rate: until caught up or `grace` after producing.
            deadline = started + args.drain_seconds if rate is None else None
            while True:
                counted = int(await redis.hget(f"{name}:totals", "scored") or 0)
                now = time.monotonic()
                progress.append((now, counted))
                for child in members + self.producers:
                    child.check()
                if producing is not None and producing.done():
                    produced = producing.result()  # a producer's failure is raised here
                    producing, deadline = None, now + args.grace
                if produced and counted >= produced["sent"]:
                    break
                if deadline is not None and now > deadline:
                    break
                await asyncio.sleep(POLL_INTERVAL_S)
            # Judged here, not after the stop: stopping drains what the workers fetched, so a run that
            # fell behind could still end with every post counted.
            caught_up = counted >= produced["sent"]
            for member in members:
                member.send({"cmd": "stop"})
            results = await asyncio.gather(*(m.expect("result", 60 + args.grace) for m in members))
        finally:
            gpu_util = sampler.stop()
            if producing is not None:
                producing.cancel()
        infrastructure = {"broker": proc_cpu_seconds(kafka.pid) - infrastructure["broker"],
                          "redis-server": proc_cpu_seconds(self.redis_pid) - infrastructure["redis-server"],
                          "engine-server": proc_cpu_seconds(server_pid) - infrastructure["engine-server"]}
        if server_pid is None:
            del infrastructure["engine-server"]
        counted = int(await redis.hget(f"{name}:totals", "scored") or 0)
        served: dict[str, float] = {}
        if server is not None:
            after = await server.ask({"cmd": "stats"}, 30)
            delta = {k: after[k] - server_before[k] for k in ("requests", "batches", "rows", "call_seconds",
                                                              "stream_wait_seconds")}
            calls, requests = max(delta["batches"], 1), max(delta["requests"], 1)
            served = {"requests": delta["requests"], "batches": delta["batches"],
                      "requests_per_batch": round(delta["requests"] / calls, 2),
                      "rows_per_batch": round(delta["rows"] / calls, 1),
                      "mean_call_ms": round(1000 * delta["call_seconds"] / calls, 3),
                      "mean_stream_wait_ms": round(1000 * delta["stream_wait_seconds"] / requests, 3)}
        result = summarize(workload.name, setup, mode, rate, produced, counted, caught_up, progress, results,
                           infrastructure, gpu_util, group_seconds, time.monotonic() - wall_started)
        result.engine_server = served
        if counted < produced["sent"] and setup.kind == "engine":
            # Which partitions fell short, and whether their missing posts were ever fetched.
            marks = {int(k): int(v) for k, v in (await redis.hgetall(f"{name}:offsets:{name}")).items()}
            held = {p: s for r in results for p, s in r.get("partitions", {}).items()}
            result.short_partitions = {
                str(p): {"produced": n, "applied": marks.get(p, 0), "worker_held": held.get(p)}
                for p, n in sorted(produced.get("per_partition", {}).items()) if marks.get(p, 0) < n}
            self.say(f"        short: {result.short_partitions}")
        return result

    # -- a workload -------------------------------------------------------------------------

    def report_run(self, r: RunResult) -> None:
        self.checkpoint()
        if r.skipped:
            self.say(f"{r.workload:>6} {r.setup:>11} {r.row_name()}: {r.skipped}")
            return
        latency = "" if r.mode == "backlog" else (f", P50 {r.p50_ms} / P99 {r.p99_ms} / max {r.max_ms} ms "
                                                  f"(fetch -> counted P99 {r.internal_p99_ms} ms)")
        state = "SATURATED" if r.saturated else ("drained" if r.drained else "stopped at the drain limit")
        state += ", exact" if r.exact else ""
        self.say(f"{r.workload:>6} {r.setup:>11} {r.row_name()}: {r.posts_per_s:,.0f} posts/s{latency}; "
                 f"{r.counted}/{r.produced} counted ({state}); group {r.group_seconds} s, run {r.wall_seconds} s"
                 + (f"; offset gaps {r.offset_gaps}" if r.offset_gaps else ""))
        if r.latency_parts_ms and r.mode != "backlog":
            self.say("        P50/P99 ms: " + ", ".join(f"{k} {v[0]}/{v[1]}" for k, v in r.latency_parts_ms.items())
                     + (f"; engine server: {r.engine_server}" if r.engine_server else "")
                     + (f"; worker GC: {r.gc}" if r.gc else ""))

    async def kafka_setup(self, workload: Workload, setup: Setup, capacity: dict[str, float]) -> list[RunResult]:
        results = [await self.run(workload, setup, "backlog", None)]
        self.report_run(results[0])
        capacity[setup.name] = results[0].posts_per_s
        # One after another: a comprehension with await runs each step to its end before the next.
        results += [await self.rate_run(workload, setup, "rate", rate, capacity[setup.name])
                    for rate in self.args.rates]
        return results

    async def repeat_cells(self, workload: Workload, runs: list[RunResult]) -> list[RunResult]:
        """``--repeats``: each equal-load cell where ours and (c) or (e) both ran, again, the order alternating."""
        cells: dict[float, tuple[str, list[str]]] = {}
        for r in runs:
            if r.mode in ("rate", "matched") and not r.skipped and r.offered and r.setup in REPEATED:
                mode, names = cells.setdefault(r.offered, (r.mode, []))
                names.append(r.setup)
        repeated: list[RunResult] = []
        for repeat in range(1, self.args.repeats):
            for rate, (mode, names) in sorted(cells.items()):
                if "ours" not in names or len(names) < 2:
                    continue
                # The first pass ran the baselines before ours: ours goes first on odd repeats.
                order = ["ours", *(n for n in REPEATED if n in names and n != "ours")]
                for name in order if repeat % 2 else order[::-1]:
                    result = await self.run(workload, self.setups[name], mode, rate)
                    result.repeat = repeat
                    self.report_run(result)
                    repeated.append(result)
        return repeated

    async def rate_run(self, workload: Workload, setup: Setup, mode: str, rate: float, capacity: float) -> RunResult:
        if rate > SKIP_ABOVE_CAPACITY * capacity:  # it would only saturate, at the price of a run
            result = skipped_run(workload.name, setup, mode, rate,
                                 f"saturated: not run, offered > {SKIP_ABOVE_CAPACITY}x its drain rate")
        else:
            result = await self.run(workload, setup, mode, rate)
        self.report_run(result)
        return result

    async def engine_only(self, workload: Workload) -> dict[str, Any]:
        group = self.models[workload.model]
        runner = group.engine_server or (group.workers or group.own_workers)[0]
        result = await runner.ask({
            "cmd": "engine_only", "workload": str(workload.path), "posts": self.args.engine_posts,
            "buckets": self.setups["ours"].batching["buckets"] if "ours" in self.setups else list(DEFAULT_BUCKETS),
            "max_tokens": self.args.max_tokens, "seconds": self.args.engine_seconds,
            "forwards": self.args.engine_only_forwards,
        }, 300)
        result.pop("event")
        device = runner.info.get("device")
        peak = fp16_peak_tflops(device, self.args.peak_tflops)
        result["peak_tflops"] = peak
        for each in (result, *result.get("forwards", {}).values()):
            each["peak_tflops"] = peak
            each["fraction_of_peak"] = each["computed_flops_per_s"] / (peak * 1e12) if peak else None
            each["real_fraction_of_peak"] = each["real_flops_per_s"] / (peak * 1e12) if peak else None
        for name, each in (result.get("forwards") or {result.get("forward") or "served": result}).items():
            self.say(f"{workload.name:>6} engine only (d), {name}: {each['posts_per_s']:,.0f} posts/s, "
                     f"{each['computed_flops_per_s'] / 1e12:.1f} TFLOP/s computed, "
                     f"{each['real_flops_per_s'] / 1e12:.1f} real"
                     + (f" = {each['real_fraction_of_peak']:.1%} of {peak} TFLOP/s FP16" if peak else ""))
        if error := result.get("forwards_error"):
            self.say(f"{workload.name:>6} engine only (d): the other forward failed: {error}")
        if agreement := result.get("forward_agreement"):
            self.say(f"{workload.name:>6} engine only (d), {agreement['compared']}: argmax agreement "
                     f"{agreement['argmax_agreement']:.5f} on {agreement['posts']:,} posts, "
                     f"max |logit diff| {agreement['max_abs_logit_diff']:.4f}")
        return result

    async def baseline_checks(self, workload: Workload) -> dict[str, Any]:
        """Pipeline-only throughput of each baseline, and its agreement with our engine."""
        checks: dict[str, Any] = {}
        sample = workload.texts[:1024]
        mine = self.models[workload.model]
        scorer = (mine.workers or mine.own_workers or [None])[0]
        ours = (await scorer.ask({"cmd": "predict", "texts": sample}, 300))["labels"] if scorer else None
        for name, group in self.baselines.items():
            if name not in self.plan[workload.name]:
                continue
            texts = workload.texts[: 512 if BASELINE_KINDS[name] == 1 else 8192]
            throughput = (await group[0].ask({"cmd": "throughput", "texts": texts}, 600))["posts_per_s"]
            checks[name] = {"pipeline_over_list_posts_per_s": round(throughput, 1)}
            if ours is not None:
                theirs = (await group[0].ask({"cmd": "predict", "texts": sample}, 300))["labels"]
                checks[name]["agreement_with_engine"] = float(np.mean(np.array(ours) == np.array(theirs)))
            self.say(f"{workload.name:>6} {name}: pipeline over a list (no Kafka): {throughput:,.0f} posts/s"
                     + (f"; argmax agreement with our engine {checks[name]['agreement_with_engine']:.1%} "
                        f"on {len(sample)} posts" if ours is not None else ""))
        return checks

    async def workload(self, workload: Workload) -> dict[str, Any]:
        planned = self.plan[workload.name]
        out: dict[str, Any] = {"model": workload.model, "mean_tokens": round(workload.mean_tokens, 1),
                               "posts_available": len(workload.texts), "setups": planned, "runs": []}
        self.report["workloads"][workload.name] = out
        if "ours" in self.setups:
            out["padding_estimate"] = round(workload.padding_estimate(self.setups["ours"].batching["buckets"]), 3)
        self.say(f"workload {workload.name} ({workload.model}): {len(workload.texts):,} distinct posts, "
                 f"mean {workload.mean_tokens:.1f} tokens/post; set-ups {', '.join(planned)}")
        if any(name in planned for name in self.baselines):
            out["baseline_checks"] = await self.baseline_checks(workload)
        if "engine-only" in planned and self.models[workload.model].children:
            out["engine_only"] = await self.engine_only(workload)
        capacity: dict[str, float] = {}
        runs: list[RunResult] = out["runs"]
        # Baselines first: the matched-rate runs need their drain rates.
        for name in (n for n in RUN_ORDER if n in self.setups and n in planned):
            runs += await self.kafka_setup(workload, self.setups[name], capacity)
        if self.args.matched and "ours" in planned:
            for name in MATCHED_BASELINES:
                if name not in planned or not capacity.get(name):
                    continue
                rate = max(1.0, float(round(self.args.matched * capacity[name], -2 if capacity[name] > 1000 else 0)))
                # The floor too, where it is in the run: each of ours' P99s has the broker's beside it.
                compared = [self.setups[n] for n in ("kafka-only", name, "ours") if n in planned]
                for setup in compared:
                    if not any(r.setup == setup.name and r.offered == rate for r in runs):
                        runs.append(await self.rate_run(workload, setup, "matched", rate, capacity[setup.name]))
        if self.args.repeats > 1:
            runs += await self.repeat_cells(workload, runs)
        # The targets are the English workloads' (issue 19's); another model's figures stand beside them.
        out["acceptance"] = acceptance(runs, out) if workload.model == MODEL else []
        print(render_workload(workload.name, workload.mean_tokens, out, self.setups), flush=True)
        self.checkpoint()
        return out
