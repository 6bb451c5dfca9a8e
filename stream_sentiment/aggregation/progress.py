"""Per-partition progress: turn out-of-order completions into contiguous, appliable offset ranges.

Posts of one partition land in different length buckets, so their batches
finish out of order. Redis may only advance a partition's high-water mark over
a *contiguous* run of finished records, so each partition keeps the records it
has fetched, in offset order, and hands out the longest finished prefix.

Ranges start at the partition's mark, not at a record's offset: Kafka offsets
may skip (compaction, transaction markers), and the fence in
``sinks.redis_sink`` requires each range to begin exactly where the last one
ended.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Generic, TypeVar

Result = TypeVar("Result")

_PENDING = object()


@dataclass(frozen=True)
class ReadyRange(Generic[Result]):
    """Finished records ``[first, next_offset)`` of one partition, in offset order."""

    partition: int
    first: int
    next_offset: int
    results: list[Result]


class PartitionProgress(Generic[Result]):
    """Fetched-but-unapplied records of one partition.

    Args:
        partition: the Kafka partition.
        mark: the next offset to apply (Redis's high-water mark, where the
            consumer was positioned).
        stream_time: the highest event time applied before ``mark`` (None
            before the partition's first post); moves with the mark.
    """

    def __init__(self, partition: int, mark: int, stream_time: float | None = None) -> None:
        self.partition = partition
        self.mark = mark
        self.stream_time = stream_time
        self._records: OrderedDict[int, object] = OrderedDict()
        # The last offset fetched: while records are in flight, the last key of _records (kept here because
        # the source asks for next_offset once per fetched record).
        self._last = mark - 1

    def fetched(self, offset: int) -> None:
        """Register a record as in flight; offsets must increase."""
        if offset < self.mark or (self._records and offset <= self._last):
            raise ValueError(f"partition {self.partition}: offset {offset} is not after the last one")
        self._records[offset] = _PENDING
        self._last = offset

    def finished(self, offset: int, result: Result) -> None:
        if self._records.get(offset, None) is not _PENDING:
            raise KeyError(f"partition {self.partition}: offset {offset} is not in flight")
        self._records[offset] = result

    def finished_many(self, offsets: Iterable[int], results: Iterable[Result]) -> int:
        """:meth:`finished` for each pair, skipping offsets not in flight; returns how many were finished.

        One call per scored batch and partition instead of one per post (a record no longer in flight
        was dropped by a revoke: its next fetch is finished instead). The caller passes only results of
        records this progress fetched: a progress replaced meanwhile (rebase, resync) has other records at
        the same offsets (``Admitted.owner``).
        """
        records = self._records
        finished = 0
        for offset, result in zip(offsets, results, strict=True):
            if records.get(offset, None) is _PENDING:
                records[offset] = result
                finished += 1
        return finished

    @property
    def in_flight(self) -> int:
        return len(self._records)

    @property
    def next_offset(self) -> int:
        """The offset the next fetched record should have: after the last one in flight, else the mark."""
        return self._last + 1 if self._records else self.mark

    def summary(self) -> dict[str, int | None]:
        """Where the partition stands: its mark, records in flight, and the first one not yet finished."""
        first_pending = next((offset for offset, value in self._records.items() if value is _PENDING), None)
        return {"mark": self.mark, "in_flight": len(self._records), "first_unfinished": first_pending}

    def take_ready(self) -> ReadyRange[Result] | None:
        """The longest finished prefix as one range; nothing is removed until :meth:`applied`.

        Peeking, not popping: if writing the range fails (a Redis error, a cancelled task), the
        records are still here and the next call offers the same range again, from the same mark.
        Popping first would let the next range start at the old mark but hold only later records,
        and the fence would mark the missing ones applied without counting them.
        """
        results: list[Result] = []
        last = None
        for offset, value in self._records.items():
            if value is _PENDING:
                break
            results.append(value)  # type: ignore[arg-type]
            last = offset
        if last is None:
            return None
        return ReadyRange(self.partition, self.mark, last + 1, results)

    def applied(self, ready: ReadyRange[Result]) -> None:
        """Redis accepted (or already had) ``ready``: its records leave and the mark moves to its end."""
        if ready.first != self.mark:
            raise ValueError(f"partition {self.partition}: range starts at {ready.first}, the mark is {self.mark}")
        while self._records and next(iter(self._records)) < ready.next_offset:
            self._records.popitem(last=False)
        self.mark = ready.next_offset
