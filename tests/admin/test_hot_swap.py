"""Engine hot swap and failure recovery, end to end against the suite's broker and Redis.

The engine manager drives a running worker: activate/rollback cycles while posts
stream in, a version that fails validation, injected engine faults (every k-th
call, a permanently broken stream, every stream broken with and without the CPU
fallback). In every case Redis must count each produced post exactly once.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import aiohttp
import numpy as np
import pytest
from aiokafka import AIOKafkaProducer
from redis.asyncio import Redis as AsyncRedis

from stream_sentiment.admin.control import ValidationFailedError
from stream_sentiment.admin.engines import EngineManager
from stream_sentiment.admin.server import AdminServer
from stream_sentiment.batching.tokenizer import PostTokenizer
from stream_sentiment.config import Settings
from stream_sentiment.engines.base import Engine
from stream_sentiment.engines.manifest import EngineManifest, load_engine_version, write_manifest
from stream_sentiment.engines.onnxruntime_backend import OnnxRuntimeEngine
from stream_sentiment.service import open_engine
from stream_sentiment.worker import Worker
from tests.conftest import engine_repository
from tests.engines.failing_engine import FailsOnToken
from tests.pipeline import pipeline_settings, produce_posts
from tests.services import FAST_GROUP_CONFIG, consume_records

TOKEN = "hot-swap-token"


async def _with_worker(
    settings: Settings, body: Callable[[Worker, EngineManager], Awaitable[Any]], engine: Engine | None = None
) -> Any:
    """Run a worker (on ``engine``, else the configured one) and its engine manager around ``body``.

    Every engine is released afterwards.
    """
    if engine is None:
        _, engine = open_engine(settings)
    engine.activate()
    engine.warm_up()
    worker = Worker(settings, engine, PostTokenizer(engine.version))
    redis = AsyncRedis.from_url(settings.redis_url, decode_responses=True)
    manager = EngineManager(settings, worker, open_engine, redis)
    stop = asyncio.Event()
    task = asyncio.create_task(worker.run(stop, consumer_options=FAST_GROUP_CONFIG))
    try:
        async with asyncio.timeout(30):
            while not worker.progress:
                await asyncio.sleep(0.05)
        return await body(worker, manager)
    finally:
        stop.set()
        await asyncio.wait_for(task, 30)
        await manager.close()
        for active in (engine, worker.engine):
            active.deactivate()
        await redis.aclose()


async def _until_counted(redis: AsyncRedis, prefix: str, produced: int, within: float = 60) -> None:
    async with asyncio.timeout(within):
        while int(await redis.hget(f"{prefix}:totals", "scored") or 0) < produced:
            await asyncio.sleep(0.1)


class SteadyProducer:
    """Posts in small rounds until stopped: a steady stream while engines change."""

    def __init__(self, bootstrap: str, topic: str, per_round: int = 10, pause: float = 0.1) -> None:
        self.bootstrap, self.topic, self.per_round, self.pause = bootstrap, topic, per_round, pause
        self.produced = 0
        self._stop = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    async def _run(self) -> None:
        round_number = 0
        while not self._stop.is_set():
            self.produced += await produce_posts(self.bootstrap, self.topic, self.per_round, 0, seed=round_number)
            round_number += 1
            await asyncio.sleep(self.pause)

    def start(self) -> None:
        self._task = asyncio.create_task(self._run())

    async def stop(self) -> int:
        self._stop.set()
        assert self._task is not None
        await self._task
        return self.produced


def test_activate_and_rollback_cycles_under_load_count_every_post_once(
    kafka, topic_factory, redis_server, redis_factory, tmp_path
):
    repository = engine_repository(tmp_path, {"v1": {}, "v2": {}})
    topic, settings = pipeline_settings(
        kafka, topic_factory, redis_server, "hs", partitions=3,
        engine={"repository": repository, "threads_per_stream": 1},
        admin={"shadow_sample_size": 64, "min_shadow_posts": 16},
    )
    # 8 cycles (16 cutovers) under load: every post counted once through each. The 20-cycle, 8-round
    # measurement of the pauses and tail is bench/hot_swap.py's; here the suite's time budget decides.
    cycles = 8

    async def body(worker: Worker, manager: EngineManager) -> tuple[int, list[dict[str, Any]]]:
        producer = SteadyProducer(kafka.bootstrap_servers, topic)
        producer.start()
        await asyncio.sleep(1.0)  # live posts for the shadow sample
        answers = []
        for _ in range(cycles):
            answers.append(await manager.activate("v2"))
            await asyncio.sleep(0.1)
            answers.append(await manager.rollback())
            await asyncio.sleep(0.1)
        produced = await producer.stop()
        await _until_counted(manager.redis, "hs", produced)
        return produced, answers

    produced, answers = asyncio.run(_with_worker(settings, body))
    redis = redis_factory()
    assert int(redis.hget("hs:totals", "scored")) == produced > 0
    assert sum(int(v) for v in redis.hgetall(f"hs:offsets:{topic}").values()) == produced
    assert [a["active"] for a in answers] == ["v2", "v1"] * cycles
    assert all(0 <= a["pause_seconds"] < 1 for a in answers)  # reported per cutover; its size is benchmarked
    shadow = [a["validation"]["shadow"] for a in answers if "validation" in a]
    assert all(s.get("agreement", 0) >= 0.9 for s in shadow[1:])  # the same model agrees with itself
    events = [fields["event"] for _, fields in redis.xrange("hs:engine-events")]
    assert events == ["activated", "rolled_back"] * cycles


def _negate_classifier(folder: Path) -> None:
    """A broken build: the classifier head's weights and bias negated, so every argmax flips."""
    import onnx
    from onnx import numpy_helper

    path = folder / "model.int8.onnx"
    model = onnx.load(str(path))
    initializers = {i.name: i for i in model.graph.initializer}
    producers = {o: n for n in model.graph.node for o in n.output}
    gemm = next(n for n in model.graph.node if n.op_type == "Gemm")
    for name in gemm.input[1:]:
        source = producers.get(name)
        name = source.input[0] if source is not None and source.op_type == "DequantizeLinear" else name
        values = numpy_helper.to_array(initializers[name])
        flipped = np.clip(-values.astype(np.int32), -127, 127).astype(values.dtype) if values.dtype == np.int8 \
            else -values
        initializers[name].CopyFrom(numpy_helper.from_array(flipped, name))
    onnx.save(model, str(path))
    data = json.loads((folder / "manifest.json").read_text())
    write_manifest(folder, EngineManifest.from_dict(data))


@pytest.mark.parametrize(("broken", "reason"), [("negated-head", "golden-set accuracy"), ("swapped-labels", "labels")])
def test_a_version_that_fails_validation_is_refused_and_the_old_one_keeps_serving(
    kafka, topic_factory, redis_server, redis_factory, tmp_path, broken, reason
):
    changes = {"labels": ["positive", "neutral", "negative"]} if broken == "swapped-labels" else {}
    repository = engine_repository(tmp_path, {"v1": {}, "swapped": changes})
    if broken == "negated-head":
        _negate_classifier(repository / "minilm-sentiment" / "swapped")
    prefix = f"vf-{broken}"
    topic, settings = pipeline_settings(
        kafka, topic_factory, redis_server, prefix, partitions=1, engine={"repository": repository},
    )

    async def body(worker: Worker, manager: EngineManager) -> tuple[int, str]:
        produced = await produce_posts(kafka.bootstrap_servers, topic, 40, 0, seed=1)
        with pytest.raises(ValidationFailedError) as refused:
            await manager.activate("swapped")
        produced += await produce_posts(kafka.bootstrap_servers, topic, 40, 0, seed=2)
        await _until_counted(manager.redis, prefix, produced)
        assert manager.active == "v1" and worker.engine.version.manifest.version == "v1"
        assert "swapped" not in manager.loaded  # released, not left holding memory
        return produced, refused.value.reason

    produced, refused_because = asyncio.run(_with_worker(settings, body))
    assert reason in refused_because
    redis = redis_factory()
    assert int(redis.hget(f"{prefix}:totals", "scored")) == produced
    (_, event), = redis.xrange(f"{prefix}:engine-events")
    assert event["event"] == "refused" and event["version"] == "swapped" and reason in event["reason"]


@pytest.mark.parametrize("faults", [{"fault_every_kth_call": 3}, {"fault_broken_stream": 1}],
                         ids=["every-3rd-call", "broken-stream"])
def test_injected_engine_faults_are_retried_and_nothing_is_lost(
    kafka, topic_factory, redis_server, redis_factory, faults
):
    prefix = "fault-" + next(iter(faults))[6:10]
    topic, settings = pipeline_settings(
        kafka, topic_factory, redis_server, prefix, partitions=3,
        engine={"streams": 2, "threads_per_stream": 1, **faults},
        batching={"max_rows": 8},  # many small batches: many calls to fail
    )

    async def body(worker: Worker, manager: EngineManager) -> tuple[int, tuple[bool, dict[str, Any]], float]:
        produced = await produce_posts(kafka.bootstrap_servers, topic, 200, 0, seed=5)
        await _until_counted(manager.redis, prefix, produced)
        return produced, manager.readiness(), worker.metrics.value("stream_sentiment_engine_retries_total")

    produced, (ready, details), retries = asyncio.run(_with_worker(settings, body))
    assert retries > 0  # faults happened and were retried on a rebuilt stream
    redis = redis_factory()
    assert int(redis.hget(f"{prefix}:totals", "scored")) == produced
    assert sum(int(v) for v in redis.hgetall(f"{prefix}:offsets:{topic}").values()) == produced
    if "fault_broken_stream" in faults:
        assert ready and details["lost_streams"] == [1]  # one stream left rotation; the other serves
    else:  # a stream fails every 3rd call of its own, never twice in a row: retried, never lost
        assert ready and details["lost_streams"] == []


def test_with_every_stream_broken_consumption_pauses_and_the_cpu_fallback_takes_over(
    kafka, topic_factory, redis_server, redis_factory
):
    topic, settings = pipeline_settings(
        kafka, topic_factory, redis_server, "fb", partitions=2,
        engine={"streams": 1, "fault_broken_stream": 0, "cpu_fallback": True},
    )

    async def body(worker: Worker, manager: EngineManager) -> int:
        produced = await produce_posts(kafka.bootstrap_servers, topic, 120, 0, seed=9)
        await _until_counted(manager.redis, "fb", produced)
        assert worker.engine.backend == "onnxruntime"  # the fault-injected engine was replaced
        return produced

    produced = asyncio.run(_with_worker(settings, body))
    redis = redis_factory()
    assert int(redis.hget("fb:totals", "scored")) == produced
    assert [f["event"] for _, f in redis.xrange("fb:engine-events")] == ["fallback"]


def test_with_every_stream_broken_and_no_fallback_nothing_is_counted_or_committed(
    kafka, topic_factory, redis_server, redis_factory
):
    topic, settings = pipeline_settings(
        kafka, topic_factory, redis_server, "down", partitions=1, engine={"streams": 1, "fault_broken_stream": 0},
    )

    async def body(worker: Worker, manager: EngineManager) -> tuple[bool, dict[str, Any]]:
        await produce_posts(kafka.bootstrap_servers, topic, 30, 0, seed=3)
        async with asyncio.timeout(20):
            while manager.readiness()[0]:
                await asyncio.sleep(0.1)
        await asyncio.sleep(1.5)  # a commit would be due by now
        return manager.readiness()

    ready, details = asyncio.run(_with_worker(settings, body))
    assert not ready and details["lost_streams"] == [0]
    redis = redis_factory()
    assert redis.hget("down:totals", "scored") is None
    assert redis.hgetall(f"down:offsets:{topic}") in ({}, {"0": "0"})


def test_admin_routes_refuse_path_like_and_unknown_versions_and_load_nothing(redis_server, engine_version, tmp_path):
    repository = engine_repository(tmp_path, {"v1": {}, "v2": {}})
    settings = Settings.load(redis_url=redis_server.url, redis_prefix="sec", engine={"repository": repository},
                             admin={"port": 0, "token": TOKEN})

    async def scenario() -> list[tuple[int, dict[str, Any]]]:
        _, engine = open_engine(settings)
        with engine:
            worker = Worker(settings, engine, PostTokenizer(load_engine_version(repository / "minilm-sentiment/v1")))
            manager = EngineManager(settings, worker, open_engine)
            answers = []
            async with AdminServer(settings.admin, manager, worker.metrics) as server, aiohttp.ClientSession() as http:
                url = f"http://127.0.0.1:{server.port}/admin/engines"
                auth = {"Authorization": f"Bearer {TOKEN}"}
                for version in ("../../etc", "..", "v1/../v2", "v9"):
                    async with http.post(f"{url}/activate", json={"version": version}, headers=auth) as response:
                        answers.append((response.status, await response.json()))
                async with http.post(f"{url}/activate", json={"version": "v2"}) as response:
                    answers.append((response.status, await response.json()))
                async with http.get(url, headers=auth) as response:
                    answers.append((response.status, await response.json()))
            assert set(manager.loaded) == {"v1"}  # nothing was loaded by any refused request
            await manager.close()
            return answers

    answers = asyncio.run(scenario())
    assert [status for status, _ in answers] == [400, 400, 400, 404, 401, 200]
    listing = answers[-1][1]
    assert listing["active"] == "v1"
    assert {e["version"]: e["state"] for e in listing["engines"]} == {"v1": "ACTIVE", "v2": "RETIRED"}


def test_a_version_folder_whose_manifest_names_another_version_is_refused_with_422(redis_server, tmp_path):
    # v9's manifest says it is v1, v8's that it is another model's: served, /admin/engines would call the
    # engine v9 while /readyz and the metrics called it v1.
    repository = engine_repository(tmp_path, {"v1": {}, "v9": {"version": "v1"}, "v8": {"model": "other-sentiment"}})
    settings = Settings.load(redis_url=redis_server.url, redis_prefix="named", engine={"repository": repository},
                             admin={"port": 0, "token": TOKEN})

    async def scenario() -> list[tuple[int, dict[str, Any]]]:
        _, engine = open_engine(settings)
        with engine:
            worker = Worker(settings, engine, PostTokenizer(engine.version))
            manager = EngineManager(settings, worker, open_engine)
            answers = []
            async with AdminServer(settings.admin, manager, worker.metrics) as server, aiohttp.ClientSession() as http:
                base, auth = f"http://127.0.0.1:{server.port}", {"Authorization": f"Bearer {TOKEN}"}
                for version in ("v9", "v8"):
                    async with http.post(f"{base}/admin/engines/activate", json={"version": version},
                                         headers=auth) as response:
                        answers.append((response.status, await response.json()))
                async with http.get(f"{base}/admin/engines", headers=auth) as response:
                    answers.append((response.status, await response.json()))
                async with http.get(f"{base}/readyz") as response:
                    answers.append((response.status, await response.json()))
            assert set(manager.loaded) == {"v1"}  # nothing of the refused folders stays loaded
            assert worker.metrics.value("stream_sentiment_engine_swaps_total",
                                        {"action": "activate", "result": "refused"}) == 2
            await manager.close()
            return answers

    (v9_status, v9), (v8_status, v8), (_, listing), (ready_status, ready) = asyncio.run(scenario())
    folder = repository / "minilm-sentiment"
    assert v9_status == 422 and str(folder / "v9") in v9["error"]
    assert "'minilm-sentiment/v9'" in v9["error"] and "version 'v1'" in v9["error"]
    assert v8_status == 422 and str(folder / "v8") in v8["error"] and "model 'other-sentiment'" in v8["error"]
    # Both endpoints still agree on what serves.
    assert listing["active"] == "v1" and ready_status == 200 and ready["details"]["engine"] == "v1"
    assert {e["version"]: e["state"] for e in listing["engines"]} == {"v1": "ACTIVE", "v8": "RETIRED",
                                                                        "v9": "RETIRED"}


def test_a_post_the_engine_fails_on_is_isolated_and_dead_lettered_while_the_rest_are_scored(
    kafka, topic_factory, redis_server, redis_factory, engine_version
):
    topic, settings = pipeline_settings(kafka, topic_factory, redis_server, "poison", partitions=1,
                                        batching={"window_ms": 200, "timeout_ms": 200})
    tokenizer = PostTokenizer(engine_version)
    poison_text = "zyzzyva"  # a rare word: its first token appears in no other post here
    token = tokenizer.encode([poison_text])[0][1]

    async def body(worker: Worker, manager: EngineManager) -> None:
        producer = AIOKafkaProducer(bootstrap_servers=kafka.bootstrap_servers)
        await producer.start()
        for i in range(31):
            text = poison_text if i == 17 else f"post {i}: the flight was fine"
            await producer.send(topic, json.dumps({"id": f"p{i}", "text": text}).encode())
        await producer.stop()
        async with asyncio.timeout(60):
            while int(await manager.redis.hget("poison:totals", "dead_lettered") or 0) < 1:
                await asyncio.sleep(0.1)
        await _until_counted(manager.redis, "poison", 30)
        assert worker.pool.healthy and not worker.pool.lost  # the slot worked all along

    engine = FailsOnToken(OnnxRuntimeEngine(engine_version, streams=1, threads_per_stream=1), token)
    asyncio.run(_with_worker(settings, body, engine))
    redis = redis_factory()
    assert redis.hgetall("poison:dead_lettered") == {"engine_error": "1"}
    assert int(redis.hget("poison:totals", "scored")) == 30
    dead = asyncio.run(consume_records(kafka.bootstrap_servers, f"{topic}.dlq", 1, group=f"dlq-{topic}"))
    assert json.loads(dead[0].value)["id"] == "p17"
    assert dict(dead[0].headers)["dlq.reason"] == b"engine_error"
