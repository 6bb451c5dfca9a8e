from __future__ import annotations

import asyncio
import itertools
import json

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
    ranged = increments_for(outcomes, None, RULES, KEYS)
    increments = ranged.increments
    start = RULES.start_of(NOW - 5)
    assert ranged.stream_time == NOW - 3  # the highest event time of the range
    assert increments.counts[KEYS.totals] == {"scored": 2, "negative": 1, "neutral": 1, "dead_lettered": 3}
    assert increments.counts[KEYS.dead_letters] == {"not_json": 2, "empty_text": 1}
    assert increments.counts[KEYS.bucket("global", "all", start)] == {
        "posts": 2, "negative": 1, "neutral": 1, "on_time_posts": 2, "on_time_negative": 1}
    assert increments.counts[KEYS.bucket("topic", "airline", start)]["posts"] == 2
    assert increments.counts[KEYS.bucket("region", "eu", start)] == {
        "posts": 1, "negative": 1, "on_time_posts": 1, "on_time_negative": 1}
    assert round(increments.sums[KEYS.bucket("global", "all", start)]["p_negative_sum"], 6) == 1.1
    assert KEYS.bucket("global", "all", start) in increments.expiring


def test_lateness_is_judged_against_the_partitions_stream_time_not_the_wall_clock():
    # The stream time before the range is NOW: nothing here looks at a clock.
    within = scored("a", NOW - 65, 0.9)  # bucket ended 55-65 s before the stream time: inside 60 s
    beyond = scored("b", NOW - 200, 0.9)
    jump = scored("c", NOW + 3600, 0.9)  # the stream time moves to NOW + 3600 here...
    now_late = scored("d", NOW - 1, 0.9)  # ...so this one, fine before the jump, is late after it
    ranged = increments_for([within, beyond, jump, now_late], NOW, RULES, KEYS)
    increments = ranged.increments
    assert ranged.stream_time == NOW + 3600
    assert increments.counts[KEYS.totals]["late"] == 2
    assert increments.counts[KEYS.bucket("global", "all", RULES.start_of(NOW - 65))]["posts"] == 1
    assert increments.counts[KEYS.bucket("global", "all", RULES.start_of(NOW + 3600))]["posts"] == 1
    assert KEYS.bucket("global", "all", RULES.start_of(NOW - 200)) not in increments.counts
    assert KEYS.bucket("global", "all", RULES.start_of(NOW - 1)) not in increments.counts


def test_posts_behind_the_watermark_count_in_their_bucket_but_not_in_alerts():
    rules = BucketRules(bucket_seconds=10, allowed_lateness=60, sample_posts=2, max_out_of_orderness=3)
    bucket = RULES.start_of(NOW)  # NOW is a bucket boundary: this bucket ends at NOW + 10
    on_time = scored("a", bucket + 1, 0.9)
    lead = scored("b", bucket + 12.5, 0.1)  # stream time bucket + 12.5: the watermark is bucket + 9.5 < its end
    still_on_time = scored("c", bucket + 2, 0.9)
    ahead = scored("d", bucket + 13.5, 0.1)  # watermark bucket + 10.5: the first bucket is closed for alerts
    behind = scored("e", bucket + 3, 0.95)  # counts in its bucket (inside the lateness), not in alerts
    increments = increments_for([on_time, lead, still_on_time, ahead, behind], None, rules, KEYS).increments
    key = KEYS.bucket("global", "all", bucket)
    assert increments.counts[key] == {"posts": 3, "negative": 3, "on_time_posts": 2, "on_time_negative": 2}
    assert round(increments.sums[key]["on_time_p_negative_sum"], 6) == 1.8
    samples = increments.samples[KEYS.samples("global", "all", bucket)]
    assert sorted(json.loads(member)["id"] for member in samples) == ["a", "c"]  # not the more negative "e"


def test_a_range_split_anywhere_gives_the_same_redis_state(redis_factory):
    """Where ranges start and end depends on timing; what they add must not."""
    rules = BucketRules(bucket_seconds=10, allowed_lateness=30, sample_posts=2, max_out_of_orderness=3)
    posts = [scored(f"p{i}", NOW + (i * 7919 % 97) - (i % 5) * 20, (i * 37 % 100) / 100,
                    topic=("x", "y", None)[i % 3]) for i in range(120)]

    async def state_after(splits: list[int]) -> dict:
        client = redis_factory(async_client=True)
        prefix = f"split{len(splits)}"
        keys = RedisKeys(prefix)
        sink = RedisSink(client, prefix=prefix, topic="posts", ttl_seconds=3600)
        stream_time, bounds = None, [0, *splits, len(posts)]
        for first, nxt in itertools.pairwise(bounds):
            ranged = increments_for(posts[first:nxt], stream_time, rules, keys)
            assert (await sink.apply(0, first, nxt, ranged.increments, ranged.stream_time)).outcome.value == "applied"
            stream_time = ranged.stream_time
        state = {}
        for key in sorted(await client.keys(f"{prefix}:*")):
            kind = await client.type(key)
            short = key.removeprefix(prefix)
            if kind == "hash":
                state[short] = {f: round(float(v), 6) for f, v in (await client.hgetall(key)).items()}
            elif kind == "zset":
                state[short] = await client.zrange(key, 0, -1, withscores=True)
            elif kind == "set":
                state[short] = sorted(await client.smembers(key))
            else:
                state[short] = await client.get(key)
        await client.aclose()
        return state

    whole = asyncio.run(state_after([]))
    assert asyncio.run(state_after([1, 50, 51, 119])) == whole
    assert asyncio.run(state_after(list(range(1, 120)))) == whole


def test_increments_apply_through_the_fence(redis_factory):
    async def scenario():
        client = redis_factory(async_client=True)
        sink = RedisSink(client, prefix="t", topic="posts", ttl_seconds=3600)
        ranged = increments_for([scored("a", NOW - 1, 0.8, topic="x")], NOW, RULES, KEYS)
        await sink.apply(0, 0, 1, ranged.increments, ranged.stream_time)
        values = await client.hgetall(KEYS.bucket("topic", "x", RULES.start_of(NOW - 1)))
        stream_time = await client.hget(KEYS.stream_times("posts"), "0")
        await client.aclose()
        return values, stream_time

    values, stream_time = asyncio.run(scenario())
    assert values["posts"] == "1" and values["negative"] == "1"
    assert abs(float(values["p_negative_sum"]) - 0.8) < 1e-9
    assert float(stream_time) == NOW  # the range's only post is older: the stream time stays


def _reference_increments(outcomes, stream_time, rules, keys):
    """The definition, key by key and post by post (what ``increments_for`` computes faster)."""

    from stream_sentiment.aggregation.buckets import ENGINE_FIELD, dimension_values, sample_member
    from stream_sentiment.sinks.redis_sink import Increments

    increments, offers = Increments(), {}
    for outcome in outcomes:
        if isinstance(outcome, Rejection):
            increments.add(keys.totals, "dead_lettered")
            increments.add(keys.dead_letters, outcome.reason.value)
            continue
        increments.add(keys.totals, "scored")
        increments.add(keys.totals, outcome.label)
        event_time = outcome.event_time
        stream_time = event_time if stream_time is None else max(stream_time, event_time)
        start = rules.start_of(event_time)
        if rules.is_late(start, stream_time):
            increments.add(keys.totals, "late")
            continue
        on_time = rules.is_on_time(start, stream_time)
        if on_time:
            increments.lowest[keys.first_bucket] = min(start, increments.lowest.get(keys.first_bucket, start))
        for dimension, value in dimension_values(outcome.post, rules.dimensions):
            key = keys.bucket(dimension, value, start)
            increments.add(key, "posts")
            increments.add(key, outcome.label)
            increments.add_float(key, "p_negative_sum", outcome.probabilities[0])
            increments.expiring.add(key)
            increments.add_member(keys.dimension_values(start), f"{dimension}:{value}")
            increments.expiring.add(keys.dimension_values(start))
            if not on_time:
                continue
            increments.add(key, "on_time_posts")
            if outcome.label == "negative":
                increments.add(key, "on_time_negative")
            increments.add_float(key, "on_time_p_negative_sum", outcome.probabilities[0])
            if outcome.engine:
                increments.add(key, ENGINE_FIELD + outcome.engine)
            if rules.sample_posts and outcome.label == "negative":
                samples = keys.samples(dimension, value, start)
                offers.setdefault(samples, []).append((outcome.probabilities[0], len(offers[samples]), outcome.post))
                increments.expiring.add(samples)
    for samples, candidates in offers.items():
        ranked = sorted(((score, sample_member(post)) for score, _, post in candidates), reverse=True)
        for score, member in ranked[: rules.sample_posts]:
            increments.add_sample(samples, member, score)
    increments.keep_samples = rules.sample_posts
    return increments, stream_time


def _outcomes():
    from hypothesis import strategies as st

    probabilities = st.lists(st.floats(0.01, 1.0), min_size=3, max_size=3).map(
        lambda w: tuple(x / sum(w) for x in w))
    # Engines as routing records them (one per route), or none: posts of several engines share buckets.
    post = st.builds(
        lambda i, ts, topic, region, p, engine: ScoredPost(Post(f"p{i}", f"text {i}", ts, topic, region), ts, p,
                                                           engine=engine),
        st.integers(0, 10**6), st.floats(NOW - 200, NOW + 30), st.sampled_from([None, "airline", "phone", ""]),
        st.sampled_from([None, "eu", "us"]), probabilities,
        st.sampled_from(["", "minilm-sentiment", "multilingual-sentiment"]))
    rejection = st.sampled_from(list(RejectReason)).map(lambda reason: Rejection(reason, "why"))
    return st.lists(st.one_of(post, post, post, rejection), max_size=60)


def test_increments_equal_the_post_by_post_definition():
    import json

    from hypothesis import given, settings
    from hypothesis import strategies as st

    @settings(max_examples=200, deadline=None)
    @given(_outcomes(), st.sampled_from([0, 1, 3]), st.sampled_from([("global", "topic", "region"), ("topic",)]),
           st.sampled_from([None, NOW - 100, NOW]), st.sampled_from([0.0, 3.0, 15.0]))
    def check(outcomes, samples, dimensions, stream_time, out_of_orderness):
        rules = BucketRules(10, 60, dimensions, samples, out_of_orderness)
        fast = increments_for(outcomes, stream_time, rules, KEYS)
        reference, reference_time = _reference_increments(outcomes, stream_time, rules, KEYS)
        assert json.loads(fast.increments.to_json()) == json.loads(reference.to_json())
        assert fast.stream_time == reference_time

    check()


def test_a_sample_member_is_the_json_it_always_was():
    """Members already in Redis must stay the same: sample_member writes exactly json.dumps's text."""
    from hypothesis import given, settings
    from hypothesis import strategies as st

    from stream_sentiment.aggregation.buckets import SAMPLE_TEXT_CHARS, sample_member

    @settings(max_examples=200, deadline=None)
    @given(st.text(max_size=20), st.text(max_size=300) | st.text(st.characters(codec="utf-8"), max_size=300),
           st.sampled_from(["", "zh", "en"]))
    def check(post_id, text, lang):
        member = {"id": post_id, "text": text[:SAMPLE_TEXT_CHARS]} | ({"lang": lang} if lang else {})
        assert sample_member(Post(post_id, text, lang=lang)) == json.dumps(member, ensure_ascii=False)

    check()
