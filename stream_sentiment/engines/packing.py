"""Unpadded ("packed", varlen) batches for GPU engines: only real tokens go through the encoder.

A bucketed ``TokenBatch`` of ``rows x bucket`` ids computes every padding cell;
with the fine buckets ~10% of the cells are padding, with the manifest's ~30%.
A packed batch concatenates the rows' real tokens into one ``[tokens]`` stream,
so every matmul runs on real tokens only, and attention stays inside each post
through ``cu_seqlens`` (the cumulative lengths varlen flash attention takes).

CUDA graphs need fixed shapes, so a packed batch is padded up to one of a few
token budgets (:func:`token_budgets`) and to a fixed number of sequence slots:

* slots ``0 .. rows_capacity-1`` are the posts, unused ones of length zero;
* the padding tokens after the last post form up to ``pad_slots`` dummy
  sequences of at most ``max_length`` tokens each (varlen attention computes
  nothing beyond a sequence's ``max_length`` rows, so one long dummy would leave
  garbage; short dummies keep every row a real, finite attention output);
* ``cu_seqlens`` therefore always has ``rows_capacity + pad_slots + 1`` entries
  and ends at the budget.

``segments`` maps each token to its slot for mean pooling; padding tokens map to
``rows_capacity``, a dump slot whose output is dropped.

Numpy only (no torch): the host side of the GPU engine, testable in CPU CI.
"""

from __future__ import annotations

import bisect
import itertools
import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from stream_sentiment.engines.base import TokenBatch


def token_budgets(max_tokens: int, smallest: int = 512, step: int = 2048) -> tuple[int, ...]:
    """Packed-batch sizes that get a graph: doubling from ``smallest`` to ``step``, then every ``step``.

    Rounding a batch's real tokens up to the next budget wastes at most ``step``
    tokens (7% of a full 28k-token batch at the default step) while keeping the
    graph count to ~``max_tokens / step`` per slot.
    """
    if smallest < 1 or step < smallest or max_tokens < smallest:
        raise ValueError(f"need 1 <= smallest <= step and smallest <= max_tokens, got {smallest}, {step}, {max_tokens}")
    sizes = set()
    size = smallest
    while size < step and size < max_tokens:
        sizes.add(size)
        size *= 2
    sizes.update(range(step, max_tokens + 1, step))
    sizes.add(max_tokens)
    return tuple(sorted(sizes))


def budget_for(tokens: int, budgets: Sequence[int]) -> int:
    """The smallest budget holding ``tokens`` tokens."""
    index = bisect.bisect_left(budgets, tokens)
    if index == len(budgets):
        raise ValueError(f"{tokens} tokens exceed the largest budget {budgets[-1]}")
    return int(budgets[index])


def pad_slots_for(budgets: Sequence[int], max_length: int) -> int:
    """Dummy sequences needed for the most padding a batch can get (the largest gap between budgets)."""
    gaps = [budgets[0], *(b - a for a, b in itertools.pairwise(budgets))]
    return math.ceil(max(gaps) / max_length)


@dataclass(frozen=True)
class PackLayout:
    """The fixed shape of every packed batch of one engine, except the token budget.

    Attributes:
        rows_capacity: the most posts in one packed batch (sequence slots).
        max_length: the longest post (and dummy sequence), the varlen ``max_seqlen``.
        budgets: token budgets, ascending (:func:`token_budgets`).
    """

    rows_capacity: int
    max_length: int
    budgets: tuple[int, ...]

    @property
    def pad_slots(self) -> int:
        return pad_slots_for(self.budgets, self.max_length)

    @property
    def cu_size(self) -> int:
        """Entries of ``cu_seqlens``: every post slot, every dummy slot, plus the leading zero."""
        return self.rows_capacity + self.pad_slots + 1


@dataclass(frozen=True)
class Packed:
    """One batch's real tokens, padded to a budget. Views into the arrays given to :func:`pack_into`."""

    rows: int
    real_tokens: int
    budget: int


def pack_into(
    batch: TokenBatch,
    layout: PackLayout,
    ids: np.ndarray,
    positions: np.ndarray,
    segments: np.ndarray,
    cu_seqlens: np.ndarray,
) -> Packed:
    """Write ``batch``'s real tokens into the first ``budget`` cells of the given int arrays.

    ``ids``, ``positions``, ``segments`` need at least the largest budget's cells,
    ``cu_seqlens`` ``layout.cu_size``; they are typically numpy views of pinned
    host tensors, so nothing is allocated per batch but the temporaries here.
    Rows must be left-aligned (as ``pad_to_bucket`` makes them).

    Raises:
        ValueError: more rows than ``rows_capacity``, a row longer than ``max_length``,
            or more real tokens than the largest budget.
    """
    rows = batch.rows
    if rows > layout.rows_capacity:
        raise ValueError(f"{rows} rows exceed the packed capacity {layout.rows_capacity}")
    mask = batch.attention_mask.astype(bool, copy=False)
    lengths = mask.sum(axis=1)
    if rows and int(lengths.max()) > layout.max_length:
        raise ValueError(f"a row of {int(lengths.max())} tokens exceeds max_length {layout.max_length}")
    real = int(lengths.sum())
    budget = budget_for(max(real, 1), layout.budgets)
    # Checked before any buffer is written: a refused batch leaves the staging buffers as they were.
    pad = budget - real
    if pad > layout.pad_slots * layout.max_length:  # cannot happen with pad_slots_for's count
        raise ValueError(f"{pad} padding tokens do not fit {layout.pad_slots} dummy slots")
    starts = np.zeros(rows + 1, dtype=np.int64)
    np.cumsum(lengths, out=starts[1:])
    # Row-major order of a left-aligned mask's True cells is exactly the tokens in sequence.
    ids[:real] = batch.input_ids[mask]
    positions[:real] = np.arange(real) - np.repeat(starts[:-1], lengths)
    segments[:real] = np.repeat(np.arange(rows), lengths)
    cu_seqlens[: rows + 1] = starts
    cu_seqlens[rows + 1 : layout.rows_capacity + 1] = real  # unused post slots: zero length
    # Padding: dummy sequences of at most max_length tokens ([PAD] ids), pooled into the dump slot.
    ids[real:budget] = 0
    positions[real:budget] = np.arange(pad) % layout.max_length
    segments[real:budget] = layout.rows_capacity
    dummy_ends = real + np.minimum(np.arange(1, layout.pad_slots + 1) * layout.max_length, pad)
    cu_seqlens[layout.rows_capacity + 1 :] = dummy_ends
    return Packed(rows=rows, real_tokens=real, budget=budget)
