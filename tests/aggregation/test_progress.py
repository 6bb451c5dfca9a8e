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
