"""What an engine call costs, and the cheapest way to group the queued length buckets into calls.

An engine call costs a fixed amount however small it is -- on the GPU host a device call on the
engine server (~0.5 ms on the H200 for one or two rows: the graph replay, the copies, the server's
Python) plus the worker's own work per batch (~0.8 ms of its CPU: padding, the socket round trip,
the batch's Redis write, the task) -- and then an amount per padded token. Padding a short post up
to a longer bucket spends tokens; sending it in a call of its own spends a fixed cost. Which is
cheaper depends on how many posts wait: a few posts of neighbouring buckets are cheaper merged, a
backlog is cheaper kept apart. :func:`plan_groups` decides that for the queue as it stands, exactly.

Only the grouping depends on these figures -- never which posts are scored or counted: a post's
scores depend on its padding only by float noise (padding is masked), which can flip the label of a
post within ~1e-3 of a tie between two labels -- as the timing-dependent grouping of every formation
already can. The settings tune latency and throughput, not results.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass


@dataclass(frozen=True)
class CallCost:
    """An engine call's cost model: ``call + token x rows x padded length``, in seconds.

    Attributes:
        call: fixed seconds per engine call, whatever its size.
        token: seconds per padded token (rows x bucket).
    """

    call: float = 1.0e-3
    token: float = 1.0e-7

    def __post_init__(self) -> None:
        if self.call < 0 or self.token < 0:
            raise ValueError("call and token costs must not be negative")

    def of(self, rows: int, bucket: int) -> float:
        """Seconds for one call of ``rows`` posts padded to ``bucket``."""
        return self.call + self.token * rows * bucket


# Defaults per backend, fitted to our measurements (docs/benchmarks.md):
# - GPU (torch-cuda, tensorrt, engine-server): on the H200 a device call took 0.52 ms for ~2 rows of
#   ~30 tokens and 7.5 ms for 256 x 256 padded tokens (-> ~0.1 us per token); the workers' CPU grew by
#   ~0.85 ms per extra batch between the bucketed and padded-to-max runs at equal load (8,000 and
#   25,800 tweets/s). Half of that is the event loop's own share, so 1 ms per call in all.
# - CPU (onnxruntime): the INT8 engine took ~95 ms for a batch of 32 x 32 on 2 cores (~90 us per
#   token) against well under a millisecond of fixed cost, so padding never pays: buckets stay apart.
BACKEND_COSTS: dict[str, CallCost] = {
    "onnxruntime": CallCost(call=1.0e-4, token=9.0e-5),
    "torch-cuda": CallCost(call=1.0e-3, token=1.0e-7),
    "tensorrt": CallCost(call=1.0e-3, token=1.0e-7),
    "engine-server": CallCost(call=1.0e-3, token=1.0e-7),
}


# With the packed forward (``engine.torch_forward = "packed"``, engines/torch_packed.py) the device runs
# real tokens only: the padding a merge adds is stripped on the host (engines/packing.py) before any
# kernel sees it. A padded token then costs only its bytes -- filled into the worker's TokenBatch, 5 bytes
# over the engine server's socket (engines/wire.py), widened to int64 and masked away by pack_into --
# an estimate of ~2 ns in all (host memory traffic, not measured), against ~100 ns of device time in the
# padded forward. Real tokens cost the same whichever group a post joins, so they never enter the choice:
# least-cost then merges neighbours almost whenever that saves a call, bounded by each call's capacity.
PACKED_TOKEN_COST = 2.0e-9
# Backends whose device forward is the torch one: torch-cuda itself, and an engine server running it.
PACKED_BACKENDS = frozenset({"torch-cuda", "engine-server"})


def backend_cost(backend: str, call_us: float | None = None, token_ns: float | None = None, *,
                 packed: bool = False) -> CallCost:
    """The cost model for ``backend``, with the configured figures replacing its defaults where set.

    ``packed``: the torch forward is the packed one (``engine.torch_forward``), so a padded token costs
    :data:`PACKED_TOKEN_COST` by default (torch-cuda and engine-server only; ignored elsewhere).
    """
    default = BACKEND_COSTS.get(backend, BACKEND_COSTS["engine-server"])
    if packed and backend in PACKED_BACKENDS:
        default = CallCost(call=default.call, token=PACKED_TOKEN_COST)
    return CallCost(call=default.call if call_us is None else call_us / 1e6,
                    token=default.token if token_ns is None else token_ns / 1e9)


def group_cost(posts: int, bucket: int, capacity: int, cost: CallCost) -> float:
    """Seconds to score ``posts`` padded to ``bucket`` in calls of at most ``capacity`` rows."""
    calls = -(-posts // capacity)
    return calls * cost.call + posts * bucket * cost.token


def plan_groups(
    waiting: Sequence[tuple[int, int]], capacity: Callable[[int], int], cost: CallCost,
) -> list[tuple[int, ...]]:
    """The cheapest split of the waiting buckets into runs of neighbours, each padded to its longest.

    Args:
        waiting: ``(bucket, posts queued)`` for the non-empty buckets, in increasing bucket order.
        capacity: most rows of one call padded to a bucket (called once per waiting bucket).
        cost: the engine's call cost.

    Returns:
        The groups, as tuples of buckets in increasing order, covering ``waiting`` exactly. Only
        neighbours merge (padding a short post past a middle bucket's posts would pad those too);
        a dynamic programme over the split points finds the exact optimum, O(buckets^2).
    """
    count = len(waiting)
    if count == 1:  # nothing to split: the common case under steady single-length traffic
        return [(waiting[0][0],)]
    # Hoisted out of the O(buckets^2) loop, which runs on the event loop at every poll: each
    # bucket's capacity once, and group_cost inlined (the same sum, in the same order, so the same floats).
    capacities = [capacity(bucket) for bucket, _ in waiting]
    call, token = cost.call, cost.token
    best = [0.0] + [float("inf")] * count  # best[j]: cheapest cost of the first j buckets
    cut = [0] * (count + 1)
    for end in range(1, count + 1):
        bucket, rows = waiting[end - 1][0], capacities[end - 1]
        posts = 0
        best_end, cut_end = best[end], cut[end]
        for start in range(end, 0, -1):  # the group waiting[start-1:end], padded to its last bucket
            posts += waiting[start - 1][1]
            total = best[start - 1] + ((-(-posts // rows)) * call + posts * bucket * token)
            # Strictly cheaper only: on a tie the smaller group (less padding) is kept.
            if total < best_end:
                best_end, cut_end = total, start - 1
        best[end], cut[end] = best_end, cut_end
    groups: list[tuple[int, ...]] = []
    end = count
    while end > 0:
        start = cut[end]
        groups.append(tuple(bucket for bucket, _ in waiting[start:end]))
        end = start
    return groups[::-1]
