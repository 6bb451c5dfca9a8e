"""Hot swap of one route while both routes are under load (issue 15, item 2), against the real broker and Redis.

English posts are routed to minilm-sentiment (v1, then v2, then back), everything else stays on the default
route, multilingual-sentiment/v1. Through the admin HTTP endpoint: no post lost or doubled, every post
counted under its lang, and the default route's engine and slots never touched.
"""

from __future__ import annotations

import asyncio
import json

import aiohttp
from aiokafka import AIOKafkaProducer
from redis.asyncio import Redis as AsyncRedis

from stream_sentiment.admin.routes import RoutedEngineManager
from stream_sentiment.admin.server import AdminServer
from stream_sentiment.batching.routing import RoutedEngines, plan_routes, route_settings
from stream_sentiment.batching.tokenizer import PostTokenizer
from stream_sentiment.service import open_engine
from stream_sentiment.worker import Worker
from tests.conftest import REPO, engine_repository
from tests.pipeline import pipeline_settings
from tests.services import FAST_GROUP_CONFIG

TOKEN = "route-swap-token"
ZH = [json.loads(line)["text"] for line in (REPO / "stream_sentiment/source/samples_zh.jsonl").read_text().splitlines()]


async def _produce_until(stop: asyncio.Event, bootstrap: str, topic: str, produced: dict[str, int]) -> None:
    """Rounds of 6 English and 3 Chinese posts (untagged: routed by their script) until ``stop``."""
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap)
    await producer.start()
    try:
        round_number = 0
        while not stop.is_set():
            for index in range(9):
                number = round_number * 9 + index
                language = "zh" if index % 3 == 2 else "en"
                mood = "awful" if index % 2 else "lovely"
                text = ZH[number % len(ZH)] if language == "zh" else f"post {number}: {mood}"
                value = json.dumps({"id": f"p{number}", "text": text}, ensure_ascii=False).encode()
                await producer.send(topic, value, key=str(number).encode())
                produced[language] = produced.get(language, 0) + 1
            await producer.flush()
            round_number += 1
            await asyncio.sleep(0.2)
    finally:
        await producer.stop()


def test_one_route_is_swapped_and_rolled_back_under_load_and_the_other_is_untouched(
    kafka, topic_factory, redis_server, redis_factory, tmp_path
):
    repository = engine_repository(tmp_path, {"v1": {}, "v2": {}})  # minilm-sentiment v1 and v2
    (repository / "multilingual-sentiment").symlink_to(REPO / "engines" / "multilingual-sentiment")
    topic, settings = pipeline_settings(
        kafka, topic_factory, redis_server, "rs", partitions=2,
        engine={"repository": repository, "model": "multilingual-sentiment", "threads_per_stream": 1,
                "routes": {"en": "minilm-sentiment/v1"}},
        # Small batches and validation at full duty: the candidate's warm-up and golden set take seconds, not tens.
        batching={"max_rows": 16}, admin={"token": TOKEN, "shadow_sample_size": 64, "min_shadow_posts": 16,
                                          "validation_duty_cycle": 1.0},
    )
    plan = plan_routes(settings)
    produced: dict[str, int] = {}

    async def scenario() -> tuple[list[tuple[int, dict]], bool, dict]:
        default_version, default_engine = open_engine(settings)
        english_version, english_engine = open_engine(route_settings(settings, plan.targets["minilm-sentiment"]))
        for engine in (default_engine, english_engine):
            engine.activate()
        worker = Worker(settings, default_engine, PostTokenizer(default_version), routes=RoutedEngines(
            plan, {"minilm-sentiment": (english_engine, PostTokenizer(english_version))}))
        default_pool = worker.pool
        redis = AsyncRedis.from_url(settings.redis_url, decode_responses=True)
        manager = RoutedEngineManager(settings, worker, open_engine, redis)
        stop, producing = asyncio.Event(), asyncio.Event()
        task = asyncio.create_task(worker.run(stop, consumer_options=FAST_GROUP_CONFIG))
        producer = asyncio.create_task(_produce_until(producing, kafka.bootstrap_servers, topic, produced))
        answers = []
        try:
            async with AdminServer(settings.admin, manager, worker.metrics) as server, \
                    aiohttp.ClientSession(headers={"Authorization": f"Bearer {TOKEN}"}) as http:
                base = f"http://127.0.0.1:{server.port}/admin/engines"
                while len(worker.route("minilm-sentiment").shadow) < 16:  # live English posts to shadow-check on
                    await asyncio.sleep(0.05)
                for path, body in (("activate", {"version": "v2", "route": "minilm-sentiment"}),
                                   ("rollback", {"route": "minilm-sentiment"}),
                                   ("activate", {"version": "v2", "route": "no-such-route"})):
                    async with http.post(f"{base}/{path}", json=body) as response:
                        answers.append((response.status, await response.json()))
                async with http.get(base) as response:
                    listing = await response.json()
                producing.set()
                await producer
                async with asyncio.timeout(60):
                    while int(await redis.hget("rs:totals", "scored") or 0) < sum(produced.values()):
                        await asyncio.sleep(0.1)
        finally:
            producing.set()
            stop.set()
            await asyncio.wait_for(task, 30)
            await manager.close()
            for scheduler in worker.routes.values():
                scheduler.engine.deactivate()
            await redis.aclose()
        return answers, worker.pool is default_pool, listing

    answers, default_untouched, listing = asyncio.run(scenario())
    assert [status for status, _ in answers] == [200, 200, 404]
    activated, rolled_back = answers[0][1], answers[1][1]
    assert (activated["active"], activated["route"], rolled_back["active"]) == ("v2", "minilm-sentiment", "v1")
    assert activated["validation"]["shadow"]["agreement"] >= 0.9  # checked on the route's own live posts
    assert default_untouched and listing["active"] == "v1" and listing["default_route"] == "multilingual-sentiment"
    assert listing["routes"]["minilm-sentiment"]["standby"] == "v2"
    redis = redis_factory()
    total = sum(produced.values())
    assert int(redis.hget("rs:totals", "scored")) == total > 0
    assert sum(int(v) for v in redis.hgetall(f"rs:offsets:{topic}").values()) == total
    counted: dict[str, int] = {}
    for key in redis.scan_iter("rs:agg:lang:*"):
        counted[key.split(":")[3]] = counted.get(key.split(":")[3], 0) + int(redis.hget(key, "posts"))
    assert counted == produced
    events = [(f["event"], f["version"], f.get("route")) for _, f in redis.xrange("rs:engine-events")]
    assert events == [("activated", "v2", "minilm-sentiment"), ("rolled_back", "v1", "minilm-sentiment")]
