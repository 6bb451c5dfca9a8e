"""PyTorch on CUDA (``torch-cuda``): the version's model in FP16/BF16, replayed as CUDA graphs.

The GPU backend for machines without TensorRT. The weights come out of the
version's ONNX (``engine_build.onnx_weights``: for the INT8 version, the dequantized INT8
weights), so it serves exactly the committed version, in half precision and
with unquantized activations.

A BERT-small forward pass is ~100 small kernels; launched one by one from
Python it is CPU-bound, so each slot replays CUDA graphs instead: one per
(bucket, graph rows), captured at warm-up. A batch's rows are rounded up to
the next of a few graph sizes (:func:`graph_batch_sizes`) and the extra rows
are padding whose outputs are dropped. Each slot has its own CUDA stream,
pinned host staging buffers, static device inputs and graphs, so N worker
threads drive N slots without sharing anything but the weights.

A slot's graphs share one memory pool: they never run at the same time (a
slot serves one batch at a time, and the output is copied out before the next
replay), so their intermediates can occupy the same memory.

``forward="packed"`` (``engine.torch_forward``) swaps the padded module for the
packed one of ``engines.torch_packed``: real tokens only, varlen flash attention,
``torch.compile``d once per engine at activation, one graph per token budget per
slot; same slots, streams, staging and contract (float32 logits ``[rows, labels]``).
"""

from __future__ import annotations

import bisect
import logging
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np

from stream_sentiment.engines.base import BackendUnavailableError, Engine, EngineError, TokenBatch
from stream_sentiment.engines.manifest import EngineVersion
from stream_sentiment.engines.packing import PackLayout, token_budgets
from stream_sentiment.engines.torch_packed import PackedForward, PackedSlot, row_chunks

log = logging.getLogger(__name__)

INSTALL_HINT = (
    "torch with CUDA is not available for the torch-cuda backend; on a machine with an NVIDIA GPU: "
    "pip install 'stream-sentiment[torch-cuda]'"
)
DTYPES = {"float16": "float16", "fp16": "float16", "bfloat16": "bfloat16", "bf16": "bfloat16", "float32": "float32"}
# torch.cuda.graph allows one capture at a time per process; warm-up and a rebuild may overlap.
_CAPTURE_LOCK = threading.Lock()
Forward = Literal["padded", "packed"]
FORWARDS: tuple[Forward, ...] = ("padded", "packed")
# The packed forward's token budgets: doubling from 512 to 2048, then every 2048 (engines.packing).
PACKED_SMALLEST, PACKED_STEP = 512, 2048


def graph_batch_sizes(max_rows: int) -> tuple[int, ...]:
    """Row counts that get a graph: 1, 2, 4, 8, 16, then every 16 up to 64, then every 32, and ``max_rows``.

    A graph per row count would be max_rows x buckets captures per slot; this
    keeps it to ~14 per bucket for 256 rows while padding a batch by at most
    ~1/3 (65 rows run as 96), and by at most half below 16 rows, where the GPU
    is latency-bound anyway.
    """
    if max_rows < 1:
        raise ValueError("max_rows must be at least 1")
    sizes = {1, 2, 4, 8, 16, *range(32, 65, 16), *range(96, max_rows + 1, 32), max_rows}
    return tuple(sorted(s for s in sizes if s <= max_rows))


def graph_rows_for(rows: int, sizes: tuple[int, ...]) -> int:
    """The smallest graph size holding ``rows`` rows."""
    index = bisect.bisect_left(sizes, rows)
    if index == len(sizes):
        raise ValueError(f"{rows} rows exceed the largest graph size {sizes[-1]}")
    return sizes[index]


@dataclass
class _Slot:
    """One stream's private state. ``*_np`` are numpy views of the pinned host tensors."""

    stream: Any
    pool: Any
    host_ids: dict[int, Any]
    host_mask: dict[int, Any]
    host_ids_np: dict[int, np.ndarray]
    host_mask_np: dict[int, np.ndarray]
    device_ids: dict[int, Any]
    device_mask: dict[int, Any]
    host_logits: Any
    host_logits_np: np.ndarray
    # A blocking-sync event: waiting on it sleeps in the driver instead of spinning a core, which
    # matters with several worker processes per GPU whose waits include other processes' time slices.
    done: Any
    graphs: dict[tuple[int, int], tuple[Any, Any]] = field(default_factory=dict)
    # One thread per slot is the Engine contract; uncontended, this only turns misuse into waiting
    # instead of two batches overwriting each other's staging buffers.
    lock: threading.Lock = field(default_factory=threading.Lock)


class TorchCudaEngine(Engine):
    """``SentimentClassifier`` on one CUDA device with ``streams`` slots.

    Args:
        version: a verified engine version (INT8 Q/DQ or FP32 ONNX).
        streams: independent slots (CUDA stream + buffers + graphs each).
        dtype: ``float16`` (default), ``bfloat16`` or ``float32``.
        max_rows: largest batch a slot runs in one go (larger batches are split);
            sets the buffer sizes and the largest graph.
        device: a CUDA device (``cuda``, ``cuda:1``).
        cuda_graphs: replay captured graphs (default) or run the module eagerly.
        forward: ``padded`` (default: the module over ``rows x bucket`` cells, a graph per
            (bucket, rows)) or ``packed`` (real tokens only, a graph per token budget;
            ``engines.torch_packed``).
        max_tokens: packed only: the most real tokens one graph call takes (its largest
            budget); unset = ``max_rows x`` the manifest's max length, capped at 32768. Larger
            batches are split. The batcher's ``batching.max_tokens`` is the natural value.
        compile: packed only: ``torch.compile`` the packed module (default; ~10 s at activation).
    """

    backend = "torch-cuda"

    def __init__(
        self,
        version: EngineVersion,
        streams: int = 1,
        *,
        dtype: str = "float16",
        max_rows: int = 256,
        device: str = "cuda",
        cuda_graphs: bool = True,
        forward: Forward = "padded",
        max_tokens: int | None = None,
        compile: bool = True,
    ) -> None:
        super().__init__(version, streams)
        if dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {sorted(DTYPES)}, got {dtype!r}")
        self.dtype = DTYPES[dtype]
        self.max_rows = max_rows
        self.graph_sizes = graph_batch_sizes(max_rows)
        self.device = device
        self.cuda_graphs = cuda_graphs
        if forward not in FORWARDS:
            raise ValueError(f"forward must be one of {FORWARDS}, got {forward!r}")
        if forward == "packed" and self.dtype == "float32":
            raise ValueError("the packed forward's flash attention runs in float16 or bfloat16, not float32")
        self.forward: Forward = forward
        self.compile = compile
        self.layout = packed_layout(max_rows, version.manifest.max_length, max_tokens)
        self._packed: PackedForward | None = None
        self._packed_slots: list[PackedSlot | None] = []
        self.warm_up_stats: dict[str, float | int | str] = {}
        self._warmed = False
        self._torch: Any = None
        self._device: Any = None
        self._model: Any = None
        self._slots: list[_Slot | None] = []

    def _activate_impl(self) -> None:
        try:
            import torch
        except ImportError as error:
            raise BackendUnavailableError(INSTALL_HINT) from error
        if not torch.cuda.is_available():
            raise BackendUnavailableError(f"{INSTALL_HINT} (torch {torch.__version__} sees no CUDA device)")
        device = torch.device(self.device)
        if device.type != "cuda":
            raise BackendUnavailableError(f"the torch-cuda backend needs a CUDA device, got {self.device!r}")
        self._torch = torch
        self._device = torch.device("cuda", torch.cuda.current_device() if device.index is None else device.index)
        if self.dtype == "bfloat16" and not torch.cuda.is_bf16_supported():
            raise BackendUnavailableError(f"{torch.cuda.get_device_name(self._device)} has no bfloat16 support")
        self._model = self._load_model()
        if self.forward == "packed":
            self._activate_packed()
            return
        self._slots = [self._new_slot() for _ in range(self.streams)]

    def _activate_packed(self) -> None:
        self._packed = PackedForward(self._torch, self._device, self._model, self.layout, len(self.labels),
                                     _CAPTURE_LOCK, compile=self.compile)
        self._packed_slots = [self._packed.new_slot() for _ in range(self.streams)]
        first = self._packed_slots[0]
        assert first is not None
        seconds = self._packed.first_call(first)
        log.info("%s: packed forward %s in %.1f s (token budgets %s)", self.describe(),
                 "compiled" if self.compile else "first call", seconds, list(self.layout.budgets))

    def _load_model(self) -> Any:
        # Build tooling at activation, unavoidably: the repository commits only the ONNX graph (no torch
        # checkpoint), so the module's float weights are recovered from it each time a version is loaded.
        from stream_sentiment.engine_build.onnx_weights import weights_for_version
        from stream_sentiment.engines.minilm_torch import EncoderConfig, SentimentClassifier

        torch = self._torch
        try:
            weights = weights_for_version(self.version)
        except ValueError as error:
            model_file = self.version.manifest.model_file
            raise EngineError(f"{self.version.label}: no torch model from {model_file}: {error}") from error
        config: dict[str, Any] = dict(weights.config)
        # SDPA: one fused attention kernel instead of MatMul/Softmax/MatMul per layer.
        model = SentimentClassifier(EncoderConfig(**config), num_labels=weights.num_labels, fused_attention=True)
        model.load_state_dict({k: torch.from_numpy(v) for k, v in weights.state_dict.items()}, strict=True)
        model.eval().requires_grad_(False)
        return model.to(device=self._device, dtype=getattr(torch, self.dtype))

    def _new_slot(self) -> _Slot:
        torch = self._torch
        labels = len(self.labels)
        with torch.cuda.device(self._device), torch.inference_mode():
            stream = torch.cuda.Stream(self._device)
            host_ids, host_mask, device_ids, device_mask = {}, {}, {}, {}
            with torch.cuda.stream(stream):  # allocations belong to the stream that uses them
                for bucket in self.version.manifest.buckets:
                    shape = (self.max_rows, bucket)
                    host_ids[bucket] = torch.zeros(shape, dtype=torch.int64, pin_memory=True)
                    host_mask[bucket] = torch.zeros(shape, dtype=torch.int64, pin_memory=True)
                    device_ids[bucket] = torch.zeros(shape, dtype=torch.int64, device=self._device)
                    device_mask[bucket] = torch.zeros(shape, dtype=torch.int64, device=self._device)
            host_logits = torch.zeros((self.max_rows, labels), dtype=torch.float32, pin_memory=True)
            return _Slot(
                stream=stream,
                pool=torch.cuda.graph_pool_handle(),
                host_ids=host_ids,
                host_mask=host_mask,
                host_ids_np={b: t.numpy() for b, t in host_ids.items()},
                host_mask_np={b: t.numpy() for b, t in host_mask.items()},
                device_ids=device_ids,
                device_mask=device_mask,
                host_logits=host_logits,
                host_logits_np=host_logits.numpy(),
                done=torch.cuda.Event(blocking=True),
            )

    def warm_up(self, rows: int = 1) -> None:
        """Capture every (bucket, graph size) graph on every slot, then run each bucket once.

        Records the graph count, seconds and reserved GPU memory in ``warm_up_stats``.
        """
        if not self.is_active:
            raise EngineError(f"{self.describe()} is not active")
        started = time.perf_counter()
        if self.cuda_graphs:
            for slot in self._slots:
                if slot is not None:
                    self._capture_all(slot)
            for packed_slot in self._packed_slots:
                if packed_slot is not None and self._packed is not None:
                    self._packed.capture_all(packed_slot)
        self._warmed = True
        super().warm_up(rows)
        torch = self._torch
        torch.cuda.synchronize(self._device)
        slots: list[Any] = [*self._slots, *self._packed_slots]
        self.warm_up_stats = {
            "forward": self.forward,
            "graphs": sum(len(slot.graphs) for slot in slots if slot is not None),
            "seconds": round(time.perf_counter() - started, 3),
            "memory_reserved_mib": round(torch.cuda.memory_reserved(self._device) / 2**20, 1),
        }
        if self._packed is not None:
            self.warm_up_stats["compile_seconds"] = round(self._packed.compile_seconds, 2)
        log.info("%s warmed up: %s", self.describe(), self.warm_up_stats)

    def _capture_all(self, slot: _Slot) -> None:
        # Largest first: later, smaller captures reuse the pool memory the large ones freed.
        shapes = [(b, r) for b in self.version.manifest.buckets for r in self.graph_sizes]
        with slot.lock:
            for bucket, rows in sorted(shapes, key=lambda s: s[0] * s[1], reverse=True):
                if (bucket, rows) not in slot.graphs:
                    self._capture(slot, bucket, rows)

    def _capture(self, slot: _Slot, bucket: int, rows: int) -> None:
        torch = self._torch
        ids, mask = slot.device_ids[bucket][:rows], slot.device_mask[bucket][:rows]
        with _CAPTURE_LOCK, torch.cuda.device(self._device), torch.inference_mode():
            with torch.cuda.stream(slot.stream):
                ids.zero_()
                mask.zero_()
                mask[:, 0] = 1
                # Run once outside the capture: cuBLAS workspaces and the SDPA kernel choice are made
                # lazily on first use, and lazy initialisation inside a capture fails.
                self._model(ids, mask)
            graph = torch.cuda.CUDAGraph()
            # thread_local: other slots' threads may keep replaying while a rebuilt slot captures.
            with torch.cuda.graph(graph, pool=slot.pool, stream=slot.stream, capture_error_mode="thread_local"):
                logits = self._model(ids, mask).float()
            slot.graphs[(bucket, rows)] = (graph, logits)

    def _infer_impl(self, batch: TokenBatch, stream: int) -> np.ndarray:
        if self._packed is not None:
            return self._infer_packed(self._packed, batch, stream)
        slot = self._slots[stream]
        if slot is None:
            raise EngineError(f"stream {stream} has no CUDA state; rebuild it")
        if batch.rows == 0:
            return np.zeros((0, len(self.labels)), dtype=np.float32)
        chunks = [slice(i, i + self.max_rows) for i in range(0, batch.rows, self.max_rows)]
        try:
            with slot.lock:
                parts = [self._run(slot, batch.input_ids[c], batch.attention_mask[c], batch.bucket) for c in chunks]
        except EngineError:
            raise
        except RuntimeError as error:  # torch.cuda.OutOfMemoryError, AcceleratorError, capture errors
            raise EngineError(f"torch-cuda failed on stream {stream}: {error}") from error
        return parts[0] if len(parts) == 1 else np.concatenate(parts)

    def _infer_packed(self, packed: PackedForward, batch: TokenBatch, stream: int) -> np.ndarray:
        slot = self._packed_slots[stream]
        if slot is None:
            raise EngineError(f"stream {stream} has no CUDA state; rebuild it")
        if batch.rows == 0:
            return np.zeros((0, len(self.labels)), dtype=np.float32)
        lengths = batch.attention_mask.sum(axis=1)
        try:
            # Inside the try: a row longer than the largest budget is a ValueError here, an EngineError out.
            chunks = row_chunks(lengths, self.layout.rows_capacity, self.layout.budgets[-1])
            with slot.lock:
                parts = [
                    packed.run(slot, batch if len(chunks) == 1 else
                               TokenBatch(batch.input_ids[c], batch.attention_mask[c], batch.bucket),
                               graphs=self.cuda_graphs, describe=self.describe())
                    for c in chunks
                ]
        except EngineError:
            raise
        except (RuntimeError, ValueError) as error:  # CUDA errors; a row longer than the layout's max length
            raise EngineError(f"torch-cuda (packed) failed on stream {stream}: {error}") from error
        return parts[0] if len(parts) == 1 else np.concatenate(parts)

    def _run(self, slot: _Slot, input_ids: np.ndarray, attention_mask: np.ndarray, bucket: int) -> np.ndarray:
        torch = self._torch
        rows = input_ids.shape[0]
        padded = graph_rows_for(rows, self.graph_sizes) if self.cuda_graphs else rows
        ids_np, mask_np = slot.host_ids_np[bucket], slot.host_mask_np[bucket]
        ids_np[:rows] = input_ids
        mask_np[:rows] = attention_mask
        if padded > rows:
            # Pad rows attend to one [PAD] token: a normal row whose output is dropped (never an empty mask).
            ids_np[rows:padded] = 0
            mask_np[rows:padded] = 0
            mask_np[rows:padded, 0] = 1
        if self.cuda_graphs and (bucket, padded) not in slot.graphs:
            log.warning("%s: capturing graph (%d, %d) during serving; call warm_up()", self.describe(), bucket, padded)
            self._capture(slot, bucket, padded)
        with torch.cuda.device(self._device), torch.inference_mode(), torch.cuda.stream(slot.stream):
            device_ids, device_mask = slot.device_ids[bucket][:padded], slot.device_mask[bucket][:padded]
            device_ids.copy_(slot.host_ids[bucket][:padded], non_blocking=True)
            device_mask.copy_(slot.host_mask[bucket][:padded], non_blocking=True)
            if self.cuda_graphs:
                graph, logits = slot.graphs[(bucket, padded)]
                graph.replay()
            else:
                logits = self._model(device_ids, device_mask).float()
            slot.host_logits[:padded].copy_(logits, non_blocking=True)
            slot.done.record(slot.stream)
        # Releases the GIL while the GPU works, so other slots' threads keep launching.
        slot.done.synchronize()
        return slot.host_logits_np[:rows].copy()

    def _rebuild_impl(self, stream: int) -> None:
        """New stream, buffers and graphs for one slot (a sticky CUDA error needs a new process instead)."""
        if self._packed is not None:
            self._packed_slots[stream] = None
            packed_slot = self._packed.new_slot()
            if self.cuda_graphs and self._warmed:
                self._packed.capture_all(packed_slot)  # the compiled module is the engine's: no recompile
            self._packed_slots[stream] = packed_slot
            return
        self._slots[stream] = None
        slot = self._new_slot()
        if self.cuda_graphs and self._warmed:
            self._capture_all(slot)
        self._slots[stream] = slot

    def _deactivate_impl(self) -> None:
        torch = self._torch
        self._slots = []
        self._packed_slots = []
        self._packed = None
        self._model = None
        self._warmed = False
        if torch is not None and self._device is not None:
            torch.cuda.synchronize(self._device)
            torch.cuda.empty_cache()


def packed_layout(max_rows: int, max_length: int, max_tokens: int | None = None) -> PackLayout:
    """The packed forward's layout: ``max_rows`` sequence slots, budgets up to ``max_tokens`` real tokens.

    ``max_tokens`` unset: ``max_rows x max_length`` (no batch of the engine's rows splits), capped at
    32768 (the probe's largest budget; each budget is a graph per slot). Never more than
    ``max_rows x max_length``, which no batch of ``max_rows`` rows exceeds.
    """
    cap = max_rows * max_length
    most = min(cap, 32768) if max_tokens is None else min(cap, max_tokens)
    smallest = min(PACKED_SMALLEST, most)
    return PackLayout(rows_capacity=max_rows, max_length=max_length,
                      budgets=token_budgets(most, smallest=smallest, step=max(PACKED_STEP, smallest)))
