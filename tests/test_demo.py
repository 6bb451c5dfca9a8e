"""The README's demo (`stream-sentiment demo --duration 60`) shows the injected surge and exits cleanly; the tests run
it shorter, the surge from 5 s instead of 15, to keep the suite's time."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import warnings
from pathlib import Path

import pytest

from stream_sentiment.embedded import pid_alive, port_is_free

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize(("engine_flag", "engine"), [
    ([], "minilm-sentiment/v1"),
    # The fast CPU student, chosen on the command line: the alerts name it.
    (["--engine", "minilm-fast"], "minilm-fast/v2"),
])
def test_demo_shows_the_surge_alert_and_exits_cleanly(engine_flag: list[str], engine: str) -> None:
    process = subprocess.Popen(
        [sys.executable, "-m", "stream_sentiment.cli", "demo", "--duration", "40", "--surge-start", "5",
         *engine_flag],
        cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )
    output, _ = process.communicate(timeout=180)
    assert process.returncode == 0, output[-3000:]
    alerts = [line for line in output.splitlines() if " ALERT " in line]
    assert any("topic=airline" in line for line in alerts), output[-3000:]
    assert not any("topic=" in line and "topic=airline" not in line for line in alerts), alerts
    assert all(line.endswith(f"engine {engine}") for line in alerts), alerts
    summary = json.loads(output.strip().splitlines()[-1])
    assert summary["scored"] > 1000 and summary["alerts_shown"] == len(alerts)
    # Honest counts: every post sent was scored, dead-lettered or is left over, counted from the broker's
    # offsets and Redis's marks, and the output says so (and what to do when some were left over).
    sent, left, in_topic = summary["sent"], summary["left_over"], summary["in_topic"]
    assert sent == summary["replayed"] + summary["surge"], summary  # no send failed
    assert in_topic == summary["scored"] + summary["dead_lettered"] + left, summary
    total = f"sent {sent:,}" if in_topic == sent else f"the topic holds {in_topic:,} records"
    assert (f"demo: {total} = scored {summary['scored']:,} + dead-lettered {summary['dead_lettered']:,} "
            f"+ left over {left:,}") in output
    if in_topic != sent:
        # The broker's count and the producer's may differ (a send retried after a time-out can be stored
        # twice); the demo must say so rather than hide it. (While this test was written, one run on a loaded
        # machine failed the older form of these checks, sent == replayed + surge == in_topic; which side
        # differed was not recorded, and the five runs since have not repeated it.)
        assert f"(the producer counted {sent:,} acknowledged sends" in output
        warnings.warn(f"the demo's topic holds {in_topic} records, its producer counted {sent}", stacklevel=1)
    if left:
        assert "demo: this machine could not keep up" in output and "stream-sentiment demo --rate " in output
    else:
        assert "demo: the worker kept up: every post sent was scored or dead-lettered" in output
    assert re.search(r"\[ *\d+\.\ds\] sent [\d,]+  scored [\d,]+  dead-lettered [\d,]+  not scored yet", output)
    # Its windows are not a deployment's, and it says so.
    assert ("5-second buckets (default 10), alert windows 30 s, 1 min, 5 min (default 1 min, 5 min, 15 min)"
            in output)
    assert not pid_alive(process.pid)
    # The embedded broker and Redis stopped with it: the ports it announced are free again.
    ports = [int(p) for p in re.findall(r"127\.0\.0\.1:(\d+)", output.splitlines()[0])]
    assert len(ports) == 2 and all(port_is_free(port) for port in ports), output.splitlines()[0]
    # ... and so did the worker's HTTP server, whose alert page the demo announced.
    page = re.search(r"alert page at http://127\.0\.0\.1:(\d+)/alerts", output)
    assert page is not None and port_is_free(int(page.group(1))), output[:500]


def test_the_chinese_demo_routes_chinese_posts_to_the_multilingual_engine_and_shows_the_surge_alert():
    """``demo --lang zh``: Chinese posts, routed to multilingual-sentiment/v3, and an airline surge's alert naming it.

    Shorter than the English demo's test (35 s instead of 40): what both demos share (the
    accounting, the servers stopped, the settings note's windows) is checked there; here, what Chinese changes.
    """
    process = subprocess.Popen(
        [sys.executable, "-m", "stream_sentiment.cli", "demo", "--lang", "zh", "--duration", "35",
         "--surge-start", "5"],
        cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, encoding="utf-8",
    )
    output, _ = process.communicate(timeout=120)
    assert process.returncode == 0, output[-3000:]
    assert "language routing (engine.routes): zh -> multilingual-sentiment/v3" in output
    assert "a ratio alert needs 75% negative (default 60%" in output
    alerts = [line for line in output.splitlines() if " ALERT " in line]
    surge = [line for line in alerts if "topic=airline" in line]
    assert surge, output[-3000:]
    # Every post of the window is Chinese: the alert names the engine that scored them, not the default route's.
    assert all(line.endswith("engine multilingual-sentiment/v3") for line in surge), surge
    assert not any("topic=" in line and "topic=airline" not in line for line in alerts), alerts
    # ... and quotes Chinese posts, whole characters, as they were written.
    samples = [line for line in output.splitlines() if line.startswith('    e.g. "')]
    assert samples and all(re.search(r"[\u4e00-\u9fff]", line) for line in samples), samples
    summary = json.loads(output.strip().splitlines()[-1])
    assert summary["scored"] > 0 and summary["alerts_shown"] == len(alerts)
    assert summary["in_topic"] == summary["scored"] + summary["dead_lettered"] + summary["left_over"], summary
    assert summary["by_label"]["negative"] > summary["by_label"]["positive"]  # the surge
    assert summary["by_label"]["neutral"] > 0  # v2 reads Chinese neutral posts (v1 never did)


def test_the_closing_lines_say_plainly_when_the_machine_could_not_keep_up():
    from stream_sentiment.demo import account

    stats = {"scored": 5200, "dead_lettered": 0}
    behind = account({"sent": 8000, "replayed": 6000, "surge": 2000, "in_topic": 8000, "left_over": 2800}, stats,
                     rate=100, producing_s=60, working_s=65)
    assert behind[1] == "demo: sent 8,000 = scored 5,200 + dead-lettered 0 + left over 2,800"
    # ~133/s offered, ~80/s scored: a rate of 100 becomes 80% of 100 x 80/133, rounded down to a multiple of 5.
    assert behind[-1].startswith("demo: this machine could not keep up: posts arrived at ~133/s (surge included) "
                                 "but the worker scored ~80/s, so 2,800 were never scored")
    assert behind[-1].endswith("Send fewer posts per second: stream-sentiment demo --rate 45")
    kept_up = account({"sent": 3000, "replayed": 2500, "surge": 500, "in_topic": 3000, "left_over": 0},
                      {"scored": 2990, "dead_lettered": 10}, rate=50, producing_s=60, working_s=58)
    assert kept_up[-1] == "demo: the worker kept up: every post sent was scored or dead-lettered"
    retried = account({"sent": 10, "replayed": 10, "surge": 0, "in_topic": 12, "left_over": 0},
                      {"scored": 12, "dead_lettered": 0}, rate=50, producing_s=1, working_s=1)
    assert retried[1].startswith("demo: the topic holds 12 records = scored 12 + dead-lettered 0 + left over 0 "
                                 "(the producer counted 10 acknowledged sends")


def test_the_engine_flag_overrides_model_and_version_and_keeps_the_routes():
    from stream_sentiment.config import EngineSettings
    from stream_sentiment.demo import _engine_overrides

    configured = EngineSettings(repository=REPO / "engines", version="v2")  # as STREAM_SENTIMENT_ENGINE__VERSION=v2
    assert _engine_overrides({}, None, configured) is None  # nothing overridden: environment and defaults decide
    # A bare name of another model is its newest version, not the configured model's version name.
    assert _engine_overrides({}, "minilm-fast", configured) == {"model": "minilm-fast", "version": "v2"}
    # A bare name of the configured model keeps the configured version.
    assert _engine_overrides({}, "minilm-sentiment", configured) == {"model": "minilm-sentiment", "version": "v2"}
    assert _engine_overrides({"zh": "multilingual-sentiment/v3"}, "minilm-sentiment/v1", configured) == {
        "routes": {"zh": "multilingual-sentiment/v3"}, "model": "minilm-sentiment", "version": "v1"}
