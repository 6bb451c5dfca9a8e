"""Fixtures of the engine tests: the engine server's socket path."""

from __future__ import annotations

import os
import shutil
import time
from collections.abc import Iterator
from pathlib import Path

import pytest


@pytest.fixture
def socket_path() -> Iterator[Path]:
    """A socket path in a fresh folder only this user can enter (as the engine server wants it)."""
    # AF_UNIX paths are limited to ~107 bytes; pytest's tmp_path can be longer.
    folder = Path(f"/tmp/ss-test-{os.getpid()}-{time.monotonic_ns()}")
    folder.mkdir(mode=0o700)
    yield folder / "engine.sock"
    shutil.rmtree(folder, ignore_errors=True)
