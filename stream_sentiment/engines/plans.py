"""Where a TensorRT plan lives and what it was built for: shared by the runtime and ``build-engine``.

Plans are specific to a GPU model, compute capability and TensorRT version;
they are stored under ``<version>/plans/`` with those three in the file name
and a JSON sidecar (:class:`PlanInfo`, which records ``profile_sets``), and
never committed. The TensorRT backend finds the plan for the GPU it runs on
here; ``engine_build.tensorrt_build`` writes it. Nothing here imports
tensorrt or cuda-python at module import.

The rows of each bucket's profile come from the batching policy (:func:`profile_rows`): the batcher never
forms more than ``BatchingPolicy.capacity(bucket)`` rows at a bucket, so that is the profile's largest shape,
and the runtime refuses at activation a policy that would form more than the plan takes.
"""

from __future__ import annotations

import re
import weakref
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from stream_sentiment.batching.batcher import BatchingPolicy
from stream_sentiment.engines.base import BackendUnavailableError
from stream_sentiment.engines.manifest import PLANS_DIR, EngineVersion

INSTALL_HINT = (
    "TensorRT is not installed. build-engine needs an NVIDIA GPU with TensorRT 10 "
    "(pip install 'stream-sentiment[tensorrt]', or a TensorRT container); the CPU "
    "engine (onnxruntime) needs no plan."
)


@dataclass(frozen=True)
class GpuIdentity:
    name: str
    compute_capability: str

    @property
    def slug(self) -> str:
        return re.sub(r"[^a-z0-9]+", "-", self.name.lower()).strip("-")


@dataclass(frozen=True)
class PlanInfo:
    """The sidecar written next to a plan: what it was built for and from."""

    plan_file: str
    gpu: str
    compute_capability: str
    tensorrt_version: str
    engine_version: str
    buckets: list[int]
    # The largest of any bucket's profile; each bucket's own are in ``profile_rows``.
    min_rows: int
    opt_rows: int
    max_rows: int
    build_seconds: float
    # Copies of the per-bucket profiles, one per execution context; sidecars written
    # before this field existed describe plans with a single set.
    profile_sets: int = 1
    # [min, opt, max] rows of each bucket's profile, in ``buckets`` order; None in sidecars written before
    # profiles followed the batching policy, whose every profile took min_rows..max_rows.
    profile_rows: list[list[int]] | None = None
    # The batching settings the rows were derived from: {"max_rows": ..., "max_tokens": ...}.
    batching: dict[str, int] | None = None
    # "strongly-typed" (TensorRT >= 10.12, an FP16-typed Q/DQ export) or "weakly-typed" (INT8 + FP16 flags).
    network_typing: str = "weakly-typed"

    def rows_for(self, bucket: int) -> tuple[int, int, int]:
        """The (min, opt, max) rows of ``bucket``'s profile."""
        if self.profile_rows is None:
            return self.min_rows, self.opt_rows, self.max_rows
        low, opt, high = self.profile_rows[self.buckets.index(bucket)]
        return low, opt, high


def profile_rows(policy: BatchingPolicy, bucket: int, opt_rows: int | None = None) -> tuple[int, int, int]:
    """The (min, opt, max) rows of ``bucket``'s optimization profile for batches formed by ``policy``.

    max is the most rows the batcher ever forms at ``bucket`` (``policy.capacity``: ``max_rows``, or fewer
    where ``max_tokens // bucket`` is smaller; a merged timeout batch is capped the same way), so no
    profile is tuned or sized for shapes that never come (the old fixed 256 rows at every bucket). opt
    defaults to that full batch: batches are full exactly when the engine is the bottleneck, which is
    when its kernels' speed decides throughput; partial batches come when the engine is idle anyway.
    min is 1: a timeout batch may hold a single post.
    """
    high = policy.capacity(bucket)
    return 1, min(opt_rows or high, high), high


# One ``trt.Logger`` per tensorrt module, shared by ``build-engine`` and the runtime: TensorRT keeps one
# logger per process (registering another only logs a warning and may not take effect), and an engine
# reloaded on every version swap would otherwise bring a new one each time.
_LOGGERS: weakref.WeakKeyDictionary[Any, Any] = weakref.WeakKeyDictionary()


def shared_logger(trt: Any) -> Any:
    """The process's ``trt.Logger`` (WARNING and above) for the tensorrt module ``trt``."""
    if trt not in _LOGGERS:
        _LOGGERS[trt] = trt.Logger(trt.Logger.WARNING)
    return _LOGGERS[trt]


def import_tensorrt() -> Any:
    try:
        import tensorrt
    except ImportError as error:
        raise BackendUnavailableError(INSTALL_HINT) from error
    return tensorrt


def import_cudart() -> Any:
    """cuda-python's runtime module, in its current layout or the pre-12.8 one."""
    try:
        from cuda.bindings import runtime as cudart
    except ImportError:
        try:
            from cuda import cudart  # cuda-python < 12.8 layout
        except ImportError as error:
            raise BackendUnavailableError("cuda-python is not installed (pip install cuda-python)") from error
    return cudart


def current_gpu(device: int = 0) -> GpuIdentity:
    """Name and compute capability of ``device``, through cuda-python's runtime API."""
    status, props = import_cudart().cudaGetDeviceProperties(device)
    if int(status) != 0:
        raise BackendUnavailableError(f"no CUDA device {device}: {status}")
    name = props.name.decode() if isinstance(props.name, bytes) else str(props.name)
    return GpuIdentity(name=name.strip("\x00 "), compute_capability=f"{props.major}.{props.minor}")


def plan_path(version: EngineVersion, gpu: GpuIdentity, tensorrt_version: str) -> Path:
    cc = gpu.compute_capability.replace(".", "")
    return version.path / PLANS_DIR / f"{gpu.slug}-sm{cc}-trt{tensorrt_version}.plan"
