"""Shared fixtures: the committed engine version and scratch copies of it."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import pytest

from stream_sentiment.engines.manifest import EngineManifest, EngineVersion, load_engine_version, write_manifest

# Real services (Tansu broker, valkey-server) started once per session on free ports.
pytest_plugins = ["tests.services"]

REPO = Path(__file__).resolve().parents[1]
COMMITTED_ENGINE = REPO / "engines" / "minilm-sentiment" / "v1"


@pytest.fixture(scope="session")
def engine_version() -> EngineVersion:
    """The committed INT8 engine, checksums verified once per session."""
    return load_engine_version(COMMITTED_ENGINE)


@pytest.fixture
def engine_copy(tmp_path: Path) -> Path:
    """A scratch copy of the committed engine folder that a test may tamper with."""
    destination = tmp_path / "minilm-sentiment" / "v1"
    shutil.copytree(COMMITTED_ENGINE, destination, ignore=shutil.ignore_patterns("plans"))
    return destination


def engine_repository(root: Path, versions: dict[str, dict[str, Any]]) -> Path:
    """An engine repository of copies of the committed version, each with manifest changes (and its name)."""
    for name, changes in versions.items():
        folder = root / "minilm-sentiment" / name
        shutil.copytree(COMMITTED_ENGINE, folder, ignore=shutil.ignore_patterns("plans"))
        data = {**json.loads((folder / "manifest.json").read_text()), "version": name, **changes}
        write_manifest(folder, EngineManifest.from_dict(data))
    return root
