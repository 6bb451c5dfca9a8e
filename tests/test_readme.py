"""The README's commands are the truth for a newcomer: check they are what CI runs and that they work."""

from __future__ import annotations

import json
import os
import re
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
SETUP = "python3 -m pip install -e '.[dev]'"


def _bash_blocks() -> list[str]:
    text = (REPO / "README.md").read_text()
    return [block.strip() for block in re.findall(r"```bash\n(.*?)```", text, flags=re.S)]


def test_readme_test_command_is_what_ci_runs():
    blocks = _bash_blocks()
    test_command = next(b for b in blocks if "pytest" in b)
    ci_script = (REPO / ".ci" / "run").read_text()
    assert test_command in ci_script.splitlines()


def test_readme_main_job_runs_and_reports(tmp_path: Path):
    main_job = next(b for b in _bash_blocks() if "stream-sentiment evaluate" in b)
    setup, _, command = main_job.partition(" && ")
    assert setup == SETUP  # the install step is the one the test command uses too
    argv = shlex.split(command)
    assert argv[0] == "stream-sentiment"
    # Run the same command through this interpreter's entry point, from the repo root.
    result = subprocess.run(
        [sys.executable, "-m", "stream_sentiment.cli", *argv[1:], "--no-progress"],
        cwd=REPO, capture_output=True, text=True, check=True,
    )
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert report["n"] == 4200
    assert report["engine_version"] == "v1"
    # The committed model's documented quality (docs/model.md) holds.
    assert report["polar_accuracy"] >= 0.86


# -- "Run it yourself (no Docker)": services -> run -> produce -> stats/alerts, as written ------------------

RUN_IT_YOURSELF = re.compile(r"<!-- run-it-yourself:begin -->(.*?)<!-- run-it-yourself:end -->", re.S)


def _run_it_yourself_blocks() -> list[str]:
    section = RUN_IT_YOURSELF.search((REPO / "README.md").read_text())
    assert section, "README.md lost its run-it-yourself markers"
    return [block.strip() for block in re.findall(r"```bash\n(.*?)```", section.group(1), flags=re.S)]


def _terminal(script: str, cwd: Path, env: dict[str, str], log: Path) -> subprocess.Popen[bytes]:
    """One README terminal: its own session, so a Ctrl-C (SIGINT to the group) reaches what it runs."""
    with log.open("wb") as output:
        return subprocess.Popen(["bash", "-e", "-c", script], cwd=cwd, env=env, stdout=output,
                                stderr=subprocess.STDOUT, start_new_session=True)


def _ctrl_c(proc: subprocess.Popen[bytes], log: Path, timeout: float = 60) -> None:
    os.killpg(proc.pid, signal.SIGINT)
    assert proc.wait(timeout=timeout) == 0, log.read_text()


def _json_lines(text: str, key: str) -> list[dict[str, Any]]:
    return [json.loads(line) for line in text.splitlines() if line.startswith("{") and f'"{key}"' in line]


def test_run_it_yourself_section_runs_as_written(tmp_path: Path) -> None:
    services, worker, client = _run_it_yourself_blocks()
    # `stream-sentiment` is this checkout's CLI, whatever is installed; nothing else differs from a user's shell
    # but two things a shared test machine needs: the admin port is any free one (8081 may be taken), and the
    # engines are found in the checkout although the commands run in a scratch folder (they write files there).
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    shim = bin_dir / "stream-sentiment"
    shim.write_text(f'#!/bin/sh\nexec "{sys.executable}" -m stream_sentiment.cli "$@"\n')
    shim.chmod(0o755)
    env = {key: value for key, value in os.environ.items() if not key.startswith("STREAM_SENTIMENT_")}
    env.update({"PATH": f"{bin_dir}{os.pathsep}{env.get('PATH', '')}", "PYTHONPATH": str(REPO),
                "STREAM_SENTIMENT_ADMIN__PORT": "0", "STREAM_SENTIMENT_ENGINE__REPOSITORY": str(REPO / "engines")})
    work = tmp_path / "work"
    work.mkdir()

    env_file = work / "local.env"
    services_log, worker_log = tmp_path / "services.log", tmp_path / "worker.log"
    first = _terminal(services, work, env, services_log)
    try:
        deadline = time.monotonic() + 60
        while not env_file.exists():
            assert first.poll() is None and time.monotonic() < deadline, services_log.read_text()
            time.sleep(0.1)
        second = _terminal(worker, work, env, worker_log)
        try:
            third = subprocess.run(["bash", "-e", "-c", client], cwd=work, env=env, capture_output=True,
                                   text=True, timeout=300, check=False)
            assert third.returncode == 0, third.stdout + third.stderr
            sent = sum(result["sent"] for result in _json_lines(third.stdout, "sent"))
            assert sent == 602
            assert len(_json_lines(third.stdout, "scored")) == 1  # stats --json ran and printed one object
            # "run it again until scored + dead_lettered reaches the 602 posts sent"
            stats_line = next(line for line in client.splitlines() if line.startswith("stream-sentiment stats"))
            loaded = f"set -a && . ./local.env && set +a\n{stats_line}"
            stats: dict[str, Any] = {}
            deadline = time.monotonic() + 240
            while time.monotonic() < deadline:
                assert second.poll() is None, worker_log.read_text()
                answer = subprocess.run(["bash", "-e", "-c", loaded], cwd=work, env=env, capture_output=True,
                                        text=True, timeout=60, check=True)
                stats = json.loads(answer.stdout)
                if stats["scored"] + stats["dead_lettered"] >= sent:
                    break
                time.sleep(1)
            assert stats["scored"] + stats["dead_lettered"] == sent, stats
            assert (stats["scored"], stats["dead_lettered"]) == (600, 2)
            assert stats["dead_lettered_by_reason"] == {"empty_text": 1, "not_json": 1}
            assert sum(stats["by_label"].values()) == 600
        finally:
            _ctrl_c(second, worker_log)
    finally:
        _ctrl_c(first, services_log)
    assert not env_file.exists()  # services removed it on the way out
