"""``stream-sentiment build-engine``: a TensorRT plan from the version's Q/DQ INT8 ONNX.

Written against the TensorRT 10 Python API. The ONNX parser reads the Q/DQ
graph, so TensorRT uses *explicit* quantization: INT8 exactly where the
Q/DQ nodes say, FP16 elsewhere. One optimization profile per length bucket,
each with a fixed sequence length (batches are always padded to a bucket) and
the row range the batcher really forms at that bucket (``engines.plans.profile_rows``:
1 to ``min(batching.max_rows, batching.max_tokens // bucket)``, 32 rows at 256 with the
defaults), so the kernels are tuned for the shapes the batcher produces and
the runtime selects a profile by the batch's bucket.

Two network paths: from TensorRT 10.12, which deprecated the weak-typing precision flags,
a strongly typed network parsed from an FP16-typed export of the Q/DQ model
(``engine_build.fp16_qdq``); before it, the committed model with the INT8 and FP16 flags.
Neither has run on a real TensorRT: both are tested against a fake of the API only.

TensorRT's ``IExecutionContext`` docs (and NVIDIA/TensorRT#1590) say that with
dynamic shapes one optimization profile may be used by only one execution
context at a time, and the runtime runs one context per CUDA stream. So the
plan holds one *set* of bucket profiles per stream (``streams``, the
``build-engine --streams`` flag): profile index = ``set * len(buckets) +
bucket_index``, and stream ``s`` uses set ``s % profile_sets``. Build time
grows with the number of sets (each profile is tuned on its own).

Plans are specific to a GPU model, compute capability and TensorRT version;
where one is stored and its JSON sidecar (which records ``profile_sets``) are
in ``engines.plans``, which the TensorRT backend reads too. The set count is
*not* in the file name: there is one plan per GPU and TensorRT version, and the
newest ``build-engine`` wins; rebuild with ``--streams`` equal to
``engine.streams`` (or more) when that setting grows.

A build takes minutes, so ``build_plan`` draws the builder's own progress
reports (``trt.IProgressMonitor``: nested phases of steps) as tqdm bars on
stderr, one per active phase; ``build-engine --no-progress`` turns them off.
"""

from __future__ import annotations

import json
import re
import sys
import threading
import time
from dataclasses import asdict
from typing import Any, TextIO

from tqdm import tqdm

from stream_sentiment.batching.batcher import BatchingPolicy
from stream_sentiment.engine_build.fp16_qdq import write_fp16_qdq
from stream_sentiment.engine_build.qdq_rewrite import is_dynamically_quantized
from stream_sentiment.engines.manifest import EngineRepositoryError, EngineVersion
from stream_sentiment.engines.plans import (
    GpuIdentity,
    PlanInfo,
    current_gpu,
    import_tensorrt,
    plan_path,
    profile_rows,
    shared_logger,
)


class PhaseBars:
    """TensorRT builder phases as tqdm bars: one bar per active phase, a nested phase on the line below its parent.

    The logic of :func:`progress_monitor`, kept apart from ``trt.IProgressMonitor`` so it runs without TensorRT.
    The method names and arguments are the monitor's.
    """

    def __init__(self, output: TextIO | None = None) -> None:
        self._output = output if output is not None else sys.stderr
        self._bars: dict[str, tqdm] = {}
        self._depths: dict[str, int] = {}
        # TensorRT calls the monitor from several of its own threads.
        self._lock = threading.Lock()

    def phase_start(self, phase_name: str, parent_phase: str | None, num_steps: int) -> None:
        with self._lock:
            self._close(phase_name)  # names are unique among active phases; a reused one has finished
            depth = self._depths.get(parent_phase, -1) + 1 if parent_phase is not None else 0
            self._depths[phase_name] = depth
            # Nested phases come and go many times per build: only top-level phases stay on screen.
            self._bars[phase_name] = tqdm(total=num_steps, desc=phase_name, unit="step", position=depth,
                                          leave=depth == 0, file=self._output)

    def step_complete(self, phase_name: str, step: int) -> bool:
        with self._lock:
            bar = self._bars.get(phase_name)
            if bar is not None:
                bar.update(step + 1 - bar.n)  # steps are numbered from 0
        return True  # False would cancel the build

    def phase_finish(self, phase_name: str) -> None:
        with self._lock:
            self._close(phase_name)

    def close(self) -> None:
        """Close the bars of phases still open (a failed build may not finish them)."""
        with self._lock:
            for phase_name in list(self._bars):
                self._close(phase_name)

    def _close(self, phase_name: str) -> None:
        bar = self._bars.pop(phase_name, None)
        self._depths.pop(phase_name, None)
        if bar is not None:
            bar.close()


def progress_monitor(trt: Any, output: TextIO | None = None) -> Any:
    """A ``trt.IProgressMonitor`` that draws the builder's phases with :class:`PhaseBars` (on stderr by default).

    Set it as ``config.progress_monitor`` and keep it alive until the build returns; ``monitor.bars.close()``
    afterwards. The class is made here because its base comes from the ``tensorrt`` module passed in.
    """

    class TqdmProgressMonitor(trt.IProgressMonitor):
        def __init__(self) -> None:
            trt.IProgressMonitor.__init__(self)  # pybind11 needs the base initialised explicitly
            self.bars = PhaseBars(output)

        def phase_start(self, phase_name: str, parent_phase: str | None, num_steps: int) -> None:
            self.bars.phase_start(phase_name, parent_phase, num_steps)

        def step_complete(self, phase_name: str, step: int) -> bool:
            return self.bars.step_complete(phase_name, step)

        def phase_finish(self, phase_name: str) -> None:
            self.bars.phase_finish(phase_name)

    return TqdmProgressMonitor()


# TensorRT 10.12 deprecated the weak-typing precision flags (BuilderFlag.INT8/FP16): from it on,
# build_plan makes a strongly typed network from an FP16-typed export (engine_build.fp16_qdq).
STRONGLY_TYPED_FROM = (10, 12)
FP16_EXPORT = "model.fp16-qdq.onnx"  # written beside the plans (uncommitted, not in the manifest)


def tensorrt_version(trt: Any) -> tuple[int, int]:
    """(major, minor) of ``trt.__version__`` ("10.12.0.36" -> (10, 12))."""
    match = re.match(r"(\d+)\.(\d+)", trt.__version__)
    if match is None:
        raise ValueError(f"unreadable TensorRT version {trt.__version__!r}")
    return int(match[1]), int(match[2])


def refuse_dynamic_quantization(version: EngineVersion) -> None:
    """Raise :class:`EngineRepositoryError` if ``version`` is quantized dynamically (``calibrate --method dynamic``).

    Its activations have no fixed scales to give TensorRT's INT8 kernels, so no plan can be built from it:
    said before any builder work, and before TensorRT is even looked for.
    """
    if is_dynamically_quantized(version.model_path):
        raise EngineRepositoryError(
            f"{version.label} is quantized dynamically (ONNX Runtime's MatMulInteger, activation ranges per batch); "
            "TensorRT builds INT8 only from Q/DQ graphs: serve this one with onnxruntime or torch-cuda, build the plan "
            "for a static version (minilm-sentiment/v1 and minilm-fast/v2 are), or, with the version's checkpoint, "
            "calibrate it statically (stream-sentiment calibrate --method minmax)")


def build_plan(
    version: EngineVersion,
    *,
    streams: int = 1,
    policy: BatchingPolicy | None = None,
    opt_rows: int | None = None,
    trt: Any = None,
    gpu: GpuIdentity | None = None,
    workspace_bytes: int = 2 << 30,
    show_progress: bool = True,
    strongly_typed: bool | None = None,
) -> PlanInfo:
    """Build and store the plan for this GPU; returns its sidecar.

    ``streams`` is the number of execution contexts the plan must serve at once: the
    per-bucket profiles are added once per stream, set after set, so profile
    ``set * len(buckets) + bucket_index`` is bucket ``bucket_index`` of set ``set``.
    Each bucket's rows are :func:`~stream_sentiment.engines.plans.profile_rows` of ``policy``
    (the batching settings the workers run with; by default ``BatchingPolicy``'s defaults):
    1, ``opt_rows`` (default: a full batch), and the most rows the batcher forms at that bucket.
    ``strongly_typed`` (default: TensorRT >= 10.12) parses an FP16-typed export of the model into a
    strongly typed network; otherwise the model as committed, with the INT8 and FP16 builder flags.
    The plan replaces any earlier one for this GPU and TensorRT version. With ``show_progress``
    the builder's phases are drawn as tqdm bars on stderr.

    Raises:
        ValueError: ``streams`` is below 1.
        EngineRepositoryError: the version is dynamically quantized (no Q/DQ scales for TensorRT).
        BackendUnavailableError: tensorrt or cuda-python missing, or no GPU.
        RuntimeError: the ONNX did not parse or TensorRT could not build it.
    """
    if streams < 1:
        raise ValueError(f"a plan needs at least one profile set (streams={streams})")
    refuse_dynamic_quantization(version)
    trt = trt or import_tensorrt()
    gpu = gpu or current_gpu()
    manifest = version.manifest
    policy = policy or BatchingPolicy(buckets=tuple(manifest.buckets))
    rows = [profile_rows(policy, bucket, opt_rows) for bucket in manifest.buckets]
    typed = tensorrt_version(trt) >= STRONGLY_TYPED_FROM if strongly_typed is None else strongly_typed
    destination = plan_path(version, gpu, trt.__version__)
    started = time.perf_counter()
    logger = shared_logger(trt)  # the runtime's logger too
    builder = trt.Builder(logger)
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, workspace_bytes)
    _add_profiles(builder, config, version, rows, streams)  # first: a refused profile leaves no files behind
    if typed:
        # Tensor types come from the network: INT8 where the Q/DQ nodes say, FP16 where the export declares it.
        model = write_fp16_qdq(version.model_path, destination.parent / FP16_EXPORT)
        network = builder.create_network(1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED))
    else:
        # TensorRT < 10.12: Q/DQ nodes make this explicitly quantized, INT8 where they say so;
        # FP16 lets the unquantized layers (LayerNorm, softmax) run fast.
        model = version.model_path
        network = builder.create_network(0)  # TensorRT 10: explicit batch is the only mode
        config.set_flag(trt.BuilderFlag.INT8)
        config.set_flag(trt.BuilderFlag.FP16)
    parser = trt.OnnxParser(network, logger)
    # From the file, not its bytes: the parser then finds external data (weights beside the model).
    if not parser.parse_from_file(str(model)):
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise RuntimeError(f"TensorRT could not parse {model.name}: {errors}")

    monitor = progress_monitor(trt) if show_progress else None
    if monitor is not None:
        config.progress_monitor = monitor
    try:
        serialized = builder.build_serialized_network(network, config)
    finally:
        if monitor is not None:
            monitor.bars.close()
    if serialized is None:
        raise RuntimeError("TensorRT failed to build the engine; run with a verbose logger for details")
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
        opt_rows=max(opt for _, opt, _ in rows),
        max_rows=max(high for _, _, high in rows),
        build_seconds=round(time.perf_counter() - started, 1),
        profile_sets=streams,
        profile_rows=[list(r) for r in rows],
        batching={"max_rows": policy.max_rows, "max_tokens": policy.max_tokens},
        network_typing="strongly-typed" if typed else "weakly-typed",
    )
    destination.with_suffix(".json").write_text(json.dumps(asdict(info), indent=2) + "\n")
    return info


def _add_profiles(builder: Any, config: Any, version: EngineVersion,
                  rows: list[tuple[int, int, int]], streams: int) -> None:
    """One set of bucket profiles per stream: a context never shares its profile with another."""
    manifest = version.manifest
    for profile_set in range(streams):
        for bucket_index, (bucket, (low, opt, high)) in enumerate(zip(manifest.buckets, rows, strict=True)):
            profile = builder.create_optimization_profile()
            for name in manifest.inputs:
                profile.set_shape(name, (low, bucket), (opt, bucket), (high, bucket))
            index = config.add_optimization_profile(profile)  # -1 when TensorRT rejects the profile
            if index != profile_set * len(manifest.buckets) + bucket_index:
                raise RuntimeError(f"TensorRT refused the profile for bucket {bucket} of set {profile_set} ({index})")
