"""What analysts read: rolling windows, per-bucket series and the alert feed, from the Redis keys.

The terminal view (``stream-sentiment top``) and the web alert page share these reads, so both show
the same numbers as the alert monitor: a window is the sum of its event-time buckets
(``P:agg:<dimension>:<value>:<bucket_start>``). Unlike the monitor, a view includes the bucket still
filling, so it answers "what is happening now" rather than "what was judged".
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import asdict, dataclass
from typing import Any

from stream_sentiment.aggregation.buckets import RedisKeys

__all__ = ["AlertEntry", "AnalystQueries", "BucketPoint", "WindowRow", "alert_entry", "dimension_label", "window_label"]


@dataclass(frozen=True)
class WindowRow:
    """One dimension value over one window."""

    dimension: str
    value: str
    posts: int
    negative: int
    p_negative_sum: float
    # Whether an alert for this dimension value was raised inside the window.
    alerting: bool = False

    @property
    def negative_ratio(self) -> float:
        return self.negative / self.posts if self.posts else 0.0

    @property
    def mean_p_negative(self) -> float:
        return self.p_negative_sum / self.posts if self.posts else 0.0

    def as_json(self) -> dict[str, Any]:
        return {**asdict(self), "negative_ratio": round(self.negative_ratio, 4),
                "mean_p_negative": round(self.mean_p_negative, 4)}


@dataclass(frozen=True)
class BucketPoint:
    """One bucket of a dimension value's series."""

    start: int
    posts: int
    negative: int
    # False for the bucket still filling: its ratio is of the posts so far, and a chart should say so
    # (a new bucket's first few posts often swing it to 0% or 100%).
    complete: bool = True

    @property
    def negative_ratio(self) -> float | None:
        # None, not 0: a bucket without posts has no ratio, and a chart should show a gap there.
        return self.negative / self.posts if self.posts else None


@dataclass(frozen=True)
class AlertEntry:
    """An alert stream entry as the web page receives it: the stream id plus its fields, typed."""

    id: str
    fields: dict[str, Any]


# Stream fields that are numbers; everything else stays a string.
_INT_FIELDS = frozenset({"window_seconds", "window_start", "window_end", "posts", "negative"})
_FLOAT_FIELDS = frozenset({"negative_ratio", "mean_p_negative", "baseline_negative", "z", "at"})


def alert_entry(entry_id: bytes | str, raw: dict[Any, Any]) -> AlertEntry:
    """Decode one ``P:alerts`` entry; a field this service did not write as a number stays a string."""
    fields: dict[str, Any] = {}
    for key, value in raw.items():
        name, text = _text(key), _text(value)
        try:
            if name in _INT_FIELDS:
                fields[name] = int(text)
            elif name in _FLOAT_FIELDS:
                number = float(text)
                # JSON has no NaN (a z without a baseline is written "nan"): null, or a browser's JSON.parse fails.
                fields[name] = number if math.isfinite(number) else None
            elif name == "samples":
                fields[name] = json.loads(text, parse_constant=lambda _: None) if text else []
            elif name == "engines":  # {model/version: posts}: the engines that scored the window's posts
                fields[name] = json.loads(text, parse_constant=lambda _: None) if text else {}
            else:
                fields[name] = text
        except ValueError:
            fields[name] = text
    return AlertEntry(_text(entry_id), fields)


class AnalystQueries:
    """Read-only queries over one deployment's Redis keys (``redis.asyncio`` client)."""

    def __init__(self, client: Any, keys: RedisKeys, bucket_seconds: int) -> None:
        self.client = client
        self.keys = keys
        self.bucket_seconds = bucket_seconds

    def _bucket_starts(self, seconds: int, now: float) -> list[int]:
        """Starts of the buckets of the ``seconds`` ending now, the one still filling included."""
        current = int(now // self.bucket_seconds) * self.bucket_seconds
        count = max(1, seconds // self.bucket_seconds)
        return [current - i * self.bucket_seconds for i in range(count - 1, -1, -1)]

    async def window(self, seconds: int, *, now: float | None = None) -> list[WindowRow]:
        """Every dimension value seen in the last ``seconds``, summed over its buckets."""
        now = time.time() if now is None else now
        starts = self._bucket_starts(seconds, now)
        members = sorted(_text(m) for m in await self.client.sunion([self.keys.dimension_values(s) for s in starts]))
        if not members:
            return []
        pipe = self.client.pipeline(transaction=False)
        for member in members:
            dimension, value = member.split(":", 1)
            for start in starts:
                pipe.hmget(self.keys.bucket(dimension, value, start), "posts", "negative", "p_negative_sum")
        replies = iter(await pipe.execute())
        alerting = await self.alerting_since(now - seconds)
        rows = []
        for member in members:
            dimension, value = member.split(":", 1)
            posts = negative = 0
            p_negative = 0.0
            for _ in starts:
                bucket_posts, bucket_negative, bucket_p = next(replies)
                posts += int(bucket_posts or 0)
                negative += int(bucket_negative or 0)
                p_negative += float(bucket_p or 0.0)
            if posts:
                rows.append(WindowRow(dimension, value, posts, negative, p_negative, (dimension, value) in alerting))
        return rows

    async def most_negative(self, seconds: int, *, limit: int = 10, min_posts: int = 1,
                            now: float | None = None) -> list[WindowRow]:
        """The ``limit`` dimension values with the highest negative share over the last ``seconds``.

        Values with fewer than ``min_posts`` posts are left out: three posts, two negative, is
        not a trend. Ties go to the larger negative count, then to the name, so the order is stable.
        """
        rows = [row for row in await self.window(seconds, now=now) if row.posts >= min_posts]
        rows.sort(key=lambda row: (-row.negative_ratio, -row.negative, row.dimension, row.value))
        return rows[:limit]

    async def series(self, dimension: str, value: str, seconds: int, *, now: float | None = None) -> list[BucketPoint]:
        """The dimension value's buckets over the last ``seconds``, oldest first (empty buckets included;
        the last, still filling, marked incomplete)."""
        now = time.time() if now is None else now
        starts = self._bucket_starts(seconds, now)
        pipe = self.client.pipeline(transaction=False)
        for start in starts:
            pipe.hmget(self.keys.bucket(dimension, value, start), "posts", "negative")
        return [BucketPoint(start, int(posts or 0), int(negative or 0), complete=start + self.bucket_seconds <= now)
                for start, (posts, negative) in zip(starts, await pipe.execute(), strict=True)]

    async def recent_alerts(self, count: int) -> list[AlertEntry]:
        """The last ``count`` alerts, oldest first."""
        entries = await self.client.xrevrange(self.keys.alerts, count=count)
        return [alert_entry(entry_id, fields) for entry_id, fields in reversed(entries)]

    async def alerts_after(self, last_id: str, *, block_ms: int, count: int = 100) -> list[AlertEntry]:
        """Alerts appended after ``last_id``, waiting up to ``block_ms`` for the first one."""
        replies = await self.client.xread({self.keys.alerts: last_id}, block=block_ms, count=count) or []
        return [alert_entry(entry_id, fields) for _, entries in replies for entry_id, fields in entries]

    async def alerting_since(self, since: float, scan: int = 500) -> set[tuple[str, str]]:
        """(dimension, value) pairs with an alert raised at or after ``since`` (epoch seconds).

        Stream ids start with the append time in milliseconds, so the newest ``scan`` entries are
        read with the id range, not filtered one by one.
        """
        entries = await self.client.xrevrange(self.keys.alerts, min=f"{int(since * 1000)}-0", count=scan)
        found = set()
        for _, fields in entries:
            fields = {_text(k): _text(v) for k, v in fields.items()}
            found.add((fields.get("dimension", ""), fields.get("value", "")))
        return found


def dimension_label(dimension: str, value: str) -> str:
    return "all posts" if dimension == "global" else f"{dimension}={value}"


def window_label(seconds: int) -> str:
    return f"{seconds // 60} min" if seconds % 60 == 0 else f"{seconds} s"


def _text(value: bytes | str) -> str:
    # Lenient: an entry some other program wrote must not break every page that reads the stream.
    return value.decode("utf-8", errors="replace") if isinstance(value, bytes) else value
