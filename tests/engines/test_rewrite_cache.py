"""The rewritten INT8 model is made once per checksum, in a child process, and only a verified copy is loaded."""

from __future__ import annotations

import hashlib
import os
import tempfile
import threading
from pathlib import Path

import onnxruntime as ort
import pytest

from stream_sentiment.engine_build.qdq_rewrite import signed_to_unsigned_activations
from stream_sentiment.engines.rewrite_cache import REWRITE_FORMAT, cached_unsigned_model, private_temp_folder


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


def test_a_new_rewrite_removes_the_copies_of_earlier_model_files(engine_version, tmp_path, private_tmp):
    plans = tmp_path / "plans"
    plans.mkdir()
    # Left by an earlier model file of this version and by an older rewrite format; a TensorRT plan stays.
    stale = [plans / "onnxruntime-uint8-r1-0123456789abcdef.onnx", plans / "onnxruntime-uint8-r0-fedcba9876543210.onnx"]
    for path in stale:
        path.write_bytes(b"old")
        Path(f"{path}.sha256").write_text(f"{'0' * 64}  {path.name}\n")
    (plans / "gpu-sm90-trt10.plan").write_bytes(b"plan")
    current = cached_unsigned_model(engine_version.model_path, _model_sha(engine_version), plans)
    assert sorted(p.name for p in plans.iterdir()) == sorted([current.name, f"{current.name}.sha256",
                                                               "gpu-sm90-trt10.plan"])
    # The private temp folder holds every version's copy: a write there removes nothing.
    private = private_temp_folder()
    private.mkdir(mode=0o700)
    other = private / "onnxruntime-uint8-r1-0123456789abcdef.onnx"
    other.write_bytes(b"another version's")
    afile = tmp_path / "afile"
    afile.write_text("")
    unusable = afile / "plans"  # mkdir fails with ENOTDIR for any user, root included: the fallback is used
    fallback = cached_unsigned_model(engine_version.model_path, _model_sha(engine_version), unusable)
    assert fallback.parent == private and other.exists()


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
    assert ort.InferenceSession(str(cached), providers=["CPUExecutionProvider"]).get_inputs()  # a whole model


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
    name = f"onnxruntime-uint8-r{REWRITE_FORMAT}-{_model_sha(engine_version)[:16]}.onnx"
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
