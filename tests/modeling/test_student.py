"""Which base layers a shallow student starts from, and the carry's FP16 rewrite of safetensors (torch-free)."""

from __future__ import annotations

import importlib.util
import json
import struct
from pathlib import Path

import numpy as np
import pytest

from stream_sentiment.modeling.student import kept_layers, student_state

REPO = Path(__file__).resolve().parents[2]


def test_students_keep_evenly_spaced_layers_and_always_the_top_one():
    assert kept_layers(6, 6) == [0, 1, 2, 3, 4, 5]
    assert kept_layers(6, 3) == [1, 3, 5]
    assert kept_layers(6, 2) == [2, 5]
    assert kept_layers(6, 1) == [5]
    for bad in (0, 7):
        with pytest.raises(ValueError):
            kept_layers(6, bad)


def test_student_state_renumbers_kept_layers_and_keeps_the_rest():
    base = {"embeddings.word_embeddings.weight": "E", "embeddings.position_ids": "P",
            **{f"encoder.layer.{i}.attention.self.query.weight": f"Q{i}" for i in range(6)},
            **{f"encoder.layer.{i}.output.dense.bias": f"B{i}" for i in range(6)}}
    state = student_state(base, 6, 2)
    assert state == {"embeddings.word_embeddings.weight": "E", "embeddings.position_ids": "P",
                     "encoder.layer.0.attention.self.query.weight": "Q2", "encoder.layer.0.output.dense.bias": "B2",
                     "encoder.layer.1.attention.self.query.weight": "Q5", "encoder.layer.1.output.dense.bias": "B5"}
    # Layer 10 must not be read as layer 1 (the index is the whole dotted field).
    assert "encoder.layer.0.x" not in student_state({"encoder.layer.10.x": 1}, 12, 1)


def _safetensors(tensors: dict[str, np.ndarray]) -> bytes:
    header, blobs, offset = {}, [], 0
    for name, array in tensors.items():
        raw = array.tobytes()
        header[name] = {"dtype": {"float32": "F32", "int64": "I64"}[str(array.dtype)], "shape": list(array.shape),
                        "data_offsets": [offset, offset + len(raw)]}
        blobs.append(raw)
        offset += len(raw)
    encoded = json.dumps(header).encode()
    return struct.pack("<Q", len(encoded)) + encoded + b"".join(blobs)


def _read(blob: bytes) -> dict[str, np.ndarray]:
    (size,) = struct.unpack("<Q", blob[:8])
    assert size % 8 == 0
    header = json.loads(blob[8 : 8 + size])
    data = blob[8 + size :]
    kinds = {"F16": "<f2", "I64": "<i8"}
    return {name: np.frombuffer(data[m["data_offsets"][0] : m["data_offsets"][1]], dtype=kinds[m["dtype"]])
            .reshape(m["shape"]) for name, m in header.items()}


def test_the_carry_stores_float_weights_fp16_and_leaves_integers_alone():
    spec = importlib.util.spec_from_file_location("prepare_carry_v2", REPO / "scripts/prepare_carry_v2.py")
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    weight = np.random.default_rng(0).standard_normal((5, 3)).astype(np.float32)
    ids = np.arange(4, dtype=np.int64)[None]
    converted = _read(module.safetensors_to_fp16(_safetensors({"w": weight, "position_ids": ids})))
    assert converted["w"].dtype == np.float16 and np.abs(converted["w"] - weight).max() < 1e-3
    assert converted["position_ids"].dtype == np.int64 and (converted["position_ids"] == ids).all()


def test_a_narrower_ffn_keeps_each_layers_most_important_neurons_in_order():
    from stream_sentiment.modeling.student import ffn_neurons_to_keep, prune_ffn

    up = np.ones((6, 2), dtype=np.float32) * np.array([[1], [5], [2], [4], [0.5], [3]], dtype=np.float32)
    down = np.ones((2, 6), dtype=np.float32)
    down[:, 1] = 0.1  # large input weights, tiny output weights: 5 * 0.1 ranks below 2 * 1
    assert ffn_neurons_to_keep(up, down, 3) == [2, 3, 5]
    state = {"encoder.layer.0.intermediate.dense.weight": up, "encoder.layer.0.intermediate.dense.bias": np.arange(6.0),
             "encoder.layer.0.output.dense.weight": down, "encoder.layer.0.output.dense.bias": np.zeros(2)}
    pruned = prune_ffn(state, 1, 3)
    assert pruned["encoder.layer.0.intermediate.dense.weight"].shape == (3, 2)
    assert pruned["encoder.layer.0.intermediate.dense.bias"].tolist() == [2.0, 3.0, 5.0]
    assert pruned["encoder.layer.0.output.dense.weight"].shape == (2, 3)
    assert pruned["encoder.layer.0.output.dense.bias"] is state["encoder.layer.0.output.dense.bias"]
    with pytest.raises(ValueError):
        ffn_neurons_to_keep(up, down, 7)
