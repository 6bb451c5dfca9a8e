"""End to end against the suite's real broker and Redis: every post counted exactly once."""

from __future__ import annotations

import asyncio
import itertools
import json

import pytest
from aiokafka import AIOKafkaProducer

from stream_sentiment.batching.tokenizer import PostTokenizer
from stream_sentiment.config import Settings
from stream_sentiment.engines.onnxruntime_backend import OnnxRuntimeEngine
from stream_sentiment.metrics import PipelineMetrics
from stream_sentiment.source.kafka_source import Admitted
from stream_sentiment.source.messages import Post
from stream_sentiment.worker import Worker
from tests.pipeline import MALFORMED, pipeline_settings, produce_posts, run_until
from tests.services import FAST_GROUP_CONFIG

VALID = 300


@pytest.fixture
def engine(engine_version):
    with OnnxRuntimeEngine(engine_version, streams=2, threads_per_stream=1) as active:
        yield active


def test_valid_and_malformed_posts_over_three_partitions_are_counted_exactly_once(
    kafka, topic_factory, redis_server, redis_factory, engine, engine_version
):
    topic, settings = pipeline_settings(kafka, topic_factory, redis_server, "e2e", partitions=3)
    redis = redis_factory()
    produced = asyncio.run(produce_posts(kafka.bootstrap_servers, topic, VALID, 5, seed=7))
    dead = produced - VALID
    tokenizer = PostTokenizer(engine_version)
    metrics = PipelineMetrics()
    asyncio.run(run_until(Worker(settings, engine, tokenizer, metrics=metrics), redis, "e2e", VALID, dead, within=90))
    _assert_metrics_match(metrics, scored=VALID, dead=dead, reasons=redis.hgetall("e2e:dead_lettered"))

    # More posts while no worker runs; a restarted worker in the same group must pick up
    # exactly after what Redis has applied: the new ones once, the old ones not again.
    produced += asyncio.run(produce_posts(kafka.bootstrap_servers, topic, 60, 1, seed=8))
    dead += len(MALFORMED)
    asyncio.run(run_until(Worker(settings, engine, tokenizer), redis, "e2e", VALID + 60, dead, within=90))

    totals = redis.hgetall("e2e:totals")
    assert int(totals["scored"]) == VALID + 60
    assert sum(int(totals.get(label, 0)) for label in ("negative", "neutral", "positive")) == VALID + 60
    assert int(totals["dead_lettered"]) == dead
    reasons = redis.hgetall("e2e:dead_lettered")
    assert sum(map(int, reasons.values())) == dead
    assert set(reasons) == {"not_utf8", "not_json", "not_an_object", "missing_text", "empty_text", "bad_id"}
    marks = {int(k): int(v) for k, v in redis.hgetall(f"e2e:offsets:{topic}").items()}
    assert sorted(marks) == [0, 1, 2] and sum(marks.values()) == produced


def test_two_workers_with_a_rebalance_mid_stream_count_exactly_once(
    kafka, topic_factory, redis_server, redis_factory, engine_version
):
    topic, settings = pipeline_settings(kafka, topic_factory, redis_server, "rb", partitions=3)
    redis = redis_factory()
    tokenizer = PostTokenizer(engine_version)
    batches, per_batch = 8, 50

    workers: list[Worker] = []

    async def scenario() -> int:
        stop = asyncio.Event()
        with OnnxRuntimeEngine(engine_version, threads_per_stream=1) as first_engine, \
                OnnxRuntimeEngine(engine_version, threads_per_stream=1) as second_engine:
            workers.append(Worker(settings, first_engine, tokenizer))
            first = asyncio.create_task(workers[0].run(stop, consumer_options=FAST_GROUP_CONFIG))
            second = None
            produced = 0
            for round_number in range(batches):
                produced += await produce_posts(kafka.bootstrap_servers, topic, per_batch, 0, seed=100 + round_number)
                if round_number == 2:  # the second worker joins while posts keep arriving
                    workers.append(Worker(settings, second_engine, tokenizer))
                    second = asyncio.create_task(workers[1].run(stop, consumer_options=FAST_GROUP_CONFIG))
                await asyncio.sleep(0.5)
            try:
                async with asyncio.timeout(90):
                    while int(redis.hgetall("rb:totals").get("scored", 0)) < produced:
                        for task in (first, second):
                            if task is not None and task.done():
                                task.result()
                        await asyncio.sleep(0.2)
            finally:
                stop.set()
                await asyncio.wait_for(asyncio.gather(first, second), 30)
        return produced

    produced = asyncio.run(scenario())
    totals = redis.hgetall("rb:totals")
    assert int(totals["scored"]) == produced == batches * per_batch
    assert sum(int(totals.get(label, 0)) for label in ("negative", "neutral", "positive")) == produced
    marks = {int(k): int(v) for k, v in redis.hgetall(f"rb:offsets:{topic}").items()}
    assert sum(marks.values()) == produced
    # The partitions really moved: each worker applied part of the stream, together all of it.
    assert all(w.scored > 0 for w in workers)
    assert sum(w.scored for w in workers) == produced


def test_a_burst_of_negative_posts_raises_an_alert_in_the_stream(
    kafka, topic_factory, redis_server, redis_factory, engine
):
    topic, settings = pipeline_settings(
        kafka, topic_factory, redis_server, "al", partitions=1,
        aggregation={"bucket_seconds": 1, "windows_seconds": (2,)},
        alerts={"min_posts": 10, "ratio_threshold": 0.6, "cooldown_seconds": 60},
    )
    redis = redis_factory()
    texts = ["This is the worst airline ever, furious and disgusted", "Terrible service, I hate this"]

    async def scenario() -> list:
        stop = asyncio.Event()
        worker = Worker(settings, engine, PostTokenizer(engine.version))
        task = asyncio.create_task(worker.run(stop, consumer_options=FAST_GROUP_CONFIG))
        producer = AIOKafkaProducer(bootstrap_servers=kafka.bootstrap_servers)
        await producer.start()
        try:
            async with asyncio.timeout(30):  # the burst starts once the worker owns the partition
                while not worker.progress:
                    await asyncio.sleep(0.1)
            for i in range(40):
                value = json.dumps({"id": f"n{i}", "text": texts[i % 2], "topic": "airline"}).encode()
                await producer.send(topic, value=value)
            await producer.flush()

            async def trickle() -> None:
                # Event time moves with the posts, not the clock: other posts keep arriving, as on a live
                # topic, so the partition's watermark passes the burst's windows and they are judged.
                for i in itertools.count():
                    await producer.send(topic, json.dumps({"id": f"t{i}", "text": "ok", "topic": "other"}).encode())
                    await asyncio.sleep(0.1)

            trickling = asyncio.create_task(trickle())
            try:
                async with asyncio.timeout(45):
                    while not redis.xrange("al:alerts"):
                        if task.done():
                            task.result()
                        await asyncio.sleep(0.2)
                await asyncio.sleep(2.5)  # more windows judged: the incident must not repeat
            finally:
                trickling.cancel()
            return redis.xrange("al:alerts")
        finally:
            await producer.stop()
            stop.set()
            await asyncio.wait_for(task, 30)

    entries = asyncio.run(scenario())
    alerts = [fields for _, fields in entries]
    keys = {(a["rule"], a["dimension"], a["value"]) for a in alerts}
    assert ("ratio", "topic", "airline") in keys
    assert len(alerts) == len(keys)  # one alert per rule and dimension value, no storm
    airline = next(a for a in alerts if a["dimension"] == "topic")
    assert float(airline["negative_ratio"]) >= 0.6 and int(airline["posts"]) >= 10
    # The engine that scored the window's posts, as model/version, and how many it scored.
    assert airline["engine_version"] == "minilm-sentiment/v1"
    assert json.loads(airline["engines"]) == {"minilm-sentiment/v1": int(airline["posts"])}


def _assert_metrics_match(metrics: PipelineMetrics, scored: int, dead: int, reasons: dict[str, str]) -> None:
    """The worker's Prometheus figures agree with what Redis counted."""
    value = metrics.value
    assert sum(value("stream_sentiment_posts_scored_total", {"label": label})
               for label in ("negative", "neutral", "positive")) == scored
    for reason, count in reasons.items():
        assert value("stream_sentiment_dead_letters_total", {"reason": reason}) == int(count)
    assert value("stream_sentiment_end_to_end_seconds_count") == scored
    assert 0 < value("stream_sentiment_end_to_end_seconds_sum") / scored < 30
    # Fetch -> Redis is part of append -> Redis: the pipeline's own share, per post as well.
    assert value("stream_sentiment_pipeline_seconds_count") == scored
    assert 0 < value("stream_sentiment_pipeline_seconds_sum") <= value("stream_sentiment_end_to_end_seconds_sum")
    # Answer -> Redis is the last part of fetch -> Redis.
    assert value("stream_sentiment_apply_wait_seconds_count") == scored
    assert 0 < value("stream_sentiment_apply_wait_seconds_sum") <= value("stream_sentiment_pipeline_seconds_sum")
    assert value("stream_sentiment_fence_outcomes_total", {"outcome": "applied"}) >= 1
    rows = sum(value("stream_sentiment_batch_rows_sum", {"bucket": b}) for b in ("32", "64", "128", "256"))
    assert rows == scored  # every admitted post went through exactly one batch
    real = value("stream_sentiment_batch_tokens_total", {"bucket": "32", "kind": "real"})
    computed = value("stream_sentiment_batch_tokens_total", {"bucket": "32", "kind": "computed"})
    assert 0 < real <= computed
    reasons_seen = {s.labels["reason"] for s in metrics.batches.collect()[0].samples if s.value > 0}
    assert reasons_seen and reasons_seen <= {"full", "window", "timeout", "drain"}
    for stage in ("decode", "tokenize", "batch", "engine", "redis"):
        assert value("stream_sentiment_stage_busy_seconds_total", {"stage": stage}) > 0, stage
    assert b"stream_sentiment_batch_padding_efficiency_bucket" in metrics.exposition()


def test_chosen_buckets_must_be_the_engines_and_include_the_largest(engine, engine_version):
    tokenizer = PostTokenizer(engine_version)
    pad_to_max = Worker(Settings.load(batching={"buckets": [256]}), engine, tokenizer)
    assert pad_to_max.batcher.policy.buckets == (256,)
    with pytest.raises(ValueError, match="not buckets of the engine"):
        Worker(Settings.load(batching={"buckets": [48, 256]}), engine, tokenizer)
    with pytest.raises(ValueError, match="largest bucket, 256"):
        Worker(Settings.load(batching={"buckets": [32, 64]}), engine, tokenizer)


def test_a_result_is_finished_only_in_the_progress_that_fetched_its_record(engine, engine_version):
    """After a rebase or resync the partition's new progress holds other records at the same offsets."""
    worker = Worker(Settings.load(), engine, PostTokenizer(engine_version))
    before = worker.sink.track(0, 0, None, in_redis=True)
    fetched_before = Admitted(0, 5, Post(id="p", text="old log"), 1.0, 1.0, 1.0, before)
    assert worker._owner_progress(fetched_before) is before
    after = worker.sink.track(0, 0, None, in_redis=True)  # the log restarted: offset 5 is another post now
    fetched_after = Admitted(0, 5, Post(id="q", text="new log"), 2.0, 2.0, 2.0, after)
    assert worker._owner_progress(fetched_before) is None
    assert worker._owner_progress(fetched_after) is after
    worker.sink.forget(0)
    assert worker._owner_progress(fetched_after) is None


FINER = (16, 24, 32, 40, 48, 64, 96, 128, 256)


def test_finer_buckets_opened_through_the_service_pad_less_and_count_exactly_once(
    kafka, topic_factory, redis_server, redis_factory
):
    from stream_sentiment.service import open_engine

    topic, settings = pipeline_settings(kafka, topic_factory, redis_server, "fine", partitions=2,
                                        batching={"buckets": list(FINER)})
    redis = redis_factory()
    produced = asyncio.run(produce_posts(kafka.bootstrap_servers, topic, 200, 0, seed=11))
    version, engine = open_engine(settings)
    assert version.manifest.buckets == FINER  # the engine warms up exactly the batcher's shapes
    metrics = PipelineMetrics()
    with engine:
        engine.warm_up()
        worker = Worker(settings, engine, PostTokenizer(version), metrics=metrics)
        assert worker.batcher.policy.buckets == FINER
        asyncio.run(run_until(worker, redis, "fine", produced, 0, within=90))
    assert int(redis.hget("fine:totals", "scored")) == produced
    # The test posts are 5-8 tokens: all in the 16 bucket, none padded to 32 as the manifest's buckets would.
    used = {str(b) for b in FINER if metrics.value("stream_sentiment_batch_rows_count", {"bucket": str(b)})}
    assert used == {"16"}, used
    real = metrics.value("stream_sentiment_batch_tokens_total", {"bucket": "16", "kind": "real"})
    computed = metrics.value("stream_sentiment_batch_tokens_total", {"bucket": "16", "kind": "computed"})
    assert produced * 5 <= real <= produced * 8 and computed == produced * 16


def test_an_engine_stream_is_free_while_its_batch_is_written_to_redis(
    kafka, topic_factory, redis_server, redis_factory, engine_version, monkeypatch
):
    """Redis is not the engine's business: with one stream, the next batch is scored during the last one's write."""
    from stream_sentiment.engines.slots import SlotPool
    from stream_sentiment.sinks.redis_sink import RedisSink

    topic, settings = pipeline_settings(kafka, topic_factory, redis_server, "free", partitions=1,
                                        batching={"max_rows": 8, "window_ms": 5, "timeout_ms": 1})
    redis = redis_factory()
    writing = 0
    calls_during_a_write: list[bool] = []
    real_apply, real_score = RedisSink.apply_many, SlotPool.score

    async def slow_apply(self, *args, **kwargs):
        nonlocal writing
        writing += 1
        try:
            await asyncio.sleep(0.2)
            return await real_apply(self, *args, **kwargs)
        finally:
            writing -= 1

    async def watched_score(self, *args, **kwargs):
        calls_during_a_write.append(writing > 0)
        return await real_score(self, *args, **kwargs)

    monkeypatch.setattr(RedisSink, "apply_many", slow_apply)
    monkeypatch.setattr(SlotPool, "score", watched_score)
    produced = asyncio.run(produce_posts(kafka.bootstrap_servers, topic, 40, 0, seed=31))
    with OnnxRuntimeEngine(engine_version, streams=1, threads_per_stream=1) as engine:
        asyncio.run(run_until(Worker(settings, engine, PostTokenizer(engine_version)), redis, "free", produced, 0,
                              within=90))
    assert int(redis.hget("free:totals", "scored")) == produced
    # Five or more batches of at most 8 rows on one stream: while one batch is written (0.2 s), the next is
    # scored. Were the stream held until its batch's write returned, no call could start during a write.
    assert len(calls_during_a_write) >= 5 and sum(calls_during_a_write) >= 3, calls_during_a_write


def test_a_redis_error_that_is_no_outage_while_applying_stops_the_worker(
    kafka, topic_factory, redis_server, redis_factory, engine, engine_version, monkeypatch
):
    """Applies run in tasks (the batch's own, the background applier): their failure must still end run().

    An error Redis answers (a script error, out of memory) is no outage to wait out: the worker stops.
    """
    from redis.exceptions import ResponseError

    from stream_sentiment.sinks.redis_sink import RedisSink

    topic, settings = pipeline_settings(kafka, topic_factory, redis_server, "fail", partitions=1)

    async def failing_apply(self, *args, **kwargs):
        raise ResponseError("OOM command not allowed when used memory > 'maxmemory'")

    monkeypatch.setattr(RedisSink, "apply_many", failing_apply)
    asyncio.run(produce_posts(kafka.bootstrap_servers, topic, 10, 1, seed=32))
    worker = Worker(settings, engine, PostTokenizer(engine_version))

    async def scenario() -> None:
        stop = asyncio.Event()
        task = asyncio.create_task(worker.run(stop, consumer_options=FAST_GROUP_CONFIG))
        try:
            await asyncio.wait_for(asyncio.shield(task), 60)
        finally:
            stop.set()
            await asyncio.wait([task], timeout=30)

    with pytest.raises(ResponseError, match="OOM"):
        asyncio.run(scenario())
    assert redis_factory().hget("fail:totals", "scored") is None  # nothing counted


def test_an_engine_whose_labels_differ_from_the_services_is_refused(engine_copy):
    """Redis counts by negative/neutral/positive and reads P(negative) from the first column."""
    from stream_sentiment.engines.manifest import (
        EngineManifest,
        EngineRepositoryError,
        load_engine_version,
        write_manifest,
    )
    from stream_sentiment.labels import LABELS

    data = json.loads((engine_copy / "manifest.json").read_text())
    write_manifest(engine_copy, EngineManifest.from_dict({**data, "labels": ["positive", "neutral", "negative"]}))
    version = load_engine_version(engine_copy)
    with pytest.raises(EngineRepositoryError, match="outputs \\['positive', 'neutral', 'negative'\\]"):
        Worker(Settings.load(), OnnxRuntimeEngine(version), PostTokenizer(version))
    assert tuple(data["labels"]) == LABELS  # the committed engine's are the service's


def test_a_stopping_worker_logs_what_it_drains_and_what_it_applied(
    kafka, topic_factory, redis_server, redis_factory, engine, engine_version, caplog
):
    """Stopped while posts are in flight, the worker says what it is draining, then what the drain applied."""
    import logging
    import re

    topic, settings = pipeline_settings(kafka, topic_factory, redis_server, "bye", partitions=2)
    redis = redis_factory()
    produced = asyncio.run(produce_posts(kafka.bootstrap_servers, topic, 200, 1, seed=41))
    worker = Worker(settings, engine, PostTokenizer(engine_version))

    async def scenario() -> int:
        stop = asyncio.Event()
        task = asyncio.create_task(worker.run(stop, consumer_options=FAST_GROUP_CONFIG))
        async with asyncio.timeout(60):  # stop as soon as posts are fetched but not all applied
            while not sum(p.in_flight for p in worker.progress.values()):
                await asyncio.sleep(0.01)
        in_flight = sum(p.in_flight for p in worker.progress.values())
        stop.set()
        await asyncio.wait_for(task, 30)
        return in_flight

    with caplog.at_level(logging.INFO, logger="stream_sentiment.worker"):
        asyncio.run(scenario())
    messages = [r.getMessage() for r in caplog.records if r.name == "stream_sentiment.worker"]
    stopping = next(m for m in messages if m.startswith("worker stopping:"))
    stopped = next(m for m in messages if m.startswith("worker stopped:"))
    fetched = int(re.search(r"draining (\d+) fetched posts \(up to 10 s\)", stopping).group(1))
    drained = re.search(r"the drain applied (\d+) scored and (\d+) dead-lettered posts in [\d.]+ s, "
                        r"nothing left over; this run applied (\d+) scored and (\d+) dead-lettered in all", stopped)
    assert drained is not None, stopped
    # The drain applied exactly what was fetched when the worker was told to stop, and the run's totals are Redis's.
    assert fetched > 0 and int(drained.group(1)) + int(drained.group(2)) == fetched
    totals = redis.hgetall("bye:totals")
    assert (int(drained.group(3)), int(drained.group(4))) == (int(totals.get("scored", 0)),
                                                              int(totals.get("dead_lettered", 0)))
    assert int(drained.group(3)) + int(drained.group(4)) <= produced
