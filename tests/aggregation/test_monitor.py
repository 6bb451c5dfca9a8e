"""Alerts judged in event time from Redis buckets, against the suite's valkey-server."""

from __future__ import annotations

import asyncio
import json

from stream_sentiment.aggregation.alerts import AlertRules
from stream_sentiment.aggregation.buckets import BucketRules, RedisKeys, ScoredPost, increments_for
from stream_sentiment.aggregation.monitor import AlertMonitor
from stream_sentiment.sinks.redis_sink import RedisSink
from stream_sentiment.source.messages import Post

KEYS = RedisKeys("m")
# No out-of-orderness: a window is judged as soon as a partition's stream time reaches its end.
BUCKETS = BucketRules(bucket_seconds=1, allowed_lateness=3600, dimensions=("global", "topic"), max_out_of_orderness=0)
RULES = AlertRules(ratio_threshold=0.95, min_posts=10, surge_z=3.0, ewma_alpha=0.2, cooldown_seconds=5,
                   warmup_windows=3)
T0 = 1_700_000_000


def _posts(second: int, total: int, negative: int) -> list[ScoredPost]:
    return [
        ScoredPost(Post(f"{second}-{i}", "t", None, "airline"), second + 0.5,
                   (0.9, 0.05, 0.05) if i < negative else (0.05, 0.05, 0.9))
        for i in range(total)
    ]


async def _apply_range(sink, posts, offset, stream_time, buckets, keys, partition=0):
    """Apply ``posts`` as the range starting at ``offset``; returns the next offset and the stream time."""
    ranged = increments_for(posts, stream_time, buckets, keys)
    await sink.apply(partition, offset, offset + len(posts), ranged.increments, ranged.stream_time)
    return offset + len(posts), ranged.stream_time


async def _apply_seconds(sink, seconds, *, partition=0, start=0, offset=0, stream_time=None, keys=KEYS,
                         buckets=BUCKETS):
    """Apply one range per second of (total, negative) posts; yields after each, like a worker's applier."""
    for index, (total, negative) in enumerate(seconds, start=start):
        offset, stream_time = await _apply_range(sink, _posts(T0 + index, total, negative), offset, stream_time,
                                                 buckets, keys, partition)
        yield index


async def _scenario(redis_factory, seconds: list[tuple[int, int]], windows=(2,)):
    client = redis_factory(async_client=True)
    sink = RedisSink(client, "m", "posts", ttl_seconds=3600)
    monitor = AlertMonitor(client, KEYS, BUCKETS, windows=windows, rules=RULES, engine_version="v1")
    other_worker = AlertMonitor(client, KEYS, BUCKETS, windows=windows, rules=RULES, engine_version="v1")
    fired = []
    async for second in _apply_seconds(sink, seconds):
        fired.extend((second, alert) for alert in await monitor.judge_due(partitions=1))
    again = [*await monitor.judge_due(partitions=1), *await other_worker.judge_due(partitions=1)]
    stream = await client.xrange(KEYS.alerts)
    await client.aclose()
    return fired, again, stream


def test_a_surge_raises_one_alert_within_two_windows_not_a_storm(redis_factory):
    steady = [(20, 4 + s % 2) for s in range(12)]
    surge = [(20, 15)] * 6
    fired, again, stream = asyncio.run(_scenario(redis_factory, steady + surge))
    surges = [(second, a) for second, a in fired if a.rule == "surge"]
    # One alert per (dimension, value) for the whole six-second incident, not one per window.
    assert sorted((a.stats.dimension, a.stats.value) for _, a in surges) == [("global", "all"), ("topic", "airline")]
    for second, alert in surges:
        assert T0 + 12 < alert.at <= T0 + 12 + 2 * 2  # the surge starts in second 12; windows are 2 s
        assert second == alert.at - T0  # judged as soon as the stream reached the window's end
        assert alert.stats.negative_ratio >= 0.5 and alert.z >= 3.0
    assert all(a.rule == "surge" for _, a in fired)
    assert again == []  # every window end is judged once, whoever looks again
    assert [entry[1]["rule"] for entry in stream] == ["surge", "surge"]
    assert stream[0][1]["engine_version"] == "v1"
    assert {entry[1]["at"] for entry in stream} == {f"{surges[0][1].at:.3f}"}  # event time, not the wall clock


def test_a_quiet_partition_holds_back_judgement_until_it_is_marked_idle(redis_factory):
    async def scenario():
        client = redis_factory(async_client=True)
        sink = RedisSink(client, "m", "posts", ttl_seconds=3600)
        monitor = AlertMonitor(client, KEYS, BUCKETS, windows=(2,), rules=RULES, engine_version="v1")
        async for _ in _apply_seconds(sink, [(10, 10)] * 3, partition=0):
            pass
        waiting = await monitor.judge_due(partitions=2)  # partition 1 has applied nothing and is not idle
        await sink.mark_idle([1])
        judged = await monitor.judge_due(partitions=2)
        await client.aclose()
        return waiting, judged

    waiting, judged = asyncio.run(scenario())
    assert waiting == []
    assert [a.rule for a in judged] == ["ratio", "ratio"]  # global/all and topic/airline, window ending at 2
    assert {(a.stats.dimension, a.stats.value) for a in judged} == {("global", "all"), ("topic", "airline")}


def test_the_slowest_partition_decides_when_a_window_is_judged(redis_factory):
    # Second 0 is quiet on both partitions, every later second all negative.
    async def scenario():
        client = redis_factory(async_client=True)
        sink = RedisSink(client, "m", "posts", ttl_seconds=3600)
        monitor = AlertMonitor(client, KEYS, BUCKETS, windows=(2,), rules=RULES, engine_version="v1")
        async for _ in _apply_seconds(sink, [(10, 0)] + [(10, 10)] * 5, partition=0):
            pass
        async for _ in _apply_seconds(sink, [(10, 0), (10, 10)], partition=1):
            pass
        behind = await monitor.judge_due(partitions=2)  # partition 1's stream time is T0 + 1.5
        judged_behind = int(await client.get(KEYS.alerts_judged))
        async for _ in _apply_seconds(sink, [(10, 10)] * 4, partition=1, start=2, offset=20, stream_time=T0 + 1.5):
            pass
        caught_up = await monitor.judge_due(partitions=2)
        await client.aclose()
        return behind, judged_behind, caught_up

    behind, judged_behind, caught_up = asyncio.run(scenario())
    # Only the end at T0 + 1 is judged (quiet); the one at T0 + 2 needs partition 1 past it.
    assert (behind, judged_behind) == ([], T0 + 1)
    # Then the windows ending at 2..5 are judged in order, on both partitions' posts (40 per window):
    # the first all-negative one alerts, the cooldown holds the rest back.
    assert [(a.at - T0, a.stats.posts) for a in caught_up] == [(3, 40), (3, 40)]


def test_windows_reaching_back_before_the_first_data_are_judged_by_their_share_only(redis_factory):
    # Data starts at second 0. A 4 s window ending at second 1 holds one second of posts: all negative,
    # so its share raises a ratio alert at once (the cooldown holds the next ones back) ...
    fired, _, _ = asyncio.run(_scenario(redis_factory, [(10, 10)] * 5, windows=(4,)))
    assert [(alert.rule, alert.stats.dimension, alert.at - T0, alert.stats.posts) for _, alert in fired] == [
        ("ratio", "global", 1, 10), ("ratio", "topic", 1, 10)]

    # ... but a partial window's count is short: no surge alert, and the baseline learns nothing from it.
    async def baselines_after(seconds):
        client = redis_factory(async_client=True)
        sink = RedisSink(client, "p", "posts", ttl_seconds=3600)
        keys = RedisKeys("p")
        monitor = AlertMonitor(client, keys, BUCKETS, windows=(4,), rules=RULES, engine_version="v1")
        async for _ in _apply_seconds(sink, seconds, keys=keys):
            await monitor.judge_due(partitions=1)
        baselines = {k: json.loads(v)["windows"] for k, v in (await client.hgetall(keys.alert_baselines)).items()}
        await client.aclose()
        return baselines

    # Quiet posts for seconds 0..5: ends 1, 2 and 3 are partial; only ends 4 and 5 teach the baseline.
    assert asyncio.run(baselines_after([(10, 1)] * 6)) == {"4|global|all": 2, "4|topic|airline": 2}


def test_an_alert_quotes_the_windows_most_negative_posts(redis_factory):
    rules = BucketRules(bucket_seconds=1, allowed_lateness=3600, dimensions=("global", "topic"), sample_posts=2,
                        max_out_of_orderness=0)

    async def scenario():
        client = redis_factory(async_client=True)
        sink = RedisSink(client, "q", "posts", ttl_seconds=3600)
        keys = RedisKeys("q")
        monitor = AlertMonitor(client, keys, rules, windows=(2,), rules=RULES, engine_version="v1", sample_posts=2)
        offset, stream_time = 0, None
        # Second 0 has too few posts to judge alone (min_posts 10): the first alert is the window of 0..1.
        for second, p_negative in enumerate([0.8, 0.99, 0.5]):
            count = 5 if second == 0 else 10
            posts = [ScoredPost(Post(f"s{second}-{i}", f"awful {second}-{i}", None, "airline"), T0 + second + 0.5,
                                (p_negative - i / 100, 0.0, 1 - p_negative + i / 100)) for i in range(count)]
            offset, stream_time = await _apply_range(sink, posts, offset, stream_time, rules, keys)
        # the samples set of a bucket keeps only the best two of its ten negative posts
        assert await client.zcard(keys.samples("topic", "airline", T0)) == 2
        await monitor.judge_due(partitions=1)
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


def test_an_alert_names_the_engines_that_scored_its_window_not_the_judges(redis_factory):
    """With language routing, Chinese posts are scored by the multilingual engine and English ones by MiniLM,
    in the same buckets and ranges. Each alert names the engines its window's on-time posts were scored by
    (counted in the buckets, so whichever worker judges says the same), not the judging worker's own engine."""
    # Buckets count posts per model (a function of the log); the alert names each model's version served now.
    zh_model, en_model = "multilingual-sentiment", "minilm-sentiment"
    zh, en = "multilingual-sentiment/v2", "minilm-sentiment/v1"
    rules = BucketRules(bucket_seconds=1, allowed_lateness=3600, dimensions=("global", "topic", "lang"),
                        max_out_of_orderness=0)

    async def scenario():
        client = redis_factory(async_client=True)
        keys = RedisKeys("e")
        sink = RedisSink(client, "e", "posts", ttl_seconds=3600)
        monitor = AlertMonitor(client, keys, rules, windows=(2,), rules=RULES, engine_version=en)
        monitor.engine_names = lambda: {zh_model: zh, en_model: en}
        offset, stream_time = 0, None
        for second in range(3):
            # Interleaved as a fetch split by route comes back: 10 Chinese posts (topic airline), 5 English (bank),
            # all negative, so every value's share passes the 0.95 threshold once it has 10 posts (min_posts).
            posts = [ScoredPost(Post(f"{second}-{i}", "航班又取消了" if i % 3 else "awful", None,
                                     "airline" if i % 3 else "bank", None, "zh" if i % 3 else "en"),
                                T0 + second + 0.5, (0.9, 0.05, 0.05), engine=zh_model if i % 3 else en_model)
                     for i in range(15)]
            offset, stream_time = await _apply_range(sink, posts, offset, stream_time, rules, keys)
        await monitor.judge_due(partitions=1)
        stream = await client.xrange(keys.alerts)
        await client.aclose()
        return stream

    named = {(f["dimension"], f["value"]): (f["engine_version"], json.loads(f["engines"]))
             for _, f in asyncio.run(scenario())}
    # The first window (second 0) alerts for the Chinese values, the next for the English ones (10 posts by then);
    # one alert per value (cooldown).
    assert named[("lang", "zh")] == (zh, {zh: 10}) and named[("topic", "airline")] == (zh, {zh: 10})
    assert named[("lang", "en")] == (en, {en: 10}) and named[("topic", "bank")] == (en, {en: 10})
    # Both engines scored the global window's posts: most first, with their counts.
    assert named[("global", "all")] == (f"{zh}, {en}", {zh: 10, en: 5})


def test_an_alert_quotes_each_text_once(redis_factory):
    """A surge of copies (the same complaint posted again and again) is quoted once, then the next texts."""
    rules = BucketRules(bucket_seconds=1, allowed_lateness=3600, dimensions=("topic",), sample_posts=3,
                        max_out_of_orderness=0)

    async def scenario():
        client = redis_factory(async_client=True)
        keys = RedisKeys("d")
        sink = RedisSink(client, "d", "posts", ttl_seconds=3600)
        monitor = AlertMonitor(client, keys, rules, windows=(2,), rules=RULES, engine_version="v1", sample_posts=3)
        offset, stream_time = 0, None
        for second in range(3):
            # Per second: the same text twice at the top, then others; a bucket keeps its best three posts.
            texts = ["航班又取消了"] * 2 + [f"other {second}-{i}" for i in range(2)] + ["fine"] * 8
            posts = [ScoredPost(Post(f"{second}-{i}", text, None, "airline"), T0 + second + 0.5,
                                (0.99 - i / 100, 0.0, 0.01 + i / 100)) for i, text in enumerate(texts)]
            offset, stream_time = await _apply_range(sink, posts, offset, stream_time, rules, keys)
        await monitor.judge_due(partitions=1)
        stream = await client.xrange(keys.alerts)
        await client.aclose()
        return stream

    stream = asyncio.run(scenario())
    quoted = [[s["text"] for s in json.loads(fields["samples"])] for _, fields in stream]
    # The first window (second 0 only: 12 posts) and, after the cooldown, none; each bucket's copies quoted once.
    assert quoted == [["航班又取消了", "other 0-0"]], quoted
