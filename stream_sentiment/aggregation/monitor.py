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
name.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import asdict
from typing import Any

from stream_sentiment.aggregation.alerts import Alert, AlertRules, AlertState, Baseline, WindowStats, evaluate
from stream_sentiment.aggregation.buckets import BucketRules, RedisKeys


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
    ) -> None:
        self.client = client
        self.keys = keys
        self.buckets = buckets
        self.windows = tuple(windows)
        self.rules = rules
        self.engine_version = engine_version
        self.stream_max_len = stream_max_len
        self.delay_seconds = delay_seconds

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
        for window in self.windows:
            if end - window < int(first):
                continue  # not yet fully covered by data
            starts = list(range(end - window, end, self.buckets.bucket_seconds))
            members = await self.client.sunion([self.keys.dimension_values(s) for s in starts])
            for member in sorted(m.decode() if isinstance(m, bytes) else m for m in members):
                dimension, value = member.split(":", 1)
                stats = await self._window_stats(window, dimension, value, starts)
                fired.extend(evaluate(stats, state, self.rules, now))
        await self._save_state(state)
        for alert in fired:
            await self._publish(alert, end)
        return fired

    async def _window_stats(self, window: int, dimension: str, value: str, starts: list[int]) -> WindowStats:
        pipe = self.client.pipeline(transaction=False)
        for start in starts:
            pipe.hgetall(self.keys.bucket(dimension, value, start))
        posts = negative = 0
        p_negative = 0.0
        for fields in await pipe.execute():
            fields = {(k.decode() if isinstance(k, bytes) else k): v for k, v in fields.items()}
            posts += int(fields.get("posts", 0))
            negative += int(fields.get("negative", 0))
            p_negative += float(fields.get("p_negative_sum", 0.0))
        return WindowStats(window, dimension, value, posts, negative, p_negative)

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
        }
        await self.client.xadd(self.keys.alerts, record, maxlen=self.stream_max_len, approximate=True)
        await self.client.publish(self.keys.alerts, json.dumps(record))


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value
