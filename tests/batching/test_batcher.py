"""The batcher's flush policy and batch formation, on an injected clock (no real time)."""

from __future__ import annotations

import dataclasses

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from stream_sentiment.batching.batcher import Batcher, BatchingPolicy, FlushReason, Formation
from stream_sentiment.batching.cost import BACKEND_COSTS, CallCost

POLICY = BatchingPolicy(buckets=(32, 64, 128, 256), max_rows=8, max_tokens=512, window=0.050, timeout=0.020)


def tokens(n: int) -> list[int]:
    return list(range(1, n + 1))


def test_window_flush_happens_exactly_when_the_oldest_post_has_waited_the_window():
    batcher: Batcher[str] = Batcher(POLICY)
    batcher.add("a", tokens(10), now=1.000)
    batcher.add("b", tokens(12), now=1.030)
    assert batcher.poll(now=1.0499, engine_idle=False) is None
    assert batcher.next_deadline(engine_idle=False) == pytest.approx(1.050)
    batch = batcher.poll(now=1.050, engine_idle=False)
    assert batch is not None
    assert batch.reason is FlushReason.WINDOW
    assert [e.item for e in batch.entries] == ["a", "b"]
    assert batch.waits() == pytest.approx([0.050, 0.020])


def test_timeout_fallback_flushes_early_only_when_an_engine_stream_is_idle():
    batcher: Batcher[str] = Batcher(POLICY)
    batcher.add("a", tokens(5), now=0.0)
    assert batcher.poll(now=0.025, engine_idle=False) is None  # engine busy: keep filling
    assert batcher.next_deadline(engine_idle=True) == pytest.approx(0.020)
    assert batcher.poll(now=0.019, engine_idle=True) is None
    batch = batcher.poll(now=0.020, engine_idle=True)
    assert batch is not None and batch.reason is FlushReason.TIMEOUT and batch.rows == 1


MERGING = dataclasses.replace(POLICY, merge_smaller_on_timeout=True)


def test_a_timeout_batch_fills_its_spare_rows_with_the_oldest_smaller_posts():
    batcher: Batcher[str] = Batcher(MERGING)
    batcher.add("m1", tokens(40), now=0.000)   # bucket 64, the oldest post
    batcher.add("s1", tokens(10), now=0.001)   # bucket 32
    batcher.add("s2", tokens(20), now=0.002)
    batcher.add("l1", tokens(100), now=0.003)  # bucket 128: never into a smaller batch
    for i in range(5):
        batcher.add(f"t{i}", tokens(5), now=0.004 + i / 1000)
    # Engine idle, m1 has waited the timeout: its batch takes the 7 oldest smaller posts into spare rows.
    first = batcher.poll(now=0.020, engine_idle=True)
    assert first is not None and first.reason is FlushReason.TIMEOUT
    assert (first.bucket, [e.item for e in first.entries]) == (64, ["m1", "s1", "s2", "t0", "t1", "t2", "t3", "t4"])
    assert first.padded_tokens == 8 * 64
    batcher.add("t5", tokens(5), now=0.0201)
    second = batcher.poll(now=0.0235, engine_idle=True)  # l1 has waited the timeout: t5 rides along, padded to 128
    assert second is not None and (second.bucket, [e.item for e in second.entries]) == (128, ["l1", "t5"])
    assert batcher.pending == 0


def test_without_merging_a_timeout_batch_stays_one_bucket():
    batcher: Batcher[str] = Batcher(POLICY)
    batcher.add("m1", tokens(40), now=0.0)
    batcher.add("s1", tokens(10), now=0.001)
    batch = batcher.poll(now=0.020, engine_idle=True)
    assert batch is not None and batch.reason is FlushReason.TIMEOUT
    assert (batch.bucket, [e.item for e in batch.entries]) == (64, ["m1"])


def test_a_window_batch_stays_one_bucket():
    batcher: Batcher[str] = Batcher(MERGING)
    batcher.add("m1", tokens(40), now=0.0)
    batcher.add("s1", tokens(10), now=0.001)
    batch = batcher.poll(now=0.050, engine_idle=False)
    assert batch is not None and batch.reason is FlushReason.WINDOW
    assert (batch.bucket, [e.item for e in batch.entries]) == (64, ["m1"])


def test_full_bucket_flushes_at_once_by_rows():
    batcher: Batcher[int] = Batcher(POLICY)
    for i in range(POLICY.max_rows):
        batcher.add(i, tokens(20), now=0.0)
    batch = batcher.poll(now=0.0, engine_idle=False)
    assert batch is not None and batch.reason is FlushReason.FULL
    assert batch.bucket == 32 and batch.rows == 8


def test_full_bucket_flushes_by_token_budget_before_rows():
    batcher: Batcher[int] = Batcher(POLICY)
    for i in range(3):
        batcher.add(i, tokens(200), now=0.0)  # bucket 256: 512 // 256 = 2 rows fill the budget
    batch = batcher.poll(now=0.0, engine_idle=False)
    assert batch is not None and batch.reason is FlushReason.FULL
    assert batch.rows == 2 and batch.padded_tokens == 512
    assert batcher.pending == 1


def test_oldest_bucket_flushes_first_and_buckets_never_mix():
    batcher: Batcher[str] = Batcher(POLICY)
    batcher.add("long", tokens(100), now=0.0)
    batcher.add("short", tokens(3), now=0.01)
    first = batcher.poll(now=0.07, engine_idle=False)
    second = batcher.poll(now=0.07, engine_idle=False)
    assert first is not None and second is not None
    assert (first.bucket, [e.item for e in first.entries]) == (128, ["long"])
    assert (second.bucket, [e.item for e in second.entries]) == (32, ["short"])
    assert batcher.poll(now=10.0, engine_idle=True) is None


def test_drain_returns_everything_in_order():
    batcher: Batcher[int] = Batcher(POLICY)
    for i in range(20):
        batcher.add(i, tokens(4), now=i * 0.001)
    drained = batcher.drain(now=1.0)
    assert [e.item for b in drained for e in b.entries] == list(range(20))
    assert all(b.reason is FlushReason.DRAIN and b.rows <= 8 for b in drained)
    assert batcher.pending == 0


def test_posts_longer_than_the_largest_bucket_are_refused():
    with pytest.raises(ValueError, match="largest bucket"):
        Batcher(POLICY).add("x", tokens(257), now=0.0)


@settings(max_examples=50, deadline=None)
@given(st.lists(st.integers(min_value=0, max_value=256), max_size=40))
def test_a_fetch_added_at_once_queues_as_its_posts_added_one_by_one(lengths):
    one_by_one: Batcher[int] = Batcher(POLICY)
    at_once: Batcher[int] = Batcher(POLICY)
    for index, length in enumerate(lengths):
        one_by_one.add(index, tokens(length), now=1.0)
    at_once.add_many(list(range(len(lengths))), [tokens(length) for length in lengths], now=1.0)
    assert at_once.pending_by_bucket() == one_by_one.pending_by_bucket()
    assert at_once.drain(2.0) == one_by_one.drain(2.0)


def test_a_fetch_with_a_post_longer_than_the_largest_bucket_is_refused_after_the_posts_before_it():
    batcher: Batcher[str] = Batcher(POLICY)
    with pytest.raises(ValueError, match="exceed the largest bucket"):
        batcher.add_many(["a", "b", "c"], [tokens(3), tokens(257), tokens(4)], now=0.0)
    assert batcher.pending == 1
    batcher.add("d", tokens(5), now=0.0)
    assert [e.seq for e in batcher.drain(0.0)[0].entries] == [0, 1]


def test_policy_rejects_a_budget_that_cannot_hold_the_largest_bucket():
    with pytest.raises(ValueError, match="max_tokens"):
        BatchingPolicy(buckets=(32, 256), max_tokens=200)


arrivals = st.lists(
    st.tuples(st.integers(min_value=1, max_value=256), st.floats(min_value=0, max_value=0.03), st.booleans()),
    min_size=1,
    max_size=200,
)


@settings(max_examples=150, deadline=None)
@given(arrivals=arrivals, max_rows=st.integers(1, 16), max_tokens=st.integers(256, 2048), merge=st.booleans(),
       formation=st.sampled_from(list(Formation)), call_us=st.sampled_from([0, 30, 1000, 100_000]))
def test_property_budget_order_and_completeness(arrivals, max_rows, max_tokens, merge, formation, call_us):
    policy = BatchingPolicy(max_rows=max_rows, max_tokens=max_tokens, window=0.05, timeout=0.02,
                            merge_smaller_on_timeout=merge, formation=formation,
                            cost=CallCost(call=call_us / 1e6, token=1e-7))
    batcher: Batcher[int] = Batcher(policy)
    now, batches = 0.0, []
    for index, (length, gap, idle) in enumerate(arrivals):
        now += gap
        batcher.add(index, tokens(length), now)
        while (batch := batcher.poll(now, engine_idle=idle)) is not None:
            batches.append(batch)
    batches.extend(batcher.drain(now + 1))

    seen = [e.item for b in batches for e in b.entries]
    assert sorted(seen) == list(range(len(arrivals)))  # nothing dropped, nothing twice
    for batch in batches:
        assert 1 <= batch.rows <= max_rows
        assert batch.padded_tokens <= max_tokens  # never over the token budget
        assert all(len(e.token_ids) <= batch.bucket for e in batch.entries)
        homes = {policy.bucket_for(len(e.token_ids)) for e in batch.entries}
        if formation is Formation.BUCKETS and batch.reason is not FlushReason.TIMEOUT:
            assert homes == {batch.bucket}  # each post in the smallest bucket that holds it
        else:  # padded up to the longest post's bucket, never past it
            assert max(homes) == batch.bucket
    for bucket in policy.buckets:  # arrival order kept within each bucket's queue
        order = [e.item for b in batches for e in b.entries if policy.bucket_for(len(e.token_ids)) == bucket]
        assert order == sorted(order)
    if formation is Formation.ARRIVAL:  # dynamic padding: arrival order across lengths too
        order = [e.item for b in batches if b.reason is not FlushReason.DRAIN for e in b.entries]
        assert order == sorted(order)


@settings(max_examples=100, deadline=None)
@given(arrivals=arrivals, formation=st.sampled_from(list(Formation)))
def test_property_no_post_waits_past_the_window_when_polled_on_time(arrivals, formation):
    batcher: Batcher[int] = Batcher(dataclasses.replace(POLICY, formation=formation))
    now = 0.0
    for index, (length, gap, _) in enumerate(arrivals):
        # The driver wakes at every deadline before the next arrival.
        while (deadline := batcher.next_deadline(engine_idle=False)) is not None and deadline <= now + gap:
            batch = batcher.poll(deadline, engine_idle=False)
            assert batch is not None, "woken at a deadline with nothing due"
            assert max(batch.waits()) <= POLICY.window + 1e-9
        now += gap
        batcher.add(index, tokens(length), now)


def test_an_expired_post_of_a_rare_length_is_not_starved_by_buckets_that_keep_filling():
    batcher: Batcher[str] = Batcher(POLICY)
    batcher.add("rare", tokens(100), now=0.0)  # bucket 128, alone
    served: list[list[str]] = []
    for step in range(6):  # the engine takes one batch per step while the 32 bucket keeps filling
        now = 0.020 * (step + 1)
        for i in range(8):
            batcher.add(f"s{step}-{i}", tokens(10), now=now)
        batch = batcher.poll(now=now, engine_idle=False)
        assert batch is not None
        served.append([e.item for e in batch.entries])
    # Expired at 0.050, older than every full batch's head: the next batch after that (at 0.060) is it.
    assert served[2] == ["rare"]
    assert all(len(batch) == 8 for i, batch in enumerate(served) if i != 2)


GPU = dataclasses.replace(POLICY, max_rows=64, max_tokens=8192, formation=Formation.LEAST_COST, timeout=0.0,
                          cost=BACKEND_COSTS["engine-server"])


def test_least_cost_sends_a_few_posts_of_several_lengths_in_one_call_as_soon_as_a_stream_is_idle():
    batcher: Batcher[str] = Batcher(GPU)
    for item, length in [("a", 10), ("b", 50), ("c", 20), ("d", 100)]:
        batcher.add(item, tokens(length), now=1.0)
    # Padding 3 posts up to 128 costs ~30 us on a GPU, a call of their own ~1 ms each: one batch, at once.
    batch = batcher.poll(now=1.0, engine_idle=True)
    assert batch is not None and batch.reason is FlushReason.TIMEOUT
    assert (batch.bucket, [e.item for e in batch.entries]) == (128, ["a", "b", "c", "d"])
    assert batcher.poll(now=1.0, engine_idle=False) is None  # a busy engine: nothing due before the window


def test_least_cost_keeps_buckets_apart_where_padding_costs_more_than_a_call():
    # The same posts with the CPU's costs: a padded token costs as much as a call, so no merging at all.
    batcher: Batcher[str] = Batcher(dataclasses.replace(GPU, cost=BACKEND_COSTS["onnxruntime"]))
    for item, length in [("a", 10), ("b", 50), ("c", 20), ("d", 100)]:
        batcher.add(item, tokens(length), now=1.0)
    batches = [batcher.poll(now=1.0, engine_idle=True) for _ in range(3)]
    assert [(b.bucket, [e.item for e in b.entries]) for b in batches if b] == [
        (32, ["a", "c"]), (64, ["b"]), (128, ["d"])]


def test_least_cost_keeps_a_backlog_in_full_single_bucket_batches_and_merges_what_is_left():
    batcher: Batcher[int] = Batcher(GPU)  # 64 rows a batch at buckets 32 and 64
    for i in range(128):
        batcher.add(i, tokens(10 if i % 2 else 60), now=0.0)
    # Merged, 128 posts would still take two calls, and pad 64 of them: kept apart, each batch full.
    first, second = batcher.poll(now=0.0, engine_idle=False), batcher.poll(now=0.0, engine_idle=False)
    assert first is not None and second is not None
    assert [(b.bucket, b.rows, b.reason) for b in (first, second)] == [
        (32, 64, FlushReason.FULL), (64, 64, FlushReason.FULL)]
    for i, length in enumerate([10, 60, 5, 20]):  # a few posts: one call, padded to 64
        batcher.add(200 + i, tokens(length), now=0.001)
    third = batcher.poll(now=0.001, engine_idle=True)
    assert third is not None and (third.bucket, third.rows, third.reason) == (64, 4, FlushReason.TIMEOUT)
    assert batcher.pending == 0


@settings(max_examples=30, deadline=None)
@given(steps=st.lists(st.tuples(st.integers(0, 6), st.integers(1, 256), st.booleans()), min_size=1, max_size=60))
def test_least_cost_plan_cache_forms_the_same_batches_as_planning_at_every_poll(steps):
    cached: Batcher[int] = Batcher(GPU)
    fresh: Batcher[int] = Batcher(GPU)
    for i, (adds, length, idle) in enumerate(steps):
        now = i * 0.01
        for j in range(adds):
            for batcher in (cached, fresh):
                batcher.add(j, tokens(length), now=now)
        for _ in range(2):  # the second poll at the same queue lengths reuses the plan
            fresh._plan = None
            got, want = cached.poll(now=now, engine_idle=idle), fresh.poll(now=now, engine_idle=idle)
            assert (got and (got.bucket, got.reason, [e.seq for e in got.entries])) == (
                want and (want.bucket, want.reason, [e.seq for e in want.entries]))


ARRIVAL = dataclasses.replace(POLICY, formation=Formation.ARRIVAL)


def test_arrival_formation_pads_posts_of_any_length_to_the_longest_in_arrival_order():
    batcher: Batcher[str] = Batcher(ARRIVAL)
    for i, length in enumerate([10, 100, 20, 30]):
        batcher.add(f"p{i}", tokens(length), now=0.001 * i)
    assert batcher.poll(now=0.015, engine_idle=True) is None  # the oldest has not waited the timeout
    batch = batcher.poll(now=0.020, engine_idle=True)
    assert batch is not None and batch.reason is FlushReason.TIMEOUT
    assert (batch.bucket, [e.item for e in batch.entries]) == (128, ["p0", "p1", "p2", "p3"])


def test_arrival_formation_stops_at_the_first_post_that_would_overflow_the_budget():
    batcher: Batcher[str] = Batcher(ARRIVAL)  # 512 padded tokens, 8 rows
    for i, length in enumerate([10, 20, 30, 200, 10]):
        batcher.add(f"p{i}", tokens(length), now=0.0)
    # 3 short posts fit in 32, but with the 200-token one the batch would be 4 x 256 > 512: it is full.
    first = batcher.poll(now=0.0, engine_idle=False)
    assert first is not None and first.reason is FlushReason.FULL
    assert (first.bucket, [e.item for e in first.entries]) == (32, ["p0", "p1", "p2"])
    second = batcher.poll(now=0.05, engine_idle=False)
    assert second is not None and (second.bucket, [e.item for e in second.entries]) == (256, ["p3", "p4"])
