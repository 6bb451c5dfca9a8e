"""The web alert page, served by the worker's HTTP server under ``/alerts``.

* ``GET /alerts`` -- the page: a live alert feed and a chart of one dimension value's negative ratio.
* ``GET /alerts/feed`` -- Server-Sent Events: the last alerts (oldest first), a ``caught-up`` event, then
  each new one as the alert monitor of any worker appends it to ``P:alerts``. Each alert's event id is the
  stream entry id, so a browser that reconnects (``Last-Event-ID``) resumes where it stopped instead of
  missing or repeating alerts.
* ``GET /alerts/api/series`` and ``/alerts/api/values`` -- the chart's data (JSON).

Everything here only reads Redis. Who may read is decided by the admin server's middleware (see
:mod:`stream_sentiment.admin.server`): the same token as the admin routes, presented as a bearer header
or, for a browser, as the cookie its sign-in form sets.
"""

from __future__ import annotations

import asyncio
import html
import json
import logging
import re
import time
from dataclasses import dataclass
from importlib import resources
from typing import Any

from aiohttp import web
from redis.exceptions import RedisError

from stream_sentiment.views.queries import AlertEntry, AnalystQueries

__all__ = [
    "PAGE_PATH", "SIGN_IN_PATH", "STATIC_PREFIX", "VIEW_PREFIX", "AlertPage", "PageSettings", "page_settings",
    "sign_in_page",
]

log = logging.getLogger(__name__)

VIEW_PREFIX = "/alerts"
PAGE_PATH = "/alerts"
SIGN_IN_PATH = "/alerts/sign-in"
STATIC_PREFIX = "/alerts/static/"
# A Redis stream entry id, the only Last-Event-ID this feed ever sends.
STREAM_ID = re.compile(r"\d{1,20}-\d{1,20}")
STATIC_FILES = {"alerts.js": "text/javascript", "chart.js": "text/javascript", "sign-in.js": "text/javascript",
                "alerts.css": "text/css"}
# Scripts and styles come only from this server: alert texts are posts from the internet.
SECURITY_HEADERS = {
    "Content-Security-Policy": "default-src 'self'; img-src 'self' data:; frame-ancestors 'none'; form-action 'self'",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-store",
}


@dataclass(frozen=True)
class PageSettings:
    """What the page needs to know about the deployment."""

    windows_seconds: tuple[int, ...]
    bucket_seconds: int
    ratio_threshold: float
    backlog: int = 50  # alerts a newly opened page shows before the live ones
    keepalive_seconds: float = 15.0  # a comment line this often lets proxies and the server notice a gone client
    poll_ms: int = 1000  # XREAD BLOCK per round: bounds how long a closing server waits for a feed
    max_feeds: int = 64  # concurrent feed connections per worker; each holds a Redis connection while it blocks


def _static(name: str) -> str:
    return resources.files("stream_sentiment.views").joinpath("static", name).read_text(encoding="utf-8")


def sign_in_page(error: str | None = None) -> web.Response:
    """The page a browser gets without the token: one password field, posted to :data:`SIGN_IN_PATH`."""
    message = f'<p class="error">{html.escape(error)}</p>' if error else ""
    body = _static("sign-in.html").replace("<!--MESSAGE-->", message)
    return web.Response(text=body, status=401, content_type="text/html", headers=SECURITY_HEADERS)


class AlertPage:
    """The ``/alerts`` routes of one worker's HTTP server."""

    def __init__(self, queries: AnalystQueries, settings: PageSettings) -> None:
        self.queries = queries
        self.settings = settings
        self._feeds = asyncio.Semaphore(settings.max_feeds)
        self._closing = asyncio.Event()

    def add_routes(self, app: web.Application) -> None:
        app.router.add_get(PAGE_PATH, self._page)
        app.router.add_get(f"{VIEW_PREFIX}/feed", self._feed)
        app.router.add_get(f"{VIEW_PREFIX}/api/series", self._series)
        app.router.add_get(f"{VIEW_PREFIX}/api/values", self._values)
        app.router.add_get(STATIC_PREFIX + "{name}", self._static_file)
        # Open event streams would hold the server's shutdown for its whole timeout; they end on this.
        app.on_shutdown.append(self._on_shutdown)

    async def _on_shutdown(self, app: web.Application) -> None:
        self._closing.set()

    # -- the page ----------------------------------------------------------------------------------------

    async def _page(self, request: web.Request) -> web.Response:
        config = {"windows": list(self.settings.windows_seconds), "bucket_seconds": self.settings.bucket_seconds,
                  "ratio_threshold": self.settings.ratio_threshold}
        body = _static("alerts.html").replace("{{CONFIG}}", html.escape(json.dumps(config), quote=True))
        return web.Response(text=body, content_type="text/html", headers=SECURITY_HEADERS)

    async def _static_file(self, request: web.Request) -> web.Response:
        name = request.match_info["name"]
        if name not in STATIC_FILES:  # a fixed list: no path from the request ever reaches the file system
            raise web.HTTPNotFound()
        return web.Response(text=_static(name), content_type=STATIC_FILES[name], headers=SECURITY_HEADERS)

    # -- JSON for the chart --------------------------------------------------------------------------------

    def _seconds(self, request: web.Request) -> int:
        longest = max(self.settings.windows_seconds)
        try:
            seconds = int(request.query.get("seconds", longest))
        except ValueError:
            raise web.HTTPBadRequest(reason="seconds must be an integer") from None
        # Bounded: a huge span would make one request read thousands of keys.
        return min(max(seconds, self.settings.bucket_seconds), 4 * longest)

    async def _series(self, request: web.Request) -> web.Response:
        dimension, value = request.query.get("dimension", "global"), request.query.get("value", "all")
        if not dimension or not value or len(dimension) + len(value) > 512:
            raise web.HTTPBadRequest(reason="dimension and value are required")
        points = await self.queries.series(dimension, value, self._seconds(request))
        return web.json_response(
            {"dimension": dimension, "value": value, "bucket_seconds": self.settings.bucket_seconds,
             "points": [{"start": p.start, "posts": p.posts, "negative": p.negative,
                         "negative_ratio": p.negative_ratio, "complete": p.complete} for p in points]},
            headers=SECURITY_HEADERS)

    async def _values(self, request: web.Request) -> web.Response:
        """Dimension values seen over the span, most negative first: the chart's choices."""
        rows = await self.queries.most_negative(self._seconds(request), limit=200)
        return web.json_response({"values": [row.as_json() for row in rows]}, headers=SECURITY_HEADERS)

    # -- the live feed ---------------------------------------------------------------------------------------

    async def _feed(self, request: web.Request) -> web.StreamResponse:
        if self._feeds.locked():
            raise web.HTTPServiceUnavailable(reason="too many open alert feeds")
        async with self._feeds:
            response = web.StreamResponse(headers={
                **SECURITY_HEADERS, "Content-Type": "text/event-stream", "X-Accel-Buffering": "no"})
            await response.prepare(request)
            try:
                await self._stream(request, response)
            except ConnectionResetError:
                pass  # the browser went away
            except (RedisError, OSError) as error:
                # The response has started, so no error status can be sent: end it, and the browser
                # reconnects after the advertised retry delay, resuming from its last event id.
                log.warning("alert feed: reading the alert stream failed: %s", error)
            return response

    async def _stream(self, request: web.Request, response: web.StreamResponse) -> None:
        await response.write(b"retry: 2000\n\n")  # reconnect soon after a worker restart
        last_id = request.headers.get("Last-Event-ID", "").strip()
        if not STREAM_ID.fullmatch(last_id):
            last_id = ""  # not an id this feed sent: start over with the backlog rather than fail every read
        if last_id:
            backlog: list[AlertEntry] = []
        else:
            backlog = await self.queries.recent_alerts(self.settings.backlog)
            # Not "$": an alert appended between this read and the first XREAD would be lost.
            last_id = backlog[-1].id if backlog else "0-0"
        for entry in backlog:
            await response.write(_event(entry))
        # The backlog comes oldest first; this tells the page it has them all, so it can open on the newest.
        await response.write(f"event: caught-up\ndata: {json.dumps({'backlog': len(backlog)})}\n\n".encode())
        quiet_since = time.monotonic()
        while not self._closing.is_set():
            try:
                entries = await self.queries.alerts_after(last_id, block_ms=self.settings.poll_ms)
            except (RedisError, OSError) as error:
                # Redis away for a moment: keep the page's connection, say so, try again.
                log.warning("alert feed: reading the alert stream failed: %s", error)
                await response.write(b": redis unavailable, retrying\n\n")
                await asyncio.sleep(1.0)
                continue
            for entry in entries:
                await response.write(_event(entry))
                last_id = entry.id
            if entries:
                quiet_since = time.monotonic()
            elif time.monotonic() - quiet_since >= self.settings.keepalive_seconds:
                await response.write(b": keep-alive\n\n")
                quiet_since = time.monotonic()


def _event(entry: AlertEntry) -> bytes:
    # One data line: json.dumps never emits a raw newline, which would end the event early.
    data = json.dumps(entry.fields, ensure_ascii=False, allow_nan=False)
    return f"id: {entry.id}\nevent: alert\ndata: {data}\n\n".encode()


def page_settings(settings: Any) -> PageSettings:
    """The page's view of the service settings."""
    return PageSettings(tuple(settings.aggregation.windows_seconds), settings.aggregation.bucket_seconds,
                        settings.alerts.ratio_threshold)
