"""The Grafana dashboard and its provisioning: structure Grafana needs, queries the workers can answer."""

from __future__ import annotations

import json
from itertools import combinations
from pathlib import Path
from typing import Any

import pytest
import yaml

from stream_sentiment.metrics import PipelineMetrics
from tests.deploy.compose_files import REPO, raw_compose
from tests.deploy.promql import ExportedSample, exported_samples, parse, problems

GRAFANA = REPO / "deploy" / "grafana"
DASHBOARD = GRAFANA / "dashboards" / "stream-sentiment.json"
DATASOURCES = GRAFANA / "provisioning" / "datasources" / "prometheus.yml"
DASHBOARD_PROVIDERS = GRAFANA / "provisioning" / "dashboards" / "stream-sentiment.yml"
PROMETHEUS_CONFIG = REPO / "deploy" / "prometheus.yml"
WORKER_JOB = "stream-sentiment"
GRID_COLUMNS = 24


@pytest.fixture(scope="module")
def dashboard() -> dict[str, Any]:
    return json.loads(DASHBOARD.read_text(encoding="utf-8"))


@pytest.fixture(scope="module")
def datasource() -> dict[str, Any]:
    (prometheus,) = yaml.safe_load(DATASOURCES.read_text(encoding="utf-8"))["datasources"]
    return prometheus


@pytest.fixture(scope="module")
def exported() -> dict[str, ExportedSample]:
    metrics = PipelineMetrics()  # a private registry: the placeholder children touch nothing else
    return exported_samples(metrics.registry, vars(metrics).values())


@pytest.fixture(scope="module")
def target_labels() -> set[str]:
    """Labels the worker job's relabelling adds to every series (besides job and instance)."""
    config = yaml.safe_load(PROMETHEUS_CONFIG.read_text(encoding="utf-8"))
    (job,) = [j for j in config["scrape_configs"] if j["job_name"] == WORKER_JOB]
    return {rule["target_label"] for rule in job.get("relabel_configs", []) if "target_label" in rule}


def query_panels(dashboard: dict[str, Any]) -> list[dict[str, Any]]:
    return [panel for panel in dashboard["panels"] if panel["type"] != "row"]


def all_exprs(dashboard: dict[str, Any]) -> list[tuple[str, str]]:
    return [(panel["title"], target["expr"]) for panel in query_panels(dashboard) for target in panel["targets"]]


def test_dashboard_has_the_fields_grafana_needs(dashboard: dict[str, Any]) -> None:
    assert isinstance(dashboard["uid"], str) and dashboard["uid"]
    assert dashboard["title"]
    assert isinstance(dashboard["schemaVersion"], int)
    assert "id" not in dashboard or dashboard["id"] is None, "a provisioned dashboard must not carry a database id"
    ids = [panel["id"] for panel in dashboard["panels"]]
    assert all(isinstance(i, int) and i > 0 for i in ids)
    assert len(ids) == len(set(ids)), "panel ids must be unique"
    for panel in dashboard["panels"]:
        assert panel["type"] and panel["title"], panel["id"]
        grid = panel["gridPos"]
        assert all(isinstance(grid[key], int) for key in "hwxy"), panel["title"]
        assert grid["h"] > 0 and grid["w"] > 0 and grid["x"] >= 0 and grid["y"] >= 0, panel["title"]
        assert grid["x"] + grid["w"] <= GRID_COLUMNS, panel["title"]


def test_panels_do_not_overlap(dashboard: dict[str, Any]) -> None:
    def cells(panel: dict[str, Any]) -> set[tuple[int, int]]:
        g = panel["gridPos"]
        return {(x, y) for x in range(g["x"], g["x"] + g["w"]) for y in range(g["y"], g["y"] + g["h"])}

    for first, second in combinations(dashboard["panels"], 2):
        assert not cells(first) & cells(second), f"{first['title']!r} overlaps {second['title']!r}"


def test_queries_use_the_provisioned_datasource(dashboard: dict[str, Any], datasource: dict[str, Any]) -> None:
    expected = {"type": datasource["type"], "uid": datasource["uid"]}
    assert datasource["type"] == "prometheus"
    for panel in query_panels(dashboard):
        assert panel["datasource"] == expected, panel["title"]
        assert panel["targets"], f"{panel['title']} has no query"
        ref_ids = [target["refId"] for target in panel["targets"]]
        assert len(ref_ids) == len(set(ref_ids)), panel["title"]
        for target in panel["targets"]:
            assert target["datasource"] == expected, panel["title"]
            assert target["expr"].strip(), panel["title"]


def test_every_query_names_exported_metrics_and_labels(
    dashboard: dict[str, Any], exported: dict[str, ExportedSample], target_labels: set[str]
) -> None:
    found = [f"{title}: {expr}\n    {problem}"
             for title, expr in all_exprs(dashboard) for problem in problems(expr, exported, target_labels)]
    assert not found, "\n".join(found)


def test_latency_quantiles_aggregate_buckets_by_le(dashboard: dict[str, Any]) -> None:
    for title, expr in all_exprs(dashboard):
        query = parse(expr)
        if "histogram_quantile" not in query.functions:
            continue
        assert all(metric.endswith("_bucket") for metric in query.metrics), title
        # Summing across replicas must keep le, or the quantile is computed from nonsense.
        assert query.groupings and all("le" in g.labels and g.clause == "by" for g in query.groupings), title


def test_dashboard_covers_what_the_issue_asks_for(dashboard: dict[str, Any]) -> None:
    used = {metric for _, expr in all_exprs(dashboard) for metric in parse(expr).metrics}
    wanted = {
        "posts/s": "stream_sentiment_posts_scored_total",
        "end-to-end latency": "stream_sentiment_end_to_end_seconds_bucket",
        "batch rows per bucket": "stream_sentiment_batch_rows_count",
        "padding efficiency": "stream_sentiment_batch_tokens_total",
        "engine state": "stream_sentiment_engine_state",
        "engine swaps": "stream_sentiment_engine_swaps_total",
        "dead letters": "stream_sentiment_dead_letters_total",
        "alerts per minute": "stream_sentiment_alerts_total",
    }
    missing = {what: metric for what, metric in wanted.items() if metric not in used}
    assert not missing


def test_provisioning_points_grafana_at_the_mounted_dashboards(datasource: dict[str, Any]) -> None:
    grafana = raw_compose()["services"]["grafana"]
    mounts = {target: source for source, target, *_ in (v.split(":") for v in grafana["volumes"])}
    (provider,) = yaml.safe_load(DASHBOARD_PROVIDERS.read_text(encoding="utf-8"))["providers"]
    folder = provider["options"]["path"]
    assert (REPO / mounts[folder]).resolve() == DASHBOARD.parent
    assert (REPO / mounts["/etc/grafana/provisioning"]).resolve() == GRAFANA / "provisioning"
    home = Path(grafana["environment"]["GF_DASHBOARDS_DEFAULT_HOME_DASHBOARD_PATH"])
    assert home.parent == Path(folder) and (DASHBOARD.parent / home.name) == DASHBOARD
    # The datasource reaches Prometheus by its compose service name and container port.
    prometheus = raw_compose()["services"]["prometheus"]
    container_ports = {mapping.rsplit(":", 1)[-1] for mapping in prometheus["ports"]}
    assert datasource["url"] in {f"http://prometheus:{port}" for port in container_ports}
