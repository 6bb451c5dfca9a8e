"""The alert page in headless Chromium, against a real broker, Redis and `stream-sentiment run`.

A worker process is started with a token; the browser signs in through the page's form, posts are
produced with an injected negative surge for one topic, and the surge's alert must appear in the page's
live feed (pushed by Server-Sent Events) within 15 s of the surge's first post. The test saves a
screenshot to ``build/test-artifacts/alert-page.png``. The running worker's ``/metrics`` is then checked
against every query of the Grafana dashboard.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import aiohttp
import pytest
from aiokafka import AIOKafkaProducer
from prometheus_client.parser import text_string_to_metric_families
from redis import Redis

from stream_sentiment.embedded import free_port
from stream_sentiment.source.replay import Surge, replay, sample_posts
from tests.browser import HeadlessChromium, ensure_chromium
from tests.deploy.promql import parse
from tests.pipeline import pipeline_settings

REPO = Path(__file__).resolve().parents[2]
SCREENSHOT = REPO / "build" / "test-artifacts" / "alert-page.png"
DASHBOARD = REPO / "deploy" / "grafana" / "dashboards" / "stream-sentiment.json"
TOKEN = "browser-test-token"
SURGE_TOPIC = "launch-day"  # not a topic of the sample posts: only the surge can raise its alert
SURGE_START_S = 6.0
ALERT_WITHIN_S = 15.0


@pytest.fixture(scope="session")
def chromium() -> str:
    return ensure_chromium()


@pytest.fixture
def worker(kafka, topic_factory, redis_server, tmp_path) -> Iterator[tuple[str, str]]:
    """`stream-sentiment run` with one-second buckets and short windows, so a surge alerts in seconds."""
    topic, settings = pipeline_settings(kafka, topic_factory, redis_server, "browser", partitions=2)
    port = free_port()
    config = tmp_path / "worker.json"
    config.write_text(json.dumps({
        "bootstrap_servers": settings.bootstrap_servers, "topic": topic, "consumer_group": settings.consumer_group,
        "redis_url": settings.redis_url, "redis_prefix": "browser",
        "kafka_session_timeout_ms": 2000, "kafka_heartbeat_interval_ms": 500,
        "aggregation": {"bucket_seconds": 1, "windows_seconds": [5, 10]},
        "alerts": {"min_posts": 15, "cooldown_seconds": 60},
        "admin": {"port": port, "token": TOKEN},
    }))
    log = (tmp_path / "worker.log").open("w")
    env = {k: v for k, v in os.environ.items() if not k.startswith("STREAM_SENTIMENT_")}
    process = subprocess.Popen([sys.executable, "-m", "stream_sentiment.cli", "run", "--config", str(config)],
                               cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT)
    try:
        yield topic, f"http://127.0.0.1:{port}"
    finally:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
        log.close()
        if process.returncode not in (0, -signal.SIGTERM):
            print((tmp_path / "worker.log").read_text()[-4000:])


async def _wait_ready(base: str, within: float = 60.0) -> None:
    async with aiohttp.ClientSession() as http, asyncio.timeout(within):
        while True:
            try:
                async with http.get(f"{base}/readyz") as response:
                    if response.status == 200:
                        return
            except aiohttp.ClientError:
                pass
            await asyncio.sleep(0.3)


SURGE_ALERT_ITEM = f"""
[...document.querySelectorAll('#feed li.alert')].find(
    (item) => item.dataset.dimension === 'topic' && item.dataset.value === '{SURGE_TOPIC}')
"""
SURGE_ALERT_SHOWN = f"({SURGE_ALERT_ITEM}) !== undefined"


FEED_TEXT = "document.getElementById('feed').innerText"


def _alerts_in_redis(url: str) -> list[str]:
    with Redis.from_url(url, decode_responses=True) as client:
        return [f"{f['dimension']}={f['value']} {f['rule']}" for _, f in client.xrange("browser:alerts")] + [
            f"totals {client.hgetall('browser:totals')}"]


def test_a_produced_surge_shows_up_on_the_alert_page_within_15_seconds(chromium, kafka, redis_server, worker,
                                                                        tmp_path):
    topic, base = worker
    redis_url = redis_server.url

    async def run() -> dict[str, object]:
        await _wait_ready(base)
        async with HeadlessChromium(chromium, tmp_path / "profile") as browser:
            await browser.navigate(f"{base}/alerts")
            # Without the cookie the page is the sign-in form; signing in leads back to the page.
            assert await browser.evaluate("document.querySelector('form#sign-in') !== null")
            await browser.evaluate(f"document.getElementById('token').value = {json.dumps(TOKEN)}")
            await browser.evaluate("document.getElementById('sign-in').submit()")
            await browser.wait_for_event("Page.loadEventFired")
            await browser.wait_until("document.getElementById('connection').dataset.state === 'live'", 15)

            producer = AIOKafkaProducer(bootstrap_servers=kafka.bootstrap_servers, linger_ms=5)
            await producer.start()
            values = (json.dumps(post).encode() for post in sample_posts(seed=3))
            surge = Surge(topic=SURGE_TOPIC, start=SURGE_START_S, duration=10.0, rate=30.0)
            started = time.monotonic()
            sending = asyncio.create_task(replay(producer, topic, values, rate=40, count=40 * 20, surge=surge))
            try:
                await asyncio.sleep(SURGE_START_S)
                assert not await browser.evaluate(SURGE_ALERT_SHOWN)  # nothing before the surge
                surge_began = started + SURGE_START_S
                try:
                    await browser.wait_until(SURGE_ALERT_SHOWN, ALERT_WITHIN_S + SURGE_START_S)
                except TimeoutError:
                    raise AssertionError(f"no surge alert on the page; Redis has {_alerts_in_redis(redis_url)}; "
                                         f"the page shows {await browser.evaluate(FEED_TEXT)!r}") from None
                seen_after = time.monotonic() - surge_began
                # The analyst clicks the alert: the chart shows that value (and stops following newer alerts).
                await browser.evaluate(f"{SURGE_ALERT_ITEM}.click()")
                await browser.wait_until(f"document.getElementById('dimension').value === 'topic:{SURGE_TOPIC}' "
                                         "&& document.querySelectorAll('#chart circle.dot').length >= 3", 10)
                await browser.screenshot(SCREENSHOT)
                feed_text = await browser.evaluate(FEED_TEXT)
                chart_choice = await browser.evaluate("document.getElementById('dimension').value")
            finally:
                sending.cancel()
                await asyncio.gather(sending, return_exceptions=True)
                await producer.stop()
            async with aiohttp.ClientSession() as http, http.get(f"{base}/metrics") as response:
                exposition = await response.text()
        return {"seen_after": seen_after, "feed": feed_text, "chart": chart_choice, "metrics": exposition}

    result = asyncio.run(run())
    print(f"surge alert on the page {result['seen_after']:.1f} s after the surge began; screenshot {SCREENSHOT}")
    assert result["seen_after"] <= ALERT_WITHIN_S
    feed = str(result["feed"])
    assert f"topic={SURGE_TOPIC}" in feed and "negative" in feed and "posts" in feed
    assert "“" in feed  # a sample post is quoted under the alert
    assert SCREENSHOT.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and SCREENSHOT.stat().st_size > 10_000
    _dashboard_queries_match_the_running_worker(str(result["metrics"]))


# Panels that must have data after this run's traffic (the others show engine swaps and failures).
BUSY_PANELS = {"stream_sentiment_posts_scored_total", "stream_sentiment_end_to_end_seconds_bucket",
               "stream_sentiment_batch_rows_count", "stream_sentiment_batch_tokens_total",
               "stream_sentiment_batches_total", "stream_sentiment_alerts_total", "stream_sentiment_engine_info",
               "stream_sentiment_stage_busy_seconds_total", "stream_sentiment_records_fetched_total"}


def _dashboard_queries_match_the_running_worker(exposition: str) -> None:
    """Every metric the Grafana dashboard queries is in a live worker's /metrics, not only in its code."""
    declared = {family.name for family in text_string_to_metric_families(exposition)}
    sampled = {sample.name for family in text_string_to_metric_families(exposition) for sample in family.samples}
    dashboard = json.loads(DASHBOARD.read_text(encoding="utf-8"))
    queried = {metric for panel in dashboard["panels"] for target in panel.get("targets", [])
               for metric in parse(target["expr"]).metrics}
    # A family is declared under its base name: counters without _total, histograms without _bucket/_sum/_count.
    missing = {m for m in queried if m not in sampled and re.sub(r"_(total|bucket|sum|count)$", "", m) not in declared}
    assert not missing, f"dashboard metrics the worker does not export: {sorted(missing)}"
    assert BUSY_PANELS <= queried and BUSY_PANELS <= sampled, sorted(BUSY_PANELS - sampled)
