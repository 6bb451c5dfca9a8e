"""The alert page in headless Chromium at 1400x1000, opened from a script after several alerts.

Real Redis (buckets written through the service's fenced sink, alerts as the monitor writes them), the real
admin server and page, with a token. The page is opened the documented scripted way (``/alerts#token=...``):
it must sign itself in, drop the token from the address bar, open on the NEWEST alert (the backlog arrives
oldest first), fit its time axis to the ~90 s of data with round, non-overlapping tick labels, explain its
marks in a legend, show every stored sample, and leave no empty half in either panel. Then it must follow a
live alert, stop following when the analyst picks a value, and follow again when asked. A screenshot goes to
``$ALERT_PAGE_SCREENSHOT`` (default ``build/test-artifacts/alert-page-newest.png``).
"""

from __future__ import annotations

import asyncio
import itertools
import json
import os
import struct
import time
from pathlib import Path
from typing import Any

import pytest
from pydantic import SecretStr

from stream_sentiment.admin.server import AdminServer
from stream_sentiment.aggregation.buckets import BucketRules, RedisKeys
from stream_sentiment.cli import main
from stream_sentiment.config import AdminSettings
from stream_sentiment.metrics import PipelineMetrics
from stream_sentiment.views.queries import AnalystQueries
from stream_sentiment.views.web import AlertPage, PageSettings
from tests.admin.test_server import RecordingControl
from tests.browser import HeadlessChromium, ensure_chromium
from tests.views.seed import alert_record, write_posts

REPO = Path(__file__).resolve().parents[2]
SCREENSHOT = Path(os.environ.get("ALERT_PAGE_SCREENSHOT", REPO / "build" / "test-artifacts" / "alert-page-newest.png"))
TOKEN = "page+from/a=script&token"  # characters a URL fragment must encode
PREFIX = "newest"
BUCKET = 5
RULES = BucketRules(bucket_seconds=BUCKET, allowed_lateness=600, dimensions=("global", "topic", "region"),
                    sample_posts=3)
SIZE = (1400, 1000)


@pytest.fixture(scope="module")
def chromium() -> str:
    return ensure_chromium()


def _samples(topic: str) -> list[dict[str, Any]]:
    return [{"id": f"{topic}-{i}", "text": f"{topic} sample {i}: cancelled again, awful", "p_negative": 0.99 - i / 100}
            for i in range(3)]


async def _seed(client: Any, now: float) -> list[str]:
    """~90 s of buckets (bank sours first, then airline) and three alerts, oldest first; their ids."""
    offset = 0
    for age in range(90, -1, -BUCKET):
        at = now - age
        bank_negative = 16 if 60 <= age <= 85 else 3
        airline_negative = 17 if age <= 40 else 4
        offset = await write_posts(client, PREFIX, RULES, at, {"bank": (20, bank_negative),
                                                               "airline": (20, airline_negative),
                                                               "news": (20, 5)}, offset=offset, region="eu")
    stream = RedisKeys(PREFIX).alerts
    ids = []
    for dimension, value, age in (("topic", "bank", 60), ("region", "eu", 45), ("topic", "airline", 15)):
        end = (now - age) // BUCKET * BUCKET
        ids.append(await client.xadd(stream, alert_record(dimension, value, end, window=30,
                                                          samples=_samples(value))))
    return ids


def _png_size(path: Path) -> tuple[int, int]:
    width, height = struct.unpack(">II", path.read_bytes()[16:24])
    return width, height


SELECTED = "document.getElementById('dimension').value"
DOTS = "document.querySelectorAll('#chart circle.dot').length"
# Where the chart's dots and tick labels lie, in screen pixels, and the panels' content against their height.
GEOMETRY = """(() => {
  const chart = document.getElementById('chart').getBoundingClientRect();
  const dots = [...document.querySelectorAll('#chart circle')].map((d) => d.getBoundingClientRect());
  const ticks = [...document.querySelectorAll('#chart text.tick')].map((t) => {
    const r = t.getBoundingClientRect(); return {left: r.left, right: r.right, text: t.textContent}; });
  const grid = [...document.querySelectorAll('#chart line.grid')].map((l) => l.getBoundingClientRect());
  const slack = (id) => { const s = document.getElementById(id).getBoundingClientRect();
    const last = [...document.getElementById(id).children].at(-1).getBoundingClientRect();
    return s.bottom - last.bottom; };
  return {chartWidth: chart.width, plotLeft: Math.min(...grid.map((g) => g.left)),
          plotRight: Math.max(...grid.map((g) => g.right)),
          firstDot: Math.min(...dots.map((d) => d.left)), lastDot: Math.max(...dots.map((d) => d.right)),
          ticks, chartSlack: slack('chart-section'), feedSlack: slack('feed-section')};
})()"""


def test_opened_from_a_script_after_several_alerts_the_page_shows_the_newest(redis_factory, chromium, tmp_path,
                                                                            monkeypatch, capsys):
    monkeypatch.delenv("STREAM_SENTIMENT_ADMIN__TOKEN", raising=False)
    monkeypatch.setenv("STREAM_SENTIMENT_ADMIN_TOKEN", TOKEN)

    async def run() -> dict[str, Any]:
        client = redis_factory(async_client=True)
        now = time.time()
        ids = await _seed(client, now)
        settings = AdminSettings(host="127.0.0.1", port=0, token=SecretStr(TOKEN))
        views = AlertPage(AnalystQueries(client, RedisKeys(PREFIX), BUCKET), PageSettings((30, 60, 300), BUCKET, 0.6))
        async with AdminServer(settings, RecordingControl(), PipelineMetrics(), views) as server, \
                HeadlessChromium(chromium, tmp_path / "profile", width=SIZE[0], height=SIZE[1]) as browser:
            await browser.send("Emulation.setDeviceMetricsOverride", width=SIZE[0], height=SIZE[1],
                               deviceScaleFactor=1, mobile=False)
            # A wrong token: back to the form with its message, the fragment gone, no loop.
            await browser.navigate(f"{server.url}/alerts#token=wrong")
            await browser.wait_until("document.body.innerText.includes('The token was not accepted.')", 15)
            assert await browser.evaluate("location.hash") == ""
            # The documented way: `alerts --page-url` puts the token in the fragment; the page signs itself in
            # and drops it from the address bar.
            assert main(["alerts", "--page-url", "--admin-url", server.url]) == 0
            page_url = capsys.readouterr().out.strip()
            assert page_url == f"{server.url}/alerts#token=page%2Bfrom%2Fa%3Dscript%26token"
            await browser.navigate(page_url)
            await browser.wait_until("document.getElementById('chart') !== null", 15)
            await browser.wait_until(f"{SELECTED} === 'topic:airline' && {DOTS} >= 15", 15)
            result: dict[str, Any] = {
                "href": await browser.evaluate("location.href"),
                "title": await browser.evaluate("document.getElementById('chart-title').textContent"),
                "feed_first": await browser.evaluate("document.querySelector('#feed li.alert').dataset.value"),
                "feed_count": await browser.evaluate("document.querySelectorAll('#feed li.alert').length"),
                "detail": await browser.evaluate("document.getElementById('alert-detail').innerText"),
                "detail_samples": await browser.evaluate("document.querySelectorAll('#detail-body .sample').length"),
                "feed_samples": await browser.evaluate(
                    "document.querySelector('#feed li.alert').querySelectorAll('.sample').length"),
                "legend": await browser.evaluate("document.getElementById('legend').innerText"),
                "marks": await browser.evaluate("document.querySelectorAll('#chart line.alert-mark').length"),
                "band": await browser.evaluate("document.querySelectorAll('#chart rect.alert-window').length"),
                "caption": await browser.evaluate("document.querySelector('#chart text.caption').textContent"),
                "geometry": await browser.evaluate(GEOMETRY),
            }
            await browser.screenshot(SCREENSHOT)
            # A live alert: the page follows it.
            await client.xadd(RedisKeys(PREFIX).alerts, alert_record("topic", "news", now // BUCKET * BUCKET,
                                                                     window=30, samples=_samples("news")))
            await browser.wait_until(f"{SELECTED} === 'topic:news'", 10)
            # The analyst picks a value: following stops; ticking "follow" goes back to the newest alert.
            await browser.evaluate("document.querySelector('#feed li.alert[data-value=\"bank\"]').click()")
            await browser.wait_until(f"{SELECTED} === 'topic:bank' && !document.getElementById('follow').checked", 5)
            await client.xadd(RedisKeys(PREFIX).alerts, alert_record("region", "eu", now // BUCKET * BUCKET,
                                                                     window=60, samples=_samples("eu")))
            await browser.wait_until("document.querySelectorAll('#feed li.alert').length === 5", 10)
            result["after_pick"] = await browser.evaluate(SELECTED)
            await browser.evaluate("document.getElementById('follow').click()")
            await browser.wait_until(f"{SELECTED} === 'region:eu'", 5)
        await client.aclose()
        result["ids"] = ids
        return result

    result = asyncio.run(run())
    assert result["href"].endswith("/alerts") and TOKEN not in result["href"]
    # The newest of the three alerts, not the first the backlog replayed.
    assert result["title"] == "Negative share of topic=airline"
    assert result["feed_first"] == "airline" and result["feed_count"] == 3
    assert result["detail"].startswith("Newest alert\nRATIO\ntopic=airline") or "topic=airline" in result["detail"]
    assert result["detail_samples"] == 3 and result["feed_samples"] == 3  # every stored sample, in both places
    assert "60%: the share that raises a ratio alert" in result["legend"]
    for words in ("5-second bucket", "still filling", "an alert for this value", "the window of the alert"):
        assert words in result["legend"], result["legend"]
    assert result["marks"] >= 1 and result["band"] == 1
    assert result["caption"].startswith("time (UTC, ")
    geometry = result["geometry"]
    plot = geometry["plotRight"] - geometry["plotLeft"]
    # ~90 s of data span the axis (a fixed 15-minute axis put them in its last tenth).
    assert geometry["firstDot"] - geometry["plotLeft"] < 0.1 * plot, geometry
    assert geometry["plotRight"] - geometry["lastDot"] < 0.1 * plot, geometry
    ticks = geometry["ticks"]
    assert len(ticks) >= 4, ticks
    assert all(a["right"] + 8 <= b["left"] for a, b in itertools.pairwise(ticks)), ticks  # no overlaps
    assert all(len(t["text"]) == 8 and t["text"][-1] in "05" for t in ticks), ticks  # round HH:MM:S0/5 times
    # No empty half: each panel ends within a few pixels of its content.
    assert geometry["chartSlack"] < 30 and geometry["feedSlack"] < 30, geometry
    assert geometry["chartWidth"] > 700
    assert result["after_pick"] == "topic:bank"  # a new alert did not move a chart the analyst chose
    assert _png_size(SCREENSHOT) == SIZE
    print(f"screenshot {SCREENSHOT}: {json.dumps(geometry)}")
