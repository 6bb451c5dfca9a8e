"""The README's demo: `stream-sentiment demo --duration 60` shows the injected surge and exits cleanly."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

from stream_sentiment.embedded import pid_alive, port_is_free

REPO = Path(__file__).resolve().parents[1]


def test_demo_shows_the_surge_alert_and_exits_cleanly():
    process = subprocess.Popen(
        [sys.executable, "-m", "stream_sentiment.cli", "demo", "--duration", "60"],
        cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )
    output, _ = process.communicate(timeout=180)
    assert process.returncode == 0, output[-3000:]
    alerts = [line for line in output.splitlines() if " ALERT " in line]
    assert any("topic=airline" in line for line in alerts), output[-3000:]
    assert not any("topic=" in line and "topic=airline" not in line for line in alerts), alerts
    summary = json.loads(output.strip().splitlines()[-1])
    assert summary["scored"] > 1000 and summary["alerts_shown"] == len(alerts)
    assert not pid_alive(process.pid)
    # The embedded broker and Redis stopped with it: the ports it announced are free again.
    ports = [int(p) for p in re.findall(r"127\.0\.0\.1:(\d+)", output.splitlines()[0])]
    assert len(ports) == 2 and all(port_is_free(port) for port in ports), output.splitlines()[0]
    # ... and so did the worker's HTTP server, whose alert page the demo announced.
    page = re.search(r"alert page at http://127\.0\.0\.1:(\d+)/alerts", output)
    assert page is not None and port_is_free(int(page.group(1))), output[:500]
