"""Engine repository: ``engines/<model>/<version>/manifest.json`` and its checksums.

A version folder is everything a backend needs to score posts: the model
file(s), the tokenizer and a manifest that pins each file by sha256 and records
how the version was built and how it scored. Loading verifies every checksum
first, so a half-copied or tampered model is refused with the name of the
file, never silently served.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

MANIFEST_NAME = "manifest.json"
# GPU-specific TensorRT plans live here, outside the checksummed set (built per machine).
PLANS_DIR = "plans"
SCHEMA_VERSION = 1
DEFAULT_BUCKETS: tuple[int, ...] = (32, 64, 128, 256)
# Versions are names inside the repository, never paths (the admin endpoint
# takes them from the network). Use fullmatch: "$" alone also matches before a final newline.
VERSION_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")


class EngineRepositoryError(Exception):
    """A version folder is missing, malformed or does not match its manifest."""


class ChecksumMismatchError(EngineRepositoryError):
    def __init__(self, path: Path, expected: str, actual: str) -> None:
        super().__init__(
            f"checksum mismatch for {path.name} in {path.parent}: manifest says sha256 "
            f"{expected[:12]}..., file has {actual[:12]}...; the engine will not be loaded"
        )
        self.path = path


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


@dataclass(frozen=True)
class EngineManifest:
    """What ``manifest.json`` holds. Paths in ``files`` are relative to the version folder.

    Attributes:
        model: model family name (the folder above the version).
        version: the version's name (its folder).
        labels: output classes, in the order of the model's output columns.
        precision: ``int8`` (Q/DQ ONNX), ``fp32`` or ``fp16``.
        model_file: the ONNX file backends load.
        tokenizer_file: a Hugging Face ``tokenizer.json``.
        text_normalization: scheme applied before tokenization (see
            ``stream_sentiment.batching.normalization``).
        max_length: tokens per post after truncation, special tokens included.
        buckets: padded sequence lengths a batch may have; each is a TensorRT
            optimization profile and a CUDA-graph shape.
        inputs / output: ONNX tensor names.
        files: sha256 of every file in the folder except the manifest.
        calibration / metrics / build: provenance, free-form.
        languages: the languages the version was built and measured for (ISO 639-1 codes);
            language routing sends a post only to a version that lists its language.
        golden: ``{"file", "n", "accuracy"}``: a small labelled set shipped in the
            folder and the accuracy this version scored on it when built; a hot
            swap re-scores it to catch a broken load before the version serves.
    """

    model: str
    version: str
    labels: tuple[str, ...]
    precision: str
    model_file: str
    tokenizer_file: str
    text_normalization: str
    max_length: int
    buckets: tuple[int, ...] = DEFAULT_BUCKETS
    inputs: tuple[str, ...] = ("input_ids", "attention_mask")
    output: str = "logits"
    files: Mapping[str, str] = field(default_factory=dict)
    calibration: Mapping[str, Any] = field(default_factory=dict)
    metrics: Mapping[str, Any] = field(default_factory=dict)
    build: Mapping[str, Any] = field(default_factory=dict)
    golden: Mapping[str, Any] = field(default_factory=dict)
    languages: tuple[str, ...] = ("en",)
    schema_version: int = SCHEMA_VERSION

    def __post_init__(self) -> None:
        if not VERSION_PATTERN.fullmatch(self.version):
            raise EngineRepositoryError(f"invalid version name {self.version!r}")
        if list(self.buckets) != sorted(set(self.buckets)) or not self.buckets:
            raise EngineRepositoryError(f"buckets must be increasing and unique, got {self.buckets}")
        if self.buckets[-1] < self.max_length:
            raise EngineRepositoryError(
                f"largest bucket {self.buckets[-1]} is shorter than max_length {self.max_length}"
            )

    def to_json(self) -> str:
        data = asdict(self)
        data["labels"], data["buckets"], data["inputs"], data["languages"] = (
            list(self.labels), list(self.buckets), list(self.inputs), list(self.languages)
        )
        return json.dumps(data, indent=2, sort_keys=False) + "\n"

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> EngineManifest:
        known = {k: v for k, v in data.items() if k in cls.__dataclass_fields__}
        for key in ("labels", "buckets", "inputs", "languages"):
            if key in known:
                known[key] = tuple(known[key])
        try:
            return cls(**known)
        except TypeError as error:
            raise EngineRepositoryError(f"malformed manifest: {error}") from None


@dataclass(frozen=True)
class EngineVersion:
    """A verified version folder: its manifest and where its files are."""

    path: Path
    manifest: EngineManifest

    def file(self, name: str) -> Path:
        return self.path / name

    @property
    def model_path(self) -> Path:
        return self.path / self.manifest.model_file

    @property
    def tokenizer_path(self) -> Path:
        return self.path / self.manifest.tokenizer_file

    @property
    def label(self) -> str:
        return f"{self.manifest.model}/{self.manifest.version}"

    def serving(self, buckets: Sequence[int]) -> EngineVersion:
        """This version batched by other length buckets than its manifest's defaults.

        The buckets are a serving choice, not part of the model: ONNX Runtime and the PyTorch
        backend take any sequence length up to the model's, so finer buckets only mean less
        padding (a TensorRT plan must be built for the same buckets: ``build-engine --buckets``).
        Every post must still fit, so the largest bucket stays the manifest's.

        Raises:
            EngineRepositoryError: buckets not increasing and positive, or not ending at the largest.
        """
        chosen = tuple(int(bucket) for bucket in buckets)
        if chosen == self.manifest.buckets:
            return self
        largest = self.manifest.buckets[-1]
        if not chosen or list(chosen) != sorted(set(chosen)) or chosen[0] < 1:
            raise EngineRepositoryError(f"buckets must be increasing, unique and positive, got {list(chosen)}")
        if chosen[-1] != largest:
            raise EngineRepositoryError(
                f"buckets {list(chosen)} must end at {self.label}'s largest bucket, {largest}, so every post fits")
        return replace(self, manifest=replace(self.manifest, buckets=chosen))


def write_manifest(folder: Path, manifest: EngineManifest) -> EngineManifest:
    """Hash every file in ``folder`` into the manifest and write ``manifest.json``."""
    files = {
        str(p.relative_to(folder)): sha256_of(p)
        for p in sorted(folder.rglob("*"))
        if p.is_file() and p.name != MANIFEST_NAME and p.relative_to(folder).parts[0] != PLANS_DIR
    }
    final = EngineManifest.from_dict({**json.loads(manifest.to_json()), "files": files})
    (folder / MANIFEST_NAME).write_text(final.to_json())
    return final


def load_engine_version(
    folder: Path, *, verify: bool = True, model: str | None = None, version: str | None = None
) -> EngineVersion:
    """Read a version folder's manifest and verify every file's sha256.

    Args:
        folder: the version folder.
        verify: check every file's sha256 (False: only read the manifest).
        model / version: what the folder is known as (a repository's ``<model>/<version>``); its
            manifest must name the same, or the folder is refused. None: not checked, for a folder
            loaded by path alone (a build's work folder, ``--engine DIR``).

    Raises:
        EngineRepositoryError: no or malformed manifest, a manifest naming another model or
            version than ``model`` / ``version``, a listed file missing.
        ChecksumMismatchError: a file's content differs from the manifest.
    """
    manifest_path = folder / MANIFEST_NAME
    if not manifest_path.is_file():
        raise EngineRepositoryError(f"{folder} is not an engine version: no {MANIFEST_NAME}")
    try:
        manifest = EngineManifest.from_dict(json.loads(manifest_path.read_text()))
    except json.JSONDecodeError as error:
        raise EngineRepositoryError(f"{manifest_path} is not valid JSON: {error}") from None
    # A folder whose manifest names another version would serve under two names: the repository's
    # (``/admin/engines``) and its manifest's (the worker, ``/readyz``, metrics, the engine server).
    if (model is not None and manifest.model != model) or (version is not None and manifest.version != version):
        known_as = "/".join(name for name in (model, version) if name is not None)
        raise EngineRepositoryError(
            f"{folder} is {known_as!r} in the engine repository, but its {MANIFEST_NAME} says model "
            f"{manifest.model!r}, version {manifest.version!r}; the folder and its manifest must name the "
            "same model and version"
        )
    for required in (manifest.model_file, manifest.tokenizer_file):
        if required not in manifest.files:
            raise EngineRepositoryError(f"{manifest_path} does not pin {required}")
    if verify:
        for name, expected in manifest.files.items():
            path = folder / name
            if not path.is_file():
                raise EngineRepositoryError(f"{name} is listed in {manifest_path} but missing")
            actual = sha256_of(path)
            if actual != expected:
                raise ChecksumMismatchError(path, expected, actual)
    return EngineVersion(path=folder, manifest=manifest)


class EngineRepository:
    """``<root>/<model>/<version>/``: lists versions and resolves names safely."""

    def __init__(self, root: Path, model: str) -> None:
        self.root = root
        self.model = model

    def versions(self) -> list[str]:
        folder = self.root / self.model
        if not folder.is_dir():
            return []
        return sorted(
            p.name for p in folder.iterdir()
            if (p / MANIFEST_NAME).is_file() and VERSION_PATTERN.fullmatch(p.name)
        )

    def path_of(self, version: str) -> Path:
        """The folder of ``version``; refuses anything that is not a plain name in the repository."""
        if not VERSION_PATTERN.fullmatch(version) or version in (".", ".."):
            raise EngineRepositoryError(f"invalid version name {version!r}")
        path = self.root / self.model / version
        if path.resolve().parent != (self.root / self.model).resolve():
            raise EngineRepositoryError(f"invalid version name {version!r}")
        if not (path / MANIFEST_NAME).is_file():
            raise EngineRepositoryError(f"unknown version {version!r} in {self.root / self.model}")
        return path

    def load(self, version: str) -> EngineVersion:
        """``version``, checksums verified; refused if its manifest names another model or version."""
        return load_engine_version(self.path_of(version), model=self.model, version=version)
