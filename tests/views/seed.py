"""Real Redis data for the analysts' views, written by the service's own fenced sink."""

from __future__ import annotations

import json
from typing import Any

from stream_sentiment.aggregation.buckets import BucketRules, RedisKeys, ScoredPost, increments_for
from stream_sentiment.sinks.redis_sink import RedisSink
from stream_sentiment.source.messages import Post

NEGATIVE = (0.9, 0.05, 0.05)
POSITIVE = (0.05, 0.05, 0.9)


async def write_posts(client: Any, prefix: str, rules: BucketRules, at: float,
                      counts: dict[str, tuple[int, int]], *, offset: int = 0, region: str | None = None) -> int:
    """Score ``counts`` = {topic: (posts, negative)} at event time ``at`` through the sink; returns the next offset."""
    keys = RedisKeys(prefix)
    sink = RedisSink(client, prefix, "posts", ttl_seconds=3600)
    scored = []
    for topic, (posts, negative) in counts.items():
        for i in range(posts):
            text = f"{topic} post {i}: " + ("this is awful, cancelled again" if i < negative else "lovely trip")
            scored.append(ScoredPost(Post(f"{topic}-{at}-{i}", text, at, topic, region), at,
                                     NEGATIVE if i < negative else POSITIVE))
    # Each call is judged on its own (no earlier stream time), so a view's history can be seeded in any order.
    ranged = increments_for(scored, None, rules, keys)
    await sink.apply(0, offset, offset + len(scored), ranged.increments, ranged.stream_time)
    return offset + len(scored)


def alert_record(dimension: str, value: str, at: float, *, posts: int = 40, negative: int = 30,
                 window: int = 60, samples: list[dict[str, Any]] | None = None) -> dict[str, str]:
    """An alert entry with the fields the alert monitor writes (see docs/redis-schema.md)."""
    end = int(at)
    return {
        "rule": "ratio", "dimension": dimension, "value": value, "window_seconds": str(window),
        "window_start": str(end - window), "window_end": str(end), "posts": str(posts), "negative": str(negative),
        "negative_ratio": f"{negative / posts:.4f}", "mean_p_negative": "0.7100", "baseline_negative": "4.20",
        "z": "5.10", "engine_version": "v1", "at": f"{at:.3f}",
        "samples": json.dumps(samples if samples is not None else [
            {"id": "s1", "text": "flight cancelled again, awful", "p_negative": 0.97},
            {"id": "s2", "text": "three hours on the tarmac", "p_negative": 0.95}]),
    }
