from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from stream_sentiment.engines.manifest import (
    ChecksumMismatchError,
    EngineManifest,
    EngineRepository,
    EngineRepositoryError,
    load_engine_version,
    write_manifest,
)


def test_committed_engine_manifest_describes_the_model(engine_version):
    manifest = engine_version.manifest
    assert manifest.labels == ("negative", "neutral", "positive")
    assert manifest.precision == "int8"
    assert manifest.buckets == (32, 64, 128, 256)
    assert manifest.calibration["method"] in ("minmax", "entropy", "percentile")
    assert set(manifest.files) >= {manifest.model_file, manifest.tokenizer_file}
    assert manifest.metrics["int8"]["n"] == 4200


def test_tampered_model_file_is_refused_naming_the_file(engine_copy: Path):
    model = engine_copy / "model.int8.onnx"
    data = bytearray(model.read_bytes())
    data[len(data) // 2] ^= 0xFF
    model.write_bytes(bytes(data))
    with pytest.raises(ChecksumMismatchError, match=r"model\.int8\.onnx") as caught:
        load_engine_version(engine_copy)
    assert caught.value.path == model


def test_tampered_tokenizer_is_refused(engine_copy: Path):
    (engine_copy / "tokenizer.json").write_text("{}")
    with pytest.raises(ChecksumMismatchError, match=r"tokenizer\.json"):
        load_engine_version(engine_copy)


def test_missing_listed_file_is_refused(engine_copy: Path):
    (engine_copy / "vocab.txt").unlink()
    with pytest.raises(EngineRepositoryError, match=r"vocab\.txt"):
        load_engine_version(engine_copy)


def test_folder_without_manifest_is_not_an_engine(tmp_path: Path):
    with pytest.raises(EngineRepositoryError, match=r"no manifest\.json"):
        load_engine_version(tmp_path)


def test_manifest_round_trips_through_json(engine_version):
    again = EngineManifest.from_dict(json.loads(engine_version.manifest.to_json()))
    assert again == engine_version.manifest


@pytest.mark.parametrize("name", ["../../etc", "..", "v1/../../x", "/abs", "", "a b", "x" * 80])
def test_repository_refuses_names_that_are_not_plain_versions(engine_copy: Path, name: str):
    repository = EngineRepository(engine_copy.parents[1], "minilm-sentiment")
    with pytest.raises(EngineRepositoryError):
        repository.path_of(name)


def test_repository_lists_and_loads_versions(engine_copy: Path):
    repository = EngineRepository(engine_copy.parents[1], "minilm-sentiment")
    assert repository.versions() == ["v1"]
    assert repository.load("v1").manifest.version == "v1"
    with pytest.raises(EngineRepositoryError, match="unknown version"):
        repository.path_of("v9")


def _copy_as(engine_copy: Path, name: str, **manifest_changes: str) -> EngineRepository:
    """A repository holding the committed version and a copy named ``name`` with its manifest changed."""
    folder = engine_copy.parent / name
    shutil.copytree(engine_copy, folder)
    data = {**json.loads((folder / "manifest.json").read_text()), **manifest_changes}
    write_manifest(folder, EngineManifest.from_dict(data))  # checksums stay right: only the naming differs
    return EngineRepository(engine_copy.parents[1], "minilm-sentiment")


@pytest.mark.parametrize(("changes", "says"), [
    ({"version": "v1"}, "model 'minilm-sentiment', version 'v1'"),
    ({"version": "v9", "model": "distilbert-sentiment"}, "model 'distilbert-sentiment', version 'v9'"),
], ids=["other-version", "other-model"])
def test_repository_refuses_a_folder_whose_manifest_names_another_version(engine_copy: Path, changes, says):
    repository = _copy_as(engine_copy, "v9", **changes)
    assert repository.versions() == ["v1", "v9"]
    with pytest.raises(EngineRepositoryError) as refused:
        repository.load("v9")
    message = str(refused.value)
    assert str(engine_copy.parent / "v9") in message and "'minilm-sentiment/v9'" in message
    assert says in message
    assert repository.load("v1").manifest.version == "v1"  # the others still load


def test_load_engine_version_checks_names_only_when_told_them(engine_copy: Path):
    folder = engine_copy.parent / "v9"
    _copy_as(engine_copy, "v9", version="v1")
    assert load_engine_version(folder).manifest.version == "v1"  # a folder loaded by path alone
    assert load_engine_version(folder, model="minilm-sentiment", version="v1").label == "minilm-sentiment/v1"
    with pytest.raises(EngineRepositoryError, match="version 'v1'"):
        load_engine_version(folder, verify=False, version="v9")
    with pytest.raises(EngineRepositoryError, match=r"'other'.*model 'minilm-sentiment'"):
        load_engine_version(folder, model="other")


def test_buckets_must_cover_max_length():
    with pytest.raises(EngineRepositoryError, match="largest bucket"):
        EngineManifest(model="m", version="v", labels=("a",), precision="int8", model_file="m.onnx",
                       tokenizer_file="t.json", text_normalization="none", max_length=300)


def test_a_version_serves_finer_buckets_that_end_at_its_largest(engine_version):
    finer = engine_version.serving((16, 24, 32, 48, 64, 96, 128, 256))
    assert finer.manifest.buckets == (16, 24, 32, 48, 64, 96, 128, 256)
    assert finer.manifest.files == engine_version.manifest.files and finer.path == engine_version.path
    assert engine_version.serving(engine_version.manifest.buckets) is engine_version
    for wrong, reason in (((16, 32, 128), "must end at"), ((32, 16, 256), "increasing"), ((0, 256), "positive")):
        with pytest.raises(EngineRepositoryError, match=reason):
            engine_version.serving(wrong)


def test_languages_default_to_english_and_round_trip():
    common = {"model": "m", "version": "v1", "labels": ["negative", "neutral", "positive"], "precision": "int8",
              "model_file": "model.onnx", "tokenizer_file": "tokenizer.json", "text_normalization": "none",
              "max_length": 32, "buckets": [32]}
    assert EngineManifest.from_dict(common).languages == ("en",)  # manifests written before the field
    both = EngineManifest.from_dict({**common, "languages": ["en", "zh"]})
    assert both.languages == ("en", "zh")
    assert json.loads(both.to_json())["languages"] == ["en", "zh"]
    assert EngineManifest.from_dict(json.loads(both.to_json())) == both
