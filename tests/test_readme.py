"""The README's two commands are the truth for a newcomer: check they are what CI runs and that they work."""

from __future__ import annotations

import json
import re
import shlex
import subprocess
import sys
from pathlib import Path

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
