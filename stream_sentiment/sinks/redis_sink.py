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

One call carries the ready ranges of several partitions (``apply_many``): each
is fenced and applied on its own, as if it had a call of its own, but a worker
pays one round trip per apply instead of one per partition.

Kafka offsets are committed only after the script has answered, so the
commit can lag but never lead the Redis state; on restart a worker seeks each
partition to the mark, not to the (possibly older) committed offset.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any

import msgspec
from redis.exceptions import NoScriptError

from stream_sentiment.sinks.keys import RedisKeys

# KEYS: offsets hash, stream-time hash, idle hash, owners hash.
# ARGV: ttl, owner token ("" = unfenced: tools and tests that write without a consumer group), then six values per
#       range: partition, first, next, increments JSON, stream time after the range ("" = unchanged), "1" if the
#       partition's mark must exist already (the worker resumed from it or applied before: a missing one means
#       Redis lost its data).
# Returns an outcome and a mark per range, in order. Each range is fenced and applied on its own, exactly as if
# it came in a call of its own: one call for every partition's ready range is one round trip instead of one each.
# increments: {"hash": {key: {field: int}}, "float": {key: {field: number}},
#              "members": {key: [member, ...]}, "lowest": {key: value}, "expire": [key, ...],
#              "top": {key: {member: score}}, "keep": n}
# - "lowest" keys keep the lowest value ever written.
# - "top" sorted sets keep only their n highest-scored members.
# - every key in "expire" gets ttl seconds.
_APPLY_SCRIPT = """
local ttl, token = tonumber(ARGV[1]), ARGV[2]
local function apply(p, first, nxt, increments, stream_time, mark_expected)
  local owner = redis.call('HGET', KEYS[4], p)
  if token ~= '' and owner and owner ~= token then
    return 'fenced', tonumber(redis.call('HGET', KEYS[1], p) or -1)
  end
  local mark = redis.call('HGET', KEYS[1], p)
  if not mark and mark_expected == '1' then return 'lost', -1 end
  if mark then
    mark = tonumber(mark)
    if nxt <= mark then return 'duplicate', mark end
    if first ~= mark then return 'out_of_order', mark end
  end
  local inc = cjson.decode(increments)
  for key, fields in pairs(inc['hash'] or {}) do
    for f, v in pairs(fields) do redis.call('HINCRBY', key, f, v) end
  end
  for key, fields in pairs(inc['float'] or {}) do
    for f, v in pairs(fields) do redis.call('HINCRBYFLOAT', key, f, v) end
  end
  for key, members in pairs(inc['members'] or {}) do
    for _, m in ipairs(members) do redis.call('SADD', key, m) end
  end
  for key, value in pairs(inc['lowest'] or {}) do
    local current = redis.call('GET', key)
    if not current or tonumber(value) < tonumber(current) then redis.call('SET', key, value) end
  end
  local keep = tonumber(inc['keep'] or 0)
  for key, members in pairs(inc['top'] or {}) do
    for m, score in pairs(members) do redis.call('ZADD', key, score, m) end
    redis.call('ZREMRANGEBYRANK', key, 0, -(keep + 1))
  end
  if ttl > 0 then
    for _, key in ipairs(inc['expire'] or {}) do redis.call('EXPIRE', key, ttl) end
  end
  redis.call('HSET', KEYS[1], p, nxt)
  if stream_time ~= '' then redis.call('HSET', KEYS[2], p, stream_time) end
  redis.call('HDEL', KEYS[3], p)
  return 'applied', nxt
end
local results = {}
for i = 3, #ARGV, 6 do
  local outcome, mark = apply(ARGV[i], tonumber(ARGV[i + 1]), tonumber(ARGV[i + 2]), ARGV[i + 3], ARGV[i + 4],
                              ARGV[i + 5])
  results[#results + 1] = outcome
  results[#results + 1] = mark
end
return results
"""

# Move a partition's mark to the start of a new log, if it is still where the caller saw it; count the regression.
# KEYS: offsets hash, regressions hash; ARGV: partition, expected mark, new mark.
_REBASE_SCRIPT = """
if redis.call('HGET', KEYS[1], ARGV[1]) ~= ARGV[2] then return 0 end
redis.call('HSET', KEYS[1], ARGV[1], ARGV[3])
return 1
"""

# Count a regression of a partition's log once, however many workers (or re-assignments) find it at that mark.
# KEYS: regressions hash (partition -> count), regression marks hash (partition -> mark found below); ARGV: p, mark.
_REGRESSION_SCRIPT = """
if redis.call('HGET', KEYS[2], ARGV[1]) == ARGV[2] then return 0 end
redis.call('HSET', KEYS[2], ARGV[1], ARGV[2])
redis.call('HINCRBY', KEYS[1], ARGV[1], 1)
return 1
"""

# Claim partitions for one owner (a worker's assignment): later writes with another token are refused.
# KEYS[1] owners hash; ARGV: token, partition...
_CLAIM_SCRIPT = """
for i = 2, #ARGV do redis.call('HSET', KEYS[1], ARGV[i], ARGV[1]) end
return #ARGV - 1
"""


class ApplyOutcome(StrEnum):
    APPLIED = "applied"
    DUPLICATE = "duplicate"
    OUT_OF_ORDER = "out_of_order"
    # Another member claimed the partition since this one did: nothing written.
    FENCED = "fenced"
    # The partition's mark should exist but does not: Redis lost its data. Nothing written.
    LOST = "lost"


@dataclass(frozen=True)
class PartitionState:
    """What Redis holds for one partition: the next offset to apply and the stream time reached."""

    mark: int
    stream_time: float | None


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
    lowest: dict[str, int] = field(default_factory=dict)
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
        if self.lowest:
            payload["lowest"] = self.lowest
        if self.members:
            payload["members"] = {key: sorted(values) for key, values in self.members.items()}
        if self.expiring:
            payload["expire"] = sorted(self.expiring)
        if self.samples and self.keep_samples > 0:
            # Only the best few per key travel: the script would trim the rest anyway.
            payload["top"] = {
                # Highest (score, member) first: the order in which the sorted set keeps them.
                key: dict(sorted(members.items(), key=lambda kv: (kv[1], kv[0]), reverse=True)[: self.keep_samples])
                for key, members in self.samples.items()
            }
            payload["keep"] = self.keep_samples
        # msgspec's encoder: a range's payload (samples' text included) is a few kB, and the standard library's
        # took as long to write it as the range took to count. The script's cjson reads either the same.
        return msgspec.json.encode(payload).decode()


@dataclass(frozen=True)
class RangeWrite:
    """One partition's offset range ``[first, next_offset)`` for :meth:`RedisSink.apply_many`: its increments,
    the partition's stream time after it (None: unchanged), and whether Redis must hold its mark already."""

    partition: int
    first: int
    next_offset: int
    increments: Increments
    stream_time: float | None = None
    mark_expected: bool = False


class RedisSink:
    """Applies offset ranges through the fenced Lua script (redis.asyncio client)."""

    def __init__(self, client: Any, prefix: str, topic: str, ttl_seconds: int) -> None:
        self._client = client
        self.prefix = prefix
        keys = RedisKeys(prefix)
        self.offsets_key = keys.offsets(topic)
        self.stream_times_key = keys.stream_times(topic)
        self.idle_key = keys.idle_partitions(topic)
        self.owners_key = keys.owners(topic)
        self.regressions_key = keys.offset_regressions(topic)
        self.ttl_seconds = ttl_seconds
        self._script = client.register_script(_APPLY_SCRIPT)
        self._claim = client.register_script(_CLAIM_SCRIPT)
        self._rebase = client.register_script(_REBASE_SCRIPT)
        self._regression = client.register_script(_REGRESSION_SCRIPT)

    async def apply(
        self, partition: int, first: int, next_offset: int, increments: Increments,
        stream_time: float | None = None, owner: str = "", *, mark_expected: bool = False,
    ) -> ApplyResult:
        """Atomically add ``increments``, move ``partition``'s mark from ``first`` to ``next_offset`` and
        its stream time to ``stream_time``; refused (``FENCED``) if another ``owner`` claimed it since, and
        (``LOST``) if ``mark_expected`` but Redis has no mark for it."""
        write = RangeWrite(partition, first, next_offset, increments, stream_time, mark_expected)
        return (await self.apply_many([write], owner))[0]

    async def apply_many(self, writes: Sequence[RangeWrite], owner: str = "") -> list[ApplyResult]:
        """:meth:`apply` for each of ``writes`` (ranges of different partitions), in one round trip.

        Each range is fenced and applied on its own, as if it had a call of its own; the results come back
        in the order of ``writes``.
        """
        args: list[str | int] = [self.ttl_seconds, owner]
        for write in writes:
            if write.next_offset <= write.first:
                raise ValueError(f"empty or inverted range [{write.first}, {write.next_offset})")
            args += [str(write.partition), write.first, write.next_offset, write.increments.to_json(),
                     "" if write.stream_time is None else repr(write.stream_time), "1" if write.mark_expected else ""]
        if not writes:
            return []
        answer = await self._evalsha(self._script, [self.offsets_key, self.stream_times_key, self.idle_key,
                                                    self.owners_key], args)
        results = []
        for outcome, mark in zip(answer[::2], answer[1::2], strict=True):
            outcome = outcome.decode() if isinstance(outcome, bytes) else outcome
            results.append(ApplyResult(ApplyOutcome(outcome), int(mark)))
        return results

    async def _evalsha(self, script: Any, keys: list[str], args: list[str | int]) -> Any:
        """``script(keys=keys, args=args)`` without redis-py's per-call work around EVALSHA; every script of the
        sink goes through it.

        The worker applies once per scored batch, and the script object's call imported two pipeline classes
        and checked the client against a Protocol on every call (a few percent of a worker's CPU per post).
        The same as it does for a client: EVALSHA, and the script loaded once more if Redis lost it (a
        restart, ``SCRIPT FLUSH``).
        """
        try:
            return await self._client.evalsha(script.sha, len(keys), *keys, *args)
        except NoScriptError:
            script.sha = await self._client.script_load(script.script)
            return await self._client.evalsha(script.sha, len(keys), *keys, *args)

    async def claim(self, owner: str, partitions: list[int]) -> None:
        """Make ``owner`` the only writer of ``partitions`` (a new assignment fences the previous owner)."""
        if partitions:
            await self._evalsha(self._claim, [self.owners_key], [owner, *map(str, partitions)])

    async def record_regression(self, partition: int, mark: int) -> bool:
        """Count a regression of ``partition``'s log below ``mark`` (``stats --json``: ``offset_regressions``);
        False if it was counted already (another worker, or this one after a rebalance, found it first)."""
        return bool(await self._evalsha(self._regression, [self.regressions_key, f"{self.regressions_key}:marks"],
                                        [str(partition), str(mark)]))

    async def rebase(self, partition: int, expected_mark: int, new_mark: int) -> bool:
        """Move ``partition``'s mark from ``expected_mark`` to ``new_mark`` (the start of a new log); False if
        the mark moved meanwhile."""
        return bool(await self._evalsha(self._rebase, [self.offsets_key, self.regressions_key],
                                        [str(partition), str(expected_mark), str(new_mark)]))

    async def mark_idle(self, partitions: list[int]) -> None:
        """Partitions with nothing new to read: they stop holding back the group's watermark until their
        next range is applied."""
        if partitions:
            await self._client.hset(self.idle_key, mapping={str(p): 1 for p in partitions})

    async def partition_states(self) -> dict[int, PartitionState]:
        """Every partition's next offset to apply and stream time: where a worker resumes on assignment."""
        pipe = self._client.pipeline(transaction=True)
        pipe.hgetall(self.offsets_key)
        pipe.hgetall(self.stream_times_key)
        marks, stream_times = await pipe.execute()
        times = {int(k): float(v) for k, v in stream_times.items()}
        return {int(k): PartitionState(int(v), times.get(int(k))) for k, v in marks.items()}
