"""Language routing through the engine server (issue 15, item 2): one engine per route's model on the server.

The server, given the workers' ``engine.model`` and ``engine.routes``, hosts each route's model; a routed
worker's connections for a route reach that route's engine (counted under its model), a hot swap and a
rollback of one route load versions of that route's model only, and a model the server does not host is
refused when the worker's engine activates, not batch by batch. ONNX Runtime on the CPU stands in for the
GPU backend, as in ``test_engine_server.py``. The multilingual engine scores ~50 posts/s on two cores, so
the stream is small.
"""

from __future__ import annotations

import asyncio
import socket
from pathlib import Path

import pytest
from redis.asyncio import Redis as AsyncRedis

from stream_sentiment.admin.routes import RoutedEngineManager
from stream_sentiment.batching.routing import plan_routes
from stream_sentiment.batching.tokenizer import PostTokenizer
from stream_sentiment.config import Settings
from stream_sentiment.engines import wire
from stream_sentiment.engines.base import Engine, EngineError
from stream_sentiment.engines.manifest import PLANS_DIR, EngineRepository
from stream_sentiment.engines.rewrite_cache import cached_unsigned_model
from stream_sentiment.engines.server import EngineServer
from stream_sentiment.engines.server_dispatch import EngineKey
from stream_sentiment.metrics import PipelineMetrics
from stream_sentiment.service import open_engine, open_routes
from stream_sentiment.source.language import post_language
from stream_sentiment.worker import Worker
from tests.conftest import REPO, engine_repository
from tests.pipeline import lang_counts, mixed_language_posts, pipeline_settings, produce_documents
from tests.services import FAST_GROUP_CONFIG

MINILM, MULTILINGUAL = "minilm-sentiment", "multilingual-sentiment"
BUCKETS = (32, 64, 128, 256)  # both models' manifest buckets


@pytest.fixture
def repository(tmp_path: Path) -> Path:
    """minilm-sentiment v1 and v2 (copies of the committed engine) beside the committed multilingual-sentiment."""
    root = engine_repository(tmp_path / "engines", {"v1": {}, "v2": {}})
    (root / MULTILINGUAL).symlink_to(REPO / "engines" / MULTILINGUAL)
    # The copies' model file is the committed one, so is its ONNX Runtime rewrite (a child process of a few
    # seconds per copy on a busy VM): link the committed version's cached rewrite into each copy's plans/.
    committed = EngineRepository(REPO / "engines", MINILM).load("v1")
    sha = committed.manifest.files[committed.manifest.model_file]
    rewritten = cached_unsigned_model(committed.model_path, sha, committed.path / PLANS_DIR)
    for version in ("v1", "v2"):
        plans = root / MINILM / version / PLANS_DIR
        plans.mkdir()
        for source in (rewritten, rewritten.with_name(f"{rewritten.name}.sha256")):
            (plans / source.name).symlink_to(source)
    return root


def _engine(repository: Path, socket_path: Path, backend: str, **engine: object) -> dict[str, object]:
    return {"backend": backend, "streams": 1, "threads_per_stream": 1, "repository": str(repository),
            "server_socket": str(socket_path), "call_timeout_s": 20.0, **engine}


def _hosted(server: EngineServer) -> dict[tuple[str, str], int]:
    return {(h["model"], h["version"]): h["clients"] for h in server.hosted()}


def _rows(server: EngineServer, model: str) -> float:
    return server.metrics.rows.labels(model)._value.get()


def test_a_route_the_server_does_not_host_is_refused_when_the_worker_starts(socket_path):
    committed = REPO / "engines"
    server_settings = Settings.load(engine=_engine(committed, socket_path, "onnxruntime"))  # minilm only
    client_settings = Settings.load(engine=_engine(committed, socket_path, "engine-server",
                                                   routes={"zh": MULTILINGUAL}))
    with EngineServer(server_settings, open_engine) as server:
        serving: list[Engine] = []
        # What `stream-sentiment run` does after opening the default route's engine: open the others.
        with pytest.raises(EngineError, match=r"hosts \['minilm-sentiment'\], not 'multilingual-sentiment': give "
                                              r"the server the workers' engine.model and engine.routes"):
            asyncio.run(open_routes(client_settings, plan_routes(client_settings), serving))
        assert serving == [] and server.hosted() == []  # refused before anything loaded
        assert server.metrics.calls.labels("bad_request")._value.get() == 1

        with socket.socket(socket.AF_UNIX) as raw:  # a worker of the previous release names no model
            raw.connect(str(socket_path))
            wire.send_json(raw, wire.HELLO, {"protocol": 1, "version": "v1", "buckets": [256], "max_rows": 1})
            kind, body = wire.recv_frame(raw)
            assert kind == wire.READY and wire.parse_json(body)["model"] == MINILM  # the server's default model


def test_a_routed_worker_on_the_engine_server_counts_every_post_once_through_a_swap_of_one_route(
    kafka, topic_factory, redis_server, redis_factory, repository, socket_path
):
    """Chinese on the default route (multilingual), English routed to minilm-sentiment, which is hot-swapped to v2
    and rolled back through the admin control while posts of both languages keep coming: every post counted once
    under its lang, each route's posts scored by its model on the server, and the multilingual engine (server and
    worker) untouched. Slower than most (~10 s on two busy cores): the one end-to-end check of routing through
    the engine server, with the server's two model loads and the candidate's."""
    engine = _engine(repository, socket_path, "engine-server", model=MULTILINGUAL, routes={"en": f"{MINILM}/v1"})
    topic, settings = pipeline_settings(
        kafka, topic_factory, redis_server, "srvroute", partitions=2, engine=engine, batching={"max_rows": 16},
        admin={"shadow_sample_size": 16, "min_shadow_posts": 8, "validation_duty_cycle": 1.0})
    device = settings.engine.model_copy(update={"backend": "onnxruntime"})  # the server's: the same routes
    server_settings = settings.model_copy(update={"engine": device})
    first, second = mixed_language_posts(chinese=6, english=12), mixed_language_posts(chinese=6, english=12)
    for document in second:
        document["id"] = f"b-{document['id']}"
    expected: dict[str, int] = {}
    for document in first + second:
        language = post_language(document.get("lang"), str(document["text"]))  # type: ignore[arg-type]
        expected[language] = expected.get(language, 0) + 1
    assert expected == {"en": 24, "zh": 12}
    total = len(first) + len(second)
    metrics = PipelineMetrics()
    multilingual_key = EngineKey(MULTILINGUAL, "v1", BUCKETS, 16)

    async def scored(redis: AsyncRedis, count: int) -> None:
        async with asyncio.timeout(60):
            while int(await redis.hget("srvroute:totals", "scored") or 0) < count:
                await asyncio.sleep(0.1)

    async def scenario(server: EngineServer) -> tuple[dict, dict[tuple[str, str], int], dict]:
        version, default_engine = open_engine(settings)
        default_engine.activate()
        serving = [default_engine]
        redis = AsyncRedis.from_url(settings.redis_url, decode_responses=True)
        try:
            worker = Worker(settings, default_engine, PostTokenizer(version), metrics=metrics,
                            routes=await open_routes(settings, plan_routes(settings), serving))
            manager = RoutedEngineManager(settings, worker, open_engine, redis)
            default_pool, served_multilingual = worker.pool, server.loaded(multilingual_key)[1]
            rows_before = _rows(server, MULTILINGUAL)
            stop = asyncio.Event()
            task = asyncio.create_task(worker.run(stop, consumer_options=FAST_GROUP_CONFIG))
            try:
                await produce_documents(settings.bootstrap_servers, topic, first)
                await scored(redis, len(first))
                assert len(worker.route(MINILM).shadow) >= 8  # live English posts to shadow-check the candidate on
                # The swap runs (loaded on the server, validated, cut over) while the second half is consumed.
                activation = asyncio.create_task(manager.activate("v2", route=MINILM))
                await produce_documents(settings.bootstrap_servers, topic, second)
                answer = await activation
                during = _hosted(server)
                rolled_back = await manager.rollback(route=MINILM)  # to the standby: still on the server
                await scored(redis, total)
            finally:
                stop.set()
                await asyncio.wait_for(task, 30)
                await manager.close()
                serving += [scheduler.engine for scheduler in worker.routes.values()]
            assert worker.pool is default_pool and server.loaded(multilingual_key)[1] is served_multilingual
            # Every Chinese post, and nothing else, went to the server's multilingual engine.
            assert _rows(server, MULTILINGUAL) - rows_before == expected["zh"]
            assert (rolled_back["active"], rolled_back["route"]) == ("v1", MINILM)
            return answer, during, worker.readiness()
        finally:
            for active in serving:
                active.deactivate()
            await redis.aclose()

    with EngineServer(server_settings, open_engine) as server:
        assert server.models == [MULTILINGUAL, MINILM]
        assert server.preload() == multilingual_key  # and each route's configured version
        assert _hosted(server) == {(MULTILINGUAL, "v1"): 0, (MINILM, "v1"): 0}  # warm before any worker
        answer, during, ready = asyncio.run(scenario(server))
    assert (answer["active"], answer["previous"], answer["route"]) == ("v2", "v1", MINILM)
    assert answer["validation"]["shadow"]["n"] >= 8 and answer["validation"]["passed"]
    # On the server: minilm v2 beside v1 (the preloaded one, and the worker's standby for a rollback).
    assert during == {(MINILM, "v1"): 1, (MINILM, "v2"): 1, (MULTILINGUAL, "v1"): 1}
    assert ready["routes"][MINILM]["engine"] == f"{MINILM}/v1" and ready["routes"][MINILM]["backend"] == "engine-server"
    redis = redis_factory()
    totals = redis.hgetall("srvroute:totals")
    assert int(totals["scored"]) == total and int(totals.get("dead_lettered", 0)) == 0
    assert sum(int(v) for v in redis.hgetall(f"srvroute:offsets:{topic}").values()) == total
    assert lang_counts(redis, "srvroute") == expected
    posts = {route: metrics.value("stream_sentiment_route_posts_total", {"route": route})
             for route in (MINILM, MULTILINGUAL)}
    assert posts == {MINILM: expected["en"], MULTILINGUAL: expected["zh"]}
