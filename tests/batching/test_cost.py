"""The cost model and the cheapest split of queued buckets into calls, checked against brute force."""

from __future__ import annotations

import itertools

from hypothesis import given, settings
from hypothesis import strategies as st

from stream_sentiment.batching.cost import BACKEND_COSTS, CallCost, backend_cost, group_cost, plan_groups

BUCKETS = (16, 24, 32, 48, 64, 96, 128, 256)


def capacity(bucket: int) -> int:
    return min(64, 4096 // bucket)


def split_cost(groups: list[tuple[int, ...]], counts: dict[int, int], cost: CallCost) -> float:
    return sum(group_cost(sum(counts[b] for b in g), g[-1], capacity(g[-1]), cost) for g in groups)


@settings(max_examples=100, deadline=None)
@given(counts=st.lists(st.integers(0, 150), min_size=len(BUCKETS), max_size=len(BUCKETS)),
       call_us=st.sampled_from([0, 10, 300, 1000, 20_000]), token_ns=st.sampled_from([0, 100, 5_000]))
def test_plan_is_the_cheapest_split_into_runs_of_neighbours(counts, call_us, token_ns):
    cost = CallCost(call_us / 1e6, token_ns / 1e9)
    waiting = [(b, n) for b, n in zip(BUCKETS, counts, strict=True) if n]
    plan = plan_groups(waiting, capacity, cost)
    assert [b for g in plan for b in g] == [b for b, _ in waiting]  # every waiting bucket, once, in order
    by_bucket = dict(waiting)
    # Brute force over every set of split points between neighbours.
    cheapest = min(
        (split_cost([tuple(b for b, _ in waiting[i:j]) for i, j in itertools.pairwise((0, *cuts, len(waiting)))],
                    by_bucket, cost)
         for r in range(len(waiting)) for cuts in itertools.combinations(range(1, len(waiting)), r)),
        default=0.0)
    assert abs(split_cost(plan, by_bucket, cost) - cheapest) <= 1e-12


def test_free_calls_keep_every_bucket_apart_and_free_tokens_merge_everything():
    waiting = [(16, 3), (32, 2), (128, 1)]
    assert plan_groups(waiting, capacity, CallCost(call=0.0, token=1e-7)) == [(16,), (32,), (128,)]
    assert plan_groups(waiting, capacity, CallCost(call=1e-3, token=0.0)) == [(16, 32, 128)]


def test_backend_defaults_and_overrides():
    assert backend_cost("torch-cuda") == BACKEND_COSTS["torch-cuda"]
    assert backend_cost("onnxruntime", call_us=250) == CallCost(call=250e-6, token=BACKEND_COSTS["onnxruntime"].token)
    assert backend_cost("engine-server", token_ns=50).token == 50e-9
