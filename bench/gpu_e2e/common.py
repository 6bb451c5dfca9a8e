"""What the parent and its child processes share: the models under test, their engine versions, one error type.

Kept free of the bench's other modules, so a child process imports only this and ``children``.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from stream_sentiment.engines.manifest import EngineRepository, EngineVersion

REPO = Path(__file__).resolve().parents[2]
# The English engine (the transformers baselines load it too); a workload may be served by another
# committed model (``workloads.WORKLOAD_MODELS``: the Chinese posts by the multilingual engine).
MODEL, VERSION = "minilm-sentiment", "v1"
MULTILINGUAL_MODEL = "multilingual-sentiment"
# MiniLM-L6-H384 (the shipped encoder): the FLOPs of the engine-only run when no other shape is given
# (scripts/device_engine_probe.py counts with the same; other models: :func:`encoder_shape`).
LAYERS, HIDDEN, FFN = 6, 384, 1536
# Dense FP16 tensor-core peaks (no sparsity), by a substring of torch.cuda.get_device_name(); first match wins.
FP16_DENSE_PEAK_TFLOPS = (("H100 PCIe", 756.5), ("H100 NVL", 835.5), ("H200", 989.4), ("H100", 989.4),
                          ("A100", 312.0), ("L40S", 362.1), ("L4", 121.0))
STATUS_INTERVAL_S = 0.2  # how often a consumer child reports its partitions and count during a run


class BenchError(RuntimeError):
    """The bench cannot go on: a missing piece, a dead child process, a time-out."""


def bench_version(buckets: Sequence[int] | None, model: str = MODEL) -> EngineVersion:
    """``model``'s committed version serving ``buckets`` together with its manifest's own (their union).

    The union lets every set-up (fine buckets, the manifest's, pad-to-max, dynamic padding) batch by a
    subset of one engine's buckets, so all share one warmed engine (see ``EngineVersion.serving``).
    """
    version = EngineRepository(REPO / "engines", model).load(VERSION)
    if not buckets:
        return version
    return version.serving(sorted(set(buckets) | set(version.manifest.buckets)))


@dataclass(frozen=True)
class EncoderShape:
    """What the encoder's FLOPs depend on: layers, hidden size, FFN size."""

    layers: int = LAYERS
    hidden: int = HIDDEN
    ffn: int = FFN


def encoder_shape(version: EngineVersion) -> EncoderShape:
    """The encoder's shape, read from the version's ONNX graph (the initializers' names and shapes only).

    Every committed engine is a BERT exported by ``stream_sentiment.modeling``: its biases and LayerNorms
    keep their PyTorch names (``encoder.layer.<i>.intermediate.dense.bias``: one per layer, FFN wide).
    """
    import onnx

    graph = onnx.load(str(version.model_path), load_external_data=False).graph
    shapes = {initializer.name: tuple(initializer.dims) for initializer in graph.initializer}
    ffn = {int(m.group(1)): shape[0] for name, shape in shapes.items()
           if (m := re.fullmatch(r"encoder\.layer\.(\d+)\.intermediate\.dense\.bias", name))}
    if not ffn or "embeddings.LayerNorm.weight" not in shapes:
        raise BenchError(f"{version.label}: no BERT encoder layers found in {version.manifest.model_file}")
    return EncoderShape(layers=len(ffn), hidden=shapes["embeddings.LayerNorm.weight"][0], ffn=ffn[0])


MINILM_SHAPE = EncoderShape()


def encoder_flops(length_sum: float, length_squared_sum: float, shape: EncoderShape = MINILM_SHAPE) -> float:
    """FLOPs (2 per multiply-add) of the encoder over posts with these sums of L and L².

    Per layer and post of L tokens: Q, K, V and output projections 4·2·L·h², the FFN 2·2·L·h·f,
    attention scores and context 2·2·L²·h; embeddings and the 3-way head are negligible.
    """
    hidden = shape.hidden
    per_token = 2 * (4 * hidden * hidden + 2 * hidden * shape.ffn)
    return shape.layers * (per_token * length_sum + 4 * hidden * length_squared_sum)


def fp16_peak_tflops(device_name: str | None, override: float | None) -> float | None:
    if override:
        return override
    for marker, peak in FP16_DENSE_PEAK_TFLOPS:
        if device_name and marker in device_name:
            return peak
    return None
