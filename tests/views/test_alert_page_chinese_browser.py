"""The alert page in headless Chromium with a Chinese alert: its text in the DOM, drawn with a Chinese font.

Real Redis (buckets through the service's fenced sink, an alert entry as the monitor writes it, with Chinese
sample posts as the worker stores them: ``lang`` "zh"), the real admin server and page. What it proves:

- the page's UTF-8 survives Redis, the server-sent feed and the DOM: the Chinese topic and samples read back
  exactly as written;
- each sample carries its language (``lang="zh"``), so the browser picks Chinese glyph forms, and is set
  upright (CJK has no italic);
- **not tofu**: Chromium reports, through the DevTools protocol (``CSS.getPlatformFontsForNode``), which
  installed fonts drew a sample's characters and how many glyphs each; every Han character must have been
  drawn by a font that fontconfig lists as covering Chinese (``fc-list :lang=zh``). A character no font covers
  would be drawn as a box by some other font, and fail the count. Debian's ``fonts-wqy-zenhei`` is installed
  when no Chinese font is (``tests.browser.chinese_font_families``), as CI's fresh machine has none.

A screenshot goes to ``build/test-artifacts/alert-page-chinese.png`` for a person to look at.
"""

from __future__ import annotations

import asyncio
import json
import re
import time
from pathlib import Path
from typing import Any

import pytest

from stream_sentiment.admin.server import AdminServer
from stream_sentiment.aggregation.buckets import BucketRules, RedisKeys
from stream_sentiment.config import AdminSettings
from stream_sentiment.metrics import PipelineMetrics
from stream_sentiment.views.queries import AnalystQueries
from stream_sentiment.views.web import AlertPage, PageSettings
from tests.admin.test_server import RecordingControl
from tests.browser import HeadlessChromium, chinese_font_families, ensure_chromium
from tests.views.seed import alert_record, write_posts

REPO = Path(__file__).resolve().parents[2]
SCREENSHOT = REPO / "build" / "test-artifacts" / "alert-page-chinese.png"
PREFIX = "zhpage"
BUCKET = 5
RULES = BucketRules(bucket_seconds=BUCKET, allowed_lateness=600, dimensions=("global", "topic"), sample_posts=3)
TOPIC = "航空"
SAMPLES = [
    {"id": "zh-1", "text": "凌晨一点被通知航班取消，航司不给安排住宿，同行的老人一夜没合眼", "p_negative": 0.99},
    {"id": "zh-2", "text": "@某航客服 你们的电话是摆设吗？从下午两点打到六点，一直是“坐席忙”", "p_negative": 0.98},
    {"id": "zh-3", "text": "延误理由永远是“流量控制”，MU5123 又晚了三个小时", "p_negative": 0.97},
]
SAMPLES = [{**sample, "lang": "zh"} for sample in SAMPLES]  # as the worker stores a Chinese post's sample
HAN = re.compile(r"[\u3400-\u9fff]")


@pytest.fixture(scope="module")
def chromium() -> str:
    return ensure_chromium()


@pytest.fixture(scope="module")
def chinese_fonts(chromium) -> set[str]:
    return chinese_font_families()  # after Chromium: fontconfig's fc-list comes with it


async def _platform_fonts(browser: HeadlessChromium, selector: str) -> list[list[dict[str, Any]]]:
    """For each element ``selector`` matches, the fonts Chromium drew its text with (``familyName``,
    ``glyphCount``, ...)."""
    await browser.send("DOM.enable")
    await browser.send("CSS.enable")
    root = (await browser.send("DOM.getDocument", depth=-1))["root"]["nodeId"]
    nodes = (await browser.send("DOM.querySelectorAll", nodeId=root, selector=selector))["nodeIds"]
    return [list((await browser.send("CSS.getPlatformFontsForNode", nodeId=node))["fonts"]) for node in nodes]


def test_a_chinese_alert_reads_back_exactly_and_is_drawn_with_a_chinese_font(redis_factory, chromium, chinese_fonts,
                                                                             tmp_path, monkeypatch):
    monkeypatch.delenv("STREAM_SENTIMENT_ADMIN_TOKEN", raising=False)
    monkeypatch.delenv("STREAM_SENTIMENT_ADMIN__TOKEN", raising=False)

    async def run() -> dict[str, Any]:
        client = redis_factory(async_client=True)
        now = time.time()
        offset = 0
        for age in range(40, -1, -BUCKET):
            offset = await write_posts(client, PREFIX, RULES, now - age, {TOPIC: (20, 17), "天气": (20, 4)},
                                       offset=offset)
        end = (now - 5) // BUCKET * BUCKET
        record = alert_record("topic", TOPIC, end, window=30, samples=SAMPLES)
        engines = {"multilingual-sentiment/v1": 40}
        record.update(engine_version="multilingual-sentiment/v1", engines=json.dumps(engines),
                      samples=json.dumps(SAMPLES, ensure_ascii=False))
        await client.xadd(RedisKeys(PREFIX).alerts, record)
        views = AlertPage(AnalystQueries(client, RedisKeys(PREFIX), BUCKET), PageSettings((30, 60), BUCKET, 0.6))
        async with AdminServer(AdminSettings(host="127.0.0.1", port=0), RecordingControl(), PipelineMetrics(),
                               views) as server, HeadlessChromium(chromium, tmp_path / "profile") as browser:
            await browser.navigate(f"{server.url}/alerts")
            await browser.wait_until("document.querySelectorAll('#detail-body .sample').length === 3 && "
                                     "document.querySelectorAll('#chart circle.dot').length >= 5", 15)
            result: dict[str, Any] = {
                "feed": await browser.evaluate("document.getElementById('feed').innerText"),
                "title": await browser.evaluate("document.getElementById('chart-title').textContent"),
                # The panel under the chart, then the feed: the same samples in both.
                "samples": await browser.evaluate(
                    "[...document.querySelectorAll('#detail-body .sample, #feed .sample')].map((s) => "
                    "({text: s.textContent, lang: s.lang, style: getComputedStyle(s).fontStyle}))"),
                "fonts": await _platform_fonts(browser, "#detail-body .sample, #feed .sample"),
                "topic_fonts": await _platform_fonts(browser, "#detail-body .where"),
            }
            await browser.screenshot(SCREENSHOT)
        await client.aclose()
        return result

    result = asyncio.run(run())
    feed = result["feed"]
    assert f"topic={TOPIC}" in feed and "engine multilingual-sentiment/v1" in feed, feed
    assert all(sample["text"] in feed for sample in SAMPLES), feed
    assert result["title"] == f"Negative share of topic={TOPIC}"
    for shown, sample in zip(result["samples"], SAMPLES * 2, strict=True):
        assert shown["text"] == f"“{sample['text']}” (P(negative) {sample['p_negative']})"
        assert shown["lang"] == "zh" and shown["style"] == "normal", shown
    drawn = [*zip(result["fonts"], [s["text"] for s in SAMPLES * 2], strict=True),
             (result["topic_fonts"][0], TOPIC)]
    for fonts, text in drawn:
        chinese = sum(font["glyphCount"] for font in fonts if font["familyName"] in chinese_fonts)
        assert chinese >= len(HAN.findall(text)), (text, fonts, sorted(chinese_fonts))
    assert SCREENSHOT.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    print(f"screenshot {SCREENSHOT}; fonts of the first sample: {result['fonts'][0]}")
