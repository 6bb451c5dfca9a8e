"""Prometheus metrics of one worker: what is consumed, how batches form, how long posts take.

Every metric lives in a registry owned by one :class:`PipelineMetrics`, not
in prometheus-client's global registry, so several workers in one process
(tests, benchmarks) keep separate figures. Names follow Prometheus
conventions (``_total`` counters, ``_seconds`` histograms); the dashboard and
``docs/metrics.md`` refer to them by these names.

Padding efficiency is exported two ways: token counters per bucket, whose
rate ratio is the efficiency over any time range (what a dashboard wants),
and a per-batch histogram (what a tuning session wants).
"""

from __future__ import annotations

import threading
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from time import perf_counter
from typing import Any

import numpy as np
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, ProcessCollector, generate_latest
from prometheus_client.exposition import start_http_server

NAMESPACE = "stream_sentiment"
ROW_BUCKETS = (1, 2, 4, 8, 16, 32, 48, 64, 96, 128, 192, 256, 512)
EFFICIENCY_BUCKETS = (0.2, 0.4, 0.5, 0.6, 0.7, 0.8, 0.85, 0.9, 0.95, 1.0)
# From 1 ms (a GPU batch) to 10 s (a consumer rebalance): latency SLOs sit in between.
LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.0075, 0.01, 0.015, 0.025, 0.05, 0.075, 0.1, 0.15, 0.25, 0.5,
                   0.75, 1.0, 2.5, 5.0, 10.0)
# Where time is spent, per stage of the data path (wall seconds while busy).
STAGES = ("decode", "tokenize", "batch", "engine", "redis")


class BatchHistogram(Histogram):
    """A histogram that also takes a whole batch of observations at once (:meth:`observe_many`).

    Per-post latencies arrive a range of posts at a time; ``observe`` per post was a few microseconds
    each, a visible share of a worker's CPU per post. The result is the same as observing one by one.
    """

    _bounds: np.ndarray | None = None

    def observe_many(self, values: np.ndarray) -> None:
        """``observe`` each of ``values``, with one counter increment per histogram bucket that got any.

        Runs once per applied range: the bucket bounds are an array made once (prometheus keeps a list,
        which ``searchsorted`` converted on every call), and only the buckets hit are incremented.
        """
        if not len(values):
            return
        self._raise_if_not_observable()
        if self._bounds is None:
            self._bounds = np.asarray(self._upper_bounds, dtype=np.float64)
        # observe() counts a value in the first bucket whose upper bound is >= it: searchsorted's "left".
        counts = np.bincount(np.searchsorted(self._bounds, values, side="left"), minlength=len(self._bounds))
        self._sum.inc(float(values.sum()))
        hit = np.flatnonzero(counts)
        for index, count in zip(hit.tolist(), counts[hit].tolist(), strict=True):
            self._buckets[index].inc(count)


def observe_many(histogram: Any, values: Sequence[float] | np.ndarray) -> None:
    """Observe ``values`` in ``histogram``: at once where it can (an ``observe_many`` method:
    :class:`BatchHistogram`, a benchmark's recording stand-in), else one by one."""
    many = getattr(histogram, "observe_many", None)
    if many is not None:
        many(np.asarray(values, dtype=np.float64))
    else:
        for value in values:
            histogram.observe(value)


class PipelineMetrics:
    """The metrics one worker updates. ``registry`` defaults to a new, private one."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry if registry is not None else CollectorRegistry()
        r = self.registry
        ns = NAMESPACE
        ProcessCollector(registry=r)  # CPU seconds and memory of the worker process
        self.records_fetched = Counter("records_fetched", "Kafka records fetched (re-reads after a seek included).",
                                       namespace=ns, registry=r)
        self.posts_scored = Counter("posts_scored", "Posts counted in Redis (fence-applied), by label.",
                                    ["label"], namespace=ns, registry=r)
        self.dead_letters = Counter("dead_letters", "Rejected records counted in Redis, by reason.",
                                    ["reason"], namespace=ns, registry=r)
        self.batches = Counter("batches", "Batches sent to an engine, by bucket and flush reason.",
                               ["bucket", "reason"], namespace=ns, registry=r)
        self.batch_rows = Histogram("batch_rows", "Posts per batch, by bucket.", ["bucket"],
                                    buckets=ROW_BUCKETS, namespace=ns, registry=r)
        self.batch_tokens = Counter("batch_tokens", "Tokens per bucket: real (posts) and computed (padded).",
                                    ["bucket", "kind"], namespace=ns, registry=r)
        self.padding_efficiency = Histogram("batch_padding_efficiency", "Real / computed tokens per batch.",
                                            ["bucket"], buckets=EFFICIENCY_BUCKETS, namespace=ns, registry=r)
        self.batch_wait = Histogram("batch_wait_seconds", "How long a batch's oldest post waited in its bucket.",
                                    ["bucket"], buckets=LATENCY_BUCKETS, namespace=ns, registry=r)
        self.engine_latency = Histogram("engine_seconds", "Engine call time per batch, by bucket.", ["bucket"],
                                        buckets=LATENCY_BUCKETS, namespace=ns, registry=r)
        self.end_to_end = BatchHistogram("end_to_end_seconds",
                                         "Kafka append (record timestamp) to Redis write, per post.",
                                         buckets=LATENCY_BUCKETS, namespace=ns, registry=r)
        self.pipeline_latency = BatchHistogram(
            "pipeline_seconds", "This worker's fetch of a record to the Redis write that counted it, per post "
            "(the pipeline's own latency: end_to_end_seconds less the time in Kafka).",
            buckets=LATENCY_BUCKETS, namespace=ns, registry=r)
        self.apply_wait = BatchHistogram(
            "apply_wait_seconds", "A scored post's engine answer to the Redis write that counted it, per post: "
            "the wait for its partition's earlier offsets still in flight (results apply in offset order) plus the "
            "write. The tail of pipeline_seconds that batching and engine times do not show.",
            buckets=LATENCY_BUCKETS, namespace=ns, registry=r)
        self.redis_apply = Histogram("redis_apply_seconds", "One fenced Redis write (every partition's ready range).",
                                     buckets=LATENCY_BUCKETS, namespace=ns, registry=r)
        self.fence = Counter("fence_outcomes",
                             "Fenced Redis writes by outcome (applied, duplicate, out_of_order, fenced).",
                             ["outcome"], namespace=ns, registry=r)
        self.commits = Counter("commits", "Kafka offset commits, by result.", ["result"], namespace=ns, registry=r)
        self.stage_seconds = Counter("stage_busy_seconds", "Wall seconds spent in each stage of the data path.",
                                     ["stage"], namespace=ns, registry=r)
        self.in_flight = Gauge("in_flight_posts", "Records fetched but not yet applied to Redis.",
                               namespace=ns, registry=r)
        self.paused = Gauge("consumer_paused", "1 while fetching is paused by backpressure.", namespace=ns, registry=r)
        self.offset_gaps = Counter("offset_gaps", "Gaps in a partition's fetched offsets: re-read (refetched) or, "
                                   "still there after the re-reads, skipped.", ["outcome"], namespace=ns, registry=r)
        self.alerts = Counter("alerts", "Alerts raised by this worker, by rule and dimension.",
                              ["rule", "dimension"], namespace=ns, registry=r)
        self.engine_info = Gauge("engine_info", "The engine serving posts (value 1).", ["backend", "version"],
                                 namespace=ns, registry=r)
        # Language routing (engine.routes): a route is named by its model; with no routes there is one.
        self.route_engine_info = Gauge("route_engine_info", "The engine serving each route (value 1).",
                                       ["route", "backend", "version"], namespace=ns, registry=r)
        self.route_batches = Counter("route_batches", "Batches sent to each route's engine.", ["route"],
                                     namespace=ns, registry=r)
        self.route_posts = Counter("route_posts", "Posts in batches sent to each route's engine (a batch "
                                   "re-sent after a failure counts once; re-reads after a restart count again).",
                                   ["route"], namespace=ns, registry=r)
        self.engine_failures = Counter("engine_failures", "Failed engine calls (exception, CUDA error, time-out).",
                                       ["version", "stream"], namespace=ns, registry=r)
        self.engine_rebuilds = Counter("engine_rebuilds", "Engine streams rebuilt after a failure.",
                                       ["version", "stream"], namespace=ns, registry=r)
        self.engine_retries = Counter("engine_retries", "Batches retried on a rebuilt stream.",
                                      namespace=ns, registry=r)
        self.batches_requeued = Counter("batches_requeued", "Batches handed to another stream after theirs failed.",
                                        namespace=ns, registry=r)
        self.streams_lost = Gauge("engine_streams_lost", "Streams that left rotation after repeated failures.",
                                  ["version"], namespace=ns, registry=r)
        self.engine_state = Gauge("engine_state", "1 for each loaded version's current state.", ["version", "state"],
                                  namespace=ns, registry=r)
        self.engine_swaps = Counter("engine_swaps", "Engine activations, rollbacks and fallbacks, by result.",
                                    ["action", "result"], namespace=ns, registry=r)
        self.cutover_pause = Histogram("engine_cutover_pause_seconds", "Batch dispatch paused for an engine cutover.",
                                       buckets=(0.0001, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 1.0),
                                       namespace=ns, registry=r)
        self.consumption_paused = Gauge("consumption_paused_no_engine", "1 while no engine stream works.",
                                        namespace=ns, registry=r)
        self.offset_regressions = Counter("offset_regressions", "Times a partition's log was found to end below "
                                          "its applied mark (a re-created topic, a broker restored empty).",
                                          namespace=ns, registry=r)
        self.redis_errors = Counter("redis_errors", "Redis calls that failed and were retried (connection, "
                                    "time-out, loading, read-only), by what was being done.", ["operation"],
                                    namespace=ns, registry=r)
        self.redis_outages = Counter("redis_outages", "Times Redis became unreachable (consumption paused).",
                                     namespace=ns, registry=r)
        self.redis_down = Gauge("redis_down", "1 while Redis is unreachable: fetching paused, not ready.",
                                namespace=ns, registry=r)
        self.watermark = Gauge("group_watermark_seconds", "The consumer group's event-time watermark (epoch "
                               "seconds): windows ending before it have been judged.", namespace=ns, registry=r)
        for stage in STAGES:
            self.stage_seconds.labels(stage)  # present from the start, so rate() has a zero to start from
        self._lock = threading.Lock()
        self._route_engines: dict[str, tuple[str, str]] = {}
        # record_batch's series by (bucket, reason, route): see there.
        self._batch_series: dict[tuple[int, str, str | None], tuple[Any, ...]] = {}

    def record_batch(self, bucket: int, rows: int, real_tokens: int, reason: str, waited: float,
                     route: str | None = None) -> None:
        """A batch was formed and sent to an engine stream (of ``route``'s engine, when given).

        The labelled series of one (bucket, reason, route) are looked up once and kept: ``labels()`` takes a
        lock and builds a key per call, and a batch updates eight series.
        """
        key = (bucket, reason, route)
        series = self._batch_series.get(key)
        if series is None:
            label = str(bucket)
            routed = (self.route_batches.labels(route), self.route_posts.labels(route)) if route is not None else None
            series = self._batch_series[key] = (
                routed, self.batches.labels(label, reason), self.batch_rows.labels(label),
                self.batch_tokens.labels(label, "real"), self.batch_tokens.labels(label, "computed"),
                self.padding_efficiency.labels(label), self.batch_wait.labels(label))
        routed, batches, batch_rows, real, computed_tokens, padding, wait = series
        computed = rows * bucket
        if routed is not None:
            routed[0].inc()
            routed[1].inc(rows)
        batches.inc()
        batch_rows.observe(rows)
        real.inc(real_tokens)
        computed_tokens.inc(computed)
        padding.observe(real_tokens / computed if computed else 1.0)
        wait.observe(max(0.0, waited))

    def set_engine(self, backend: str, version: str) -> None:
        with self._lock:
            self.engine_info.clear()
            self.engine_info.labels(backend, version).set(1)

    def set_route_engine(self, route: str, backend: str, version: str) -> None:
        """``route`` is served by ``backend``/``version`` now (its previous series removed)."""
        with self._lock:
            previous = self._route_engines.pop(route, None)
            if previous is not None:
                self.route_engine_info.remove(route, *previous)
            self._route_engines[route] = (backend, version)
            self.route_engine_info.labels(route, backend, version).set(1)

    @contextmanager
    def stage(self, name: str) -> Iterator[None]:
        """Add the wall time of the ``with`` body to ``name``'s busy seconds."""
        started = perf_counter()
        try:
            yield
        finally:
            self.stage_seconds.labels(name).inc(perf_counter() - started)

    def exposition(self) -> bytes:
        """The registry in Prometheus text format (what ``/metrics`` serves)."""
        return generate_latest(self.registry)

    def value(self, name: str, labels: dict[str, str] | None = None) -> float:
        """One sample's current value (0.0 when absent): for tests and summaries, not for scraping."""
        found = self.registry.get_sample_value(name, labels or {})
        return 0.0 if found is None else float(found)

    def serve(self, port: int, host: str = "127.0.0.1") -> MetricsServer:
        """Serve ``/metrics`` on ``host:port`` (0 = any free port) from a daemon thread."""
        server, thread = start_http_server(port, addr=host, registry=self.registry)
        return MetricsServer(server, thread)


class MetricsServer:
    """A running metrics HTTP server; :meth:`close` stops it and frees the port."""

    def __init__(self, server: object, thread: threading.Thread) -> None:
        self._server = server
        self._thread = thread

    @property
    def port(self) -> int:
        return int(self._server.server_port)  # type: ignore[attr-defined]

    def close(self) -> None:
        self._server.shutdown()  # type: ignore[attr-defined]
        self._server.server_close()  # type: ignore[attr-defined]
        self._thread.join(timeout=5)
