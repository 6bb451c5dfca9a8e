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

from stream_sentiment.batching.batcher import BatchingPolicy
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


def make_engine(version, trt, cuda, streams=1, batching=None, **plan_options) -> TensorRTEngine:
    """The engine on a fake plan built as ``build-engine --streams <streams>`` would be, unless told otherwise."""
    plan_options.setdefault("profile_sets", streams)
    plan = fake_plan(plan_options.pop("buckets", version.manifest.buckets), **plan_options)
    return TensorRTEngine(version, streams, trt=trt, cudart=cuda, plan=plan, batching=batching)


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
    # An old sidecar (no profile_rows): every bucket's profile took min_rows..max_rows.
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
        assert engine.rows_by_bucket == {32: 4, 64: 4, 128: 4, 256: 4}
        batch = random_batch(rng, 128, 4)
        np.testing.assert_allclose(engine.infer(batch), expected(batch), atol=1e-6)
        with pytest.raises(EngineError, match="5 rows exceed the plan's 4 at bucket 128"):
            engine.infer(random_batch(rng, 128, 5))
    assert trt.logs[0].executes == 1  # the oversized batch never reached TensorRT


def test_sidecar_that_disagrees_with_the_plan_is_refused(engine_copy, trt, cuda, monkeypatch):
    monkeypatch.setattr(tensorrt_backend, "current_gpu", lambda device=0: GPU)
    version = load_engine_version(engine_copy)
    _store_plan(version, trt, max_rows=4, sidecar_rows=256)
    with pytest.raises(EngineError, match="sidecar says max rows 256 at bucket 32 but its profile 4"):
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


@pytest.mark.parametrize("strict", [False, True])
def test_fewer_profile_sets_than_streams_are_refused_at_activation(engine_version, cuda, strict):
    """Shared profiles used to fail batch by batch (where TensorRT forbids sharing); now activation refuses."""
    trt = FakeTensorRT(cuda, strict_profiles=strict)
    engine = make_engine(engine_version, trt, cuda, streams=3, profile_sets=2)
    with pytest.raises(EngineError, match=r"engine.streams is 3 but the plan has 2 .*--streams 3.*engine.streams to 2"):
        engine.activate()
    assert not engine.is_active
    gc.collect()
    assert trt.live_contexts == 0 and cuda.live_streams == 0 and trt.logs == []


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
    policy = BatchingPolicy(buckets=version.manifest.buckets, max_rows=16, max_tokens=4096)
    assert build_plan(version, streams=2, policy=policy, opt_rows=4).profile_sets == 2
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
    with TensorRTEngine(version, streams=2, batching=policy) as gpu:
        assert gpu.profile_sets == 2
        gpu.warm_up()
        for stream in range(2):
            probabilities = gpu.infer(batch, stream)
            assert probabilities.shape == reference.shape
            assert list(probabilities.argmax(axis=1)) == list(reference.argmax(axis=1))


# The batching policy's rows per bucket with the defaults (64 rows, 8192 tokens): 32 at bucket 256.
DEFAULT_ROWS = (64, 64, 64, 32)


def test_each_bucket_takes_its_own_rows_and_buffers_are_sized_to_them(engine_version, trt, cuda):
    policy = BatchingPolicy(buckets=engine_version.manifest.buckets)
    rng = np.random.default_rng(11)
    with make_engine(engine_version, trt, cuda, rows=DEFAULT_ROWS, batching=policy) as engine:
        assert engine.rows_by_bucket == {32: 64, 64: 64, 128: 64, 256: 32}
        assert engine.max_rows_for(256) == 32
        batch = random_batch(rng, 256, 32)
        np.testing.assert_allclose(engine.infer(batch), expected(batch), atol=1e-6)
        with pytest.raises(EngineError, match="33 rows exceed the plan's 32 at bucket 256"):
            engine.infer(random_batch(rng, 256, 33))
        # Buffers of bucket 256 hold 32 rows: two int32 inputs [32, 256] and the float32 logits [32, 3].
        assert cuda.allocation_sizes() == sorted([32 * 256 * 4] * 2 + [32 * 3 * 4])


@pytest.mark.parametrize(
    ("max_rows", "max_tokens", "message"),
    [
        # 128 rows at buckets 32 and 64: max_rows is what forms them.
        (128, 8192, r"batching.max_rows=128 forms batches of up to 128 rows at bucket 32, but the plan's profile "
                    r"there takes at most 64; rebuild it with .*--max-rows 128 --max-tokens 8192.* or lower "
                    r"batching.max_rows"),
        # 16383 tokens: 63 rows at 256 where the plan takes 32; max_tokens is what forms them.
        (64, 16383, r"batching.max_tokens=16383 forms batches of up to 63 rows at bucket 256, but the plan's "
                    r"profile there takes at most 32.* or lower batching.max_tokens"),
    ],
)
def test_a_batching_policy_the_plan_cannot_take_is_refused_at_activation(
    engine_version, trt, cuda, max_rows, max_tokens, message
):
    policy = BatchingPolicy(buckets=engine_version.manifest.buckets, max_rows=max_rows, max_tokens=max_tokens)
    engine = make_engine(engine_version, trt, cuda, rows=DEFAULT_ROWS, batching=policy)
    with pytest.raises(EngineError, match=message):
        engine.activate()
    gc.collect()
    assert trt.live_contexts == 0 and cuda.live_streams == 0


def test_a_batching_policy_within_the_plan_is_accepted(engine_version, trt, cuda):
    # Fewer rows than the plan takes are fine (e.g. a latency-tuned max_rows); only more are refused.
    policy = BatchingPolicy(buckets=engine_version.manifest.buckets, max_rows=16, max_tokens=4096)
    with make_engine(engine_version, trt, cuda, rows=DEFAULT_ROWS, batching=policy) as engine:
        assert engine.is_active


def test_the_open_engine_passes_the_worker_batching_settings(engine_copy):
    from stream_sentiment.config import Settings
    from stream_sentiment.service import open_engine

    settings = Settings.load(engine={"repository": str(engine_copy.parent.parent), "model": engine_copy.parent.name,
                                     "version": engine_copy.name, "backend": "tensorrt"},
                             batching={"max_rows": 48, "max_tokens": 6144})
    _, engine = open_engine(settings)
    assert isinstance(engine, TensorRTEngine)
    assert (engine.batching.max_rows, engine.batching.max_tokens) == (48, 6144)
    assert engine.batching.capacity(256) == 24


def test_scoring_splits_batches_larger_than_the_plan_takes(engine_version, trt, cuda):
    from stream_sentiment.engines.scoring import score_token_ids

    rng = np.random.default_rng(12)
    token_ids = [tuple(int(t) for t in rng.integers(100, 30_000, 200)) for _ in range(40)]
    with make_engine(engine_version, trt, cuda, rows=DEFAULT_ROWS) as engine:
        scored = score_token_ids(engine, token_ids, engine_version.manifest.buckets, max_rows=64)
    ids = np.zeros((40, 256), dtype=np.int64)
    ids[:, :200] = token_ids
    mask = (ids > 0).astype(np.int64)
    np.testing.assert_allclose(scored, softmax(fake_logits(ids, mask)), atol=1e-6)
    (log,) = trt.logs
    assert [shape[0] for name, shape in log.shapes if name == "input_ids"] == [32, 8]  # 40 rows, 32 at a time


def test_runtime_and_builder_share_one_logger(engine_version, trt, cuda):
    from stream_sentiment.engines.plans import shared_logger

    with make_engine(engine_version, trt, cuda):
        pass
    with make_engine(engine_version, trt, cuda):
        pass
    assert len(trt.loggers) == 2 and trt.loggers[0] is trt.loggers[1] is shared_logger(trt)
