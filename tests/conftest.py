"""Shared fixtures: the committed engine version and scratch copies of it."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from stream_sentiment.engines.manifest import EngineVersion, load_engine_version

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
