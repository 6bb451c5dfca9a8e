"""Idempotent Redis writes: one partition's offset range and its increments, atomically.

Exactly-once rests on this one Lua call. For each Kafka partition Redis keeps
the *applied high-water mark* (the next offset to apply) in
``<prefix>:offsets:<topic>``. A worker applies the records of a partition as
contiguous ranges ``[first, next)``; the script adds the range's increments
and moves the mark to ``next`` in the same atomic step, and only if ``first``
equals the mark:

* ``first == mark`` (or no mark yet): applied -> ``APPLIED``.
* ``next <= mark``: this range was applied before (a replay after a crash) ->
  nothing written, ``DUPLICATE``.
* otherwise (``first < mark < next``, or ``first > mark``): a worker that lost
  the partition, or a gap -> nothing written, ``OUT_OF_ORDER``; the caller
  re-reads the mark and seeks there.

Kafka offsets are committed only after the script has answered, so the
commit can lag but never lead the Redis state; on restart a worker seeks each
partition to the mark, not to the (possibly older) committed offset.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any

# KEYS[1] offsets hash; ARGV: partition, first, next, ttl, increments JSON.
# increments: {"hash": {key: {field: int}}, "float": {key: {field: number}},
#              "members": {key: [member, ...]}, "first": {key: value}, "expire": [key, ...],
#              "top": {key: {member: score}}, "keep": n}
# - "first" keys are set only if absent (SET NX).
# - "top" sorted sets keep only their n highest-scored members.
# - every key in "expire" gets ttl seconds.
_APPLY_SCRIPT = """
local mark = redis.call('HGET', KEYS[1], ARGV[1])
local first, nxt = tonumber(ARGV[2]), tonumber(ARGV[3])
if mark then
  mark = tonumber(mark)
  if nxt <= mark then return {'duplicate', mark} end
  if first ~= mark then return {'out_of_order', mark} end
end
local inc = cjson.decode(ARGV[5])
for key, fields in pairs(inc['hash'] or {}) do
  for f, v in pairs(fields) do redis.call('HINCRBY', key, f, v) end
end
for key, fields in pairs(inc['float'] or {}) do
  for f, v in pairs(fields) do redis.call('HINCRBYFLOAT', key, f, v) end
end
for key, members in pairs(inc['members'] or {}) do
  for _, m in ipairs(members) do redis.call('SADD', key, m) end
end
for key, value in pairs(inc['first'] or {}) do redis.call('SET', key, value, 'NX') end
local keep = tonumber(inc['keep'] or 0)
for key, members in pairs(inc['top'] or {}) do
  for m, score in pairs(members) do redis.call('ZADD', key, score, m) end
  redis.call('ZREMRANGEBYRANK', key, 0, -(keep + 1))
end
local ttl = tonumber(ARGV[4])
if ttl > 0 then
  for _, key in ipairs(inc['expire'] or {}) do redis.call('EXPIRE', key, ttl) end
end
redis.call('HSET', KEYS[1], ARGV[1], nxt)
return {'applied', nxt}
"""


class ApplyOutcome(StrEnum):
    APPLIED = "applied"
    DUPLICATE = "duplicate"
    OUT_OF_ORDER = "out_of_order"


@dataclass(frozen=True)
class ApplyResult:
    outcome: ApplyOutcome
    mark: int


@dataclass
class Increments:
    """What one offset range adds: integer and float hash increments, and keys that expire."""

    counts: dict[str, dict[str, int]] = field(default_factory=dict)
    sums: dict[str, dict[str, float]] = field(default_factory=dict)
    members: dict[str, set[str]] = field(default_factory=dict)
    first: dict[str, int] = field(default_factory=dict)
    expiring: set[str] = field(default_factory=set)
    samples: dict[str, dict[str, float]] = field(default_factory=dict)
    keep_samples: int = 0

    def add(self, key: str, field_name: str, amount: int = 1) -> None:
        fields = self.counts.setdefault(key, {})
        fields[field_name] = fields.get(field_name, 0) + amount

    def add_float(self, key: str, field_name: str, amount: float) -> None:
        fields = self.sums.setdefault(key, {})
        fields[field_name] = fields.get(field_name, 0.0) + amount

    def add_member(self, key: str, member: str) -> None:
        self.members.setdefault(key, set()).add(member)

    def add_sample(self, key: str, member: str, score: float) -> None:
        """Offer ``member`` to the sorted set ``key``, which keeps its ``keep_samples`` best."""
        members = self.samples.setdefault(key, {})
        members[member] = max(score, members.get(member, score))

    def to_json(self) -> str:
        # Lua's cjson turns [] into {} and back unpredictably: send a list only when non-empty.
        payload: dict[str, Any] = {"hash": self.counts, "float": self.sums}
        if self.first:
            payload["first"] = self.first
        if self.members:
            payload["members"] = {key: sorted(values) for key, values in self.members.items()}
        if self.expiring:
            payload["expire"] = sorted(self.expiring)
        if self.samples and self.keep_samples > 0:
            # Only the best few per key travel: the script would trim the rest anyway.
            payload["top"] = {
                key: dict(sorted(members.items(), key=lambda kv: -kv[1])[: self.keep_samples])
                for key, members in self.samples.items()
            }
            payload["keep"] = self.keep_samples
        return json.dumps(payload, separators=(",", ":"))


class RedisSink:
    """Applies offset ranges through the fenced Lua script (redis.asyncio client)."""

    def __init__(self, client: Any, prefix: str, topic: str, ttl_seconds: int) -> None:
        self._client = client
        self.prefix = prefix
        self.offsets_key = f"{prefix}:offsets:{topic}"
        self.ttl_seconds = ttl_seconds
        self._script = client.register_script(_APPLY_SCRIPT)

    async def apply(self, partition: int, first: int, next_offset: int, increments: Increments) -> ApplyResult:
        """Atomically add ``increments`` and move ``partition``'s mark from ``first`` to ``next_offset``."""
        if next_offset <= first:
            raise ValueError(f"empty or inverted range [{first}, {next_offset})")
        outcome, mark = await self._script(
            keys=[self.offsets_key],
            args=[str(partition), first, next_offset, self.ttl_seconds, increments.to_json()],
        )
        outcome = outcome.decode() if isinstance(outcome, bytes) else outcome
        return ApplyResult(ApplyOutcome(outcome), int(mark))

    async def applied_marks(self) -> Mapping[int, int]:
        """Every partition's next offset to apply: where a worker seeks on assignment."""
        raw = await self._client.hgetall(self.offsets_key)
        return {int(k): int(v) for k, v in raw.items()}
