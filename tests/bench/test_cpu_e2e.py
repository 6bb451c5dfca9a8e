"""bench/cpu_e2e.py's choice of runs: which committed engine runs which workload."""

from __future__ import annotations

from pathlib import Path

from bench.cpu_e2e import WORKLOADS, served_pairs
from stream_sentiment.engines.manifest import load_engine_version

REPO = Path(__file__).resolve().parents[2]


def test_each_workload_runs_on_the_engines_that_list_its_language() -> None:
    models = ["minilm-sentiment", "multilingual-sentiment"]
    languages = {m: load_engine_version(REPO / "engines" / m / "v1", verify=False).manifest.languages for m in models}
    assert served_pairs(models, list(WORKLOADS), languages) == [
        ("minilm-sentiment", "tweets"), ("multilingual-sentiment", "tweets"), ("multilingual-sentiment", "zh")]
