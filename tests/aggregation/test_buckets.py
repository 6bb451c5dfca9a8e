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


def _reference_increments(outcomes, now, rules, keys):
    """The definition, key by key and post by post (what ``increments_for`` computes faster)."""
    import heapq

    from stream_sentiment.aggregation.buckets import dimension_values, sample_member
    from stream_sentiment.sinks.redis_sink import Increments

    increments, offers = Increments(), {}
    for outcome in outcomes:
        if isinstance(outcome, Rejection):
            increments.add(keys.totals, "dead_lettered")
            increments.add(keys.dead_letters, outcome.reason.value)
            continue
        increments.add(keys.totals, "scored")
        increments.add(keys.totals, outcome.label)
        event_time = min(outcome.event_time, now)
        if rules.is_late(event_time, now):
            increments.add(keys.totals, "late")
            continue
        start = rules.start_of(event_time)
        increments.first[keys.first_bucket] = min(start, increments.first.get(keys.first_bucket, start))
        for dimension, value in dimension_values(outcome.post, rules.dimensions):
            key = keys.bucket(dimension, value, start)
            increments.add(key, "posts")
            increments.add(key, outcome.label)
            increments.add_float(key, "p_negative_sum", outcome.probabilities[0])
            increments.expiring.add(key)
            increments.add_member(keys.dimension_values(start), f"{dimension}:{value}")
            increments.expiring.add(keys.dimension_values(start))
            if rules.sample_posts and outcome.label == "negative":
                samples = keys.samples(dimension, value, start)
                offers.setdefault(samples, []).append((outcome.probabilities[0], len(offers[samples]), outcome.post))
                increments.expiring.add(samples)
    for samples, candidates in offers.items():
        for score, _, post in heapq.nlargest(rules.sample_posts, candidates, key=lambda c: (c[0], -c[1])):
            increments.add_sample(samples, sample_member(post), score)
    increments.keep_samples = rules.sample_posts
    return increments


def _outcomes():
    from hypothesis import strategies as st

    probabilities = st.lists(st.floats(0.01, 1.0), min_size=3, max_size=3).map(
        lambda w: tuple(x / sum(w) for x in w))
    post = st.builds(
        lambda i, ts, topic, region, p: ScoredPost(Post(f"p{i}", f"text {i}", ts, topic, region), ts, p),
        st.integers(0, 10**6), st.floats(NOW - 200, NOW + 30), st.sampled_from([None, "airline", "phone", ""]),
        st.sampled_from([None, "eu", "us"]), probabilities)
    rejection = st.sampled_from(list(RejectReason)).map(lambda reason: Rejection(reason, "why"))
    return st.lists(st.one_of(post, post, post, rejection), max_size=60)


def test_increments_equal_the_post_by_post_definition():
    import json

    from hypothesis import given, settings
    from hypothesis import strategies as st

    @settings(max_examples=200, deadline=None)
    @given(_outcomes(), st.sampled_from([0, 1, 3]), st.sampled_from([("global", "topic", "region"), ("topic",)]))
    def check(outcomes, samples, dimensions):
        rules = BucketRules(10, 60, dimensions, samples)
        fast, reference = increments_for(outcomes, NOW, rules, KEYS), _reference_increments(outcomes, NOW, rules, KEYS)
        assert json.loads(fast.to_json()) == json.loads(reference.to_json())

    check()
