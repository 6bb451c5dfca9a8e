"""The torch-cuda backend. Graph sizing and the missing-runtime error run everywhere; the rest needs a CUDA GPU."""

from __future__ import annotations

import threading

import numpy as np
import pytest

from stream_sentiment.batching.tokenizer import PostTokenizer, pad_to_bucket
from stream_sentiment.engine_build.onnx_weights import expected_shapes, weights_for_version
from stream_sentiment.engine_build.qdq_rewrite import strip_quantization
from stream_sentiment.engines.base import BackendUnavailableError, EngineError, TokenBatch, softmax
from stream_sentiment.engines.torch_backend import TorchCudaEngine, graph_batch_sizes, graph_rows_for


def _torch_cuda_available() -> bool:
    try:
        import torch
    except ImportError:
        return False
    return bool(torch.cuda.is_available())


HAS_CUDA = _torch_cuda_available()
needs_cuda = pytest.mark.skipif(not HAS_CUDA, reason="needs torch with a CUDA device")

POSTS = [
    "I absolutely love this, best day ever! :)",
    "This is the worst service I have ever had. Furious and disgusted.",
    "The meeting is scheduled for 3pm on Tuesday.",
    "delayed for three hours and nobody told us anything, thanks a lot @airline",
    "not bad at all, honestly better than I expected",
]


def test_graph_sizes_cover_every_row_count_with_bounded_padding():
    sizes = graph_batch_sizes(256)
    assert sizes == (1, 2, 4, 8, 16, 32, 48, 64, 96, 128, 160, 192, 224, 256)
    for rows in range(1, 257):
        padded = graph_rows_for(rows, sizes)
        assert rows <= padded
        assert padded <= max(2 * rows, rows + 31)
    assert graph_batch_sizes(100)[-1] == 100
    assert graph_batch_sizes(1) == (1,)
    with pytest.raises(ValueError, match="exceed"):
        graph_rows_for(257, sizes)


def test_rejects_an_unknown_dtype(engine_version):
    with pytest.raises(ValueError, match="dtype"):
        TorchCudaEngine(engine_version, dtype="int4")


@pytest.mark.skipif(HAS_CUDA, reason="torch with CUDA is available here")
def test_activation_without_torch_cuda_says_how_to_install(engine_version):
    engine = TorchCudaEngine(engine_version)
    with pytest.raises(BackendUnavailableError, match=r"stream-sentiment\[torch-cuda\]"):
        engine.activate()
    assert not engine.is_active


@pytest.fixture(scope="module")
def engine(engine_version):
    with TorchCudaEngine(engine_version, streams=2, max_rows=32) as active:
        active.warm_up()
        yield active


@pytest.fixture(scope="module")
def batch(engine_version) -> TokenBatch:
    tokenizer = PostTokenizer(engine_version)
    return pad_to_bucket(tokenizer.encode(POSTS), 32)


@needs_cuda
def test_expected_shapes_are_the_real_module_state_dict(engine_version):
    from stream_sentiment.modeling.minilm import EncoderConfig, SentimentClassifier

    weights = weights_for_version(engine_version)
    module = SentimentClassifier(EncoderConfig(**weights.config), num_labels=weights.num_labels)
    actual = {name: tuple(tensor.shape) for name, tensor in module.state_dict().items()}
    assert actual == expected_shapes(weights.config, weights.num_labels)


@needs_cuda
def test_warm_up_captures_every_graph_on_every_slot(engine, engine_version):
    buckets = len(engine_version.manifest.buckets)
    assert engine.warm_up_stats["graphs"] == 2 * buckets * len(graph_batch_sizes(32))
    assert engine.warm_up_stats["seconds"] > 0


@needs_cuda
def test_fp16_agrees_with_the_fp32_graph_of_the_same_weights(engine, engine_version, batch):
    import onnxruntime as ort

    session = ort.InferenceSession(strip_quantization(engine_version.model_path), providers=["CPUExecutionProvider"])
    (logits,) = session.run(["logits"], {"input_ids": batch.input_ids, "attention_mask": batch.attention_mask})
    expected = softmax(logits)
    actual = engine.infer(batch)
    assert actual.dtype == np.float32
    assert actual.shape == (len(POSTS), 3)
    assert (actual.argmax(1) == expected.argmax(1)).all()
    assert np.abs(actual - expected).max() < 0.02


@needs_cuda
def test_graphs_and_eager_agree(engine_version, engine, batch):
    with TorchCudaEngine(engine_version, max_rows=32, cuda_graphs=False) as eager:
        eager.warm_up()
        assert np.abs(eager.infer(batch) - engine.infer(batch)).max() < 5e-3


@needs_cuda
def test_padding_rows_do_not_change_real_rows(engine, batch):
    # 5 rows run in the 8-row graph; 3 and 1 rows in their own sizes.
    full = engine.infer(batch)
    first_three = TokenBatch(batch.input_ids[:3], batch.attention_mask[:3], batch.bucket)
    first = TokenBatch(batch.input_ids[:1], batch.attention_mask[:1], batch.bucket)
    assert np.abs(engine.infer(first_three) - full[:3]).max() < 5e-3
    assert np.abs(engine.infer(first) - full[:1]).max() < 5e-3


@needs_cuda
def test_batches_larger_than_max_rows_are_split(engine, batch):
    many = TokenBatch(np.tile(batch.input_ids, (9, 1)), np.tile(batch.attention_mask, (9, 1)), batch.bucket)
    probabilities = engine.infer(many)
    assert probabilities.shape == (45, 3)
    assert np.abs(probabilities - np.tile(engine.infer(batch), (9, 1))).max() < 5e-3


@needs_cuda
def test_slots_run_concurrently_from_their_own_threads(engine, batch):
    reference = engine.infer(batch)
    results: dict[int, list[np.ndarray]] = {0: [], 1: []}

    def work(stream: int) -> None:
        results[stream].extend(engine.infer(batch, stream) for _ in range(50))

    threads = [threading.Thread(target=work, args=(s,)) for s in (0, 1)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    for outputs in results.values():
        assert len(outputs) == 50
        assert all(np.abs(out - reference).max() < 1e-3 for out in outputs)


@needs_cuda
def test_rebuild_recreates_a_slot_with_its_graphs(engine, batch):
    before = engine.infer(batch, stream=1)
    engine.rebuild(1)
    assert np.abs(engine.infer(batch, stream=1) - before).max() < 1e-3


@needs_cuda
def test_rejects_buckets_outside_the_manifest(engine):
    with pytest.raises(EngineError, match="bucket 48"):
        engine.infer(pad_to_bucket([[101, 102]], 48))


@pytest.fixture(scope="module")
def packed_engine(engine_version):
    # max_tokens 1024: budgets 512, 1024, so a batch over 1024 real tokens must split into calls.
    with TorchCudaEngine(engine_version, streams=2, max_rows=32, forward="packed", max_tokens=1024) as active:
        active.warm_up()
        yield active


@needs_cuda
def test_packed_forward_agrees_with_the_padded_one(packed_engine, engine, batch):
    assert packed_engine.warm_up_stats["graphs"] == 2 * len(packed_engine.layout.budgets)
    assert packed_engine.warm_up_stats["compile_seconds"] > 0
    packed = packed_engine.logits(batch)
    padded = engine.logits(batch)
    assert packed.dtype == np.float32 and packed.shape == padded.shape
    assert (packed.argmax(1) == padded.argmax(1)).all()
    assert np.abs(packed - padded).max() < 0.05


@needs_cuda
def test_packed_splits_by_rows_and_tokens_and_rebuilds(packed_engine, batch):
    reference = packed_engine.logits(batch)
    many = TokenBatch(np.tile(batch.input_ids, (40, 1)), np.tile(batch.attention_mask, (40, 1)), batch.bucket)
    assert np.abs(packed_engine.logits(many, 1) - np.tile(reference, (40, 1))).max() < 5e-3
    packed_engine.rebuild(1)
    assert np.abs(packed_engine.logits(batch, 1) - reference).max() < 5e-3
