"""The batcher's flush policy and batch formation, on an injected clock (no real time)."""

from __future__ import annotations

import dataclasses

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from stream_sentiment.batching.batcher import Batcher, BatchingPolicy, FlushReason

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


def test_policy_rejects_a_budget_that_cannot_hold_the_largest_bucket():
    with pytest.raises(ValueError, match="max_tokens"):
        BatchingPolicy(buckets=(32, 256), max_tokens=200)


arrivals = st.lists(
    st.tuples(st.integers(min_value=1, max_value=256), st.floats(min_value=0, max_value=0.03), st.booleans()),
    min_size=1,
    max_size=200,
)


@settings(max_examples=200, deadline=None)
@given(arrivals=arrivals, max_rows=st.integers(1, 16), max_tokens=st.integers(256, 2048), merge=st.booleans())
def test_property_budget_order_and_completeness(arrivals, max_rows, max_tokens, merge):
    policy = BatchingPolicy(max_rows=max_rows, max_tokens=max_tokens, window=0.05, timeout=0.02,
                            merge_smaller_on_timeout=merge)
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
        # each post sits in the smallest bucket that holds it; only a timeout batch pads smaller posts up
        homes = {policy.bucket_for(len(e.token_ids)) for e in batch.entries}
        assert homes == {batch.bucket} if batch.reason is not FlushReason.TIMEOUT else max(homes) == batch.bucket
    for bucket in policy.buckets:  # arrival order kept within each bucket's queue
        order = [e.item for b in batches for e in b.entries if policy.bucket_for(len(e.token_ids)) == bucket]
        assert order == sorted(order)


@settings(max_examples=100, deadline=None)
@given(arrivals=arrivals)
def test_property_no_post_waits_past_the_window_when_polled_on_time(arrivals):
    batcher: Batcher[int] = Batcher(POLICY)
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
