"""The TensorRT backend: its control logic against a FAKE of the TensorRT / cuda-python APIs, and on a GPU.

Everything but the last two tests runs against ``tests/engines/fake_tensorrt.py``, a fake
of the runtime APIs (not TensorRT): it checks which profile, shapes, addresses, copies
and streams the backend uses, and computes deterministic logits from the token ids it
finds in "device" memory, so results are checked batch by batch. The last two tests
run only where a GPU (and, for the smoke test, TensorRT) is present.
"""

from __future__ import annotations

import dataclasses
import gc
import importlib.util
import json
import logging
import subprocess
import sys
import threading
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

from stream_sentiment.engines import tensorrt_backend
from stream_sentiment.engines.base import BackendUnavailableError, EngineError, TokenBatch, softmax
from stream_sentiment.engines.manifest import load_engine_version
from stream_sentiment.engines.plans import GpuIdentity, PlanInfo, plan_path
from stream_sentiment.engines.tensorrt_backend import TensorRTEngine
from tests.engines.fake_tensorrt import (
    CudaThroughCudart,
    FakeCudaRuntime,
    FakeTensorRT,
    cudaMemcpyKind,
    fake_logits,
    fake_plan,
)

HAS_TENSORRT = importlib.util.find_spec("tensorrt") is not None
H2D, D2H = cudaMemcpyKind.cudaMemcpyHostToDevice, cudaMemcpyKind.cudaMemcpyDeviceToHost
GPU = GpuIdentity("NVIDIA H100 80GB HBM3", "9.0")


def _real_cudart():
    """cuda-python's runtime if it is installed and sees a GPU, else None."""
    try:
        cudart = tensorrt_backend.import_cudart()
        status, count = cudart.cudaGetDeviceCount()
    except Exception:
        return None
    return cudart if int(status) == 0 and count > 0 else None


def _tensorrt_works() -> bool:
    try:
        import tensorrt  # noqa: F401
    except Exception:
        return False
    return _real_cudart() is not None


@pytest.fixture
def cuda() -> FakeCudaRuntime:
    return FakeCudaRuntime()


@pytest.fixture
def trt(cuda) -> FakeTensorRT:
    return FakeTensorRT(cuda)


def make_engine(version, trt, cuda, streams=1, **plan_options) -> TensorRTEngine:
    plan = fake_plan(plan_options.pop("buckets", version.manifest.buckets), **plan_options)
    return TensorRTEngine(version, streams, trt=trt, cudart=cuda, plan=plan)


def random_batch(rng: np.random.Generator, bucket: int, rows: int) -> TokenBatch:
    ids = np.zeros((rows, bucket), dtype=np.int64)
    mask = np.zeros((rows, bucket), dtype=np.int64)
    for row in range(rows):
        length = int(rng.integers(1, bucket + 1))
        ids[row, :length] = rng.integers(100, 30_000, length)
        mask[row, :length] = 1
    return TokenBatch(ids, mask, bucket)


def expected(batch: TokenBatch) -> np.ndarray:
    return softmax(fake_logits(batch.input_ids, batch.attention_mask))


def test_a_plan_serves_any_subset_of_the_buckets_it_was_built_for(engine_version, trt, cuda):
    # batching.buckets [64, 256] (e.g. the pad-to-max baseline uses [256]) on the default four-bucket plan.
    serving = engine_version.serving((64, 256))
    rng = np.random.default_rng(1)
    batches = [random_batch(rng, 64, 2), random_batch(rng, 256, 1)]
    plan = fake_plan(engine_version.manifest.buckets, profile_sets=2)
    with TensorRTEngine(serving, 2, trt=trt, cudart=cuda, plan=plan) as engine:
        for batch in batches:
            np.testing.assert_allclose(engine.infer(batch, stream=1), expected(batch), atol=1e-6)
    # Stream 1 uses the second set: the plan's bucket 64 is its profile 4 + 1, bucket 256 is 4 + 3.
    assert [index for log in trt.logs for index, _ in log.profiles] == [5, 7]


def test_profile_follows_the_bucket_and_is_switched_only_when_it_changes(engine_version, trt, cuda):
    rng = np.random.default_rng(0)
    batches = [random_batch(rng, bucket, rows) for bucket, rows in [(32, 3), (64, 2), (32, 5), (32, 1)]]
    with make_engine(engine_version, trt, cuda) as engine:
        for batch in batches:
            np.testing.assert_allclose(engine.infer(batch), expected(batch), atol=1e-6)
    (log,) = trt.logs
    assert [index for index, _ in log.profiles] == [0, 1, 0]  # not again for the second 32 in a row
    handles = {handle for _, handle in log.profiles}
    assert len(handles) == 1 and isinstance(handles.pop(), int)  # the slot's stream, as a raw handle
    assert log.shapes == [(name, (b.rows, b.bucket)) for b in batches for name in ("input_ids", "attention_mask")]
    assert cuda.stream_flags == [cuda.cudaStreamNonBlocking]
    assert cuda.errors == []


def test_buffers_are_allocated_once_per_stream_and_bucket_and_reused(engine_version, trt, cuda):
    rng = np.random.default_rng(1)
    with make_engine(engine_version, trt, cuda, max_rows=8) as engine:
        assert cuda.live_device_allocations == 0  # nothing until a bucket is used
        engine.infer(random_batch(rng, 32, 3))
        assert (cuda.calls["cudaMalloc"], cuda.calls["cudaMallocHost"]) == (3, 3)
        # At max_rows capacity: two int32 inputs [8, 32] and the float32 logits [8, 3].
        assert cuda.allocation_sizes() == sorted([8 * 32 * 4, 8 * 32 * 4, 8 * 3 * 4])
        first_addresses = trt.logs[0].addresses[-3:]

        for rows in (8, 1, 5):  # full capacity, then fewer rows than capacity
            batch = random_batch(rng, 32, rows)
            np.testing.assert_allclose(engine.infer(batch), expected(batch), atol=1e-6)
            assert trt.logs[0].addresses[-3:] == first_addresses
            # Only the batch's rows travel, not the whole buffer.
            assert cuda.copies[-3:] == [(H2D, rows * 32 * 4), (H2D, rows * 32 * 4), (D2H, rows * 3 * 4)]
        assert (cuda.calls["cudaMalloc"], cuda.calls["cudaMallocHost"]) == (3, 3)

        engine.infer(random_batch(rng, 64, 2))  # a new bucket gets its own buffers
        assert (cuda.calls["cudaMalloc"], cuda.calls["cudaMallocHost"]) == (6, 6)
        engine.warm_up(rows=2)  # every bucket once: only the two unused buckets allocate
        assert cuda.live_device_allocations == cuda.live_host_allocations == 4 * 3
    assert cuda.errors == []


@pytest.mark.parametrize("input_dtype", ["int32", "int64"])
def test_token_ids_are_cast_to_the_plans_input_type(engine_version, trt, cuda, input_dtype):
    batch = random_batch(np.random.default_rng(2), 64, 4)
    with make_engine(engine_version, trt, cuda, input_dtype=input_dtype, max_rows=4) as engine:
        np.testing.assert_allclose(engine.infer(batch), expected(batch), atol=1e-6)
        itemsize = np.dtype(input_dtype).itemsize
        assert cuda.copies[:2] == [(H2D, 4 * 64 * itemsize)] * 2


def test_streams_run_in_parallel_each_context_used_by_one_thread(engine_version, trt, cuda):
    streams, batches_per_stream = 4, 40
    start = threading.Barrier(streams, timeout=10)

    def score(engine: TensorRTEngine, stream: int) -> int:
        rng = np.random.default_rng(100 + stream)
        start.wait()
        wrong = 0
        for _ in range(batches_per_stream):
            batch = random_batch(rng, int(rng.choice(engine_version.manifest.buckets)), int(rng.integers(1, 9)))
            wrong += not np.allclose(engine.infer(batch, stream), expected(batch), atol=1e-6)
        return wrong

    interval = sys.getswitchinterval()
    sys.setswitchinterval(1e-5)  # make the threads interleave inside infer, not one after another
    try:
        with make_engine(engine_version, trt, cuda, streams=streams) as engine, ThreadPoolExecutor(streams) as pool:
            wrong = list(pool.map(lambda s: score(engine, s), range(streams)))
    finally:
        sys.setswitchinterval(interval)

    assert wrong == [0] * streams
    assert len(trt.logs) == streams
    assert all(len(log.threads) == 1 for log in trt.logs)  # each context only ever saw one thread
    assert len(set().union(*(log.threads for log in trt.logs))) == streams
    assert all(log.overlapping_calls == 0 for log in trt.logs)
    assert sum(log.executes for log in trt.logs) == streams * batches_per_stream
    assert cuda.errors == []


@pytest.mark.parametrize(("raise_error", "message"), [(False, "execute_async_v3 failed"), (True, "injected")])
def test_failed_execute_then_rebuild_gives_the_stream_a_new_context(engine_version, trt, cuda, raise_error, message):
    rng = np.random.default_rng(3)
    batch = random_batch(rng, 32, 2)
    with make_engine(engine_version, trt, cuda, streams=2) as engine:
        engine.infer(batch, 0)
        engine.infer(batch, 1)
        assert cuda.live_device_allocations == 6
        trt.fail_next_executes(1, raise_error=raise_error)
        with pytest.raises(EngineError, match=message):
            engine.infer(batch, 0)

        engine.rebuild(0)
        gc.collect()
        assert len(trt.logs) == 3 and trt.live_contexts == 2  # stream 0's old context is gone
        assert cuda.live_device_allocations == cuda.live_host_allocations == 3  # only stream 1's buffers
        assert cuda.calls["cudaStreamDestroy"] == 1 and cuda.live_streams == 2

        np.testing.assert_allclose(engine.infer(batch, 0), expected(batch), atol=1e-6)
        new = trt.logs[2]
        assert new.executes == 1 and [index for index, _ in new.profiles] == [0]  # set afresh
        np.testing.assert_allclose(engine.infer(batch, 1), expected(batch), atol=1e-6)  # untouched
        assert trt.logs[1].executes == 2
    assert cuda.errors == []


def test_a_failed_rebuild_leaves_the_stream_refusing_until_rebuilt(engine_version, trt, cuda):
    batch = random_batch(np.random.default_rng(4), 32, 1)
    with make_engine(engine_version, trt, cuda) as engine:
        cuda.fail_next("cudaStreamCreateWithFlags")
        with pytest.raises(EngineError, match="cudaStreamCreateWithFlags failed: cudaErrorMemoryAllocation"):
            engine.rebuild(0)
        with pytest.raises(EngineError, match="rebuild it"):
            engine.infer(batch)
        engine.rebuild(0)
        np.testing.assert_allclose(engine.infer(batch), expected(batch), atol=1e-6)
    assert cuda.live_streams == 0


def test_deactivate_releases_every_buffer_stream_and_context(engine_version, trt, cuda):
    engine = make_engine(engine_version, trt, cuda, streams=3)
    engine.activate()
    engine.warm_up(rows=2)
    assert cuda.live_device_allocations == cuda.live_host_allocations == 3 * 4 * 3
    assert cuda.live_streams == 3 and trt.live_contexts == 3

    engine.deactivate()
    gc.collect()
    assert (cuda.live_device_allocations, cuda.live_host_allocations, cuda.live_streams) == (0, 0, 0)
    assert trt.live_contexts == 0 and trt.live_engines == 0
    assert cuda.calls["cudaStreamDestroy"] == 3
    engine.deactivate()  # idempotent
    with pytest.raises(EngineError, match="not active"):
        engine.infer(random_batch(np.random.default_rng(5), 32, 1))
    assert cuda.errors == []


def test_a_half_done_activation_releases_what_it_made(engine_version, trt, cuda):
    cuda.fail_next("cudaStreamCreateWithFlags", after=2)
    engine = make_engine(engine_version, trt, cuda, streams=3)
    with pytest.raises(EngineError, match="cudaStreamCreateWithFlags failed"):
        engine.activate()
    gc.collect()
    assert not engine.is_active
    assert cuda.live_streams == 0 and trt.live_contexts == 0 and trt.live_engines == 0


@pytest.mark.skipif(HAS_TENSORRT, reason="TensorRT is installed here")
def test_without_tensorrt_activation_says_how_to_install_it(engine_version):
    with pytest.raises(BackendUnavailableError, match="TensorRT is not installed"):
        TensorRTEngine(engine_version).activate()


@pytest.mark.skipif(importlib.util.find_spec("cuda") is not None, reason="cuda-python is installed here")
def test_without_cuda_python_activation_says_so(engine_version, trt):
    with pytest.raises(BackendUnavailableError, match="cuda-python is not installed"):
        TensorRTEngine(engine_version, trt=trt).activate()


def test_importing_the_backend_imports_neither_tensorrt_nor_cuda():
    code = (
        "import sys, stream_sentiment.engines.tensorrt_backend; print(sorted({'tensorrt', 'cuda'} & set(sys.modules)))"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=60)
    assert result.stdout.strip() == "[]"


def test_missing_plan_names_build_engine(engine_copy, trt, cuda, monkeypatch):
    monkeypatch.setattr(tensorrt_backend, "current_gpu", lambda device=0: GPU)
    version = load_engine_version(engine_copy)
    with pytest.raises(BackendUnavailableError, match="stream-sentiment build-engine --engine") as error:
        TensorRTEngine(version, trt=trt, cudart=cuda).activate()
    assert "nvidia-h100-80gb-hbm3-sm90-trt10.99.fake.plan" in str(error.value)
    assert cuda.live_streams == 0


def _store_plan(version, trt, max_rows: int, sidecar_rows: int, sets: int = 1, sidecar_sets: int | None = 1) -> None:
    """The plan and sidecar build_plan would write; ``sidecar_sets=None`` writes an old sidecar without the field."""
    path = plan_path(version, GPU, trt.__version__)
    path.parent.mkdir(parents=True)
    path.write_bytes(fake_plan(version.manifest.buckets, max_rows=max_rows, profile_sets=sets))
    info = PlanInfo(path.name, GPU.name, "9.0", trt.__version__, "v1", [32, 64, 128, 256], 1, 2, sidecar_rows, 1.0)
    sidecar = dataclasses.asdict(info) | {"profile_sets": sidecar_sets}
    if sidecar_sets is None:
        del sidecar["profile_sets"]
    path.with_suffix(".json").write_text(json.dumps(sidecar))


def test_plan_for_this_gpu_is_found_and_rows_above_max_rows_are_refused(engine_copy, trt, cuda, monkeypatch):
    monkeypatch.setattr(tensorrt_backend, "current_gpu", lambda device=0: GPU)
    version = load_engine_version(engine_copy)
    _store_plan(version, trt, max_rows=4, sidecar_rows=4)
    rng = np.random.default_rng(6)
    with TensorRTEngine(version, trt=trt, cudart=cuda) as engine:
        assert engine.max_rows == 4
        batch = random_batch(rng, 128, 4)
        np.testing.assert_allclose(engine.infer(batch), expected(batch), atol=1e-6)
        with pytest.raises(EngineError, match="5 rows exceed the plan's max_rows 4"):
            engine.infer(random_batch(rng, 128, 5))
    assert trt.logs[0].executes == 1  # the oversized batch never reached TensorRT


def test_sidecar_that_disagrees_with_the_plan_is_refused(engine_copy, trt, cuda, monkeypatch):
    monkeypatch.setattr(tensorrt_backend, "current_gpu", lambda device=0: GPU)
    version = load_engine_version(engine_copy)
    _store_plan(version, trt, max_rows=4, sidecar_rows=256)
    with pytest.raises(EngineError, match="sidecar says max_rows 256"):
        TensorRTEngine(version, trt=trt, cudart=cuda).activate()
    assert cuda.live_streams == 0


@pytest.mark.parametrize(
    ("plan_options", "message"),
    [
        ({"buckets": (32, 64)}, r"not built for buckets \[128, 256\] .*--buckets 32,64,128,256"),
        ({"buckets": (32, 64, 128, 256, 32, 64)}, "not repeated sets of one bucket list"),
        ({"buckets": ()}, "0 optimization profiles"),
        ({"buckets": (32, 64, 128, 512)}, r"not built for buckets \[256\]"),
        ({"buckets": (32, 64, 128, 256, 32, 64, 256, 128)}, "not repeated sets"),  # the second set is wrong
        ({"inputs": ("ids", "mask")}, "do not match the manifest"),
        ({"labels": 2}, "does not have 3 columns"),
    ],
)
def test_plan_that_does_not_fit_the_manifest_is_refused(engine_version, trt, cuda, plan_options, message):
    with pytest.raises(EngineError, match=message):
        make_engine(engine_version, trt, cuda, **plan_options).activate()
    gc.collect()
    assert trt.live_engines == 0 and cuda.live_streams == 0


@pytest.mark.parametrize(("sets", "sidecar_sets"), [(2, 2), (1, None)])  # None: a sidecar older than profile sets
def test_sidecar_profile_sets_are_read_and_old_sidecars_mean_one(
    engine_copy, trt, cuda, monkeypatch, sets, sidecar_sets
):
    monkeypatch.setattr(tensorrt_backend, "current_gpu", lambda device=0: GPU)
    version = load_engine_version(engine_copy)
    _store_plan(version, trt, max_rows=4, sidecar_rows=4, sets=sets, sidecar_sets=sidecar_sets)
    with TensorRTEngine(version, sets, trt=trt, cudart=cuda) as engine:
        assert engine.profile_sets == sets


def test_sidecar_that_disagrees_on_profile_sets_is_refused(engine_copy, trt, cuda, monkeypatch):
    monkeypatch.setattr(tensorrt_backend, "current_gpu", lambda device=0: GPU)
    version = load_engine_version(engine_copy)
    _store_plan(version, trt, max_rows=4, sidecar_rows=4, sets=2, sidecar_sets=1)
    with pytest.raises(EngineError, match="sidecar says 1 profile set"):
        TensorRTEngine(version, 2, trt=trt, cudart=cuda).activate()
    assert cuda.live_streams == 0


def test_a_profile_set_per_stream_keeps_parallel_streams_on_disjoint_profiles(engine_version, cuda, caplog):
    """Two sets, two streams, under the fake's strict one-context-per-profile rule (TensorRT's documented one)."""
    trt = FakeTensorRT(cuda, strict_profiles=True)
    buckets = engine_version.manifest.buckets
    assert list(buckets) == [32, 64, 128, 256]
    start = threading.Barrier(2, timeout=10)

    def score(engine: TensorRTEngine, stream: int) -> int:
        rng = np.random.default_rng(200 + stream)
        start.wait()
        wrong = 0
        for round_ in range(12):
            # Both streams walk the buckets in the same order, so they want the same bucket at the same time.
            batch = random_batch(rng, buckets[round_ % len(buckets)], int(rng.integers(1, 9)))
            wrong += not np.allclose(engine.infer(batch, stream), expected(batch), atol=1e-6)
        return wrong

    interval = sys.getswitchinterval()
    sys.setswitchinterval(1e-5)
    caplog.set_level(logging.WARNING, logger=tensorrt_backend.__name__)
    try:
        with make_engine(engine_version, trt, cuda, streams=2, profile_sets=2) as engine, ThreadPoolExecutor(2) as pool:
            assert engine.profile_sets == 2
            assert list(pool.map(lambda s: score(engine, s), range(2))) == [0, 0]
            engine.rebuild(1)  # a rebuilt slot keeps its profile set
            batch = random_batch(np.random.default_rng(8), 64, 2)
            np.testing.assert_allclose(engine.infer(batch, 1), expected(batch), atol=1e-6)
    finally:
        sys.setswitchinterval(interval)

    stream0, stream1, rebuilt = trt.logs
    assert [index for index, _ in stream0.profiles] == [0, 1, 2, 3] * 3
    assert [index for index, _ in stream1.profiles] == [4, 5, 6, 7] * 3
    assert [index for index, _ in rebuilt.profiles] == [5]
    assert trt.profile_conflicts == []
    assert caplog.records == []  # enough sets: nothing to warn about
    assert cuda.errors == []


def test_fewer_profile_sets_than_streams_warns_once_and_still_runs(engine_version, trt, cuda, caplog):
    batch = random_batch(np.random.default_rng(9), 32, 2)
    caplog.set_level(logging.WARNING, logger=tensorrt_backend.__name__)
    with make_engine(engine_version, trt, cuda, streams=2) as engine:
        (record,) = caplog.records
        assert record.levelno == logging.WARNING
        assert "share profiles" in record.getMessage() and "--streams 2" in record.getMessage()
        assert engine.profile_sets == 1
        for stream in range(2):  # the default fake, like TensorRT 10, lets contexts share a profile
            np.testing.assert_allclose(engine.infer(batch, stream), expected(batch), atol=1e-6)
    assert [[index for index, _ in log.profiles] for log in trt.logs] == [[0], [0]]
    assert len(caplog.records) == 1


def test_shared_profiles_fail_as_engine_errors_where_tensorrt_forbids_sharing(engine_version, cuda, caplog):
    """Why the sets exist: under the strict rule the second context cannot select a profile the first holds."""
    trt = FakeTensorRT(cuda, strict_profiles=True)
    batch = random_batch(np.random.default_rng(10), 32, 2)
    with make_engine(engine_version, trt, cuda, streams=2) as engine:
        np.testing.assert_allclose(engine.infer(batch, 0), expected(batch), atol=1e-6)
        with pytest.raises(EngineError, match="refused optimization profile 0"):
            engine.infer(batch, 1)
    assert trt.profile_conflicts == [0]
    assert cuda.errors == []


def test_plan_tensorrt_cannot_read_is_refused(engine_version, trt, cuda):
    engine = TensorRTEngine(engine_version, trt=trt, cudart=cuda, plan=b"not a plan")
    with pytest.raises(EngineError, match="could not deserialize"):
        engine.activate()


@pytest.mark.skipif(_real_cudart() is None, reason="needs cuda-python and a CUDA GPU")
def test_real_cuda_memory_and_streams_with_the_fake_network(engine_version):
    """On a GPU: the backend's real cudart plumbing (pinned memory, copies, streams), only the network faked."""
    cudart = _real_cudart()
    trt = FakeTensorRT(CudaThroughCudart(cudart))
    rng = np.random.default_rng(7)
    plan = fake_plan((32, 64, 128, 256), profile_sets=2)
    with TensorRTEngine(engine_version, 2, trt=trt, cudart=cudart, plan=plan) as engine:
        batches = [random_batch(rng, bucket, rows) for bucket, rows in [(32, 3), (256, 8), (64, 1), (32, 8)]]
        with ThreadPoolExecutor(2) as pool:
            results = list(pool.map(lambda s: [engine.infer(b, s) for b in batches], range(2)))
        for per_stream in results:
            for batch, probabilities in zip(batches, per_stream, strict=True):
                np.testing.assert_allclose(probabilities, expected(batch), atol=1e-6)
        engine.rebuild(1)
        np.testing.assert_allclose(engine.infer(batches[0], 1), expected(batches[0]), atol=1e-6)


@pytest.mark.skipif(not _tensorrt_works(), reason="needs TensorRT, cuda-python and a CUDA GPU")
def test_gpu_plan_scores_like_onnxruntime(engine_copy):
    """GPU smoke test: build the plan for this GPU, score on two streams, agree with the CPU engine."""
    from stream_sentiment.batching.tokenizer import PostTokenizer, pad_to_bucket
    from stream_sentiment.engine_build.tensorrt_build import build_plan
    from stream_sentiment.engines.onnxruntime_backend import OnnxRuntimeEngine

    version = load_engine_version(engine_copy)
    assert build_plan(version, streams=2, opt_rows=4, max_rows=16).profile_sets == 2
    texts = [
        "I absolutely love this, best day ever! :)",
        "This is the worst service I have ever had. Furious and disgusted.",
        "The meeting is scheduled for 3pm on Tuesday.",
        "delayed for three hours and nobody told us anything",
    ]
    tokenizer = PostTokenizer(version)
    ids = tokenizer.encode(texts)
    batch = pad_to_bucket(ids, tokenizer.bucket_for(max(map(len, ids))))
    with OnnxRuntimeEngine(version, threads_per_stream=1) as cpu:
        reference = cpu.infer(batch)
    with TensorRTEngine(version, streams=2) as gpu:
        assert gpu.profile_sets == 2
        gpu.warm_up()
        for stream in range(2):
            probabilities = gpu.infer(batch, stream)
            assert probabilities.shape == reference.shape
            assert list(probabilities.argmax(axis=1)) == list(reference.argmax(axis=1))
