"""Language routing end to end against the suite's real broker and Redis (issue 15, item 2).

A mixed English/Chinese stream, Chinese routed to multilingual-sentiment/v1 and the rest to
minilm-sentiment/v1: every post counted exactly once under its `lang`, and the per-route metrics show
which engine scored which language's posts. Two partitions carry both languages, so the two routes
finish offsets of one partition out of order (the multilingual engine is ~2x slower per post).
"""

from __future__ import annotations

import asyncio
from pathlib import Path

from stream_sentiment.aggregation.buckets import engine_counts
from stream_sentiment.batching.routing import RoutedEngines, plan_routes
from stream_sentiment.batching.tokenizer import PostTokenizer
from stream_sentiment.engines.manifest import EngineRepository
from stream_sentiment.engines.onnxruntime_backend import OnnxRuntimeEngine
from stream_sentiment.metrics import PipelineMetrics
from stream_sentiment.source.language import post_language
from stream_sentiment.worker import Worker
from tests.pipeline import lang_counts, mixed_language_posts, pipeline_settings, produce_documents, run_until


def test_a_mixed_stream_is_routed_by_language_and_counted_once_under_its_lang(
    kafka, topic_factory, redis_server, redis_factory
):
    topic, settings = pipeline_settings(kafka, topic_factory, redis_server, "route", partitions=2,
                                        engine={"routes": {"zh": "multilingual-sentiment/v1"}})
    redis = redis_factory()
    documents = mixed_language_posts(chinese=24, english=40)
    expected: dict[str, int] = {}
    for document in documents:
        language = post_language(document.get("lang"), str(document["text"]))  # type: ignore[arg-type]
        expected[language] = expected.get(language, 0) + 1
    assert expected == {"en": 40, "zh": 24}  # the stream really is mixed, tagged and untagged

    plan = plan_routes(settings)
    assert plan.route_of("zh") == "multilingual-sentiment" and plan.route_of("en") == "minilm-sentiment"
    default = EngineRepository(Path("engines"), "minilm-sentiment").load("v1")
    multilingual = EngineRepository(Path("engines"), "multilingual-sentiment").load("v1")
    metrics = PipelineMetrics()
    with OnnxRuntimeEngine(default, threads_per_stream=1) as english_engine, \
            OnnxRuntimeEngine(multilingual, threads_per_stream=1) as multilingual_engine:
        routes = RoutedEngines(plan, {"multilingual-sentiment": (multilingual_engine, PostTokenizer(multilingual))})
        worker = Worker(settings, english_engine, PostTokenizer(default), routes=routes, metrics=metrics)
        assert worker.engine is english_engine and worker.route("multilingual-sentiment").engine is multilingual_engine
        asyncio.run(produce_documents(kafka.bootstrap_servers, topic, documents))
        asyncio.run(run_until(worker, redis, "route", len(documents), 0, within=60))
        ready = worker.readiness()

    totals = redis.hgetall("route:totals")
    assert int(totals["scored"]) == len(documents) and int(totals.get("dead_lettered", 0)) == 0
    assert lang_counts(redis, "route") == expected
    marks = {int(k): int(v) for k, v in redis.hgetall(f"route:offsets:{topic}").items()}
    assert sum(marks.values()) == len(documents)
    # Each route's engine scored exactly its languages' posts (no rebalance here, so nothing was re-read).
    posts = {route: metrics.value("stream_sentiment_route_posts_total", {"route": route})
             for route in ("minilm-sentiment", "multilingual-sentiment")}
    assert posts == {"minilm-sentiment": expected["en"], "multilingual-sentiment": expected["zh"]}
    assert metrics.value("stream_sentiment_route_engine_info",
                         {"route": "multilingual-sentiment", "backend": "onnxruntime", "version": "v1"}) == 1
    assert set(ready["routes"]) == {"minilm-sentiment", "multilingual-sentiment"} and ready["engine_working"]
    # ... and the buckets record it: each language's on-time posts under the engine of its route, which the
    # alerts of a window name (aggregation.monitor).
    engines: dict[str, dict[str, int]] = {}
    for key in redis.scan_iter("route:agg:lang:*"):
        fields = redis.hgetall(key)
        language = engines.setdefault(key.split(":")[3], {})
        for name, count in engine_counts(fields).items():
            language[name] = language.get(name, 0) + count
        assert sum(engine_counts(fields).values()) == int(fields.get("on_time_posts", 0))
    # Counted per model (which version scored a post depends on when a swap cut over; buckets follow the log).
    assert engines == {"en": {"minilm-sentiment": expected["en"]}, "zh": {"multilingual-sentiment": expected["zh"]}}
