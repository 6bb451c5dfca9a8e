"""What the parent and its child processes share: the model under test, the engine version, one error type.

Kept free of the bench's other modules, so a child process imports only this and ``children``.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from stream_sentiment.engines.manifest import EngineRepository, EngineVersion

REPO = Path(__file__).resolve().parents[2]
MODEL, VERSION = "minilm-sentiment", "v1"
# MiniLM-L6-H384 (the shipped encoder): for the fraction-of-peak figure of the engine-only run.
LAYERS, HIDDEN, FFN = 6, 384, 1536
# Dense FP16 tensor-core peaks (no sparsity), by a substring of torch.cuda.get_device_name(); first match wins.
FP16_DENSE_PEAK_TFLOPS = (("H100 PCIe", 756.5), ("H100 NVL", 835.5), ("H200", 989.4), ("H100", 989.4),
                          ("A100", 312.0), ("L40S", 362.1), ("L4", 121.0))
STATUS_INTERVAL_S = 0.2  # how often a consumer child reports its partitions and count during a run


class BenchError(RuntimeError):
    """The bench cannot go on: a missing piece, a dead child process, a time-out."""


def bench_version(buckets: Sequence[int] | None) -> EngineVersion:
    """The committed version serving ``buckets`` together with its manifest's own (their union).

    The union lets every set-up (fine buckets, the manifest's, pad-to-max, dynamic padding) batch by a
    subset of one engine's buckets, so all share one warmed engine (see ``EngineVersion.serving``).
    """
    version = EngineRepository(REPO / "engines", MODEL).load(VERSION)
    if not buckets:
        return version
    return version.serving(sorted(set(buckets) | set(version.manifest.buckets)))


def encoder_flops(length_sum: float, length_squared_sum: float) -> float:
    """FLOPs (2 per multiply-add) of the encoder over posts with these sums of L and L².

    Per layer and post of L tokens: Q, K, V and output projections 4·2·L·h², the FFN 2·2·L·h·f,
    attention scores and context 2·2·L²·h; embeddings and the 3-way head are negligible.
    """
    per_token = 2 * (4 * HIDDEN * HIDDEN + 2 * HIDDEN * FFN)
    return LAYERS * (per_token * length_sum + 4 * HIDDEN * length_squared_sum)


def fp16_peak_tflops(device_name: str | None, override: float | None) -> float | None:
    if override:
        return override
    for marker, peak in FP16_DENSE_PEAK_TFLOPS:
        if device_name and marker in device_name:
            return peak
    return None
