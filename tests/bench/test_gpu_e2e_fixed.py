"""bench/gpu_e2e run for real on this machine with ``--backend fixed``: a worker per set-up with a model-free engine,
the real broker and Redis, the workers profiled from inside (``BENCH_PROFILE_DIR``)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from bench.gpu_e2e.cli import BenchError, check_prerequisites, parse_args
from bench.profile_summary import roles, stacks

REPO = Path(__file__).resolve().parents[2]


def test_fixed_backend_refuses_set_ups_that_need_a_model() -> None:
    args = parse_args(["--backend", "fixed", "--setups", "ours,kafka-only"])
    with pytest.raises(BenchError, match="drop ours"):
        check_prerequisites(args)


def test_fixed_backend_counts_a_backlog_exactly_and_profiles_the_worker(tmp_path: Path) -> None:
    report = tmp_path / "run.json"
    profiles = tmp_path / "profile"
    command = [sys.executable, "bench/gpu_e2e", "--backend", "fixed", "--workers", "1", "--partitions", "2",
               "--producers", "1", "--setups", "ours-own", "--workloads", "tweets", "--rates", "", "--posts", "2000",
               "--drain-seconds", "20", "--streams", "2", "--matched", "0", "--fetch-min-bytes", "8192",
               "--json", str(report)]
    result = subprocess.run(command, cwd=REPO, env={**os.environ, "BENCH_PROFILE_DIR": str(profiles)},
                            capture_output=True, text=True, timeout=240)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    written = json.loads(report.read_text())
    (run,) = written["workloads"]["tweets"]["runs"]
    assert (run["setup"], run["produced"], run["counted"], run["exact"]) == ("ours-own", 2000, 2000, True)
    # The consumers' fetch size is every set-up's, said in the header and kept with the run.
    assert written["options"]["fetch_min_bytes"] == 8192
    assert "Every set-up's consumers: fetch_min_bytes 8192, fetch_max_wait_ms 5" in result.stdout
    files = sorted(profiles.glob("*.txt"))
    assert [f.name for f in files] == ["tweets-ours-own-0-worker0.txt"]  # one file per worker and run
    assert set(roles(files).values()) == {"worker"}
    assert any("Worker.run (worker.py)" in frames for _, frames, _ in stacks(files))  # the worker's own loop
