"""Packed (unpadded) batches: the host side of the varlen GPU engine."""

from __future__ import annotations

import numpy as np
import pytest

from stream_sentiment.batching.tokenizer import pad_to_bucket
from stream_sentiment.engines.packing import PackLayout, budget_for, pack_into, pad_slots_for, token_budgets


def test_budgets_double_then_step() -> None:
    assert token_budgets(10000, smallest=512, step=2048) == (512, 1024, 2048, 4096, 6144, 8192, 10000)
    assert budget_for(1, (512, 1024)) == 512
    assert budget_for(513, (512, 1024)) == 1024
    with pytest.raises(ValueError):
        budget_for(1025, (512, 1024))
    # The largest padding is the largest gap between budgets (or the first budget).
    assert pad_slots_for((512, 1024, 2048, 4096), 256) == 8


def _arrays(layout: PackLayout) -> tuple[np.ndarray, ...]:
    most = layout.budgets[-1]
    return (np.full(most, -1, np.int32), np.full(most, -1, np.int32), np.full(most, -1, np.int32),
            np.full(layout.cu_size, -1, np.int32))


@pytest.mark.parametrize("lengths", [[5, 1, 16, 9], [16] * 8, [1]])
def test_pack_keeps_each_post_and_pads_with_short_dummies(lengths: list[int]) -> None:
    layout = PackLayout(rows_capacity=8, max_length=16, budgets=token_budgets(128, smallest=16, step=32))
    rng = np.random.default_rng(len(lengths))
    posts = [rng.integers(1000, 2000, n).tolist() for n in lengths]
    ids, positions, segments, cu = _arrays(layout)
    packed = pack_into(pad_to_bucket(posts, 16), layout, ids, positions, segments, cu)

    assert (packed.rows, packed.real_tokens) == (len(posts), sum(lengths))
    assert packed.budget == budget_for(sum(lengths), layout.budgets)
    for row, post in enumerate(posts):
        start, end = cu[row], cu[row + 1]
        assert ids[start:end].tolist() == post
        assert positions[start:end].tolist() == list(range(len(post)))
        assert (segments[start:end] == row).all()
    # Unused post slots are empty; dummies hold the padding, none longer than max_length; the end is the budget.
    assert (cu[len(posts) + 1 : layout.rows_capacity + 1] == sum(lengths)).all()
    dummies = np.diff(cu[layout.rows_capacity :])
    assert dummies.min() >= 0 and dummies.max() <= layout.max_length
    assert cu[-1] == packed.budget and (np.diff(cu) >= 0).all()
    pad = slice(sum(lengths), packed.budget)
    assert (ids[pad] == 0).all() and (segments[pad] == layout.rows_capacity).all()
    assert (positions[pad] < layout.max_length).all()
    for slot in range(layout.rows_capacity, layout.cu_size - 1):  # each dummy's positions start at 0
        assert positions[cu[slot] : cu[slot + 1]].tolist() == list(range(cu[slot + 1] - cu[slot]))


def test_pack_refuses_what_the_layout_cannot_hold() -> None:
    layout = PackLayout(rows_capacity=2, max_length=8, budgets=(16, 32))
    arrays = _arrays(layout)
    with pytest.raises(ValueError, match="rows"):
        pack_into(pad_to_bucket([[1]] * 3, 8), layout, *arrays)
    with pytest.raises(ValueError, match="max_length"):
        pack_into(pad_to_bucket([[1] * 9], 16), layout, *arrays)


class _TooFewDummies(PackLayout):
    @property
    def pad_slots(self) -> int:  # fewer than pad_slots_for's count: the guard's only way to fire
        return 1


def test_too_much_padding_is_refused_before_any_buffer_is_written() -> None:
    layout = _TooFewDummies(rows_capacity=2, max_length=8, budgets=(32,))
    arrays = _arrays(layout)
    with pytest.raises(ValueError, match="dummy slots"):
        pack_into(pad_to_bucket([[1, 2]], 8), layout, *arrays)  # 30 padding tokens, room for 8
    assert all((array == -1).all() for array in arrays)
