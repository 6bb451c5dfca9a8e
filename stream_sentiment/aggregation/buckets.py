"""Event-time buckets: what one offset range adds to Redis.

Each scored post adds to one bucket per configured dimension (``global``,
``topic``, ``region``): label counts, a post count and the sum of P(negative),
in the ``bucket_seconds``-wide bucket of its event time. Rolling windows
(1 / 5 / 15 min) are read as sums of buckets, so a bucket is the only thing
written. A post whose bucket closed more than ``allowed_lateness`` ago is
counted as late instead (its window has been reported); a post stamped in the
future (clock skew) counts as now. Dead-lettered records add to per-reason
counters. The most negative posts of each bucket and dimension value are
kept as samples (a small sorted set), so an alert can show what people said.
All of it goes into one :class:`Increments`, applied with the partition's
offset range in one atomic call.
"""

from __future__ import annotations

import heapq
import json
import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

from stream_sentiment.modeling.corpora import LABELS
from stream_sentiment.sinks.redis_sink import Increments
from stream_sentiment.source.messages import Post, Rejection


@dataclass(frozen=True)
class RedisKeys:
    """Every Redis key the service writes, in one place (documented in docs/redis-schema.md)."""

    prefix: str

    @property
    def totals(self) -> str:
        return f"{self.prefix}:totals"

    @property
    def dead_letters(self) -> str:
        return f"{self.prefix}:dead_lettered"

    def bucket(self, dimension: str, value: str, start: int) -> str:
        return f"{self.prefix}:agg:{dimension}:{value}:{start}"

    def offsets(self, topic: str) -> str:
        return f"{self.prefix}:offsets:{topic}"

    @property
    def first_bucket(self) -> str:
        """Start of the earliest bucket ever written: windows reaching before it are incomplete."""
        return f"{self.prefix}:first-bucket"

    def samples(self, dimension: str, value: str, start: int) -> str:
        """Sorted set of the bucket's most negative posts (JSON ``{"id", "text"}``, score P(negative))."""
        return f"{self.prefix}:samples:{dimension}:{value}:{start}"

    def dimension_values(self, start: int) -> str:
        """Set of ``dimension:value`` members that have a bucket starting at ``start``."""
        return f"{self.prefix}:dims:{start}"

    @property
    def alerts(self) -> str:
        return f"{self.prefix}:alerts"

    def alerts_evaluated(self, window_end: int) -> str:
        return f"{self.prefix}:alerts:evaluated:{window_end}"

    @property
    def alert_baselines(self) -> str:
        return f"{self.prefix}:alerts:baselines"

    @property
    def alert_last_active(self) -> str:
        return f"{self.prefix}:alerts:last-active"


@dataclass(frozen=True)
class ScoredPost:
    post: Post
    event_time: float
    probabilities: tuple[float, float, float]
    # When Kafka appended the record (its timestamp): the start of the end-to-end latency.
    appended_at: float | None = None

    # The most probable label, set once: it is read for the totals, every dimension's bucket and
    # the metrics of each post (a property recomputed it each time; cached_property takes a lock on 3.11).
    label: str = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "label", LABELS[max(range(3), key=self.probabilities.__getitem__)])


@dataclass(frozen=True)
class BucketRules:
    bucket_seconds: int = 10
    allowed_lateness: int = 60
    dimensions: Sequence[str] = ("global", "topic", "region")
    # Most negative posts kept per bucket and dimension value, for alerts to quote; 0 keeps none.
    sample_posts: int = 0

    def start_of(self, event_time: float) -> int:
        return math.floor(event_time / self.bucket_seconds) * self.bucket_seconds

    def is_late(self, event_time: float, now: float) -> bool:
        return self.start_of(event_time) + self.bucket_seconds + self.allowed_lateness < now


def dimension_values(post: Post, dimensions: Iterable[str]) -> list[tuple[str, str]]:
    """(dimension, value) pairs a post counts under; a post without a topic/region skips that one."""
    pairs = []
    for dimension in dimensions:
        value = "all" if dimension == "global" else getattr(post, dimension)
        if value:
            pairs.append((dimension, value))
    return pairs


def increments_for(
    outcomes: Iterable[ScoredPost | Rejection], now: float, rules: BucketRules, keys: RedisKeys
) -> Increments:
    """What a range of outcomes adds to Redis: totals, per-bucket counts by dimension value, samples.

    Counts are summed per (dimension, value, bucket) in plain lists first and turned into keys
    once per group: this runs on the event loop for every post, and building key strings and
    nested dict entries per post and dimension was the largest cost of the worker's hot path.
    """
    totals: dict[str, int] = {}
    rejected: dict[str, int] = {}
    # (dimension, value, bucket start) -> [posts, negative, neutral, positive, sum of P(negative)]
    groups: dict[tuple[str, str, int], list[float]] = {}
    # The best candidates per sample set, serialized only once the few that are kept are known:
    # JSON-encoding every negative post for every dimension was the most expensive part of a range.
    offers: dict[tuple[str, str, int], list[tuple[float, int, Post]]] = {}
    first: int | None = None
    dimensions = rules.dimensions
    keep_samples = rules.sample_posts
    for outcome in outcomes:
        if isinstance(outcome, Rejection):
            totals["dead_lettered"] = totals.get("dead_lettered", 0) + 1
            reason = outcome.reason.value
            rejected[reason] = rejected.get(reason, 0) + 1
            continue
        label = outcome.label
        totals["scored"] = totals.get("scored", 0) + 1
        totals[label] = totals.get(label, 0) + 1
        event_time = min(outcome.event_time, now)
        if rules.is_late(event_time, now):
            totals["late"] = totals.get("late", 0) + 1
            continue
        start = rules.start_of(event_time)
        first = start if first is None else min(first, start)
        column = _LABEL_COLUMN[label]
        p_negative = outcome.probabilities[0]
        for dimension, value in dimension_values(outcome.post, dimensions):
            group_key = (dimension, value, start)
            counts = groups.get(group_key)
            if counts is None:
                counts = groups[group_key] = [0, 0, 0, 0, 0.0]
            counts[0] += 1
            counts[column] += 1
            counts[4] += p_negative
            if keep_samples and column == 1:
                candidates = offers.setdefault(group_key, [])
                candidates.append((p_negative, len(candidates), outcome.post))
    increments = Increments()
    if totals:
        increments.counts[keys.totals] = totals
    if rejected:
        increments.counts[keys.dead_letters] = rejected
    if first is not None:
        increments.first[keys.first_bucket] = first
    for (dimension, value, start), (posts, negative, neutral, positive, p_sum) in groups.items():
        key = keys.bucket(dimension, value, start)
        fields = {"posts": int(posts)}
        for name, count in (("negative", negative), ("neutral", neutral), ("positive", positive)):
            if count:
                fields[name] = int(count)
        increments.counts[key] = fields
        increments.sums[key] = {"p_negative_sum": p_sum}
        members = keys.dimension_values(start)
        increments.add_member(members, f"{dimension}:{value}")
        increments.expiring.update((key, members))
    for (dimension, value, start), candidates in offers.items():
        samples = keys.samples(dimension, value, start)
        increments.expiring.add(samples)
        # The index breaks ties in arrival order and keeps posts from being compared.
        for score, _, post in heapq.nlargest(keep_samples, candidates, key=lambda c: (c[0], -c[1])):
            increments.add_sample(samples, sample_member(post), score)
    increments.keep_samples = keep_samples
    return increments


# Columns of a group's counts; labels are the model's (negative, neutral, positive).
_LABEL_COLUMN = {label: column for column, label in enumerate(LABELS, start=1)}


# Long posts are cut in samples: an alert quotes them, it does not archive them.
SAMPLE_TEXT_CHARS = 280


def sample_member(post: Post) -> str:
    """The sorted-set member that stands for ``post`` in a sample set."""
    return json.dumps({"id": post.id, "text": post.text[:SAMPLE_TEXT_CHARS]}, ensure_ascii=False)
