"""PipelineMetrics: private registries, batch figures, and the /metrics HTTP server."""

from __future__ import annotations

import socket
import urllib.request

import pytest

from stream_sentiment.metrics import LATENCY_BUCKETS, PipelineMetrics, observe_many


def test_each_worker_has_its_own_registry():
    first, second = PipelineMetrics(), PipelineMetrics()
    first.posts_scored.labels("negative").inc(3)
    assert first.value("stream_sentiment_posts_scored_total", {"label": "negative"}) == 3
    assert second.value("stream_sentiment_posts_scored_total", {"label": "negative"}) == 0


def test_a_batch_records_rows_padding_wait_and_reason():
    metrics = PipelineMetrics()
    metrics.record_batch(bucket=64, rows=10, real_tokens=480, reason="timeout", waited=0.02)
    metrics.record_batch(bucket=64, rows=20, real_tokens=1280, reason="full", waited=-0.001)
    value = metrics.value
    assert value("stream_sentiment_batches_total", {"bucket": "64", "reason": "timeout"}) == 1
    assert value("stream_sentiment_batches_total", {"bucket": "64", "reason": "full"}) == 1
    assert value("stream_sentiment_batch_rows_sum", {"bucket": "64"}) == 30
    real = value("stream_sentiment_batch_tokens_total", {"bucket": "64", "kind": "real"})
    computed = value("stream_sentiment_batch_tokens_total", {"bucket": "64", "kind": "computed"})
    assert (real, computed) == (1760, 30 * 64)
    assert value("stream_sentiment_batch_padding_efficiency_sum", {"bucket": "64"}) == pytest.approx(0.75 + 1.0)
    # a clock step backwards never records a negative wait
    assert value("stream_sentiment_batch_wait_seconds_sum", {"bucket": "64"}) == pytest.approx(0.02)


def test_latencies_observed_a_range_at_once_equal_them_observed_one_by_one():
    # Exactly on bucket bounds (counted in that bucket), between them, beyond the last, and zero.
    values = [0.0, *LATENCY_BUCKETS, *(b * 1.5 for b in LATENCY_BUCKETS), 30.0, 0.0042]
    at_once, one_by_one = PipelineMetrics(), PipelineMetrics()
    observe_many(at_once.pipeline_latency, values)
    observe_many(at_once.pipeline_latency, [])
    for value in values:
        one_by_one.pipeline_latency.observe(value)

    def samples(metrics: PipelineMetrics) -> dict[tuple[str, str], float]:
        family = metrics.pipeline_latency.collect()[0]
        return {(s.name, s.labels.get("le", "")): s.value for s in family.samples if not s.name.endswith("_created")}

    assert samples(at_once) == pytest.approx(samples(one_by_one))
    assert at_once.value("stream_sentiment_pipeline_seconds_count") == len(values)


def test_engine_info_names_only_the_current_engine():
    metrics = PipelineMetrics()
    metrics.set_engine("onnxruntime", "v1")
    metrics.set_engine("onnxruntime", "v2")
    assert metrics.value("stream_sentiment_engine_info", {"backend": "onnxruntime", "version": "v1"}) == 0
    assert metrics.value("stream_sentiment_engine_info", {"backend": "onnxruntime", "version": "v2"}) == 1


def test_metrics_are_served_over_http_and_the_port_is_freed():
    metrics = PipelineMetrics()
    metrics.posts_scored.labels("positive").inc()
    server = metrics.serve(0)
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{server.port}/metrics", timeout=5) as response:
            body = response.read().decode()
        assert 'stream_sentiment_posts_scored_total{label="positive"} 1.0' in body
        assert "process_cpu_seconds_total" in body
    finally:
        server.close()
    with socket.socket() as probe:
        # Free again: no listener left. SO_REUSEADDR, as servers set it, so the closed client
        # connection's TIME_WAIT on this port does not count as "in use".
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        probe.bind(("127.0.0.1", server.port))
        probe.listen()
