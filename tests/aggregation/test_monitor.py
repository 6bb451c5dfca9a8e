"""Alerts from Redis buckets on wall-clock ticks, against the suite's valkey-server."""

from __future__ import annotations

import asyncio
import json

from stream_sentiment.aggregation.alerts import AlertRules
from stream_sentiment.aggregation.buckets import BucketRules, RedisKeys, ScoredPost, increments_for
from stream_sentiment.aggregation.monitor import AlertMonitor
from stream_sentiment.sinks.redis_sink import RedisSink
from stream_sentiment.source.messages import Post

KEYS = RedisKeys("m")
BUCKETS = BucketRules(bucket_seconds=1, allowed_lateness=3600, dimensions=("global", "topic"))
RULES = AlertRules(ratio_threshold=0.95, min_posts=10, surge_z=3.0, ewma_alpha=0.2, cooldown_seconds=5,
                   warmup_windows=3)
T0 = 1_700_000_000


def _posts(second: int, total: int, negative: int) -> list[ScoredPost]:
    return [
        ScoredPost(Post(f"{second}-{i}", "t", None, "airline"), second + 0.5,
                   (0.9, 0.05, 0.05) if i < negative else (0.05, 0.05, 0.9))
        for i in range(total)
    ]


async def _scenario(redis_factory, seconds: list[tuple[int, int]], ticks: list[int], windows=(2,)):
    client = redis_factory(async_client=True)
    sink = RedisSink(client, "m", "posts", ttl_seconds=3600)
    monitor = AlertMonitor(client, KEYS, BUCKETS, windows=windows, rules=RULES, engine_version="v1")
    offset = 0
    for index, (total, negative) in enumerate(seconds):
        increments = increments_for(_posts(T0 + index, total, negative), T0 + index + 1, BUCKETS, KEYS)
        await sink.apply(0, offset, offset + total, increments)
        offset += total
    fired = [(tick, alert) for tick in ticks for alert in await monitor.evaluate_closed(T0 + tick + 0.01)]
    again = await monitor.evaluate_closed(T0 + ticks[-1] + 0.5)  # same boundary: another worker's turn
    stream = await client.xrange(KEYS.alerts)
    await client.aclose()
    return fired, again, stream


def test_a_surge_raises_one_alert_within_two_windows_not_a_storm(redis_factory):
    steady = [(20, 4 + s % 2) for s in range(12)]
    surge = [(20, 15)] * 6
    fired, again, stream = asyncio.run(
        _scenario(redis_factory, steady + surge, ticks=list(range(2, 12 + 6 + 1)))
    )
    surges = [(tick, a) for tick, a in fired if a.rule == "surge"]
    # One alert per (dimension, value) for the whole six-second incident, not one per tick.
    assert sorted((a.stats.dimension, a.stats.value) for _, a in surges) == [("global", "all"), ("topic", "airline")]
    for tick, alert in surges:
        assert 12 < tick <= 12 + 2 * 2  # the surge starts in second 12; windows are 2 s
        assert alert.stats.negative_ratio >= 0.5 and alert.z >= 3.0
    assert all(a.rule == "surge" for _, a in fired)
    assert again == []
    assert [entry[1]["rule"] for entry in stream] == ["surge", "surge"]
    assert stream[0][1]["engine_version"] == "v1"

def test_windows_close_and_alert_with_no_new_posts(redis_factory):
    # All posts arrive in the first two seconds; the window ending at second 2 is only
    # evaluated when the wall clock passes it, with nothing new arriving.
    fired, _, stream = asyncio.run(_scenario(redis_factory, [(10, 10), (10, 10)], ticks=[2]))
    assert [a.rule for _, a in fired] == ["ratio", "ratio"]  # global/all and topic/airline
    assert {(a.stats.dimension, a.stats.value) for _, a in fired} == {("global", "all"), ("topic", "airline")}
    assert len(stream) == 2


def test_windows_reaching_back_before_the_first_data_are_not_judged(redis_factory):
    # Data starts at second 0; a 4 s window ending at second 2 is half empty: skipped,
    # neither alerting nor teaching the baseline. The one ending at second 4 is judged.
    fired, _, _ = asyncio.run(
        _scenario(redis_factory, [(10, 10)] * 4, ticks=[2, 3, 4], windows=(4,))
    )
    assert {tick for tick, _ in fired} == {4}


def test_an_alert_quotes_the_windows_most_negative_posts(redis_factory):
    rules = BucketRules(bucket_seconds=1, allowed_lateness=3600, dimensions=("global", "topic"), sample_posts=2)

    async def scenario():
        client = redis_factory(async_client=True)
        sink = RedisSink(client, "q", "posts", ttl_seconds=3600)
        keys = RedisKeys("q")
        monitor = AlertMonitor(client, keys, rules, windows=(2,), rules=RULES, engine_version="v1", sample_posts=2)
        offset = 0
        for second, p_negative in enumerate([0.8, 0.99]):
            posts = [ScoredPost(Post(f"s{second}-{i}", f"awful {second}-{i}", None, "airline"), T0 + second + 0.5,
                                (p_negative - i / 100, 0.0, 1 - p_negative + i / 100)) for i in range(10)]
            await sink.apply(0, offset, offset + 10, increments_for(posts, T0 + second + 1, rules, keys))
            offset += 10
        # the samples set of a bucket keeps only the best two of its ten negative posts
        assert await client.zcard(keys.samples("topic", "airline", T0)) == 2
        await monitor.evaluate_closed(T0 + 2.01)
        stream = await client.xrange(keys.alerts)
        await client.aclose()
        return stream

    stream = asyncio.run(scenario())
    assert len(stream) == 2
    for _, fields in stream:
        samples = json.loads(fields["samples"])
        assert [(s["id"], s["text"], s["p_negative"]) for s in samples] == [
            ("s1-0", "awful 1-0", 0.99), ("s1-1", "awful 1-1", 0.98),
        ]
