from __future__ import annotations

import asyncio

from stream_sentiment.aggregation.buckets import BucketRules, RedisKeys, ScoredPost, increments_for
from stream_sentiment.sinks.redis_sink import RedisSink
from stream_sentiment.source.messages import Post, Rejection, RejectReason

KEYS = RedisKeys("t")
RULES = BucketRules(bucket_seconds=10, allowed_lateness=60)
NOW = 1_000_000.0


def scored(post_id, ts, p_negative, topic=None, region=None):
    rest = (1.0 - p_negative) / 2
    return ScoredPost(Post(post_id, "text", ts, topic, region), ts, (p_negative, rest, rest))


def test_posts_count_in_their_event_time_bucket_per_dimension():
    outcomes = [
        scored("a", NOW - 5, 0.9, topic="airline", region="eu"),
        scored("b", NOW - 3, 0.2, topic="airline"),
        Rejection(RejectReason.NOT_JSON, "x"),
        Rejection(RejectReason.NOT_JSON, "y"),
        Rejection(RejectReason.EMPTY_TEXT, "z"),
    ]
    increments = increments_for(outcomes, NOW, RULES, KEYS)
    start = RULES.start_of(NOW - 5)
    assert increments.counts[KEYS.totals] == {"scored": 2, "negative": 1, "neutral": 1, "dead_lettered": 3}
    assert increments.counts[KEYS.dead_letters] == {"not_json": 2, "empty_text": 1}
    assert increments.counts[KEYS.bucket("global", "all", start)] == {"posts": 2, "negative": 1, "neutral": 1}
    assert increments.counts[KEYS.bucket("topic", "airline", start)]["posts"] == 2
    assert increments.counts[KEYS.bucket("region", "eu", start)] == {"posts": 1, "negative": 1}
    assert round(increments.sums[KEYS.bucket("global", "all", start)]["p_negative_sum"], 6) == 1.1
    assert KEYS.bucket("global", "all", start) in increments.expiring


def test_late_posts_inside_lateness_count_in_their_bucket_later_ones_as_late():
    within = scored("a", NOW - 65, 0.9)  # bucket closed 55-65 s ago: inside 60 s
    beyond = scored("b", NOW - 200, 0.9)
    future = scored("c", NOW + 3600, 0.9)  # clock skew: counts now
    increments = increments_for([within, beyond, future], NOW, RULES, KEYS)
    assert increments.counts[KEYS.totals]["late"] == 1
    assert increments.counts[KEYS.bucket("global", "all", RULES.start_of(NOW - 65))]["posts"] == 1
    assert increments.counts[KEYS.bucket("global", "all", RULES.start_of(NOW))]["posts"] == 1
    assert KEYS.bucket("global", "all", RULES.start_of(NOW - 200)) not in increments.counts


def test_increments_apply_through_the_fence(redis_factory):
    async def scenario():
        client = redis_factory(async_client=True)
        sink = RedisSink(client, prefix="t", topic="posts", ttl_seconds=3600)
        increments = increments_for([scored("a", NOW - 1, 0.8, topic="x")], NOW, RULES, KEYS)
        await sink.apply(0, 0, 1, increments)
        values = await client.hgetall(KEYS.bucket("topic", "x", RULES.start_of(NOW - 1)))
        await client.aclose()
        return values

    values = asyncio.run(scenario())
    assert values["posts"] == "1" and values["negative"] == "1"
    assert abs(float(values["p_negative_sum"]) - 0.8) < 1e-9
