"""Length-bucketed batch formation: which posts run together, and when.

Pure and clock-free: every method takes ``now`` (seconds on a monotonic clock)
and returns plain data, so the policy is tested deterministically without a
broker, an engine or real time; the async driver asks ``next_deadline()`` how
long it may sleep.

Posts wait in one FIFO queue per length bucket. A bucket flushes

* **full** - it holds as many posts as one batch may take (``max_rows``, or
  fewer when ``rows x bucket`` would exceed the token budget);
* **window** - its oldest post has waited ``window`` seconds;
* **timeout** - an engine stream is idle and its oldest post has waited
  ``timeout`` seconds (the fallback that keeps sparse traffic from waiting the
  whole window while the engine has nothing to do).

Batch formation follows TEI's queue: take posts in arrival order, stop before
the padded cost ``bucket x rows`` exceeds the token budget.

Which posts form a batch is the policy's ``formation``:

* ``buckets`` - one bucket per batch, as above (with the merge below);
* ``least-cost`` - the queued buckets are split into runs of neighbours the way that
  costs least by the engine's cost model (``batching.cost``: a fixed cost per call
  plus a cost per padded token), and a run is one batch padded to its longest
  bucket: a few posts of neighbouring lengths share one call, a backlog stays apart.
  A run is due on the same full / window / timeout rules; with ``timeout`` 0 a
  batch leaves as soon as a stream is idle (an idle stream gains nothing from
  waiting but posts, and the next fetch is milliseconds away);
* ``arrival`` - dynamic padding, the baseline: posts in arrival order across all
  lengths, padded to the smallest bucket holding the batch's longest post (with
  buckets every 8 tokens, to its length rounded up to a multiple of 8).

With ``merge_smaller_on_timeout`` (for GPUs), a **timeout** batch also takes the
oldest posts of the smaller buckets into its spare rows, padded up: an engine
stream is idle then, so the extra padding uses capacity nobody else wanted,
while every engine call saved is a fixed cost saved (a GPU time slice, a Redis
write) - at sparse traffic, where timeouts fire, those fixed costs are what
limit latency. Off by default: on a CPU the cost of a batch grows with its
padded tokens, so merging would spend more than it saves. Full and window
batches always stay one bucket, so padding stays low when the engine is busy.
"""

from __future__ import annotations

import bisect
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Generic, TypeVar

from stream_sentiment.batching.cost import CallCost, plan_groups

Item = TypeVar("Item")


class Formation(StrEnum):
    """Which posts form a batch (see the module docstring)."""

    BUCKETS = "buckets"
    LEAST_COST = "least-cost"
    ARRIVAL = "arrival"


class FlushReason(StrEnum):
    FULL = "full"
    WINDOW = "window"
    TIMEOUT = "timeout"
    DRAIN = "drain"


@dataclass(frozen=True)
class BatchingPolicy:
    """How batches are formed. Seconds for times.

    Attributes:
        buckets: padded lengths, increasing; a post goes to the smallest that fits.
        max_rows: most posts in one batch.
        max_tokens: most padded tokens (``rows x bucket``) in one batch; at
            least the largest bucket, so any admitted post fits alone.
        window: the longest a post waits for its batch to fill.
        timeout: with an idle engine stream, the longest a post waits.
        merge_smaller_on_timeout: a timeout batch fills its spare rows with the
            oldest posts of smaller buckets (``buckets`` formation only).
        formation: which posts form a batch (see the module docstring).
        cost: the engine's call cost, which ``least-cost`` formation minimizes.
    """

    buckets: tuple[int, ...] = (32, 64, 128, 256)
    max_rows: int = 64
    max_tokens: int = 8192
    window: float = 0.050
    timeout: float = 0.020
    merge_smaller_on_timeout: bool = False
    formation: Formation = Formation.BUCKETS
    cost: CallCost = field(default_factory=CallCost)
    # Each bucket's capacity, computed once: the batcher asks for it at every poll.
    _capacities: dict[int, int] = field(init=False, repr=False, compare=False)
    # The bucket of every length up to the largest bucket (0 tokens: the smallest), for adding a fetch at once.
    _bucket_of_length: tuple[int, ...] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if not self.buckets or list(self.buckets) != sorted(set(self.buckets)):
            raise ValueError(f"buckets must be increasing and unique, got {self.buckets}")
        if self.max_rows < 1:
            raise ValueError("max_rows must be at least 1")
        if self.max_tokens < self.buckets[-1]:
            raise ValueError(f"max_tokens {self.max_tokens} cannot hold one post of the largest bucket")
        if not 0 <= self.timeout <= self.window:
            raise ValueError("need 0 <= timeout <= window")
        object.__setattr__(self, "_capacities", {bucket: self._capacity(bucket) for bucket in self.buckets})
        object.__setattr__(self, "_bucket_of_length",
                           tuple(self.bucket_for(max(1, length)) for length in range(self.buckets[-1] + 1)))

    def _capacity(self, bucket: int) -> int:
        return max(1, min(self.max_rows, self.max_tokens // bucket))

    def capacity(self, bucket: int) -> int:
        """Posts that fill one batch of ``bucket``."""
        capacity = self._capacities.get(bucket)
        return self._capacity(bucket) if capacity is None else capacity

    def bucket_for(self, length: int) -> int:
        index = bisect.bisect_left(self.buckets, length)
        if index == len(self.buckets):
            raise ValueError(f"{length} tokens exceed the largest bucket {self.buckets[-1]}")
        return self.buckets[index]


@dataclass(slots=True)
class Pending(Generic[Item]):
    """A queued post. Immutable by convention, not frozen: one is made per post on the hot path, and a
    frozen dataclass's ``__init__`` sets each field through ``object.__setattr__``, four times the cost."""

    item: Item
    token_ids: Sequence[int]
    arrived: float
    # Order of arrival across all buckets: posts of one fetch share ``arrived``.
    seq: int = 0


@dataclass(frozen=True)
class FormedBatch(Generic[Item]):
    """What the batcher hands to an engine stream: posts padded to one bucket.

    ``buckets`` formation: posts of that bucket in arrival order, then (a merged timeout batch only)
    the oldest posts of smaller buckets. ``least-cost`` and ``arrival``: posts of that bucket and
    smaller ones, oldest first.
    """

    bucket: int
    entries: tuple[Pending[Item], ...]
    reason: FlushReason
    formed: float

    @property
    def rows(self) -> int:
        return len(self.entries)

    @property
    def real_tokens(self) -> int:
        return sum(len(e.token_ids) for e in self.entries)

    @property
    def padded_tokens(self) -> int:
        return self.rows * self.bucket

    @property
    def padding_efficiency(self) -> float:
        return self.real_tokens / self.padded_tokens

    def waits(self) -> list[float]:
        return [self.formed - e.arrived for e in self.entries]


def take_batch(queue: deque[Pending[Item]], bucket: int, policy: BatchingPolicy) -> tuple[Pending[Item], ...]:
    """Pop the next batch from a bucket's queue: arrival order, within rows and token budget."""
    limit = policy.capacity(bucket)
    taken: list[Pending[Item]] = []
    while queue and len(taken) < limit:
        taken.append(queue.popleft())
    return tuple(taken)


def take_smaller(queues: Sequence[deque[Pending[Item]]], room: int) -> list[Pending[Item]]:
    """Pop up to ``room`` posts from ``queues`` (smaller buckets, or a least-cost group), oldest first across them."""
    taken: list[Pending[Item]] = []
    heads = [queue for queue in queues if queue]
    while heads and len(taken) < room:
        if len(heads) == 1:  # the rest of one queue, already in arrival order
            queue, popleft = heads[0], heads[0].popleft
            taken += [popleft() for _ in range(min(room - len(taken), len(queue)))]
            break
        queue = min(heads, key=_head_seq)
        taken.append(queue.popleft())
        if not queue:
            heads.remove(queue)
    return taken


def _head_seq(queue: deque[Pending[Item]]) -> int:
    return queue[0].seq


def peek_arrival(queues: Sequence[deque[Pending[Item]]], policy: BatchingPolicy) -> tuple[list[int], bool]:
    """The oldest posts across ``queues`` that fit one call padded to their longest, without popping.

    Returns the queue index of each post, oldest first, and whether a post was left behind for
    want of room (the batch is full). Reads at most one batch deep into each queue, however long.
    """
    depth = [0] * len(queues)
    taken: list[int] = []
    longest = 0
    while True:
        index = min((i for i, queue in enumerate(queues) if depth[i] < len(queue)),
                    key=lambda i: queues[i][depth[i]].seq, default=None)
        if index is None:
            return taken, False
        length = max(longest, len(queues[index][depth[index]].token_ids), 1)
        if len(taken) + 1 > policy.capacity(policy.bucket_for(length)):
            return taken, True
        taken.append(index)
        depth[index] += 1
        longest = length


@dataclass
class Batcher(Generic[Item]):
    """Per-bucket FIFO queues plus the flush policy."""

    policy: BatchingPolicy
    _queues: dict[int, deque[Pending[Item]]] = field(init=False)
    _added: int = field(init=False, default=0)
    # least-cost: the last plan and the queue lengths it was made for. Polls between two changes of
    # the queues (timer wake-ups, an engine stream turning idle) reuse it rather than rerun the DP.
    _plan: tuple[tuple[tuple[int, int], ...], list[tuple[int, ...]]] | None = field(init=False, default=None)

    def __post_init__(self) -> None:
        self._queues = {bucket: deque() for bucket in self.policy.buckets}

    def add(self, item: Item, token_ids: Sequence[int], now: float) -> int:
        """Queue a post; returns its bucket. Raises ValueError if it fits no bucket."""
        bucket = self.policy.bucket_for(max(1, len(token_ids)))
        self._queues[bucket].append(Pending(item, token_ids, now, self._added))
        self._added += 1
        return bucket

    def add_many(self, items: Sequence[Item], token_ids: Sequence[Sequence[int]], now: float) -> None:
        """:meth:`add` each item with its token ids, in order: a fetch at once, each bucket found in a table.

        Raises ValueError if a post fits no bucket (the posts before it are queued).
        """
        bucket_of, queues, added = self.policy._bucket_of_length, self._queues, self._added
        try:
            for item, ids in zip(items, token_ids, strict=True):
                queues[bucket_of[len(ids)]].append(Pending(item, ids, now, added))
                added += 1
        except IndexError:
            raise ValueError(f"{len(ids)} tokens exceed the largest bucket {self.policy.buckets[-1]}") from None
        finally:
            self._added = added

    @property
    def pending(self) -> int:
        return sum(len(q) for q in self._queues.values())

    def pending_by_bucket(self) -> dict[int, int]:
        return {bucket: len(queue) for bucket, queue in self._queues.items()}

    def _due(self, now: float, engine_idle: bool) -> tuple[int, FlushReason] | None:
        # Compared as "now >= arrived + wait", the same sum next_deadline()
        # returns: "now - arrived >= wait" can round false at that very
        # deadline, and a driver woken there would find nothing due, forever.
        window = self.policy.window
        due = [b for b, q in self._queues.items()
               if q and (len(q) >= self.policy.capacity(b) or now >= q[0].arrived + window)]
        if due:
            # Full and expired buckets alike, oldest head first: were full ones served first, a rare
            # length's expired posts would wait as long as busy buckets keep filling -- and hold back
            # their partitions' Redis progress meanwhile.
            bucket = min(due, key=lambda b: self._queues[b][0].arrived)
            full = len(self._queues[bucket]) >= self.policy.capacity(bucket)
            return bucket, FlushReason.FULL if full else FlushReason.WINDOW
        waiting = [b for b, q in self._queues.items() if q]
        if not waiting:
            return None
        oldest = min(waiting, key=lambda b: self._queues[b][0].arrived)
        if engine_idle and now >= self._queues[oldest][0].arrived + self.policy.timeout:
            return oldest, FlushReason.TIMEOUT
        return None

    def _expired(self, head: float, now: float, engine_idle: bool) -> bool:
        """Has a queue whose oldest post arrived at ``head`` waited its window (or, stream idle, timeout)?"""
        return now >= head + self.policy.window or (engine_idle and now >= head + self.policy.timeout)

    def _poll_least_cost(self, now: float, engine_idle: bool) -> FormedBatch[Item] | None:
        """The due group of the cheapest split (full, or its oldest post waited), oldest head first."""
        policy = self.policy
        waiting = tuple((b, len(q)) for b, q in self._queues.items() if q)
        if not waiting:
            return None
        if self._plan is None or self._plan[0] != waiting:
            self._plan = (waiting, plan_groups(waiting, policy.capacity, policy.cost))
        due: list[tuple[float, tuple[int, ...], FlushReason]] = []
        for group in self._plan[1]:
            head = min(self._queues[b][0].arrived for b in group)
            if sum(len(self._queues[b]) for b in group) >= policy.capacity(group[-1]):
                due.append((head, group, FlushReason.FULL))
            elif self._expired(head, now, engine_idle):
                due.append((head, group, FlushReason.WINDOW if now >= head + policy.window else FlushReason.TIMEOUT))
        if not due:
            return None
        _, group, reason = min(due, key=lambda d: d[0])
        entries = take_smaller([self._queues[b] for b in group], policy.capacity(group[-1]))
        # Padded to its longest post's bucket: the oldest posts may all come from the group's shorter buckets.
        bucket = policy.bucket_for(max([len(entry.token_ids) for entry in entries]))
        return FormedBatch(bucket, tuple(entries), reason, now)

    def _poll_arrival(self, now: float, engine_idle: bool) -> FormedBatch[Item] | None:
        """Dynamic padding: the oldest posts across lengths, when full or their oldest has waited."""
        heads = [q[0].arrived for q in self._queues.values() if q]
        if not heads:
            return None
        queues = list(self._queues.values())
        # Peeked first: a batch that is neither full nor due leaves the queues as they are.
        taken, full = peek_arrival(queues, self.policy)
        if not full and not self._expired(min(heads), now, engine_idle):
            return None
        entries = [queues[index].popleft() for index in taken]
        reason = FlushReason.FULL if full else (
            FlushReason.WINDOW if now >= min(heads) + self.policy.window else FlushReason.TIMEOUT)
        bucket = self.policy.bucket_for(max(1, *(len(e.token_ids) for e in entries)))
        return FormedBatch(bucket, tuple(entries), reason, now)

    def poll(self, now: float, engine_idle: bool) -> FormedBatch[Item] | None:
        """The batch that is due at ``now``, if any."""
        if self.policy.formation is Formation.LEAST_COST:
            return self._poll_least_cost(now, engine_idle)
        if self.policy.formation is Formation.ARRIVAL:
            return self._poll_arrival(now, engine_idle)
        due = self._due(now, engine_idle)
        if due is None:
            return None
        bucket, reason = due
        entries = take_batch(self._queues[bucket], bucket, self.policy)
        room = self.policy.capacity(bucket) - len(entries)
        if reason is FlushReason.TIMEOUT and self.policy.merge_smaller_on_timeout and room > 0:
            smaller = [queue for b, queue in self._queues.items() if b < bucket]
            entries += tuple(take_smaller(smaller, room))
        return FormedBatch(bucket, entries, reason, now)

    def drain(self, now: float) -> list[FormedBatch[Item]]:
        """Everything still queued, as batches (shutdown, hot swap, partition revoke)."""
        batches = []
        for bucket, queue in self._queues.items():
            while queue:
                batches.append(FormedBatch(bucket, take_batch(queue, bucket, self.policy), FlushReason.DRAIN, now))
        return batches

    def next_deadline(self, engine_idle: bool) -> float | None:
        """The earliest time a flush can become due with no new posts; None when empty."""
        heads = [q[0].arrived for q in self._queues.values() if q]
        if not heads:
            return None
        wait = self.policy.timeout if engine_idle else self.policy.window
        return min(heads) + wait
