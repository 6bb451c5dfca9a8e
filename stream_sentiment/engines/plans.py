"""Where a TensorRT plan lives and what it was built for: shared by the runtime and ``build-engine``.

Plans are specific to a GPU model, compute capability and TensorRT version;
they are stored under ``<version>/plans/`` with those three in the file name
and a JSON sidecar (:class:`PlanInfo`, which records ``profile_sets``), and
never committed. The TensorRT backend finds the plan for the GPU it runs on
here; ``engine_build.tensorrt_build`` writes it. Nothing here imports
tensorrt or cuda-python at module import.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

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
    min_rows: int
    opt_rows: int
    max_rows: int
    build_seconds: float
    # Copies of the per-bucket profiles, one per execution context; sidecars written
    # before this field existed describe plans with a single set.
    profile_sets: int = 1


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
