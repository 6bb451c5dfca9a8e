"""TensorRT on an NVIDIA GPU: runs the plan that ``stream-sentiment build-engine`` stored.

Written against the TensorRT 10 Python API and cuda-python's runtime API, in the
shape of Polygraphy's TensorRT runner and TensorRT's ``common_runtime.py``:

* one ``IExecutionContext`` per slot, each on its own non-blocking CUDA stream,
  because a context holds per-inference state and must never be shared by threads;
* the plan has one *set* of optimization profiles per stream, one profile per bucket it was
  built for in each (the manifest's, or ``build-engine --buckets``; every serving bucket must
  be among them; see ``engine_build.tensorrt_build``): TensorRT's docs allow a profile to be used by
  only one context at a time, so slot ``s`` uses set ``s % profile_sets`` and a batch's
  profile is ``set * len(plan buckets) + bucket_index``. A plan with fewer sets than streams
  is refused at activation (``build-engine --streams``). A slot switches profile only when
  the bucket changes (a switch costs resource updates on the next enqueue);
* each bucket's profile takes the rows the batcher forms at that bucket
  (``engines.plans.profile_rows``); given the worker's ``batching`` policy, activation refuses
  a plan that takes fewer, naming the setting, instead of failing batch after batch;
* pinned host and device buffers are allocated once per (slot, bucket) at that bucket's
  largest rows and reused by every later batch, then freed explicitly: a serving
  loop must not allocate per batch, and GPU memory must not wait for the GC.
* one ``trt.Logger`` per process, shared with ``build-engine`` (``engines.plans.shared_logger``).

Nothing here imports tensorrt or cuda-python at module import: they are loaded in
``activate()``, or injected (the tests pass fakes of both APIs).
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from stream_sentiment.batching.batcher import BatchingPolicy
from stream_sentiment.engines.base import BackendUnavailableError, Engine, EngineError, TokenBatch
from stream_sentiment.engines.manifest import EngineVersion
from stream_sentiment.engines.plans import (
    PlanInfo,
    current_gpu,
    import_cudart,
    import_tensorrt,
    plan_path,
    shared_logger,
)

log = logging.getLogger(__name__)


def cuda_call(cudart: Any, name: str, *args: Any) -> Any:
    """Call ``cudart.<name>`` and check its status: every call returns ``(error, *values)``."""
    error, *values = getattr(cudart, name)(*args)
    if int(error) != 0:
        raise EngineError(f"{name} failed: {getattr(error, 'name', error)}")
    return values[0] if len(values) == 1 else None


class _SlotBuffers:
    """Pinned host arrays and device memory for every IO tensor of one (slot, bucket).

    All pointer handling lives here. Host memory is page-locked so ``cudaMemcpyAsync``
    really is asynchronous; the numpy views point into it and are dropped before it is freed.
    """

    def __init__(self, cudart: Any, shapes: dict[str, tuple[tuple[int, int], np.dtype]]) -> None:
        self._cudart = cudart
        self.host: dict[str, np.ndarray] = {}
        self.host_ptr: dict[str, int] = {}
        self.device_ptr: dict[str, int] = {}
        try:
            for name, (shape, dtype) in shapes.items():
                nbytes = shape[0] * shape[1] * dtype.itemsize
                self.host_ptr[name] = cuda_call(cudart, "cudaMallocHost", nbytes)
                raw = (ctypes.c_char * nbytes).from_address(self.host_ptr[name])
                self.host[name] = np.frombuffer(memoryview(raw), dtype=dtype).reshape(shape)
                self.device_ptr[name] = cuda_call(cudart, "cudaMalloc", nbytes)
        except EngineError:
            self.free()
            raise

    def upload(self, name: str, values: np.ndarray, stream: Any) -> None:
        host = self.host[name][: len(values)]
        np.copyto(host, values, casting="same_kind")  # plan inputs may be int32 while batches are int64
        self._copy(self.device_ptr[name], self.host_ptr[name], host.nbytes, "cudaMemcpyHostToDevice", stream)

    def download(self, name: str, rows: int, stream: Any) -> np.ndarray:
        """Queue the copy back; the returned view is valid once ``stream`` is synchronized."""
        host = self.host[name][:rows]
        self._copy(self.host_ptr[name], self.device_ptr[name], host.nbytes, "cudaMemcpyDeviceToHost", stream)
        return host

    def _copy(self, destination: int, source: int, nbytes: int, kind: str, stream: Any) -> None:
        kind_value = getattr(self._cudart.cudaMemcpyKind, kind)
        cuda_call(self._cudart, "cudaMemcpyAsync", destination, source, nbytes, kind_value, stream)

    def free(self) -> None:
        """Release every allocation, even past a failing call: a leak is worse than a late error."""
        self.host.clear()
        frees = [("cudaFreeHost", p) for p in self.host_ptr.values()]
        frees += [("cudaFree", p) for p in self.device_ptr.values()]
        self.host_ptr.clear()
        self.device_ptr.clear()
        failures = []
        for call, pointer in frees:
            try:
                cuda_call(self._cudart, call, pointer)
            except EngineError as error:
                failures.append(str(error))
        if failures:
            raise EngineError("; ".join(failures))


@dataclass
class _Slot:
    """One execution slot: a context, its stream, its buffers, the profile it has selected."""

    profile_set: int = 0  # which copy of the bucket profiles this slot's context selects from
    stream: Any = None
    context: Any = None
    profile: int | None = None
    buffers: dict[int, _SlotBuffers] = field(default_factory=dict)
    # The base class promises one thread per slot; this lock only guards against misuse
    # and never spans slots, so streams still run in parallel.
    lock: threading.Lock = field(default_factory=threading.Lock)


class TensorRTEngine(Engine):
    """A TensorRT plan scored on ``streams`` execution contexts, each with its own CUDA stream.

    Args:
        version: the engine version whose ``plans/`` folder holds the plan.
        streams: number of execution contexts (and CUDA streams); the plan must hold at least
            as many profile sets (``build-engine --streams``), else activation refuses it.
        batching: the policy the worker's batcher forms batches with; activation refuses a plan
            whose profile at some serving bucket takes fewer rows than that policy forms there.
            None (tools scoring their own batches) checks batch by batch only.
        trt / cudart: the tensorrt and cuda-python runtime modules; imported on
            activation when not given.
        plan: plan bytes or a plan path; by default the plan built for this GPU and
            TensorRT version (``engines.plans.plan_path``) and its JSON sidecar.
        device: CUDA device ordinal.
    """

    backend = "tensorrt"

    def __init__(
        self,
        version: EngineVersion,
        streams: int = 1,
        *,
        trt: Any = None,
        cudart: Any = None,
        plan: bytes | Path | None = None,
        device: int = 0,
        batching: BatchingPolicy | None = None,
    ) -> None:
        super().__init__(version, streams)
        self._trt, self._cudart, self._plan, self.device = trt, cudart, plan, device
        self.batching = batching
        self.rows_by_bucket: dict[int, int] = {}  # the most rows each plan bucket's profile takes
        self.profile_sets = 0
        self._plan_buckets: list[int] = []  # the bucket of each profile in a set, as the plan was built
        self._runtime: Any = None
        self._engine: Any = None
        self._dtypes: dict[str, np.dtype] = {}
        self._slots: list[_Slot] = []
        self._thread = threading.local()  # the current CUDA device is per thread

    def _activate_impl(self) -> None:
        self._trt = trt = self._trt or import_tensorrt()
        self._cudart = self._cudart or import_cudart()
        self._use_device()
        plan, sidecar = self._read_plan()
        try:
            self._runtime = trt.Runtime(shared_logger(trt))
            self._engine = self._runtime.deserialize_cuda_engine(plan)
            if self._engine is None:
                raise EngineError(
                    "TensorRT could not deserialize the plan (built by another TensorRT version or for another "
                    f"GPU?); rebuild it with `stream-sentiment build-engine --engine {self.version.path}`"
                )
            self._check_engine(sidecar)
            self._check_fit()
            self._slots = [_Slot(profile_set=s % self.profile_sets) for s in range(self.streams)]
            for slot in self._slots:
                self._open_slot(slot)
        except BaseException:
            self._release()  # a half-activated engine must not hold streams or memory
            raise

    def _read_plan(self) -> tuple[bytes, dict[str, Any] | None]:
        """The plan bytes and its JSON sidecar (None for plan bytes or a plan without one)."""
        if isinstance(self._plan, bytes):
            return self._plan, None
        if self._plan is not None:
            path = Path(self._plan)
        else:
            path = plan_path(self.version, current_gpu(self.device), self._trt.__version__)
        if not path.is_file():
            raise BackendUnavailableError(
                f"no TensorRT plan for this GPU and TensorRT {self._trt.__version__} at {path}; "
                f"build it with `stream-sentiment build-engine --engine {self.version.path}`"
            )
        sidecar = path.with_suffix(".json")
        return path.read_bytes(), json.loads(sidecar.read_text()) if sidecar.is_file() else None

    def _check_engine(self, sidecar: dict[str, Any] | None) -> None:
        """Refuse a plan whose tensors or profiles do not fit the manifest now, not at the first batch."""
        trt, engine, manifest = self._trt, self._engine, self.version.manifest
        names = [engine.get_tensor_name(i) for i in range(engine.num_io_tensors)]
        inputs = {n for n in names if engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT}
        if inputs != set(manifest.inputs) or set(names) - inputs != {manifest.output}:
            raise EngineError(f"plan tensors {names} do not match the manifest's {manifest.inputs} and output")
        if tuple(engine.get_tensor_shape(manifest.output))[-1] not in (-1, len(self.labels)):
            raise EngineError(f"plan output {manifest.output} does not have {len(self.labels)} columns")
        self._dtypes = {n: np.dtype(trt.nptype(engine.get_tensor_dtype(n))) for n in names}
        # build_plan adds sets of one profile per bucket, increasing: profile set * len(plan buckets) + i
        # is the plan's bucket i, which is how _run selects it. The serving buckets (batching.buckets)
        # may be any of the plan's.
        count = engine.num_optimization_profiles
        if count < 1:
            raise EngineError("plan has 0 optimization profiles; rebuild it")
        largest = [tuple(engine.get_tensor_profile_shape(manifest.inputs[0], i)[2]) for i in range(count)]
        widths = [shape[1] for shape in largest]
        per_set = next((i for i in range(1, count) if widths[i] <= widths[i - 1]), count)
        plan_buckets = widths[:per_set]
        if count % per_set or widths != plan_buckets * (count // per_set):
            raise EngineError(f"plan profiles {largest} are not repeated sets of one bucket list; rebuild it")
        missing = [bucket for bucket in manifest.buckets if bucket not in plan_buckets]
        if missing:
            raise EngineError(
                f"plan was not built for buckets {missing} (it has {plan_buckets}); rebuild it for the serving "
                f"buckets: build-engine --buckets {','.join(map(str, manifest.buckets))}")
        rows = [shape[0] for shape in largest]
        if rows != rows[:per_set] * (count // per_set):
            raise EngineError(f"plan profiles {largest} differ in rows between sets; rebuild it")
        self._plan_buckets = plan_buckets
        self.rows_by_bucket = dict(zip(plan_buckets, rows[:per_set], strict=True))
        self.profile_sets = count // per_set
        if sidecar is None:
            return
        info = PlanInfo(**sidecar)
        for bucket, limit in self.rows_by_bucket.items():
            said = info.rows_for(bucket)[2] if bucket in info.buckets else None
            if said != limit:
                raise EngineError(f"plan sidecar says max rows {said} at bucket {bucket} but its profile {limit}")
        sets = info.profile_sets  # sidecars older than profile sets describe one set
        if sets != self.profile_sets:
            raise EngineError(f"plan sidecar says {sets} profile set(s) but the plan has {self.profile_sets}")

    def _check_fit(self) -> None:
        """Refuse now what would otherwise fail batch by batch: too few profile sets, too few rows."""
        rebuild = f"stream-sentiment build-engine --engine {self.version.path}"
        if self.streams > self.profile_sets:
            # TensorRT's docs let a profile serve one context at a time: shared, batches would fail (or worse).
            raise EngineError(
                f"engine.streams is {self.streams} but the plan has {self.profile_sets} optimization profile "
                f"set(s), one per concurrent stream; rebuild it with `{rebuild} --streams {self.streams}` "
                f"or lower engine.streams to {self.profile_sets}")
        if self.batching is None:
            return
        policy = self.batching
        for bucket in self.version.manifest.buckets:
            formed, limit = policy.capacity(bucket), self.rows_by_bucket[bucket]
            if formed <= limit:
                continue
            # capacity = min(max_rows, max_tokens // bucket): name the setting that gives it.
            setting = ("batching.max_rows", policy.max_rows) if formed == policy.max_rows else (
                "batching.max_tokens", policy.max_tokens)
            raise EngineError(
                f"{setting[0]}={setting[1]} forms batches of up to {formed} rows at bucket {bucket}, but the "
                f"plan's profile there takes at most {limit}; rebuild it with `{rebuild} --max-rows "
                f"{policy.max_rows} --max-tokens {policy.max_tokens}` or lower {setting[0]}")

    def max_rows_for(self, bucket: int) -> int | None:
        return self.rows_by_bucket.get(bucket)

    def _open_slot(self, slot: _Slot) -> None:
        # Non-blocking: the slot's work never waits on the legacy default stream of
        # whatever else uses this GPU in the process.
        slot.stream = cuda_call(self._cudart, "cudaStreamCreateWithFlags", self._cudart.cudaStreamNonBlocking)
        slot.context = self._engine.create_execution_context()
        slot.profile = None  # set explicitly, on this slot's stream, before the first batch
        if slot.context is None:
            raise EngineError("TensorRT could not create an execution context (out of GPU memory?)")

    def _infer_impl(self, batch: TokenBatch, stream: int) -> np.ndarray:
        limit = self.rows_by_bucket.get(batch.bucket, 0)
        if batch.rows > limit:
            # A last guard for callers without a batching policy; the worker's is checked at activation.
            raise EngineError(f"{batch.rows} rows exceed the plan's {limit} at bucket {batch.bucket}; split the batch")
        if batch.rows == 0:
            return np.zeros((0, len(self.labels)), dtype=np.float32)
        slot = self._slots[stream]
        with slot.lock:
            if slot.context is None:
                raise EngineError(f"stream {stream} has no execution context; rebuild it")
            self._use_device()
            buffers = slot.buffers.get(batch.bucket)
            if buffers is None:
                buffers = slot.buffers[batch.bucket] = self._allocate(batch.bucket)
            try:
                return self._run(slot, buffers, batch)
            except Exception as error:
                with contextlib.suppress(EngineError):
                    self._drain(slot)  # no copy of the failed batch may still be in flight into reused buffers
                if isinstance(error, EngineError):
                    raise
                raise EngineError(f"TensorRT failed on stream {stream}: {error}") from error

    def _allocate(self, bucket: int) -> _SlotBuffers:
        manifest = self.version.manifest
        width = {**{name: bucket for name in manifest.inputs}, manifest.output: len(self.labels)}
        rows = self.rows_by_bucket[bucket]
        return _SlotBuffers(self._cudart, {n: ((rows, width[n]), d) for n, d in self._dtypes.items()})

    def _run(self, slot: _Slot, buffers: _SlotBuffers, batch: TokenBatch) -> np.ndarray:
        context, manifest = slot.context, self.version.manifest
        handle = int(slot.stream)  # TensorRT takes the raw cudaStream_t as an int
        buckets = self._plan_buckets
        profile = slot.profile_set * len(buckets) + buckets.index(batch.bucket)
        if slot.profile != profile:
            # On the slot's own stream, so the switch is ordered before the copies and the enqueue.
            # The slot's own profile set keeps concurrent contexts on separate profiles, as TensorRT's
            # class docs ask (activation refuses fewer sets than streams).
            if not context.set_optimization_profile_async(profile, handle):
                raise EngineError(f"TensorRT refused optimization profile {profile} (bucket {batch.bucket})")
            slot.profile = profile
        for name, values in zip(manifest.inputs, (batch.input_ids, batch.attention_mask), strict=True):
            buffers.upload(name, values, slot.stream)
            if not context.set_input_shape(name, (batch.rows, batch.bucket)):
                raise EngineError(f"TensorRT refused shape {(batch.rows, batch.bucket)} for {name}")
        for name, pointer in buffers.device_ptr.items():
            if not context.set_tensor_address(name, pointer):
                raise EngineError(f"TensorRT refused the address of {name}")
        if not context.execute_async_v3(handle):
            raise EngineError("execute_async_v3 failed (see the TensorRT log); rebuild the stream")
        logits = buffers.download(manifest.output, batch.rows, slot.stream)
        cuda_call(self._cudart, "cudaStreamSynchronize", slot.stream)
        return logits.astype(np.float32, copy=True)  # the pinned buffer is reused by the next batch

    def _rebuild_impl(self, stream: int) -> None:
        slot = self._slots[stream]
        with slot.lock:
            self._use_device()
            self._close_slot(slot)  # best effort: the old stream or context may be what broke
            self._open_slot(slot)

    def _deactivate_impl(self) -> None:
        with contextlib.suppress(EngineError):
            self._use_device()  # if even this fails, the frees below still run and report
        errors = self._release()
        if errors:
            raise EngineError(f"releasing {self.describe()} failed: {'; '.join(errors)}")

    def _release(self) -> list[str]:
        """Free every slot, then drop the engine and the runtime, in that order; collect errors."""
        errors = [error for slot in self._slots for error in self._close_slot(slot)]
        self._slots = []
        self._engine = None  # after its contexts, before the runtime that made it
        self._runtime = None
        return errors

    def _close_slot(self, slot: _Slot) -> list[str]:
        """Drain, free the buffers, destroy the stream, drop the context: every step is tried."""
        errors: list[str] = []

        def attempt(step: Callable[[], None]) -> None:
            try:
                step()
            except EngineError as error:
                errors.append(str(error))

        attempt(lambda: self._drain(slot))
        for buffers in slot.buffers.values():
            attempt(buffers.free)
        slot.buffers.clear()
        stream, slot.stream = slot.stream, None
        if stream is not None:
            attempt(lambda: cuda_call(self._cudart, "cudaStreamDestroy", stream))
        slot.context, slot.profile = None, None
        return errors

    def _drain(self, slot: _Slot) -> None:
        if slot.stream is not None:
            cuda_call(self._cudart, "cudaStreamSynchronize", slot.stream)

    def _use_device(self) -> None:
        if getattr(self._thread, "device", None) != self.device:
            cuda_call(self._cudart, "cudaSetDevice", self.device)
            self._thread.device = self.device
