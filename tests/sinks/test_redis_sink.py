"""The exactly-once fence against a real Redis-protocol server (valkey) started by the suite."""

from __future__ import annotations

import asyncio

from stream_sentiment.sinks.redis_sink import ApplyOutcome, Increments, PartitionState, RangeWrite, RedisSink


def _increments(negative: int, p_negative: float) -> Increments:
    increments = Increments()
    increments.add("t:agg:global:all:1000", "negative", negative)
    increments.add("t:totals", "scored", negative)
    increments.add_float("t:agg:global:all:1000", "p_negative_sum", p_negative)
    increments.expiring.add("t:agg:global:all:1000")
    return increments


def test_ranges_apply_once_in_order_and_replays_are_skipped(redis_factory):
    async def scenario():
        client = redis_factory(async_client=True)
        sink = RedisSink(client, prefix="t", topic="posts", ttl_seconds=600)
        first = await sink.apply(0, 0, 10, _increments(3, 1.5))
        second = await sink.apply(0, 10, 25, _increments(2, 0.25))
        replay = await sink.apply(0, 0, 10, _increments(3, 1.5))  # a restarted worker re-reads [0, 10)
        replay_tail = await sink.apply(0, 10, 25, _increments(2, 0.25))
        other_partition = await sink.apply(1, 0, 5, _increments(1, 0.5))
        state = (
            await client.hgetall("t:agg:global:all:1000"),
            await client.hgetall("t:totals"),
            await client.ttl("t:agg:global:all:1000"),
            await sink.partition_states(),
        )
        await client.aclose()
        return first, second, replay, replay_tail, other_partition, state

    first, second, replay, replay_tail, other, (aggregate, totals, ttl, states) = asyncio.run(scenario())
    assert (first.outcome, second.outcome) == (ApplyOutcome.APPLIED, ApplyOutcome.APPLIED)
    assert (replay.outcome, replay.mark) == (ApplyOutcome.DUPLICATE, 25)
    assert replay_tail.outcome is ApplyOutcome.DUPLICATE
    assert other.outcome is ApplyOutcome.APPLIED
    assert aggregate["negative"] == "6"  # 3 + 2 + 1: each range counted once
    assert float(aggregate["p_negative_sum"]) == 2.25
    assert totals["scored"] == "6"
    assert 0 < ttl <= 600
    assert {partition: state.mark for partition, state in states.items()} == {0: 25, 1: 5}


def test_a_script_redis_lost_is_loaded_again(redis_factory):
    """A Redis restart or SCRIPT FLUSH forgets the apply script: the next apply loads it again and applies."""

    async def scenario():
        client = redis_factory(async_client=True)
        sink = RedisSink(client, prefix="t", topic="posts", ttl_seconds=600)
        first = await sink.apply(0, 0, 10, _increments(3, 1.5))
        await client.script_flush()
        second = await sink.apply(0, 10, 20, _increments(2, 0.5))
        loaded = await client.script_exists(sink._script.sha)
        totals = await client.hgetall("t:totals")
        await client.aclose()
        return first, second, loaded, totals

    first, second, loaded, totals = asyncio.run(scenario())
    assert (first.outcome, second.outcome) == (ApplyOutcome.APPLIED, ApplyOutcome.APPLIED)
    assert loaded == [True]
    assert totals["scored"] == "5"


def test_overlapping_or_gapped_ranges_write_nothing(redis_factory):
    async def scenario():
        client = redis_factory(async_client=True)
        sink = RedisSink(client, prefix="t", topic="posts", ttl_seconds=0)
        await sink.apply(0, 0, 10, _increments(1, 0.1))
        straddling = await sink.apply(0, 5, 15, _increments(100, 1.0))  # a zombie worker's stale range
        gap = await sink.apply(0, 12, 20, _increments(100, 1.0))  # records 10..11 never applied
        totals = await client.hgetall("t:totals")
        await client.aclose()
        return straddling, gap, totals

    straddling, gap, totals = asyncio.run(scenario())
    assert (straddling.outcome, straddling.mark) == (ApplyOutcome.OUT_OF_ORDER, 10)
    assert (gap.outcome, gap.mark) == (ApplyOutcome.OUT_OF_ORDER, 10)
    assert totals == {"scored": "1"}


def test_concurrent_writers_of_one_range_apply_it_exactly_once(redis_factory):
    async def scenario():
        clients = [redis_factory(async_client=True) for _ in range(8)]
        sinks = [RedisSink(c, prefix="t", topic="posts", ttl_seconds=0) for c in clients]
        results = await asyncio.gather(*(s.apply(3, 0, 50, _increments(7, 0.7)) for s in sinks))
        totals = await clients[0].hgetall("t:totals")
        for client in clients:
            await client.aclose()
        return results, totals

    results, totals = asyncio.run(scenario())
    assert sorted(r.outcome for r in results) == [ApplyOutcome.APPLIED] + [ApplyOutcome.DUPLICATE] * 7
    assert totals == {"scored": "7"}


def test_a_range_moves_the_stream_time_with_the_mark_and_lowest_keys_only_go_down(redis_factory):
    async def scenario():
        client = redis_factory(async_client=True)
        sink = RedisSink(client, prefix="s", topic="posts", ttl_seconds=0)
        first = Increments()
        first.lowest["s:first-bucket"] = 1000
        await sink.apply(0, 0, 10, first, stream_time=1005.5)
        lower, higher = Increments(), Increments()
        lower.lowest["s:first-bucket"] = 990
        higher.lowest["s:first-bucket"] = 2000
        await sink.apply(1, 0, 5, lower, stream_time=995.0)
        await sink.apply(0, 10, 12, higher)  # no stream time given: it stays
        states = await sink.partition_states()
        bucket = await client.get("s:first-bucket")
        await client.aclose()
        return states, bucket

    states, bucket = asyncio.run(scenario())
    assert states == {0: PartitionState(12, 1005.5), 1: PartitionState(5, 995.0)}
    assert bucket == "990"


def test_a_partition_claimed_by_another_member_refuses_the_previous_owners_writes(redis_factory):
    async def scenario():
        client = redis_factory(async_client=True)
        sink = RedisSink(client, prefix="o", topic="posts", ttl_seconds=0)
        await sink.claim("worker-a:1:x", [0, 1])
        owned = await sink.apply(0, 0, 10, _increments(1, 0.1), owner="worker-a:1:x")
        await sink.claim("worker-b:2:y", [0])  # a rebalance gave partition 0 to worker b
        zombie = await sink.apply(0, 10, 20, _increments(100, 1.0), owner="worker-a:1:x")
        still_mine = await sink.apply(1, 0, 5, _increments(1, 0.1), owner="worker-a:1:x")
        new_owner = await sink.apply(0, 10, 20, _increments(2, 0.2), owner="worker-b:2:y")
        totals = await client.hgetall("t:totals")
        await client.aclose()
        return owned, zombie, still_mine, new_owner, totals

    owned, zombie, still_mine, new_owner, totals = asyncio.run(scenario())
    assert owned.outcome is ApplyOutcome.APPLIED
    assert (zombie.outcome, zombie.mark) == (ApplyOutcome.FENCED, 10)
    assert still_mine.outcome is ApplyOutcome.APPLIED
    assert new_owner.outcome is ApplyOutcome.APPLIED
    assert totals == {"scored": "4"}  # 1 + 1 + 2: nothing of the zombie's range


def test_one_call_fences_and_applies_each_partitions_range_on_its_own(redis_factory):
    """``apply_many``: several partitions' ranges in one round trip, each answered as a call of its own would be."""
    async def scenario():
        client = redis_factory(async_client=True)
        sink = RedisSink(client, prefix="m", topic="posts", ttl_seconds=0)
        await sink.claim("worker-a:1:x", [0, 1, 2, 3])
        await sink.apply(0, 0, 10, _increments(1, 0.1), owner="worker-a:1:x")
        await sink.claim("worker-b:2:y", [3])  # partition 3 is another member's now
        results = await sink.apply_many([
            RangeWrite(0, 0, 10, _increments(100, 1.0)),  # a replay of what partition 0 applied
            RangeWrite(1, 0, 4, _increments(2, 0.2), stream_time=1001.5),
            RangeWrite(2, 3, 6, _increments(100, 1.0)),  # starts past partition 2's (absent) mark: applied
            RangeWrite(3, 0, 5, _increments(100, 1.0)),  # fenced
            RangeWrite(0, 12, 20, _increments(100, 1.0)),  # a gap after partition 0's mark
        ], owner="worker-a:1:x")
        lost = await sink.apply_many([RangeWrite(4, 0, 1, _increments(100, 1.0), mark_expected=True)])
        totals = await client.hgetall("t:totals")
        states = await sink.partition_states()
        await client.aclose()
        return results, lost, totals, states

    results, lost, totals, states = asyncio.run(scenario())
    assert [(r.outcome, r.mark) for r in results] == [
        (ApplyOutcome.DUPLICATE, 10), (ApplyOutcome.APPLIED, 4), (ApplyOutcome.APPLIED, 6),
        (ApplyOutcome.FENCED, -1), (ApplyOutcome.OUT_OF_ORDER, 10)]
    assert [(r.outcome, r.mark) for r in lost] == [(ApplyOutcome.LOST, -1)]
    assert totals == {"scored": str(1 + 2 + 100)}
    assert states == {0: PartitionState(10, None), 1: PartitionState(4, 1001.5), 2: PartitionState(6, None)}
