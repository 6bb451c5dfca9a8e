"""``stream-sentiment build-engine``: a TensorRT plan from the version's Q/DQ INT8 ONNX.

Written against the TensorRT 10 Python API. The ONNX parser reads the Q/DQ
graph, so TensorRT uses *explicit* quantization: INT8 exactly where the
Q/DQ nodes say, FP16 elsewhere. One optimization profile per length bucket,
each with a fixed sequence length (batches are always padded to a bucket) and
a row range, so the kernels are tuned for the shapes the batcher produces and
the runtime selects a profile by the batch's bucket.

Plans are specific to a GPU model, compute capability and TensorRT version;
they are stored under ``<version>/plans/`` with those three in the file name
and a JSON sidecar, and never committed.
"""

from __future__ import annotations

import json
import re
import time
from dataclasses import asdict, dataclass
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


def import_tensorrt() -> Any:
    try:
        import tensorrt
    except ImportError as error:
        raise BackendUnavailableError(INSTALL_HINT) from error
    return tensorrt


def current_gpu(device: int = 0) -> GpuIdentity:
    """Name and compute capability of ``device``, through cuda-python's runtime API."""
    try:
        from cuda.bindings import runtime as cudart
    except ImportError:
        try:
            from cuda import cudart  # cuda-python < 12.8 layout
        except ImportError as error:
            raise BackendUnavailableError("cuda-python is not installed (pip install cuda-python)") from error
    status, props = cudart.cudaGetDeviceProperties(device)
    if int(status) != 0:
        raise BackendUnavailableError(f"no CUDA device {device}: {status}")
    name = props.name.decode() if isinstance(props.name, bytes) else str(props.name)
    return GpuIdentity(name=name.strip("\x00 "), compute_capability=f"{props.major}.{props.minor}")


def plan_path(version: EngineVersion, gpu: GpuIdentity, tensorrt_version: str) -> Path:
    cc = gpu.compute_capability.replace(".", "")
    return version.path / PLANS_DIR / f"{gpu.slug}-sm{cc}-trt{tensorrt_version}.plan"


def build_plan(
    version: EngineVersion,
    *,
    trt: Any = None,
    gpu: GpuIdentity | None = None,
    opt_rows: int = 64,
    max_rows: int = 256,
    workspace_bytes: int = 2 << 30,
) -> PlanInfo:
    """Build and store the plan for this GPU; returns its sidecar.

    Raises:
        BackendUnavailableError: tensorrt or cuda-python missing, or no GPU.
        RuntimeError: the ONNX did not parse or TensorRT could not build it.
    """
    trt = trt or import_tensorrt()
    gpu = gpu or current_gpu()
    manifest = version.manifest
    started = time.perf_counter()
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    network = builder.create_network(0)  # TensorRT 10: explicit batch is the only mode
    parser = trt.OnnxParser(network, logger)
    if not parser.parse(version.model_path.read_bytes()):
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise RuntimeError(f"TensorRT could not parse {version.model_path.name}: {errors}")

    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, workspace_bytes)
    # Q/DQ nodes make this an explicitly quantized network: INT8 where they
    # say so; FP16 lets the unquantized layers (LayerNorm, softmax) run fast.
    config.set_flag(trt.BuilderFlag.INT8)
    config.set_flag(trt.BuilderFlag.FP16)
    for bucket in manifest.buckets:
        profile = builder.create_optimization_profile()
        for name in manifest.inputs:
            profile.set_shape(name, (1, bucket), (min(opt_rows, max_rows), bucket), (max_rows, bucket))
        config.add_optimization_profile(profile)

    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise RuntimeError("TensorRT failed to build the engine; run with a verbose logger for details")
    destination = plan_path(version, gpu, trt.__version__)
    destination.parent.mkdir(parents=True, exist_ok=True)
    destination.write_bytes(bytes(serialized))
    info = PlanInfo(
        plan_file=destination.name,
        gpu=gpu.name,
        compute_capability=gpu.compute_capability,
        tensorrt_version=trt.__version__,
        engine_version=manifest.version,
        buckets=list(manifest.buckets),
        min_rows=1,
        opt_rows=min(opt_rows, max_rows),
        max_rows=max_rows,
        build_seconds=round(time.perf_counter() - started, 1),
    )
    destination.with_suffix(".json").write_text(json.dumps(asdict(info), indent=2) + "\n")
    return info
