"""The web alert page's routes against a real socket and real Redis: who may read, the chart data, the live feed."""

from __future__ import annotations

import asyncio
import json
import time
from typing import Any

import aiohttp
import pytest
from pydantic import SecretStr

from stream_sentiment.admin.server import VIEW_COOKIE, AdminServer
from stream_sentiment.aggregation.buckets import BucketRules, RedisKeys
from stream_sentiment.cli import main
from stream_sentiment.config import AdminSettings
from stream_sentiment.metrics import PipelineMetrics
from stream_sentiment.views.queries import AnalystQueries
from stream_sentiment.views.web import AlertPage, PageSettings
from tests.admin.test_server import RecordingControl
from tests.views.seed import alert_record, write_posts

TOKEN = "analyst-and-admin-token"
PREFIX = "page"
RULES = BucketRules(bucket_seconds=10, allowed_lateness=60, dimensions=("global", "topic"), sample_posts=3)


def _server(client: Any, token: str | None, **page: Any) -> AdminServer:
    settings = AdminSettings(host="127.0.0.1", port=0, token=SecretStr(token) if token else None)
    views = AlertPage(AnalystQueries(client, RedisKeys(PREFIX), RULES.bucket_seconds),
                      PageSettings((60, 300), RULES.bucket_seconds, 0.6, **page))
    return AdminServer(settings, RecordingControl(), PipelineMetrics(), views)


async def _events(response: aiohttp.ClientResponse, count: int, within: float = 10.0) -> list[dict[str, str]]:
    """The next ``count`` SSE events (``id``, ``event``, ``data``); comments and the ``retry`` advice skipped."""
    events: list[dict[str, str]] = []
    current: dict[str, str] = {}
    async with asyncio.timeout(within):
        while len(events) < count:
            line = (await response.content.readline()).decode().rstrip("\n")
            if not line:
                if "data" in current:
                    events.append(current)
                current = {}
            elif not line.startswith(":"):
                name, _, value = line.partition(": ")
                current[name] = value
    return events


def _refuse(constant: str) -> None:
    raise ValueError(f"{constant} is not JSON: a browser's JSON.parse rejects it")


def test_with_a_token_the_page_asks_for_it_and_its_cookie_opens_only_the_page(redis_factory):
    async def run() -> None:
        client = redis_factory(async_client=True)
        # unsafe=True: aiohttp's jar, unlike a browser, ignores cookies from IP-address hosts by default.
        jar = aiohttp.CookieJar(unsafe=True)
        async with _server(client, TOKEN) as server, aiohttp.ClientSession(cookie_jar=jar) as http:
            base = server.url
            async with http.get(f"{base}/alerts") as response:
                assert response.status == 401 and 'name="token"' in await response.text()
            async with http.get(f"{base}/alerts/api/values") as response:
                assert response.status == 401
            async with http.get(f"{base}/alerts/static/alerts.css") as response:  # the sign-in page's style
                assert response.status == 200
            async with http.post(f"{base}/alerts/sign-in", data={"token": "wrong"}) as response:
                assert response.status == 401 and "The token was not accepted." in await response.text()
                assert VIEW_COOKIE not in response.cookies
            async with http.post(f"{base}/alerts/sign-in", data={"token": TOKEN}, allow_redirects=False) as response:
                assert response.status == 303 and response.headers["Location"] == "/alerts"
                cookie = response.cookies[VIEW_COOKIE]
                assert cookie["httponly"] and cookie["samesite"] == "Strict" and cookie["path"] == "/alerts"
                assert TOKEN not in cookie.value
            async with http.get(f"{base}/alerts") as response:  # the session now carries the cookie
                page = await response.text()
                assert response.status == 200 and 'id="feed"' in page
                assert "default-src 'self'" in response.headers["Content-Security-Policy"]
            async with http.get(f"{base}/alerts/api/values") as response:
                assert response.status == 200
            # The page cookie is not an admin credential.
            async with http.get(f"{base}/admin/engines") as response:
                assert response.status == 401
        async with _server(client, TOKEN) as server, aiohttp.ClientSession() as http:
            # A script or curl uses the bearer token directly.
            headers = {"Authorization": f"Bearer {TOKEN}"}
            async with http.get(f"{server.url}/alerts/api/values", headers=headers) as response:
                assert response.status == 200
            async with http.get(f"{server.url}/alerts/api/values", cookies={VIEW_COOKIE: "forged"}) as response:
                assert response.status == 401
        await client.aclose()

    asyncio.run(run())


def test_without_a_token_the_loopback_page_is_open_and_the_admin_routes_stay_shut(redis_factory):
    async def run() -> None:
        client = redis_factory(async_client=True)
        async with _server(client, None) as server, aiohttp.ClientSession() as http:
            async with http.get(f"{server.url}/alerts") as response:
                assert response.status == 200
            for name in ("alerts.js", "alerts.css"):
                async with http.get(f"{server.url}/alerts/static/{name}") as response:
                    assert response.status == 200 and len(await response.text()) > 500
            async with http.get(f"{server.url}/alerts/static/..%2F..%2Fconfig.py") as response:
                assert response.status == 404
            async with http.get(f"{server.url}/admin/engines") as response:
                assert response.status == 403  # the worker has no token: its side, said as such
            # A web page that points its own name at 127.0.0.1 (DNS rebinding) is not this machine's user.
            async with http.get(f"{server.url}/alerts/api/values", headers={"Host": "evil.example"}) as response:
                assert response.status == 403
            async with http.get(f"{server.url}/alerts", headers={"Host": "localhost"}) as response:
                assert response.status == 200
        await client.aclose()

    asyncio.run(run())


def test_chart_data_is_the_dimension_values_buckets(redis_factory):
    async def run() -> None:
        client = redis_factory(async_client=True)
        bucket = RULES.bucket_seconds
        if time.time() % bucket > bucket - 3:  # the requests below must see the same bucket still filling
            await asyncio.sleep(bucket - time.time() % bucket + 0.05)
        now = time.time()
        await write_posts(client, PREFIX, RULES, now - now % bucket, {"airline": (10, 9), "weather": (10, 1)})
        async with _server(client, None) as server, aiohttp.ClientSession() as http:
            async with http.get(f"{server.url}/alerts/api/values?seconds=60") as response:
                values = (await response.json())["values"]
            assert [(v["dimension"], v["value"], v["posts"], v["negative_ratio"]) for v in values] == [
                ("topic", "airline", 10, 0.9), ("global", "all", 20, 0.5), ("topic", "weather", 10, 0.1)]
            query = {"dimension": "topic", "value": "airline", "seconds": "60"}
            async with http.get(f"{server.url}/alerts/api/series", params=query) as response:
                series = await response.json()
            assert len(series["points"]) == 6 and series["points"][-1]["negative_ratio"] == 0.9
            # The bucket written a second ago is the one still filling, and says so; the others are closed.
            assert [p["complete"] for p in series["points"]] == [True] * 5 + [False]
            assert [p["negative_ratio"] for p in series["points"][:-1]] == [None] * 5  # no posts: no ratio
            async with http.get(f"{server.url}/alerts/api/series?seconds=x") as response:
                assert response.status == 400
        await client.aclose()

    asyncio.run(run())


def test_the_feed_sends_recent_alerts_then_new_ones_and_resumes_after_a_reconnect(redis_factory):
    async def run() -> None:
        client = redis_factory(async_client=True)
        stream = RedisKeys(PREFIX).alerts
        now = time.time()
        first = await client.xadd(stream, alert_record("topic", "airline", now - 5))
        async with _server(client, None, backlog=10) as server, aiohttp.ClientSession() as http:
            async with http.get(f"{server.url}/alerts/feed") as response:
                assert response.headers["Content-Type"].startswith("text/event-stream")
                [backlog, caught_up] = await _events(response, 2)
                assert backlog["id"] == first and backlog["event"] == "alert"
                # The backlog is complete: the page opens on its newest alert, not the first one replayed.
                assert caught_up["event"] == "caught-up" and json.loads(caught_up["data"]) == {"backlog": 1}
                alert = json.loads(backlog["data"])
                assert alert["dimension"] == "topic" and alert["value"] == "airline" and alert["posts"] == 40
                assert alert["samples"][0]["text"] == "flight cancelled again, awful"
                second = await client.xadd(stream, alert_record("region", "eu", now))
                [live] = await _events(response, 1)
                assert live["id"] == second and json.loads(live["data"])["value"] == "eu"
            # Before its baseline warms up an alert's z is "nan": the event must still be strict JSON.
            third = await client.xadd(stream, {**alert_record("topic", "weather", now), "z": "nan"})
            # The browser reconnects with the last id it saw: only what it missed comes, nothing twice.
            async with http.get(f"{server.url}/alerts/feed", headers={"Last-Event-ID": second}) as response:
                [caught_up, missed] = await _events(response, 2)
                assert json.loads(caught_up["data"]) == {"backlog": 0}  # a resumed feed replays no backlog
                assert missed["id"] == third
                assert json.loads(missed["data"], parse_constant=_refuse)["z"] is None
            # An id this feed never sent: the backlog again, not a reader stuck on failing XREADs.
            async with http.get(f"{server.url}/alerts/feed", headers={"Last-Event-ID": "zzz"}) as response:
                replayed = await _events(response, 4)
                assert [event.get("id") for event in replayed] == [first, second, third, None]
                assert replayed[-1]["event"] == "caught-up"
        await client.aclose()

    asyncio.run(run())


def test_an_open_feed_does_not_hold_up_the_server_stopping(redis_factory):
    async def run() -> float:
        client = redis_factory(async_client=True)
        server = _server(client, None, poll_ms=200)
        await server.start()
        http = aiohttp.ClientSession()
        response = await http.get(f"{server.url}/alerts/feed")
        await response.content.readline()  # connected and streaming
        started = time.monotonic()
        await server.stop()
        stopped = time.monotonic() - started
        response.close()
        await http.close()
        await client.aclose()
        return stopped

    assert asyncio.run(run()) < 5.0


@pytest.mark.parametrize(("env", "flags", "expected"), [
    ({"STREAM_SENTIMENT_ADMIN_TOKEN": "s3cret+/="}, [], "http://127.0.0.1:8081/alerts#token=s3cret%2B%2F%3D"),
    ({"STREAM_SENTIMENT_ADMIN__TOKEN": "t", "STREAM_SENTIMENT_ADMIN__HOST": "0.0.0.0",
      "STREAM_SENTIMENT_ADMIN__PORT": "9000"}, [], "http://127.0.0.1:9000/alerts#token=t"),
    ({}, ["--admin-url", "http://worker-2:8081/"], "http://worker-2:8081/alerts"),
], ids=["token", "wildcard-bind", "no-token"])
def test_page_url_prints_where_the_page_is_with_the_token_in_its_fragment(env, flags, expected, monkeypatch, capsys):
    for name in ("STREAM_SENTIMENT_ADMIN_TOKEN", "STREAM_SENTIMENT_ADMIN__TOKEN", "STREAM_SENTIMENT_ADMIN__HOST",
                 "STREAM_SENTIMENT_ADMIN__PORT"):
        monkeypatch.delenv(name, raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    assert main(["alerts", "--page-url", *flags]) == 0
    out, err = capsys.readouterr()
    assert out == expected + "\n"
    assert ("carries the admin token" in err) == ("#token=" in expected)
