"""The torch-cuda backend's packed forward (``engine.torch_forward = "packed"``): real tokens only.

Today's padded forward computes every ``rows x bucket`` cell of a batch. This one
unpads each ``TokenBatch`` on the host (``engines.packing``) into one stream of real
tokens, runs ``engines.minilm_packed.PackedClassifier`` (fused QKV, varlen flash
attention, mean pooling by segment) under ``torch.compile`` (default mode,
fullgraph: bias, GELU, residual and LayerNorm fused), and replays it as CUDA graphs,
one per token budget per slot: a batch runs on the graph of the smallest budget
holding its real tokens.

Measured on one H200 (docs/engine-probe-h200.md, the probe's ``b-compile``):
227k tweets/s and 111k long posts/s against 207k and 89.8k for the padded
forward (24.6% of the FP16 peak on real tokens, from 19.8%), VADER argmax
agreement with it 0.99976; compile ~10 s once per engine, capture ~0.6 s for
18 budgets x 4 slots.

Only :class:`PackedForward` touches torch (given to it, never imported here at
module level); :func:`row_chunks` and :func:`warm_lengths` are host-side numpy.
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from stream_sentiment.engines.base import TokenBatch
from stream_sentiment.engines.packing import PackLayout, budget_for, pack_into

log = logging.getLogger(__name__)
INPUTS = ("ids", "positions", "segments")


def row_chunks(lengths: np.ndarray, rows_capacity: int, max_tokens: int) -> list[slice]:
    """Consecutive row ranges of at most ``rows_capacity`` rows and ``max_tokens`` real tokens each.

    ``lengths``: real tokens per row, each at most ``max_tokens``. One chunk per
    graph call; a batch the batcher formed within its limits is one chunk.
    """
    rows = len(lengths)
    if rows and int(lengths.max()) > max_tokens:
        raise ValueError(f"a row of {int(lengths.max())} tokens exceeds {max_tokens} tokens per call")
    ends = np.cumsum(lengths, dtype=np.int64)
    chunks = []
    start = 0
    while start < rows:
        before = int(ends[start - 1]) if start else 0
        # The last row whose cumulative tokens still fit, at least one row past start.
        fit = int(np.searchsorted(ends, before + max_tokens, side="right"))
        end = min(start + rows_capacity, max(fit, start + 1), rows)
        chunks.append(slice(start, end))
        start = end
    return chunks


def warm_lengths(budget: int, max_length: int) -> list[int]:
    """Row lengths (of at most ``max_length``) holding exactly ``budget`` tokens: a capture's input."""
    return [max_length] * (budget // max_length) + ([budget % max_length] if budget % max_length else [])


def warm_batch(budget: int, layout: PackLayout) -> TokenBatch:
    """Arbitrary (non-[PAD]) tokens filling ``budget`` exactly, left-aligned in ``max_length`` rows."""
    lengths = warm_lengths(budget, layout.max_length)
    mask = (np.arange(layout.max_length)[None, :] < np.array(lengths)[:, None]).astype(np.int64)
    ids = np.where(mask == 1, 1000 + np.arange(mask.size).reshape(mask.shape) % 1000, 0).astype(np.int64)
    return TokenBatch(ids, mask, layout.max_length)


@dataclass
class PackedSlot:
    """One stream's private state for the packed forward. ``host_np`` are numpy views of pinned tensors."""

    stream: Any
    pool: Any
    host: dict[str, Any]  # pinned int32: ids, positions, segments (largest budget), cu (layout.cu_size)
    host_np: dict[str, np.ndarray]
    device: dict[str, Any]
    host_logits: Any
    host_logits_np: np.ndarray
    done: Any  # a blocking-sync event (see torch_backend._Slot)
    graphs: dict[int, tuple[Any, Any]] = field(default_factory=dict)
    lock: threading.Lock = field(default_factory=threading.Lock)


class PackedForward:
    """The compiled packed module of one engine, and how a slot stages, captures and runs it.

    Args:
        torch: the torch module (imported by the engine at activation).
        device: the CUDA device.
        model: the engine's loaded ``SentimentClassifier`` (half precision, on ``device``).
        layout: the packed shape (sequence slots, max length, token budgets).
        labels: logits per row.
        capture_lock: the process-wide lock around graph captures (``torch_backend._CAPTURE_LOCK``).
        compile: ``torch.compile`` the module (default); off runs it eagerly (still in graphs).
    """

    def __init__(self, torch: Any, device: Any, model: Any, layout: PackLayout, labels: int,
                 capture_lock: threading.Lock, *, compile: bool = True) -> None:
        from stream_sentiment.engines.minilm_packed import PackedClassifier

        self.torch = torch
        self.device = device
        self.layout = layout
        self.labels = labels
        self.capture_lock = capture_lock
        module = PackedClassifier(model, rows_capacity=layout.rows_capacity, max_length=layout.max_length,
                                  attention="flash").eval()
        self.module = module
        self.compile_seconds = 0.0
        if compile:
            # Dynamo's caches are per code object: without a reset, an earlier engine's compile of the same
            # forward in this process would count against the recompile limit (8) and could leave this one eager.
            # An earlier engine's captured graphs keep replaying; only its lazy captures would compile again.
            # Under the capture lock: during a hot swap the old engine may be capturing a rebuilt slot on
            # another thread, and a reset between its warm call and its capture would make the captured
            # call recompile inside the CUDA graph capture (a failed capture, a slot lost). Every capture,
            # padded or packed, holds this lock across both calls, so the reset lands between captures.
            with capture_lock:
                torch._dynamo.reset()
            self.fn: Any = torch.compile(module, mode="default", fullgraph=True)
        else:
            self.fn = module

    def new_slot(self) -> PackedSlot:
        torch = self.torch
        most = self.layout.budgets[-1]
        sizes = {"ids": most, "positions": most, "segments": most, "cu": self.layout.cu_size}
        with torch.cuda.device(self.device), torch.inference_mode():
            stream = torch.cuda.Stream(self.device)
            host = {k: torch.zeros(n, dtype=torch.int32, pin_memory=True) for k, n in sizes.items()}
            with torch.cuda.stream(stream):  # allocations belong to the stream that uses them
                device = {k: torch.zeros(n, dtype=torch.int32, device=self.device) for k, n in sizes.items()}
            logits = torch.zeros((self.layout.rows_capacity, self.labels), dtype=torch.float32, pin_memory=True)
            return PackedSlot(stream=stream, pool=torch.cuda.graph_pool_handle(), host=host,
                              host_np={k: t.numpy() for k, t in host.items()}, device=device,
                              host_logits=logits, host_logits_np=logits.numpy(),
                              done=torch.cuda.Event(blocking=True))

    def first_call(self, slot: PackedSlot) -> float:
        """Compile (once per engine) at the largest budget, the token dimension dynamic; seconds."""
        torch = self.torch
        budget = self.layout.budgets[-1]
        started = time.perf_counter()
        with torch.cuda.device(self.device), torch.inference_mode():
            self._stage(slot, warm_batch(budget, self.layout))
            with torch.cuda.stream(slot.stream):
                inputs = self._inputs(slot, budget)
                # One graph for every budget: without this each new size would recompile (dynamo's
                # automatic-dynamic would get there on the second size, after one more compile).
                marker = getattr(torch._dynamo, "maybe_mark_dynamic", None)
                if marker is not None:
                    for tensor in inputs[:3]:
                        marker(tensor, 0)
                self.fn(*inputs)
            torch.cuda.synchronize(self.device)
        self.compile_seconds = time.perf_counter() - started
        return self.compile_seconds

    def capture_all(self, slot: PackedSlot) -> None:
        # Largest first: later, smaller captures reuse the pool memory the large ones freed.
        with slot.lock:
            for budget in sorted(self.layout.budgets, reverse=True):
                if budget not in slot.graphs:
                    self.capture(slot, budget)

    def capture(self, slot: PackedSlot, budget: int) -> None:
        torch = self.torch
        with self.capture_lock, torch.cuda.device(self.device), torch.inference_mode():
            self._stage(slot, warm_batch(budget, self.layout))
            inputs = self._inputs(slot, budget)
            with torch.cuda.stream(slot.stream):
                self.fn(*inputs)  # lazy initialisation (cuBLAS workspaces, a recompile) outside the capture
            graph = torch.cuda.CUDAGraph()
            # thread_local: other slots' threads may keep replaying while a rebuilt slot captures.
            with torch.cuda.graph(graph, pool=slot.pool, stream=slot.stream, capture_error_mode="thread_local"):
                out = self.fn(*inputs)
            slot.graphs[budget] = (graph, out)
            slot.stream.synchronize()  # the warm call's copies out of the pinned buffers are done before reuse

    def _inputs(self, slot: PackedSlot, budget: int) -> tuple[Any, Any, Any, Any]:
        d = slot.device
        return d["ids"][:budget], d["positions"][:budget], d["segments"][:budget], d["cu"]

    def _stage(self, slot: PackedSlot, batch: TokenBatch) -> Any:
        """Pack ``batch`` into the pinned buffers and queue their copies on the slot's stream."""
        h = slot.host_np
        packed = pack_into(batch, self.layout, h["ids"], h["positions"], h["segments"], h["cu"])
        with self.torch.cuda.stream(slot.stream):
            for key in INPUTS:
                slot.device[key][: packed.budget].copy_(slot.host[key][: packed.budget], non_blocking=True)
            slot.device["cu"].copy_(slot.host["cu"], non_blocking=True)
        return packed

    def run(self, slot: PackedSlot, batch: TokenBatch, *, graphs: bool, describe: str) -> np.ndarray:
        """Float32 logits ``[rows, labels]`` of one batch within the layout (see :func:`row_chunks`)."""
        torch = self.torch
        with torch.cuda.device(self.device), torch.inference_mode():
            # The previous call's copy out of the pinned buffers finished (its event was waited on),
            # so overwriting them here is safe.
            if graphs:
                budget = budget_for(max(1, batch.real_tokens), self.layout.budgets)
                if budget not in slot.graphs:  # before staging: a capture stages its own input
                    log.warning("%s: capturing the %d-token graph during serving; call warm_up()", describe, budget)
                    self.capture(slot, budget)
            packed = self._stage(slot, batch)
            with torch.cuda.stream(slot.stream):
                if graphs:
                    graph, out = slot.graphs[packed.budget]
                    graph.replay()
                else:
                    out = self.fn(*self._inputs(slot, packed.budget))
                slot.host_logits[: packed.rows].copy_(out[: packed.rows], non_blocking=True)
                slot.done.record(slot.stream)
        # Releases the GIL while the GPU works, so other slots' threads keep launching.
        slot.done.synchronize()
        return slot.host_logits_np[: packed.rows].copy()
