"""The PromQL checker itself: it must reject broken queries, or the dashboard test proves nothing."""

from __future__ import annotations

import pytest

from stream_sentiment.metrics import PipelineMetrics
from tests.deploy.promql import ExportedSample, PromQLError, exported_samples, parse, problems


@pytest.fixture(scope="module")
def exported() -> dict[str, ExportedSample]:
    metrics = PipelineMetrics()
    return exported_samples(metrics.registry, vars(metrics).values())


def test_exported_samples_follow_prometheus_naming(exported: dict[str, ExportedSample]) -> None:
    assert exported["stream_sentiment_posts_scored_total"].labels == {"label"}
    assert "stream_sentiment_posts_scored" not in exported  # a counter is exposed with _total only
    assert exported["stream_sentiment_end_to_end_seconds_bucket"].labels == {"le"}
    assert exported["stream_sentiment_batch_rows_sum"].labels == {"bucket"}
    assert not exported["stream_sentiment_in_flight_posts"].counter_like
    assert exported["stream_sentiment_batch_rows_count"].counter_like
    assert "process_cpu_seconds_total" in exported  # the process collector, registered per worker


def test_parse_finds_metrics_labels_and_groupings() -> None:
    query = parse('histogram_quantile(0.99, sum by (le, bucket) '
                  '(rate(stream_sentiment_engine_seconds_bucket{bucket=~"64|128"}[$__rate_interval])))')
    (selector,) = query.selectors
    assert selector.metric == "stream_sentiment_engine_seconds_bucket"
    assert selector.labels == {"bucket"}
    assert selector.enclosing_function == "rate"
    (grouping,) = query.groupings
    assert grouping.labels == {"le", "bucket"}
    assert grouping.metrics == {"stream_sentiment_engine_seconds_bucket"}
    assert query.functions == {"histogram_quantile", "rate"}


@pytest.mark.parametrize("expr", [
    "sum(rate(stream_sentiment_posts_scored_total[5m])) by (label)",  # grouping after the argument
    'sum by (kind) (increase(stream_sentiment_batch_tokens_total{kind="real", bucket!="256"}[1h:1m] offset 5m))',
    'label_replace(stream_sentiment_engine_info, "x", "$1", "version", "stream_sentiment_not_a_metric")',
    'sum(stream_sentiment_in_flight_posts{job="stream-sentiment"}) / count(stream_sentiment_in_flight_posts)',
    "sum(rate(stream_sentiment_dead_letters_total[${interval}])) * 60 > bool 0",
    '{__name__="stream_sentiment_consumer_paused"} == 1',
    "topk(3, sum by (stage) (rate(stream_sentiment_stage_busy_seconds_total[5m])))",
])
def test_valid_queries_pass(expr: str, exported: dict[str, ExportedSample]) -> None:
    assert problems(expr, exported) == []


@pytest.mark.parametrize(("expr", "complaint"), [
    ("sum(rate(stream_sentiment_posts_scored[5m]))", "unknown metric stream_sentiment_posts_scored"),
    ("rate(stream_sentiment_no_such_metric_total[5m])", "unknown metric stream_sentiment_no_such_metric_total"),
    ('rate(stream_sentiment_batch_tokens_total{knid="real"}[5m])', "has no label 'knid'"),
    ("sum by (reason) (rate(stream_sentiment_alerts_total[5m]))", "by (reason): stream_sentiment_alerts_total"),
    ("histogram_quantile(0.5, sum by (le) (rate(stream_sentiment_end_to_end_seconds_sum[5m])))",
     "by (le): stream_sentiment_end_to_end_seconds_sum"),
    ("rate(stream_sentiment_in_flight_posts[5m])", "not a counter"),
    ("rats(stream_sentiment_posts_scored_total[5m])", "unknown function rats()"),
    ("sum(rate(stream_sentiment_posts_scored_total[5m])", "cannot parse"),
    ("1 + 1", "refers to no metric"),
])
def test_broken_queries_are_reported(expr: str, complaint: str, exported: dict[str, ExportedSample]) -> None:
    found = problems(expr, exported)
    assert any(complaint in problem for problem in found), found


def test_scrape_labels_are_allowed_only_when_declared(exported: dict[str, ExportedSample]) -> None:
    expr = "sum by (service, instance) (stream_sentiment_in_flight_posts)"
    assert problems(expr, exported) == ["by (service): stream_sentiment_in_flight_posts has no label 'service'"]
    assert problems(expr, exported, extra_labels={"service"}) == []


@pytest.mark.parametrize("expr", ["sum by (label (x)", 'x{label="a" other="b"}', "x ~ y", "by (label) x"])
def test_malformed_queries_raise(expr: str) -> None:
    with pytest.raises(PromQLError):
        parse(expr)
