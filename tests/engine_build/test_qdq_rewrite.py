"""The load-time INT8 rewrite must not change a single output value."""

from __future__ import annotations

import hashlib
import os
import tempfile
import threading
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import numpy_helper

from stream_sentiment.engine_build.qdq_rewrite import (
    cached_unsigned_model,
    private_temp_folder,
    signed_to_unsigned_activations,
)


def _session(model: bytes | str) -> ort.InferenceSession:
    options = ort.SessionOptions()
    # No graph optimization: both models run the reference Q/DQ kernels, so
    # the comparison isolates the rewrite from ORT's fused-kernel rounding.
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    options.log_severity_level = 3
    return ort.InferenceSession(model, options, providers=["CPUExecutionProvider"])


def test_rewrite_is_exact_on_the_committed_model(engine_version):
    rng = np.random.default_rng(1)
    ids = rng.integers(1000, 29000, size=(4, 32), dtype=np.int64)
    mask = np.ones_like(ids)
    mask[1, 20:] = 0
    feeds = {"input_ids": ids, "attention_mask": mask}
    original = _session(str(engine_version.model_path)).run(None, feeds)[0]
    rewritten = _session(signed_to_unsigned_activations(engine_version.model_path)).run(None, feeds)[0]
    np.testing.assert_array_equal(original, rewritten)


def test_rewrite_moves_only_activation_zero_points_to_uint8(engine_version):
    model = onnx.ModelProto.FromString(signed_to_unsigned_activations(engine_version.model_path))
    initializers = {i.name: i for i in model.graph.initializer}
    weight_dq = activation_q = 0
    for node in model.graph.node:
        if node.op_type == "QuantizeLinear":
            assert numpy_helper.to_array(initializers[node.input[2]]).dtype == np.uint8
            activation_q += 1
        elif node.op_type == "DequantizeLinear" and node.input[0] in initializers:
            # weights int8, the Gemm bias int32: both stay signed
            assert numpy_helper.to_array(initializers[node.input[0]]).dtype in (np.int8, np.int32)
            weight_dq += 1
    assert activation_q > 0 and weight_dq > 0


@pytest.fixture(scope="module")
def fresh_rewrite_sha(engine_version) -> str:
    return hashlib.sha256(signed_to_unsigned_activations(engine_version.model_path)).hexdigest()


@pytest.fixture
def private_tmp(tmp_path, monkeypatch) -> Path:
    """The temp dir the fallback uses, redirected so tests never touch the real /tmp."""
    temp = tmp_path / "tmp"
    temp.mkdir()
    monkeypatch.setattr(tempfile, "gettempdir", lambda: str(temp))
    return temp


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _model_sha(engine_version) -> str:
    return engine_version.manifest.files[engine_version.manifest.model_file]


def test_cached_rewrite_has_a_checksum_sidecar_and_is_reused(engine_version, tmp_path, fresh_rewrite_sha, private_tmp):
    plans = tmp_path / "plans"
    first = cached_unsigned_model(engine_version.model_path, _model_sha(engine_version), plans)
    assert first.parent == plans and _sha(first) == fresh_rewrite_sha
    assert Path(f"{first}.sha256").read_text().split()[0] == fresh_rewrite_sha
    mtime = first.stat().st_mtime_ns
    assert cached_unsigned_model(engine_version.model_path, _model_sha(engine_version), plans) == first
    assert first.stat().st_mtime_ns == mtime  # a verified hit is not rebuilt
    assert not [p for p in plans.iterdir() if p.name.endswith(".partial")]
    assert not list(private_tmp.iterdir())


@pytest.mark.parametrize("damage", ["tampered", "no_sidecar"])
def test_a_tampered_or_unverifiable_cached_model_is_rebuilt(
    engine_version, tmp_path, fresh_rewrite_sha, private_tmp, damage
):
    plans = tmp_path / "plans"
    cached = cached_unsigned_model(engine_version.model_path, _model_sha(engine_version), plans)
    if damage == "tampered":
        with cached.open("r+b") as stream:
            stream.seek(1000)
            stream.write(b"planted")
    else:
        Path(f"{cached}.sha256").unlink()
    assert cached_unsigned_model(engine_version.model_path, _model_sha(engine_version), plans) == cached
    assert _sha(cached) == fresh_rewrite_sha
    assert Path(f"{cached}.sha256").read_text().split()[0] == fresh_rewrite_sha
    assert _session(str(cached)).get_inputs()


def test_an_unwritable_cache_folder_falls_back_to_a_private_temp_folder(
    engine_version, tmp_path, fresh_rewrite_sha, private_tmp
):
    afile = tmp_path / "afile"
    afile.write_text("")
    plans = afile / "plans"  # mkdir fails with an OSError (ENOTDIR) for any user, root included
    cached = cached_unsigned_model(engine_version.model_path, _model_sha(engine_version), plans)
    folder = private_tmp / f"stream-sentiment-models-{os.geteuid()}"
    assert cached.parent == folder == private_temp_folder()
    assert folder.stat().st_mode & 0o777 == 0o700 and folder.stat().st_uid == os.geteuid()
    assert _sha(cached) == fresh_rewrite_sha
    assert Path(f"{cached}.sha256").read_text().split()[0] == fresh_rewrite_sha


def test_a_temp_folder_others_can_write_is_never_used(engine_version, tmp_path, private_tmp):
    plans = tmp_path / "afile" / "plans"
    plans.parent.write_text("")
    shared = private_tmp / f"stream-sentiment-models-{os.geteuid()}"
    shared.mkdir()
    shared.chmod(0o777)
    name = f"onnxruntime-uint8-r1-{_model_sha(engine_version)[:16]}.onnx"
    planted = shared / name
    planted.write_bytes(b"a planted model")
    Path(f"{planted}.sha256").write_text(hashlib.sha256(b"a planted model").hexdigest())
    with pytest.raises(PermissionError, match="not a private folder"):
        cached_unsigned_model(engine_version.model_path, _model_sha(engine_version), plans)
    assert planted.read_bytes() == b"a planted model"


def test_concurrent_loads_in_one_process_do_not_collide(engine_version, tmp_path, fresh_rewrite_sha, private_tmp):
    plans = tmp_path / "plans"
    results: list[Path] = []
    errors: list[BaseException] = []

    def load() -> None:
        try:
            results.append(cached_unsigned_model(engine_version.model_path, _model_sha(engine_version), plans))
        except BaseException as error:  # reported by the assertion below
            errors.append(error)

    threads = [threading.Thread(target=load) for _ in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not errors and len(results) == 2 and results[0] == results[1]
    assert _sha(results[0]) == fresh_rewrite_sha
    assert not [p for p in plans.iterdir() if p.name.endswith(".partial")]
