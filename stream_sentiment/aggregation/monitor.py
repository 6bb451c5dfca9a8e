"""Alert evaluation on wall-clock ticks, shared safely by every worker of the group.

At each bucket boundary the windows that closed ``delay_seconds`` ago (1 / 5 /
15 min ending at that boundary) are summed from their buckets and checked by
:func:`alerts.evaluate` — whether or not posts are still arriving. The delay
lets posts still in the pipeline reach their buckets before they are judged.
A window that reaches back before the first bucket ever written is skipped
(no alert, no baseline update): right after the service starts, windows are
only partly filled, and a baseline learned from them makes every dimension
look like a surge once they fill. Exactly one
worker evaluates each boundary: the first to ``SET NX`` its marker. Baselines
and cooldowns live in Redis, so whichever worker evaluates next sees them.
Alerts are appended to a capped stream and published on a channel of the same
name, each quoting the window's most negative posts (kept per bucket by the
fenced writes, see ``buckets.sample_member``).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import asdict
from typing import Any

from stream_sentiment.aggregation.alerts import Alert, AlertRules, AlertState, Baseline, WindowStats, evaluate
from stream_sentiment.aggregation.buckets import BucketRules, RedisKeys

# Seconds a bucket stays "open" beyond its allowed lateness: workers' clocks may differ a little.
FINAL_MARGIN_S = 5


class AlertMonitor:
    def __init__(
        self,
        client: Any,
        keys: RedisKeys,
        buckets: BucketRules,
        windows: Sequence[int],
        rules: AlertRules,
        *,
        engine_version: str,
        stream_max_len: int = 10000,
        delay_seconds: float = 0.0,
        sample_posts: int = 0,
    ) -> None:
        self.client = client
        self.keys = keys
        self.buckets = buckets
        self.windows = tuple(windows)
        self.rules = rules
        self.engine_version = engine_version
        self.stream_max_len = stream_max_len
        self.delay_seconds = delay_seconds
        self.sample_posts = sample_posts
        # (dimension:value, bucket start) -> counts of buckets that can no longer change.
        self._final: dict[tuple[str, int], tuple[int, int, float]] = {}

    async def evaluate_closed(self, now: float) -> list[Alert]:
        """Evaluate the windows ending at the last boundary before ``now - delay``, once per group."""
        end = self.buckets.start_of(now - self.delay_seconds)
        claimed = await self.client.set(self.keys.alerts_evaluated(end), "1", nx=True, ex=2 * max(self.windows))
        if not claimed:
            return []
        first = await self.client.get(self.keys.first_bucket)
        if first is None:
            return []
        state = await self._load_state()
        fired: list[Alert] = []
        judged = [w for w in self.windows if end - w >= int(first)]  # others are not yet fully covered by data
        if judged:
            starts = list(range(end - max(judged), end, self.buckets.bucket_seconds))
            present = await self.client.sunion([self.keys.dimension_values(s) for s in starts])
            members = sorted(_text(m) for m in present)
            counts = {member: await self._bucket_counts(member, starts, now) for member in members}
            for window in judged:
                for member in members:
                    dimension, value = member.split(":", 1)
                    in_window = [counts[member][s] for s in starts if s >= end - window]
                    if not any(c[0] for c in in_window):
                        continue  # no posts in this window: as before, only values seen in it are judged
                    stats = WindowStats(window, dimension, value, sum(c[0] for c in in_window),
                                        sum(c[1] for c in in_window), sum(c[2] for c in in_window))
                    fired.extend(evaluate(stats, state, self.rules, now))
        self._forget_before(end - max(self.windows))
        await self._save_state(state)
        for alert in fired:
            await self._publish(alert, end)
        return fired

    async def _bucket_counts(self, member: str, starts: list[int], now: float) -> dict[int, tuple[int, int, float]]:
        """(posts, negative, sum of P(negative)) of each bucket; final buckets are read once, then cached.

        A bucket is final once no post can still be counted in it (its end plus the allowed lateness
        has passed, with a margin for clock skew between workers). Without the cache every tick would
        re-read every bucket of the longest window (90 per dimension value for 15 min) and stall the
        worker's event loop more the longer it runs.
        """
        dimension, value = member.split(":", 1)
        missing = [s for s in starts if (member, s) not in self._final]
        pipe = self.client.pipeline(transaction=False)
        for start in missing:
            pipe.hgetall(self.keys.bucket(dimension, value, start))
        counts = {}
        for start, fields in zip(missing, await pipe.execute(), strict=True):
            fields = {_text(k): v for k, v in fields.items()}
            counts[start] = (int(fields.get("posts", 0)), int(fields.get("negative", 0)),
                             float(fields.get("p_negative_sum", 0.0)))
            if start + self.buckets.bucket_seconds + self.buckets.allowed_lateness + FINAL_MARGIN_S < now:
                self._final[(member, start)] = counts[start]
        return {s: counts[s] if s in counts else self._final[(member, s)] for s in starts}

    def _forget_before(self, start: int) -> None:
        for key in [k for k in self._final if k[1] < start]:
            del self._final[key]

    async def _load_state(self) -> AlertState:
        baselines = await self.client.hgetall(self.keys.alert_baselines)
        last_active = await self.client.hgetall(self.keys.alert_last_active)
        state = AlertState()
        for field, raw in baselines.items():
            window, dimension, value = _text(field).split("|", 2)
            state.baselines[(int(window), dimension, value)] = Baseline(**json.loads(raw))
        for field, raw in last_active.items():
            rule, dimension, value = _text(field).split("|", 2)
            state.last_active[(rule, dimension, value)] = float(raw)
        return state

    async def _save_state(self, state: AlertState) -> None:
        baselines = {f"{w}|{d}|{v}": json.dumps(asdict(b)) for (w, d, v), b in state.baselines.items()}
        last_active = {f"{r}|{d}|{v}": str(t) for (r, d, v), t in state.last_active.items()}
        if baselines:
            await self.client.hset(self.keys.alert_baselines, mapping=baselines)
        if last_active:
            await self.client.hset(self.keys.alert_last_active, mapping=last_active)

    async def _publish(self, alert: Alert, window_end: int) -> None:
        stats = alert.stats
        record = {
            "rule": alert.rule,
            "dimension": stats.dimension,
            "value": stats.value,
            "window_seconds": str(stats.window_seconds),
            "window_start": str(window_end - stats.window_seconds),
            "window_end": str(window_end),
            "posts": str(stats.posts),
            "negative": str(stats.negative),
            "negative_ratio": f"{stats.negative_ratio:.4f}",
            "mean_p_negative": f"{stats.p_negative_sum / stats.posts if stats.posts else 0.0:.4f}",
            "baseline_negative": f"{alert.baseline_mean:.2f}",
            "z": f"{alert.z:.2f}",
            "engine_version": self.engine_version,
            "at": f"{alert.at:.3f}",
            "samples": json.dumps(await self._samples(stats.dimension, stats.value, window_end, stats.window_seconds),
                                  ensure_ascii=False),
        }
        await self.client.xadd(self.keys.alerts, record, maxlen=self.stream_max_len, approximate=True)
        await self.client.publish(self.keys.alerts, json.dumps(record))


    async def _samples(self, dimension: str, value: str, window_end: int, window: int) -> list[dict[str, Any]]:
        """The window's ``sample_posts`` most negative posts: ``[{"id", "text", "p_negative"}]``."""
        if not self.sample_posts:
            return []
        pipe = self.client.pipeline(transaction=False)
        for start in range(window_end - window, window_end, self.buckets.bucket_seconds):
            pipe.zrevrange(self.keys.samples(dimension, value, start), 0, self.sample_posts - 1, withscores=True)
        best: dict[str, float] = {}
        for members in await pipe.execute():
            for member, score in members:
                best[_text(member)] = max(float(score), best.get(_text(member), 0.0))
        ranked = sorted(best.items(), key=lambda item: -item[1])[: self.sample_posts]
        return [{**json.loads(member), "p_negative": round(score, 4)} for member, score in ranked]


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value
