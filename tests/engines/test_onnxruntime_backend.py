from __future__ import annotations

import numpy as np
import pytest

from stream_sentiment.batching.tokenizer import PostTokenizer, pad_to_bucket
from stream_sentiment.engines.base import EngineError
from stream_sentiment.engines.onnxruntime_backend import OnnxRuntimeEngine


@pytest.fixture(scope="module")
def engine(engine_version):
    with OnnxRuntimeEngine(engine_version, streams=2, threads_per_stream=1) as active:
        yield active


def _batch(engine_version, texts):
    tokenizer = PostTokenizer(engine_version)
    ids = tokenizer.encode(texts)
    return pad_to_bucket(ids, tokenizer.bucket_for(max(map(len, ids))))


def test_scores_obvious_posts_the_right_way(engine, engine_version):
    texts = [
        "I absolutely love this, best day ever! :)",
        "This is the worst service I have ever had. Furious and disgusted.",
        "The meeting is scheduled for 3pm on Tuesday.",
    ]
    probabilities = engine.infer(_batch(engine_version, texts))
    assert probabilities.shape == (3, 3)
    assert np.allclose(probabilities.sum(axis=1), 1.0, atol=1e-5)
    labels = [engine.labels[i] for i in probabilities.argmax(axis=1)]
    assert labels[0] == "positive"
    assert labels[1] == "negative"
    assert labels[2] == "neutral"


def test_streams_are_independent_and_agree(engine, engine_version):
    batch = _batch(engine_version, ["what a lovely surprise", "ugh, cancelled again"])
    assert np.allclose(engine.infer(batch, stream=0), engine.infer(batch, stream=1), atol=1e-6)


def test_padding_to_a_larger_bucket_does_not_change_scores(engine, engine_version):
    tokenizer = PostTokenizer(engine_version)
    ids = tokenizer.encode(["delayed for three hours and nobody told us anything"])
    small, large = pad_to_bucket(ids, 32), pad_to_bucket(ids, 128)
    assert np.allclose(engine.infer(small), engine.infer(large), atol=0.02)


def test_rejects_shapes_outside_the_buckets(engine):
    batch = pad_to_bucket([[101, 102]], 48)
    with pytest.raises(EngineError, match="bucket 48"):
        engine.infer(batch)


def test_rejects_unknown_stream(engine, engine_version):
    with pytest.raises(EngineError, match="stream 5"):
        engine.infer(_batch(engine_version, ["hi"]), stream=5)


def test_rebuild_replaces_one_stream(engine, engine_version):
    batch = _batch(engine_version, ["so happy for you"])
    before = engine.infer(batch, stream=1)
    engine.rebuild(1)
    assert np.allclose(engine.infer(batch, stream=1), before, atol=1e-6)


def test_lifecycle_is_guarded(engine_version):
    engine = OnnxRuntimeEngine(engine_version, streams=1, threads_per_stream=1)
    with pytest.raises(EngineError, match="not active"):
        engine.infer(pad_to_bucket([[101, 102]], 32))
    engine.activate()
    with pytest.raises(EngineError, match="already active"):
        engine.activate()
    engine.warm_up()
    engine.deactivate()
    engine.deactivate()  # idempotent
    assert not engine.is_active
