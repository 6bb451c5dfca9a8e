"""How soon after a surge starts does its alert land? The demo, run N times, timed from its own output.

Each run is ``stream-sentiment demo --duration D`` (embedded broker and Redis, one worker on the INT8 CPU
engine, sample tweets at 50/s, a negative surge of 30/s more for ``topic=airline`` from ``--surge-start``).
The demo prints every alert with the seconds since it started; the latency of a run is the first
``topic=airline`` alert's time less the surge's start. Prints one JSON object: per-run latencies and their
median.

Windows reaching back before the first post are judged by their negative share (``aggregation.monitor``),
so the demo's own start (15 s) and a later one (40 s) measure the same thing: the judgement itself.

    python bench/alert_latency.py --runs 5 --duration 45
    python bench/alert_latency.py --runs 5 --duration 70 --surge-start 40
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
ALERT_LINE = re.compile(r"^\[\s*(?P<at>\d+(\.\d+)?)s\] ALERT .*topic=airline")


def one_run(duration: float, surge_start: float) -> dict[str, object]:
    started = time.monotonic()
    result = subprocess.run(
        [sys.executable, "-m", "stream_sentiment.cli", "demo", "--duration", str(duration),
         "--surge-start", str(surge_start)],
        cwd=REPO, capture_output=True, text=True, timeout=duration + 120, check=False,
    )
    times = [float(m.group("at")) for line in result.stdout.splitlines() if (m := ALERT_LINE.match(line))]
    return {
        "exit_code": result.returncode,
        "latency_s": round(times[0] - surge_start, 1) if times else None,
        "airline_alerts": len(times),
        "wall_s": round(time.monotonic() - started, 1),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--duration", type=float, default=45.0)
    parser.add_argument("--surge-start", type=float, default=15.0, help="seconds after the demo starts")
    args = parser.parse_args()
    runs = [one_run(args.duration, args.surge_start) for _ in range(args.runs)]
    latencies = [r["latency_s"] for r in runs if isinstance(r["latency_s"], float)]
    print(json.dumps({
        "duration_s": args.duration, "surge_start_s": args.surge_start,
        "runs": runs,
        "median_latency_s": statistics.median(latencies) if latencies else None,
        "runs_without_alert": sum(1 for r in runs if r["latency_s"] is None),
    }, indent=2))
    return 0 if latencies and len(latencies) == len(runs) else 1


if __name__ == "__main__":
    raise SystemExit(main())
