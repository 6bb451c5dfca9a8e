# ruff: noqa: N801, N802, N815 - the fake keeps the real APIs' names (cudaMalloc, cudaError_t, Runtime)
"""A FAKE of a slice of the TensorRT 10 runtime and builder APIs and of cuda-python's runtime API.
Not TensorRT, not CUDA.

It exists so the TensorRT backend's control logic (profile per bucket, buffers per
stream and bucket, one context per thread, rebuild, release) runs in CI, where no
GPU and no TensorRT exist. It imitates only what ``tensorrt_backend`` calls, with
the same names, argument order and return conventions as the real APIs:

* :class:`FakeTensorRT`: ``__version__``, ``Logger``, ``Runtime``,
  ``deserialize_cuda_engine``, an ``ICudaEngine`` and ``IExecutionContext`` whose
  ``execute_async_v3`` runs a made-up "kernel" (:func:`fake_logits`) on the bytes
  found at the tensor addresses, queued on the stream like real work;
* :class:`FakeCudaRuntime`: ``cudaMalloc`` / ``cudaMallocHost`` hand out the real
  addresses of ctypes buffers (so numpy views and ``memmove`` work), async copies
  and fake kernels are queued per stream and run at ``cudaStreamSynchronize``, and
  every call returns ``(cudaError_t, *values)``. It counts live allocations and
  streams and records misuse (wrong pointer kind, unknown stream) in ``errors``.

A plan for the fake is made by :func:`fake_plan`; real plans are refused.

``FakeTensorRT(cuda, strict_profiles=True)`` enforces the rule of TensorRT's
``IExecutionContext`` docs that an optimization profile is used by one context at a
time: ``set_optimization_profile_async`` returns False for a profile that another
live context has selected (and records it in ``profile_conflicts``).

:class:`FakeTensorRTBuilder` fakes the builder half that ``tensorrt_build.build_plan``
uses: network, ONNX parser, builder config with optimization profiles, and
``build_serialized_network``, which returns fake plan bytes (not a plan any runtime
loads) after driving the config's ``progress_monitor`` (a subclass of the fake
:class:`IProgressMonitor`) through made-up nested phases, from another thread as
TensorRT does.
"""

from __future__ import annotations

import ctypes
import enum
import itertools
import json
import os
import threading
import types
import weakref
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

PLAN_MAGIC = b"FAKE-TENSORRT-PLAN\n"


def fake_plan(
    buckets: Sequence[int],
    *,
    max_rows: int = 8,
    input_dtype: str = "int32",
    labels: int = 3,
    inputs: Sequence[str] = ("input_ids", "attention_mask"),
    output: str = "logits",
    profile_sets: int = 1,
    rows: Sequence[int] | None = None,
) -> bytes:
    """A serialized "plan" for the fake, like build_plan's: ``profile_sets`` copies of one profile
    per bucket (profile ``set * len(buckets) + i`` is bucket ``i``), rows 1..rows[i] (default max_rows)."""
    spec = {"buckets": list(buckets), "max_rows": max_rows, "input_dtype": input_dtype, "labels": labels}
    spec["profiles"] = list(buckets) * profile_sets  # the bucket of each profile index
    per_bucket = list(rows) if rows is not None else [max_rows] * len(buckets)
    spec["profile_rows"] = per_bucket * profile_sets  # the largest rows of each profile index
    return PLAN_MAGIC + json.dumps({**spec, "inputs": list(inputs), "output": output}).encode()


def fake_logits(input_ids: np.ndarray, attention_mask: np.ndarray) -> np.ndarray:
    """What the fake kernel computes: a fixed linear function of each row's mean real token id."""
    mask = attention_mask.astype(np.float64)
    real = mask.sum(axis=1)
    mean = (input_ids * mask).sum(axis=1) / np.maximum(real, 1)
    return np.stack([mean / 1000, 1 - mean / 1000, real / 100], axis=1).astype(np.float32)


# ----------------------------------------------------------------------------- cuda-python


class cudaError_t(enum.IntEnum):
    cudaSuccess = 0
    cudaErrorInvalidValue = 1
    cudaErrorMemoryAllocation = 2
    cudaErrorInvalidResourceHandle = 400
    cudaErrorIllegalAddress = 700


class cudaMemcpyKind(enum.IntEnum):
    cudaMemcpyHostToHost = 0
    cudaMemcpyHostToDevice = 1
    cudaMemcpyDeviceToHost = 2
    cudaMemcpyDeviceToDevice = 3


class FakeStream:
    """Like ``cudart.cudaStream_t``: an opaque handle whose ``int()`` is the raw pointer."""

    def __init__(self, handle: int) -> None:
        self._handle = handle

    def __int__(self) -> int:
        return self._handle

    def __repr__(self) -> str:
        return f"<FakeStream 0x{self._handle:x}>"


class FakeCudaRuntime:
    """A fake of the cuda-python runtime calls the backend makes. Memory is host memory."""

    cudaError_t = cudaError_t
    cudaMemcpyKind = cudaMemcpyKind
    cudaStreamNonBlocking = 1

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._device: dict[int, ctypes.Array] = {}
        self._pinned: dict[int, ctypes.Array] = {}
        self._queues: dict[int, list[Callable[[], None]]] = {}
        self._handles = itertools.count(0x7000)
        self._fail: dict[str, tuple[int, cudaError_t]] = {}
        self.calls: dict[str, int] = {}
        self.stream_flags: list[int] = []
        self.copies: list[tuple[cudaMemcpyKind, int]] = []
        self.errors: list[str] = []
        self.device_of_thread: dict[int, int] = {}

    # -- what tests look at
    @property
    def live_device_allocations(self) -> int:
        return len(self._device)

    @property
    def live_host_allocations(self) -> int:
        return len(self._pinned)

    @property
    def live_streams(self) -> int:
        return len(self._queues)

    def allocation_sizes(self) -> list[int]:
        return sorted(len(buffer) for buffer in self._device.values())

    def fail_next(
        self, call: str, error: cudaError_t = cudaError_t.cudaErrorMemoryAllocation, *, after: int = 0
    ) -> None:
        """Make ``call`` (e.g. ``"cudaMalloc"``) return ``error`` once, after ``after`` successful calls."""
        self._fail[call] = (after, error)

    # -- the runtime API
    def _enter(self, call: str) -> cudaError_t | None:
        with self._lock:
            self.calls[call] = self.calls.get(call, 0) + 1
            if call not in self._fail:
                return None
            after, error = self._fail[call]
            if after:
                self._fail[call] = (after - 1, error)
                return None
            del self._fail[call]
            return error

    def cudaSetDevice(self, device: int) -> tuple[cudaError_t]:
        self.device_of_thread[threading.get_ident()] = device
        return (self._enter("cudaSetDevice") or cudaError_t.cudaSuccess,)

    def _allocate(self, call: str, table: dict[int, ctypes.Array], size: int) -> tuple[cudaError_t, int]:
        if failure := self._enter(call):
            return failure, 0
        buffer = ctypes.create_string_buffer(size)
        with self._lock:
            table[ctypes.addressof(buffer)] = buffer
        return cudaError_t.cudaSuccess, ctypes.addressof(buffer)

    def cudaMalloc(self, size: int) -> tuple[cudaError_t, int]:
        return self._allocate("cudaMalloc", self._device, size)

    def cudaMallocHost(self, size: int) -> tuple[cudaError_t, int]:
        return self._allocate("cudaMallocHost", self._pinned, size)

    def _free(self, call: str, table: dict[int, ctypes.Array], pointer: int) -> tuple[cudaError_t]:
        self._enter(call)
        with self._lock:
            if table.pop(pointer, None) is None:
                self.errors.append(f"{call}(0x{pointer:x}): not an allocation of that kind")
                return (cudaError_t.cudaErrorInvalidValue,)
        return (cudaError_t.cudaSuccess,)

    def cudaFree(self, pointer: int) -> tuple[cudaError_t]:
        return self._free("cudaFree", self._device, pointer)

    def cudaFreeHost(self, pointer: int) -> tuple[cudaError_t]:
        return self._free("cudaFreeHost", self._pinned, pointer)

    def cudaStreamCreateWithFlags(self, flags: int) -> tuple[cudaError_t, FakeStream | None]:
        if failure := self._enter("cudaStreamCreateWithFlags"):
            return failure, None
        with self._lock:
            handle = next(self._handles)
            self._queues[handle] = []
            self.stream_flags.append(flags)
        return cudaError_t.cudaSuccess, FakeStream(handle)

    def cudaStreamDestroy(self, stream: FakeStream | int) -> tuple[cudaError_t]:
        self._enter("cudaStreamDestroy")
        status = self._run_queue(stream)  # like CUDA: queued work still completes
        with self._lock:
            self._queues.pop(int(stream), None)
        return (status,)

    def cudaStreamSynchronize(self, stream: FakeStream | int) -> tuple[cudaError_t]:
        if failure := self._enter("cudaStreamSynchronize"):
            return (failure,)
        return (self._run_queue(stream),)

    def cudaMemcpyAsync(
        self, destination: int, source: int, count: int, kind: cudaMemcpyKind, stream: FakeStream | int
    ) -> tuple[cudaError_t]:
        if failure := self._enter("cudaMemcpyAsync"):
            return (failure,)
        if kind not in (cudaMemcpyKind.cudaMemcpyHostToDevice, cudaMemcpyKind.cudaMemcpyDeviceToHost):
            return (cudaError_t.cudaErrorInvalidValue,)
        to_device = kind == cudaMemcpyKind.cudaMemcpyHostToDevice
        self.copies.append((kind, count))

        def copy() -> None:
            # An async copy needs pinned host memory on one side and device memory on the other.
            self._check(self._pinned if to_device else self._device, source, count, "copy source")
            self._check(self._device if to_device else self._pinned, destination, count, "copy destination")
            ctypes.memmove(destination, source, count)

        return (self.enqueue(int(stream), copy),)

    # -- used by the fake TensorRT's kernel
    def enqueue(self, stream_handle: int, work: Callable[[], None]) -> cudaError_t:
        with self._lock:
            queue = self._queues.get(stream_handle)
            if queue is None:
                self.errors.append(f"work queued on unknown stream 0x{stream_handle:x}")
                return cudaError_t.cudaErrorInvalidResourceHandle
            queue.append(work)
        return cudaError_t.cudaSuccess

    def read(self, pointer: int, count: int) -> bytes:
        self._check(self._device, pointer, count, "kernel read")
        return ctypes.string_at(pointer, count)

    def write(self, pointer: int, data: bytes) -> None:
        self._check(self._device, pointer, len(data), "kernel write")
        ctypes.memmove(pointer, data, len(data))

    def _check(self, table: dict[int, ctypes.Array], pointer: int, count: int, what: str) -> None:
        with self._lock:
            inside = any(base <= pointer and pointer + count <= base + len(b) for base, b in table.items())
        if not inside:
            kind = "device" if table is self._device else "pinned host"
            raise MemoryError(f"{what}: 0x{pointer:x}+{count} is not inside live {kind} memory")

    def _run_queue(self, stream: FakeStream | int) -> cudaError_t:
        with self._lock:
            queue = self._queues.get(int(stream))
            if queue is None:
                self.errors.append(f"unknown stream {stream!r}")
                return cudaError_t.cudaErrorInvalidResourceHandle
            work, queue[:] = list(queue), []
        for step in work:
            try:
                step()
            except MemoryError as error:
                self.errors.append(str(error))
                return cudaError_t.cudaErrorIllegalAddress
        return cudaError_t.cudaSuccess


class CudaThroughCudart:
    """Lets the fake kernel run against real GPU memory through cuda-python (for a GPU machine).

    The fake TensorRT then exercises the backend's real cudart plumbing: pinned memory,
    device memory, async copies and streams, with only the network itself faked.
    """

    def __init__(self, cudart: Any) -> None:
        self.cudart = cudart

    def enqueue(self, stream_handle: int, work: Callable[[], None]) -> Any:
        (status,) = self.cudart.cudaStreamSynchronize(self.cudart.cudaStream_t(stream_handle))
        if int(status) == 0:
            work()
        return status

    def read(self, pointer: int, count: int) -> bytes:
        host = ctypes.create_string_buffer(count)
        kind = self.cudart.cudaMemcpyKind.cudaMemcpyDeviceToHost
        (status,) = self.cudart.cudaMemcpy(ctypes.addressof(host), pointer, count, kind)
        assert int(status) == 0, status
        return host.raw

    def write(self, pointer: int, data: bytes) -> None:
        host = ctypes.create_string_buffer(data, len(data))
        kind = self.cudart.cudaMemcpyKind.cudaMemcpyHostToDevice
        (status,) = self.cudart.cudaMemcpy(pointer, ctypes.addressof(host), len(data), kind)
        assert int(status) == 0, status


# ----------------------------------------------------------------------------- TensorRT


class TensorIOMode(enum.Enum):
    NONE = 0
    INPUT = 1
    OUTPUT = 2


class Logger:
    WARNING = "warning"
    ERROR = "error"

    def __init__(self, min_severity: str = WARNING) -> None:
        self.min_severity = min_severity


@dataclass
class ContextLog:
    """What one fake execution context was asked to do (kept after the context is gone)."""

    profiles: list[tuple[int, int]] = field(default_factory=list)  # (profile index, stream handle)
    shapes: list[tuple[str, tuple[int, ...]]] = field(default_factory=list)
    addresses: list[tuple[str, int]] = field(default_factory=list)
    executes: int = 0
    threads: set[int] = field(default_factory=set)
    overlapping_calls: int = 0


class FakeTensorRT:
    """A fake of the ``tensorrt`` module's runtime half (TensorRT 10 names). Not TensorRT."""

    __version__ = "10.99.fake"
    Logger = Logger
    TensorIOMode = TensorIOMode

    def __init__(self, cuda: FakeCudaRuntime | CudaThroughCudart, *, strict_profiles: bool = False) -> None:
        self.cuda = cuda
        self.strict_profiles = strict_profiles
        self.profile_conflicts: list[int] = []  # profile indices refused because another context held them
        self.logs: list[ContextLog] = []
        self.loggers: list[Logger] = []
        self._contexts: list[weakref.ref] = []
        self._engines: list[weakref.ref] = []
        self._lock = threading.Lock()
        self._failures = 0
        self._raise_on_failure = False

    @staticmethod
    def nptype(dtype: str) -> type:
        return np.dtype(dtype).type

    def Runtime(self, logger: Logger) -> FakeRuntime:
        self.loggers.append(logger)
        return FakeRuntime(self)

    def fail_next_executes(self, count: int = 1, *, raise_error: bool = False) -> None:
        """The next ``count`` executes return False (or raise, as a broken binding would)."""
        self._failures, self._raise_on_failure = count, raise_error

    def take_failure(self) -> bool:
        with self._lock:
            if self._failures <= 0:
                return False
            self._failures -= 1
            return True

    @property
    def live_contexts(self) -> int:
        return sum(ref() is not None for ref in self._contexts)

    def claim_profile(self, context: FakeExecutionContext, profile_index: int) -> bool:
        """Strict mode: may ``context`` select ``profile_index``? Not if another live context selected it."""
        with self._lock:
            if self.strict_profiles:
                others = (ref() for ref in self._contexts)
                if any(c is not None and c is not context and c.selected == profile_index for c in others):
                    self.profile_conflicts.append(profile_index)
                    return False
            context.selected = profile_index
            return True

    @property
    def live_engines(self) -> int:
        return sum(ref() is not None for ref in self._engines)


class FakeRuntime:
    def __init__(self, trt: FakeTensorRT) -> None:
        self.trt = trt

    def deserialize_cuda_engine(self, data: bytes) -> FakeCudaEngine | None:
        if not bytes(data).startswith(PLAN_MAGIC):
            return None  # TensorRT logs an error and returns None
        engine = FakeCudaEngine(self.trt, json.loads(bytes(data)[len(PLAN_MAGIC) :]))
        self.trt._engines.append(weakref.ref(engine))
        return engine


class FakeCudaEngine:
    def __init__(self, trt: FakeTensorRT, spec: dict[str, Any]) -> None:
        self.trt, self.spec = trt, spec
        self.inputs, self.output = list(spec["inputs"]), spec["output"]
        self.num_io_tensors = len(self.inputs) + 1
        self.profiles = list(spec.get("profiles", spec["buckets"]))  # bucket of each profile index
        self.profile_rows = list(spec.get("profile_rows", [spec["max_rows"]] * len(self.profiles)))
        self.num_optimization_profiles = len(self.profiles)

    def get_tensor_name(self, index: int) -> str:
        return [*self.inputs, self.output][index]

    def get_tensor_mode(self, name: str) -> TensorIOMode:
        return TensorIOMode.INPUT if name in self.inputs else TensorIOMode.OUTPUT

    def get_tensor_dtype(self, name: str) -> str:
        return self.spec["input_dtype"] if name in self.inputs else "float32"

    def get_tensor_shape(self, name: str) -> tuple[int, int]:
        return (-1, -1) if name in self.inputs else (-1, self.spec["labels"])

    def get_tensor_profile_shape(self, name: str, profile_index: int) -> list[tuple[int, int]]:
        bucket, rows = self.profiles[profile_index], self.profile_rows[profile_index]
        return [(1, bucket), (max(1, rows // 2), bucket), (rows, bucket)]

    def create_execution_context(self) -> FakeExecutionContext:
        log = ContextLog()
        context = FakeExecutionContext(self, log)
        with self.trt._lock:
            self.trt.logs.append(log)
            self.trt._contexts.append(weakref.ref(context))
        return context


class FakeExecutionContext:
    def __init__(self, engine: FakeCudaEngine, log: ContextLog) -> None:
        self.engine, self.log = engine, log
        self.profile = 0  # TensorRT 10 assigns profile 0 to a new context
        self.selected: int | None = None  # the profile explicitly selected (what strict mode checks)
        self.shapes: dict[str, tuple[int, int]] = {}
        self.addresses: dict[str, int] = {}
        self._busy = threading.Lock()

    def _touch(self) -> None:
        self.log.threads.add(threading.get_ident())

    def set_optimization_profile_async(self, profile_index: int, stream_handle: int) -> bool:
        self._touch()
        if type(stream_handle) is not int:  # the binding takes the raw handle
            raise TypeError(f"stream_handle must be int, got {type(stream_handle).__name__}")
        self.log.profiles.append((profile_index, stream_handle))
        if not 0 <= profile_index < self.engine.num_optimization_profiles:
            return False
        if not self.engine.trt.claim_profile(self, profile_index):
            return False  # strict mode: another live context uses this profile
        self.profile, self.shapes = profile_index, {}  # a switch invalidates input shapes
        return True

    def set_input_shape(self, name: str, shape: tuple[int, int]) -> bool:
        self._touch()
        self.log.shapes.append((name, tuple(shape)))
        bucket, rows = self.engine.profiles[self.profile], self.engine.profile_rows[self.profile]
        if name not in self.engine.inputs or not (1 <= shape[0] <= rows and shape[1] == bucket):
            return False  # outside the selected profile
        self.shapes[name] = (int(shape[0]), int(shape[1]))
        return True

    def set_tensor_address(self, name: str, memory: int) -> bool:
        self._touch()
        if type(memory) is not int:
            raise TypeError(f"memory must be int, got {type(memory).__name__}")
        self.log.addresses.append((name, memory))
        self.addresses[name] = memory
        return True

    def execute_async_v3(self, stream_handle: int) -> bool:
        self._touch()
        if not self._busy.acquire(blocking=False):
            self.log.overlapping_calls += 1  # two threads inside one context at once
            self._busy.acquire()
        try:
            if type(stream_handle) is not int:
                raise TypeError(f"stream_handle must be int, got {type(stream_handle).__name__}")
            self.log.executes += 1
            trt = self.engine.trt
            if trt.take_failure():
                if trt._raise_on_failure:
                    raise RuntimeError("fake TensorRT: injected execute failure")
                return False
            names = [*self.engine.inputs, self.engine.output]
            if set(self.shapes) != set(self.engine.inputs) or not set(names) <= set(self.addresses):
                return False  # TensorRT refuses to enqueue with shapes or addresses missing
            kernel = self._kernel(dict(self.shapes), {n: self.addresses[n] for n in names})
            return int(trt.cuda.enqueue(stream_handle, kernel)) == 0
        finally:
            self._busy.release()

    def _kernel(self, shapes: dict[str, tuple[int, int]], addresses: dict[str, int]) -> Callable[[], None]:
        engine, cuda = self.engine, self.engine.trt.cuda
        dtype = np.dtype(engine.spec["input_dtype"])

        def run() -> None:
            ids_name, mask_name = engine.inputs
            rows, bucket = shapes[ids_name]
            count = rows * bucket * dtype.itemsize
            ids = np.frombuffer(cuda.read(addresses[ids_name], count), dtype=dtype).reshape(rows, bucket)
            mask = np.frombuffer(cuda.read(addresses[mask_name], count), dtype=dtype).reshape(rows, bucket)
            cuda.write(addresses[engine.output], fake_logits(ids, mask).tobytes())

        return run


# ----------------------------------------------------------------------------- TensorRT builder


class IProgressMonitor:
    """A fake of ``trt.IProgressMonitor``: the base class of an application's build-progress monitor.

    Like the pybind11 original, a subclass must call ``IProgressMonitor.__init__(self)``;
    the fake builder refuses a monitor that did not.
    """

    def __init__(self) -> None:
        self.fake_base_initialised = True

    def phase_start(self, phase_name: str, parent_phase: str | None, num_steps: int) -> None:
        raise NotImplementedError("pure virtual in TensorRT")

    def step_complete(self, phase_name: str, step: int) -> bool:
        raise NotImplementedError("pure virtual in TensorRT")

    def phase_finish(self, phase_name: str) -> None:
        raise NotImplementedError("pure virtual in TensorRT")


@dataclass(frozen=True)
class FakeBuildPhase:
    """A phase the fake builder reports: ``steps`` steps, with ``nested`` run inside each of them."""

    name: str
    steps: int
    nested: FakeBuildPhase | None = None


class NetworkDefinitionCreationFlag(enum.IntEnum):
    """TensorRT 10's flags for ``Builder.create_network``: bit positions of its argument."""

    EXPLICIT_BATCH = 0  # deprecated and ignored in TensorRT 10
    STRONGLY_TYPED = 1


# Made-up names and shape: TensorRT's own phase names and hierarchy change between versions.
FAKE_BUILD_PHASES = FakeBuildPhase("Fake engine build", 2, nested=FakeBuildPhase("Fake tactic timing", 3))


class FakeTensorRTBuilder(types.SimpleNamespace):
    """A fake of the slice of the ``tensorrt`` module's builder API that build_plan uses. Not TensorRT.

    What tests look at: ``profiles`` (the shapes of each added optimization profile),
    ``flags`` (builder flags), ``network_flags`` (the ``create_network`` bit field), ``workspace``,
    ``parsed_files`` (paths given to ``parse_from_file``; ``parse(bytes)`` is refused, as it cannot
    find external data), ``loggers`` (what Builder and OnnxParser were given),
    ``progress_monitors`` (the monitors builds reported to) and ``monitor_errors`` (exceptions
    a monitor raised, which TensorRT's binding prints and, from ``step_complete``, takes as a request to cancel).
    """

    # Like a module: hashable and equal only to itself (SimpleNamespace compares attributes).
    __hash__ = object.__hash__
    __eq__ = object.__eq__

    def __init__(
        self,
        parse_ok: bool = True,
        reject_profile: int | None = None,
        phases: FakeBuildPhase = FAKE_BUILD_PHASES,
        version: str = "10.99.fake",
    ) -> None:
        super().__init__(__version__=version)
        self.profiles: list[dict[str, tuple]] = []
        self.flags: set[str] = set()
        self.network_flags: list[int] = []
        self.parsed_files: list[str] = []
        self.loggers: list[Any] = []
        self.build_errors: list[str] = []
        self.progress_monitors: list[IProgressMonitor] = []
        self.monitor_errors: list[BaseException] = []
        fake = self

        class Logger:
            WARNING = "warning"

            def __init__(self, level: str) -> None:
                self.level = level

        class Profile:
            def __init__(self) -> None:
                self.shapes: dict[str, tuple] = {}

            def set_shape(self, name, low, opt, high):
                self.shapes[name] = (low, opt, high)

        class Config:
            progress_monitor: IProgressMonitor | None = None  # TensorRT's default: no monitor

            def set_memory_pool_limit(self, pool, size):
                fake.workspace = size

            def set_flag(self, flag):
                fake.flags.add(flag)

            def add_optimization_profile(self, profile):
                added = self.__dict__.setdefault("added", [])  # indices count per config, as in TensorRT
                if len(added) == reject_profile:
                    return -1  # TensorRT's answer to an invalid profile
                added.append(profile.shapes)
                fake.profiles.append(profile.shapes)
                return len(added) - 1

        class Network:
            def __init__(self, flags: int) -> None:
                self.flags = flags

        class Builder:
            def __init__(self, logger):
                fake.loggers.append(logger)

            def create_network(self, flags):
                if type(flags) is not int:
                    raise TypeError(f"flags must be an int bit field, got {type(flags).__name__}")
                fake.network_flags.append(flags)
                return Network(flags)

            def create_builder_config(self):
                return Config()

            def create_optimization_profile(self):
                return Profile()

            def build_serialized_network(self, network, config):
                strongly_typed = network.flags & (1 << int(NetworkDefinitionCreationFlag.STRONGLY_TYPED))
                if strongly_typed and fake.flags & {"int8", "fp16"}:
                    # TensorRT: precision flags are an error on a strongly typed network.
                    fake.build_errors.append("precision builder flags set on a strongly typed network")
                    return None
                monitor = config.progress_monitor
                if monitor is not None and not fake.report_progress(monitor, phases):
                    return None  # a cancelled build yields no plan
                return b"fake-plan-bytes"

        class OnnxParser:
            num_errors = 0 if parse_ok else 1

            def __init__(self, network, logger):
                fake.loggers.append(logger)

            def parse(self, data):
                raise AssertionError("parse(bytes) cannot find a model's external data: use parse_from_file")

            def parse_from_file(self, path):
                if not isinstance(path, str) or not os.path.isfile(path):
                    raise TypeError(f"parse_from_file takes the path of an existing file, got {path!r}")
                fake.parsed_files.append(path)
                return parse_ok

            def get_error(self, index):
                return "fake parser error"

        self.Logger, self.Builder, self.OnnxParser = Logger, Builder, OnnxParser
        self.IProgressMonitor = IProgressMonitor
        self.MemoryPoolType = types.SimpleNamespace(WORKSPACE="workspace")
        self.BuilderFlag = types.SimpleNamespace(INT8="int8", FP16="fp16")
        self.NetworkDefinitionCreationFlag = NetworkDefinitionCreationFlag

    def report_progress(self, monitor: IProgressMonitor, phases: FakeBuildPhase) -> bool:
        """Drive ``monitor`` through ``phases`` on a builder thread; False if it asked to cancel."""
        if not isinstance(monitor, IProgressMonitor) or not getattr(monitor, "fake_base_initialised", False):
            raise TypeError("progress_monitor must be an IProgressMonitor whose __init__ was called")
        self.progress_monitors.append(monitor)
        completed: list[bool] = []
        worker = threading.Thread(target=lambda: completed.append(self._report_phase(monitor, phases, None)))
        worker.start()
        worker.join()
        return completed == [True]

    def _report_phase(self, monitor: IProgressMonitor, phase: FakeBuildPhase, parent: str | None) -> bool:
        self._call(monitor.phase_start, phase.name, parent, phase.steps)
        try:
            for step in range(phase.steps):
                if phase.nested is not None and not self._report_phase(monitor, phase.nested, phase.name):
                    return False
                if not self._call(monitor.step_complete, phase.name, step):  # steps count [0, num_steps)
                    return False
            return True
        finally:
            self._call(monitor.phase_finish, phase.name)  # TensorRT finishes a phase even when cancelled

    def _call(self, callback: Callable[..., Any], *args: Any) -> Any:
        try:
            return callback(*args)
        except Exception as error:  # TensorRT's binding prints it; the build goes on (or stops, for a step)
            self.monitor_errors.append(error)
            return False
