"""How soon after a surge starts does its alert land? The demo, run N times, timed from its own output.

Each run is ``stream-sentiment demo --duration D`` (embedded broker and Redis, one worker on the INT8 CPU
engine, sample tweets at 100/s, a negative surge for ``topic=airline`` from 15 s). The demo prints every
alert with the seconds since it started; the latency of a run is the first ``topic=airline`` alert's time
less the surge's start. Prints one JSON object: per-run latencies and their median.

    python bench/alert_latency.py --runs 5 --duration 45
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SURGE_START_S = 15.0
ALERT_LINE = re.compile(r"^\[\s*(?P<at>\d+(\.\d+)?)s\] ALERT .*topic=airline")


def one_run(duration: float) -> dict[str, object]:
    started = time.monotonic()
    result = subprocess.run(
        [sys.executable, "-m", "stream_sentiment.cli", "demo", "--duration", str(duration)],
        cwd=REPO, capture_output=True, text=True, timeout=duration + 120, check=False,
    )
    times = [float(m.group("at")) for line in result.stdout.splitlines() if (m := ALERT_LINE.match(line))]
    return {
        "exit_code": result.returncode,
        "latency_s": round(times[0] - SURGE_START_S, 1) if times else None,
        "airline_alerts": len(times),
        "wall_s": round(time.monotonic() - started, 1),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--duration", type=float, default=45.0)
    args = parser.parse_args()
    runs = [one_run(args.duration) for _ in range(args.runs)]
    latencies = [r["latency_s"] for r in runs if isinstance(r["latency_s"], float)]
    print(json.dumps({
        "runs": runs,
        "median_latency_s": statistics.median(latencies) if latencies else None,
        "runs_without_alert": sum(1 for r in runs if r["latency_s"] is None),
    }, indent=2))
    return 0 if latencies and len(latencies) == len(runs) else 1


if __name__ == "__main__":
    raise SystemExit(main())
