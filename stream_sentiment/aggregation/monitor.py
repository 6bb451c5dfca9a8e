"""Alert judgement in event time: each window judged once, when the group's watermark passes its end.

Every partition's stream time (the highest event time applied, see ``buckets``)
lives in Redis beside its offset mark. The group's *watermark* is the lowest
stream time over the topic's partitions, less ``max_out_of_orderness``;
partitions their owner marked idle (nothing new for ``idle_partition_seconds``)
do not hold it back. Once the watermark reaches a window end, every on-time post
of the windows ending there has been applied, and none can be added: the
``on_time_*`` fields of their buckets are final. So a window's judgement is a
function of the log alone, whatever worker judges it, whenever, after however
many crashes.

Window ends are judged in event-time order, one bucket boundary after another;
every window length ending at a boundary is judged together. Claim, baselines,
cooldowns, the ``XADD`` of its alerts and their ``PUBLISH`` happen in one Lua
call, conditional on the last judged end still being the one this worker read
(``judged-until``): a second worker, a retry after a crash, or a replay never
adds, loses or doubles an alert. Pub/sub itself reaches only the subscribers
connected at that moment: the stream is the durable feed.

A window reaching back before the first bucket with on-time posts is judged by
the ratio rule only: its negative share is a fair reading, its count is short,
so it neither raises a surge alert nor teaches the baseline. (A surge soon after
the stream starts is caught by its share, not only after the first window that
data fully covers.)
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any

from stream_sentiment.aggregation.alerts import Alert, AlertRules, AlertState, Baseline, WindowStats, evaluate
from stream_sentiment.aggregation.buckets import BucketRules, engine_counts
from stream_sentiment.sinks.keys import RedisKeys

# KEYS: judged-until, baselines hash, last-active hash, alert stream.
# ARGV: expected judged-until ("" = none yet), new judged-until, baselines JSON object, last-active JSON object,
#       alerts JSON list of [flat field list, published JSON], stream MAXLEN.
_JUDGE_SCRIPT = """
local judged = redis.call('GET', KEYS[1])
if (judged or '') ~= ARGV[1] then return 0 end
redis.call('SET', KEYS[1], ARGV[2])
for f, v in pairs(cjson.decode(ARGV[3])) do redis.call('HSET', KEYS[2], f, v) end
for f, v in pairs(cjson.decode(ARGV[4])) do redis.call('HSET', KEYS[3], f, v) end
for _, alert in ipairs(cjson.decode(ARGV[5])) do
  redis.call('XADD', KEYS[4], 'MAXLEN', '~', ARGV[6], '*', unpack(alert[1]))
  redis.call('PUBLISH', KEYS[4], alert[2])
end
return 1
"""


@dataclass(frozen=True)
class GroupTime:
    """Where the group stands in event time, read in one transaction."""

    judged_until: int | None
    first_bucket: int | None
    stream_times: dict[int, float]
    idle: frozenset[int]


def group_watermark(stream_times: dict[int, float], idle: frozenset[int], partitions: int,
                    buckets: BucketRules) -> float | None:
    """The lowest watermark of the partitions that are not idle; None while one of them has applied nothing.

    Idle partitions are left out (Flink's ``withIdleness``). When every partition is idle, everything
    written to the topic has been applied, so the watermark is the highest stream time: the windows the
    data covers are judged, rather than waiting for posts that are not coming.
    """
    live = [p for p in range(partitions) if p not in idle]
    if any(p not in stream_times for p in live):
        return None
    if live:
        return buckets.watermark(min(stream_times[p] for p in live))
    return max(stream_times.values()) if stream_times else None


class AlertMonitor:
    """Judges the windows the group's watermark has passed; any number of workers may call it concurrently.

    Args:
        client: a redis.asyncio client.
        keys: the service's Redis keys.
        buckets: the bucket rules the counts were written with.
        windows: window lengths in seconds, multiples of the bucket width.
        rules: the alert rules.
        topic: the input topic, whose partitions' stream times make the watermark.
        engine_version: the engine (``model/version``) an alert names when its window's buckets recorded none
            (each names the engines that scored its posts, see :meth:`_record`).
        stream_max_len: approximate MAXLEN of the alert stream.
        sample_posts: negative posts quoted per alert.
    """

    def __init__(
        self,
        client: Any,
        keys: RedisKeys,
        buckets: BucketRules,
        windows: Sequence[int],
        rules: AlertRules,
        *,
        topic: str = "posts",
        engine_version: str,
        stream_max_len: int = 10000,
        sample_posts: int = 0,
    ) -> None:
        self.client = client
        self.keys = keys
        self.buckets = buckets
        self.windows = tuple(sorted(windows))
        self.rules = rules
        self.topic = topic
        self.engine_version = engine_version
        # ``{model: model/version}`` served now (the worker's routes): buckets count posts per model, an alert
        # names each model's current version. Unknown models are named as recorded.
        self.engine_names: Callable[[], Mapping[str, str]] = dict
        self.stream_max_len = stream_max_len
        self.sample_posts = sample_posts
        self._judge = client.register_script(_JUDGE_SCRIPT)
        # The group's watermark at the last look (None before every live partition has applied a post).
        self.watermark: float | None = None
        # (dimension:value, bucket start) -> on-time posts, negative, sum of P(negative) and posts per engine;
        # final once read (see the module doc), so read once.
        self._final: dict[tuple[str, int], tuple[int, int, float, dict[str, int]]] = {}

    async def read_group_time(self) -> GroupTime:
        """The judged end, first bucket, stream times and idle partitions, as one snapshot."""
        keys = self.keys
        pipe = self.client.pipeline(transaction=True)
        pipe.get(keys.alerts_judged)
        pipe.get(keys.first_bucket)
        pipe.hgetall(keys.stream_times(self.topic))
        pipe.hgetall(keys.idle_partitions(self.topic))
        judged, first, stream_times, idle = await pipe.execute()
        return GroupTime(
            judged_until=None if judged is None else int(judged),
            first_bucket=None if first is None else int(first),
            stream_times={int(p): float(t) for p, t in stream_times.items()},
            idle=frozenset(int(p) for p in idle),
        )

    async def _read_state(self) -> tuple[int | None, AlertState]:
        """Baselines and cooldowns with the judged end they belong to, as one snapshot.

        Read only when a window is due: the hashes grow with the dimension values seen.
        """
        pipe = self.client.pipeline(transaction=True)
        pipe.get(self.keys.alerts_judged)
        pipe.hgetall(self.keys.alert_baselines)
        pipe.hgetall(self.keys.alert_last_active)
        judged, baselines, last_active = await pipe.execute()
        state = AlertState()
        for name, raw in baselines.items():
            window, dimension, value = _text(name).split("|", 2)
            state.baselines[(int(window), dimension, value)] = Baseline(**json.loads(raw))
        for name, raw in last_active.items():
            rule, dimension, value = _text(name).split("|", 2)
            state.last_active[(rule, dimension, value)] = float(raw)
        return (None if judged is None else int(judged)), state

    def _judged_or_start(self, group: GroupTime) -> int:
        """The last judged end, or (none yet) the first bucket's start: its end is the first one judged."""
        assert group.first_bucket is not None
        if group.judged_until is not None:
            return group.judged_until
        return group.first_bucket

    async def judge_due(self, partitions: int) -> list[Alert]:
        """Judge every window end the group's watermark has passed, in order; returns the alerts raised here.

        Args:
            partitions: how many partitions the topic has (each one's stream time counts).
        """
        fired: list[Alert] = []
        while True:
            group = await self.read_group_time()
            watermark = self.watermark = group_watermark(group.stream_times, group.idle, partitions, self.buckets)
            if watermark is None or group.first_bucket is None:
                return fired
            if self._judged_or_start(group) + self.buckets.bucket_seconds > watermark:
                return fired  # nothing due
            judged, state = await self._read_state()
            if judged != group.judged_until:
                continue  # another worker judged meanwhile
            done, raised = await self._judge_from(group, state, watermark)
            fired.extend(raised)
            if done:
                return fired
            # Another worker judged a window meanwhile: start again from what it wrote.

    async def _judge_from(self, group: GroupTime, state: AlertState,
                          watermark: float) -> tuple[bool, list[Alert]]:
        """Judge the ends after ``group.judged_until`` up to ``watermark``; False if another worker got there first."""
        assert group.first_bucket is not None
        step = self.buckets.bucket_seconds
        first = group.first_bucket
        committed = group.judged_until
        cursor = self._judged_or_start(group)
        fired: list[Alert] = []
        while cursor + step <= watermark:
            end = cursor + step
            alerts, changed = await self._judge_end(end, first, state)
            if alerts or changed:
                if not await self._commit(committed, end, state, changed, alerts):
                    return False, fired
                committed = end
                fired.extend(alerts)
            cursor = end
        if cursor != committed and not await self._commit(committed, cursor, state, set(), []):
            return False, fired
        self._forget_before(cursor - self.windows[-1])
        return True, fired

    async def _judge_end(self, end: int, first: int, state: AlertState) -> tuple[list[Alert], set[tuple[str, ...]]]:
        """Evaluate every window ending at ``end``; ``state`` is updated in place.

        A window reaching back before ``first`` is partial (see :func:`alerts.evaluate`).

        Returns the alerts and the state entries touched (("b", window, dimension, value) baselines,
        ("c", rule, dimension, value) cooldowns).
        """
        judged = list(self.windows)
        step = self.buckets.bucket_seconds
        starts = list(range(end - judged[-1], end, step))
        present = await self.client.sunion([self.keys.dimension_values(s) for s in starts])
        members = sorted(_text(m) for m in present)
        fired: list[Alert] = []
        changed: set[tuple[str, ...]] = set()
        for member in members:
            counts = await self._bucket_counts(member, starts)
            dimension, value = member.split(":", 1)
            for window in judged:
                in_window = [counts[s] for s in starts if s >= end - window]
                posts = sum(c[0] for c in in_window)
                if not posts:
                    continue  # only values with posts in a window are judged
                stats = WindowStats(window, dimension, value, posts, sum(c[1] for c in in_window),
                                    sum(c[2] for c in in_window))
                # Event time, not the wall clock: cooldowns and the alert's time are the window's end.
                fired.extend(evaluate(stats, state, self.rules, float(end), partial=end - window < first))
                if (window, dimension, value) in state.baselines:  # not while an incident holds it
                    changed.add(("b", str(window), dimension, value))
                changed.update(("c", rule, dimension, value) for rule in ("ratio", "surge")
                               if (rule, dimension, value) in state.last_active)
        return fired, changed

    async def _bucket_counts(self, member: str,
                             starts: list[int]) -> dict[int, tuple[int, int, float, dict[str, int]]]:
        """(on-time posts, on-time negative, on-time sum of P(negative), on-time posts per engine) of each
        bucket, read once each.

        Every bucket of a judged window ended at or before the watermark, so its on-time fields are
        final: caching them spares re-reading the 90 buckets of a 15-minute window at every boundary.
        The whole hash is read: its engine fields are named by the engines (``buckets.ENGINE_FIELD``).
        """
        dimension, value = member.split(":", 1)
        missing = [s for s in starts if (member, s) not in self._final]
        if missing:
            pipe = self.client.pipeline(transaction=False)
            for start in missing:
                pipe.hgetall(self.keys.bucket(dimension, value, start))
            for start, raw in zip(missing, await pipe.execute(), strict=True):
                fields = {_text(name): count for name, count in raw.items()}
                self._final[(member, start)] = (
                    int(fields.get("on_time_posts") or 0), int(fields.get("on_time_negative") or 0),
                    float(fields.get("on_time_p_negative_sum") or 0.0), engine_counts(fields))
        return {s: self._final[(member, s)] for s in starts}

    def _window_engines(self, dimension: str, value: str, window_end: int, window: int) -> dict[str, int]:
        """On-time posts per engine in the window, most first (ties by name): read by the judging just before."""
        member = f"{dimension}:{value}"
        totals: dict[str, int] = {}
        for start in range(window_end - window, window_end, self.buckets.bucket_seconds):
            cached = self._final.get((member, start))
            for name, count in (cached[3] if cached else {}).items():
                totals[name] = totals.get(name, 0) + count
        return dict(sorted(totals.items(), key=lambda item: (-item[1], item[0])))

    def _forget_before(self, start: int) -> None:
        for key in [k for k in self._final if k[1] < start]:
            del self._final[key]

    async def _commit(self, expected: int | None, end: int, state: AlertState, changed: set[tuple[str, ...]],
                      alerts: list[Alert]) -> bool:
        baselines: dict[str, str] = {}
        last_active: dict[str, str] = {}
        for entry in changed:
            kind, first_part, dimension, value = entry
            if kind == "b":
                baseline = state.baselines[(int(first_part), dimension, value)]
                baselines[f"{first_part}|{dimension}|{value}"] = json.dumps(asdict(baseline))
            else:
                when = state.last_active[(first_part, dimension, value)]
                last_active[f"{first_part}|{dimension}|{value}"] = repr(when)
        records = []
        for alert in alerts:
            record = await self._record(alert, end)
            records.append([[item for pair in record.items() for item in pair], json.dumps(record)])
        # cjson reads {} and [] alike; an empty list or object must still be a JSON container.
        result = await self._judge(
            keys=[self.keys.alerts_judged, self.keys.alert_baselines, self.keys.alert_last_active, self.keys.alerts],
            args=["" if expected is None else str(expected), str(end), json.dumps(baselines or {}),
                  json.dumps(last_active or {}), json.dumps(records), self.stream_max_len],
        )
        return bool(result)

    async def _record(self, alert: Alert, window_end: int) -> dict[str, str]:
        stats = alert.stats
        # The engines that scored the window's posts, from its buckets: with language routing a Chinese post's
        # alert names the engine its route sent it to, whichever engine this worker's default route serves.
        # Buckets written before engines were recorded have none: then this worker's default engine is named.
        current = self.engine_names()
        engines = {current.get(model, model): count for model, count in
                   self._window_engines(stats.dimension, stats.value, window_end, stats.window_seconds).items()}
        return {
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
            "engine_version": ", ".join(engines) or self.engine_version,
            "engines": json.dumps(engines),
            # The window's end in event time: what the alert is about, the same in every replay.
            "at": f"{alert.at:.3f}",
            "samples": json.dumps(await self._samples(stats.dimension, stats.value, window_end, stats.window_seconds),
                                  ensure_ascii=False),
        }

    async def _samples(self, dimension: str, value: str, window_end: int, window: int) -> list[dict[str, Any]]:
        """The window's ``sample_posts`` most negative on-time posts, each text once: ``[{"id", "text", "lang"?,
        "p_negative"}]``."""
        if not self.sample_posts:
            return []
        pipe = self.client.pipeline(transaction=False)
        for start in range(window_end - window, window_end, self.buckets.bucket_seconds):
            pipe.zrevrange(self.keys.samples(dimension, value, start), 0, self.sample_posts - 1, withscores=True)
        best: dict[str, float] = {}
        for members in await pipe.execute():
            for member, score in members:
                best[_text(member)] = max(float(score), best.get(_text(member), 0.0))
        # Ties broken by the member itself, so every judge quotes the same posts.
        quoted: list[dict[str, Any]] = []
        texts: set[str] = set()
        for member, score in sorted(best.items(), key=lambda item: (-item[1], item[0])):
            sample = json.loads(member)
            # The same words posted again (a copy, a retweet, a bot) say nothing new: each text is quoted once.
            if sample.get("text") in texts:
                continue
            texts.add(sample.get("text"))
            quoted.append({**sample, "p_negative": round(score, 4)})
            if len(quoted) == self.sample_posts:
                break
        return quoted


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value
