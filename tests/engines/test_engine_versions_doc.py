"""docs/engine-versions.md: its rehearsal snippet makes a version the repository loads and a hot swap accepts."""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import pytest

from stream_sentiment.engines.manifest import EngineRepository, load_engine_version
from tests.conftest import COMMITTED_ENGINE

DOC = Path(__file__).resolve().parents[2] / "docs" / "engine-versions.md"


def test_the_rehearsal_snippet_packages_v1_under_a_new_name(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    [snippet] = re.findall(r"```python\n(.*?)```", DOC.read_text(encoding="utf-8"), flags=re.S)
    shutil.copytree(COMMITTED_ENGINE, tmp_path / "engines" / "minilm-sentiment" / "v1",
                    ignore=shutil.ignore_patterns("plans"))
    monkeypatch.chdir(tmp_path)  # the snippet works on engines/ under the working directory, as the docs say
    exec(compile(snippet, str(DOC), "exec"), {})  # the documented code, run as a user would
    repository = EngineRepository(tmp_path / "engines", "minilm-sentiment")
    assert sorted(repository.versions()) == ["v1", "v1-rehearsal"]
    copy = load_engine_version(tmp_path / "engines" / "minilm-sentiment" / "v1-rehearsal",
                               model="minilm-sentiment", version="v1-rehearsal")  # checksums verified
    original = load_engine_version(COMMITTED_ENGINE)
    # What a hot swap's validation compares: the same tokenizer and golden set, so the rehearsal passes it.
    assert copy.manifest.version == "v1-rehearsal"
    assert copy.manifest.files == original.manifest.files
    assert copy.manifest.golden == original.manifest.golden
