from __future__ import annotations

import itertools

import pytest
from hypothesis import given
from hypothesis import strategies as st

from stream_sentiment.aggregation.progress import PartitionProgress


def test_only_a_contiguous_finished_prefix_is_ready():
    progress: PartitionProgress[str] = PartitionProgress(partition=2, mark=100)
    for offset in (100, 101, 103, 104):  # 102 was compacted away
        progress.fetched(offset)
    progress.finished(101, "b")
    assert progress.take_ready() is None  # 100 is still running
    progress.finished(100, "a")
    progress.finished(104, "d")
    ready = progress.take_ready()
    assert ready is not None and (ready.first, ready.next_offset, ready.results) == (100, 102, ["a", "b"])
    progress.applied(ready)
    progress.finished(103, "c")
    ready = progress.take_ready()
    # The range starts at the mark (102), not at the record (103): the fence needs no gaps.
    assert ready is not None and (ready.first, ready.next_offset, ready.results) == (102, 105, ["c", "d"])


def test_offsets_must_increase_and_be_in_flight():
    progress: PartitionProgress[int] = PartitionProgress(0, mark=10)
    with pytest.raises(ValueError, match="not after"):
        progress.fetched(9)
    progress.fetched(10)
    with pytest.raises(ValueError, match="not after"):
        progress.fetched(10)
    with pytest.raises(KeyError):
        progress.finished(11, 1)


@given(st.permutations(list(range(30))), st.integers(0, 1000))
def test_property_ranges_tile_the_partition_in_order(completion_order, start):
    progress: PartitionProgress[int] = PartitionProgress(0, mark=start)
    for i in range(30):
        progress.fetched(start + i)
    ranges = []
    for i in completion_order:
        progress.finished(start + i, i)
        if (ready := progress.take_ready()) is not None:
            progress.applied(ready)
            ranges.append(ready)
    assert [r for rng in ranges for r in rng.results] == list(range(30))
    assert ranges[0].first == start and ranges[-1].next_offset == start + 30
    assert all(a.next_offset == b.first for a, b in itertools.pairwise(ranges))
    assert progress.in_flight == 0


def test_a_range_whose_write_failed_is_offered_again_with_nothing_skipped():
    progress: PartitionProgress[str] = PartitionProgress(partition=0, mark=100)
    for offset in range(100, 104):
        progress.fetched(offset)
    progress.finished(100, "a")
    progress.finished(101, "b")
    first_try = progress.take_ready()  # suppose the Redis write of this range fails: applied() never runs
    progress.finished(102, "c")
    again = progress.take_ready()
    assert again is not None and first_try is not None
    assert (again.first, again.next_offset, again.results) == (100, 103, ["a", "b", "c"])
    with pytest.raises(ValueError, match="the mark is 103"):
        progress.applied(again)
        progress.applied(first_try)  # a stale range can never move the mark
    assert progress.mark == 103 and progress.in_flight == 1
