"""Event-time buckets: what one offset range adds to Redis, as a function of the log alone.

Each scored post adds to one bucket per configured dimension (``global``,
``topic``, ``region``, ``lang``): label counts, a post count and the sum of P(negative),
in the ``bucket_seconds``-wide bucket of its event time; an on-time post also counts
under the engine that scored it (``ENGINE_FIELD``), so an alert can name the engines
behind its window even when language routing sends its posts to several. Rolling windows
(1 / 5 / 15 min) are read as sums of buckets, so a bucket is the only thing
written. Dead-lettered records add to per-reason counters.

Time is the partition's *stream time*: the highest event time applied so far in
that partition, in offset order (Kafka Streams' term), stored in Redis with the
partition's offset mark. Never the wall clock, so replaying the same records --
after a crash, an outage, or a day later -- gives the same buckets. Per post,
with the stream time including that post:

* **late**: its bucket ended more than ``allowed_lateness`` before the stream
  time; it counts in the totals as ``late`` and in no bucket.
* **on time**: its bucket ends after the partition's *watermark*, the stream
  time less ``max_out_of_orderness``. Only on-time posts add to a bucket's
  ``on_time_*`` fields, its samples and the first-bucket marker: those are what
  alerts judge, and once every partition's watermark has passed a window's end
  they can no longer change (``aggregation.monitor``). A post between the two
  counts in its bucket (views, totals) but not in alerts.

The most negative on-time posts of each bucket and dimension value are kept as
samples (a small sorted set), so an alert can show what people said. All of it
goes into one :class:`Increments`, applied with the partition's offset range
and new stream time in one atomic call.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

from stream_sentiment.labels import LABELS
from stream_sentiment.sinks.keys import RedisKeys
from stream_sentiment.sinks.redis_sink import Increments
from stream_sentiment.source.messages import Post, Rejection


@dataclass(slots=True)
class ScoredPost:
    """A scored post, as the sink counts it. Immutable by convention, not frozen: one is made per post on
    the hot path (see ``Post``)."""

    post: Post
    event_time: float
    probabilities: tuple[float, float, float]
    # When Kafka appended the record (its timestamp): the start of the end-to-end latency.
    appended_at: float | None = None
    # When this worker fetched the record (wall clock): the start of the pipeline-internal latency.
    fetched_at: float | None = None
    # When the engine's answer for its batch reached the worker (wall clock): the start of its wait for the
    # partition's earlier offsets (results apply in offset order) and the Redis write. Metrics only.
    scored_at: float | None = None

    # The most probable label, set once: it is read for the totals, every dimension's bucket and
    # the metrics of each post. The worker passes it in, from one argmax over the whole batch; left
    # empty, it is computed here (ties go to the first label either way).
    label: str = field(default="", repr=False, compare=False)
    # The model (the route's engine) that scored it; each bucket counts its on-time posts per model, so an alert
    # names the engines that scored its window. The model, not the version: which version scored a post
    # depends on when a hot swap cut over, and buckets must be a function of the log. Empty: not recorded.
    engine: str = ""

    def __post_init__(self) -> None:
        if not self.label:
            self.label = LABELS[max(range(3), key=self.probabilities.__getitem__)]


@dataclass(frozen=True)
class BucketRules:
    bucket_seconds: int = 10
    allowed_lateness: int = 60
    dimensions: Sequence[str] = ("global", "topic", "region")
    # Most negative posts kept per bucket and dimension value, for alerts to quote; 0 keeps none.
    sample_posts: int = 0
    # How far behind a partition's stream time its watermark trails: posts this much out of order still
    # count in alerts.
    max_out_of_orderness: float = 3.0

    def start_of(self, event_time: float) -> int:
        return math.floor(event_time / self.bucket_seconds) * self.bucket_seconds

    def is_late(self, start: int, stream_time: float) -> bool:
        """Too late to count in the bucket starting at ``start``: it ended more than the allowed lateness
        before ``stream_time``."""
        return start + self.bucket_seconds + self.allowed_lateness < stream_time

    def is_on_time(self, start: int, stream_time: float) -> bool:
        """Still counts in alerts: the bucket starting at ``start`` ends after the partition's watermark."""
        return start + self.bucket_seconds > stream_time - self.max_out_of_orderness

    def watermark(self, stream_time: float) -> float:
        """The event time up to which a partition's on-time posts are all applied."""
        return stream_time - self.max_out_of_orderness


def dimension_values(post: Post, dimensions: Iterable[str]) -> list[tuple[str, str]]:
    """(dimension, value) pairs a post counts under; a post without a topic/region skips that one.

    The definition, kept as the reference: :func:`increments_for` inlines it in its per-post loop, and
    tests/aggregation/test_buckets.py's ``_reference_increments`` computes a range's increments post by
    post with this function, property-tested equal to ``increments_for``. Serving never calls it.
    """
    pairs = []
    for dimension in dimensions:
        value = "all" if dimension == "global" else getattr(post, dimension)
        if value:
            pairs.append((dimension, value))
    return pairs


@dataclass
class RangeIncrements:
    """What one offset range adds to Redis, and the partition's stream time after it."""

    increments: Increments
    stream_time: float | None


def increments_for(
    outcomes: Iterable[ScoredPost | Rejection], stream_time: float | None, rules: BucketRules, keys: RedisKeys
) -> RangeIncrements:
    """What a range of outcomes adds to Redis: totals, per-bucket counts by dimension value, samples.

    Args:
        outcomes: the range's records in offset order.
        stream_time: the partition's stream time before the range (None before its first post).

    Counts are summed per (dimension, value, bucket) in plain lists first and turned into keys
    once per group: this runs for every post, and building key strings and nested dict entries
    per post and dimension was the largest cost of the worker's hot path.
    """
    rejected: dict[str, int] = {}
    # (dimension, value, bucket start) ->
    #   [posts, negative, neutral, positive, sum of P(negative), on-time posts, on-time negative, on-time sum,
    #    the engine of the group's first post, {another engine: its on-time posts} or None]
    # The engine of the first post is counted by difference (on-time posts less the others'), so the common
    # case, every post of a bucket scored by one engine, costs one identity check per post and dimension.
    groups: dict[tuple[str, str, int], list[Any]] = {}
    # The best candidates per sample set, serialized only once the few that are kept are known:
    # JSON-encoding every negative post for every dimension was the most expensive part of a range.
    offers: dict[tuple[str, str, int], list[tuple[float, Post]]] = {}
    first: int | None = None
    keep_samples = rules.sample_posts
    # The rules' start_of / is_late / is_on_time, inlined (same expressions, so the same floats): this loop
    # runs once per post, and a method call per post and rule was a third of it.
    bucket_seconds = rules.bucket_seconds
    allowed_lateness = rules.allowed_lateness
    out_of_orderness = rules.max_out_of_orderness
    floor = math.floor
    # (dimension, the post's attribute holding its value; None: the global dimension, value "all"):
    # dimension_values inlined, and tested against it.
    dimensions = [(dimension, None if dimension == "global" else dimension) for dimension in rules.dimensions]
    label_counts = [0, 0, 0, 0]  # by label column (1-3); column 0 unused
    late = 0
    dead_lettered = 0
    for outcome in outcomes:
        if isinstance(outcome, Rejection):
            dead_lettered += 1
            reason = outcome.reason.value
            rejected[reason] = rejected.get(reason, 0) + 1
            continue
        column = _LABEL_COLUMN[outcome.label]
        label_counts[column] += 1
        event_time = outcome.event_time
        if stream_time is None or event_time > stream_time:
            stream_time = event_time
        start = floor(event_time / bucket_seconds) * bucket_seconds
        if start + bucket_seconds + allowed_lateness < stream_time:
            late += 1
            continue
        on_time = start + bucket_seconds > stream_time - out_of_orderness
        if on_time:
            first = start if first is None or start < first else first
        p_negative = outcome.probabilities[0]
        post = outcome.post
        engine = outcome.engine
        for dimension, attribute in dimensions:
            value = "all" if attribute is None else getattr(post, attribute)
            if not value:
                continue  # a post without a topic or region skips that dimension
            group_key = (dimension, value, start)
            counts = groups.get(group_key)
            if counts is None:
                counts = groups[group_key] = [0, 0, 0, 0, 0.0, 0, 0, 0.0, engine, None]
            counts[0] += 1
            counts[column] += 1
            counts[4] += p_negative
            if on_time:
                counts[5] += 1
                counts[6] += column == 1
                counts[7] += p_negative
                if engine is not counts[8] and engine != counts[8]:
                    others = counts[9]
                    if others is None:
                        others = counts[9] = {}
                    others[engine] = others.get(engine, 0) + 1
                if keep_samples and column == 1:
                    offers.setdefault(group_key, []).append((p_negative, post))
    totals: dict[str, int] = {}
    if dead_lettered:
        totals["dead_lettered"] = dead_lettered
    scored = label_counts[1] + label_counts[2] + label_counts[3]
    if scored:
        totals["scored"] = scored
    for label, column in _LABEL_COLUMN.items():
        if label_counts[column]:
            totals[label] = label_counts[column]
    if late:
        totals["late"] = late
    increments = Increments()
    if totals:
        increments.counts[keys.totals] = totals
    if rejected:
        increments.counts[keys.dead_letters] = rejected
    if first is not None:
        increments.lowest[keys.first_bucket] = first
    for (dimension, value, start), counts in groups.items():
        posts, negative, neutral, positive, p_sum, on_time_posts, on_time_negative, on_time_sum, first_engine, others \
            = counts
        key = keys.bucket(dimension, value, start)
        fields = {"posts": int(posts)}
        for name, count in (("negative", negative), ("neutral", neutral), ("positive", positive),
                            ("on_time_posts", on_time_posts), ("on_time_negative", on_time_negative)):
            if count:
                fields[name] = int(count)
        if on_time_posts:
            by_engine = dict(others) if others else {}
            by_engine[first_engine] = int(on_time_posts) - sum(by_engine.values())
            for engine_name, count in by_engine.items():
                if engine_name and count:
                    fields[ENGINE_FIELD + engine_name] = count
        increments.counts[key] = fields
        increments.sums[key] = {"p_negative_sum": p_sum}
        if on_time_posts:
            increments.sums[key]["on_time_p_negative_sum"] = on_time_sum
        members = keys.dimension_values(start)
        increments.add_member(members, f"{dimension}:{value}")
        increments.expiring.update((key, members))
    # A post offered to several dimensions' samples (its topic's, its region's, the global one) is serialized once.
    serialized: dict[int, str] = {}
    for (dimension, value, start), candidates in offers.items():
        samples = keys.samples(dimension, value, start)
        increments.expiring.add(samples)
        # Only the best few and their ties are serialized. Ties are broken by the member, as the sorted set
        # itself breaks them: then what a bucket keeps does not depend on how its posts were split into ranges.
        if len(candidates) > keep_samples:
            cutoff = sorted([score for score, _ in candidates], reverse=True)[keep_samples - 1]
            candidates = [candidate for candidate in candidates if candidate[0] >= cutoff]
        tied = sorted([(score, serialized.get(id(post)) or serialized.setdefault(id(post), sample_member(post)))
                       for score, post in candidates], reverse=True)
        for score, member in tied[:keep_samples]:
            increments.add_sample(samples, member, score)
    increments.keep_samples = keep_samples
    return RangeIncrements(increments, stream_time)


# A bucket's on-time posts scored by one model are counted in the field ``on_time_posts@<model>``.
ENGINE_FIELD = "on_time_posts@"


def engine_counts(fields: dict[str, Any]) -> dict[str, int]:
    """``{model: on-time posts}`` from a bucket hash (str or bytes fields, as Redis returns them)."""
    counts: dict[str, int] = {}
    for name, value in fields.items():
        text = name.decode() if isinstance(name, bytes) else name
        if text.startswith(ENGINE_FIELD):
            counts[text[len(ENGINE_FIELD):]] = int(value)
    return counts


# Columns of a group's counts; labels are the model's (negative, neutral, positive).
_LABEL_COLUMN = {label: column for column, label in enumerate(LABELS, start=1)}


# Long posts are cut in samples: an alert quotes them, it does not archive them.
SAMPLE_TEXT_CHARS = 280
# How json.dumps(..., ensure_ascii=False) writes a string.
_json_string = json.encoder.encode_basestring


def sample_member(post: Post) -> str:
    """The sorted-set member that stands for ``post`` in a sample set.

    Its ``lang`` travels with it: the alert page marks a sample's language, so a browser picks the right
    font and glyph forms for it (a Chinese sample on an English page). Exactly
    ``json.dumps({"id": ..., "text": ...[, "lang": ...]}, ensure_ascii=False)`` (members already in Redis must
    stay the same), spelled out with the encoder's own string escaping: a third of the time.
    """
    text = f'{{"id": {_json_string(post.id)}, "text": {_json_string(post.text[:SAMPLE_TEXT_CHARS])}'
    if post.lang:
        return f'{text}, "lang": {_json_string(post.lang)}}}'
    return text + "}"
