"""The worker's admin HTTP server (aiohttp): open probes, and token-guarded engine management.

``/healthz``, ``/readyz`` and ``/metrics`` are open, as orchestrators and Prometheus scrape them without
secrets. Every other path is refused with 401 unless it carries ``Authorization: Bearer <token>``: deny by
default, so a route added later is guarded without anyone remembering to. A worker started without a token
answers 403 instead, saying so: no token the caller could send would help, and a 401 would read as the
caller's fault. Refusals name the side in ``{"token": ...}`` (:data:`TOKEN_NOT_CONFIGURED`,
:data:`TOKEN_MISSING`, :data:`TOKEN_REJECTED`) for clients such as ``stream-sentiment engines``.
The token is checked before the body is read, bodies are capped at ``max_body_bytes`` (413) before any JSON
parsing, a body that is not a JSON object (malformed or nested too deeply, whatever the limit) is 400, and
version names are checked against the repository's name rule here, so a path such as ``../../etc`` never
reaches the manager.

With an :class:`~stream_sentiment.views.web.AlertPage` the server also serves the read-only alert page
under ``/alerts``. It follows the same rules: where a token is configured, the page and its data need it,
as a bearer header or as the cookie the page's sign-in form sets (derived from the token, valid for
``/alerts`` only, so it never authorises an admin call). Without a token the server is loopback-only
(enforced at start), and the read-only page is then open to this machine, as ``/metrics`` is.

Refusals from the manager (:class:`AdminError`) keep their status and reason; anything else is logged
and answered as a bare 500, so no traceback leaks to the caller. The token is never logged.
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
import json
import logging
from collections.abc import Awaitable, Callable
from types import TracebackType
from typing import Any, Self

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST

from stream_sentiment.admin.control import AdminError, EngineControl, InvalidVersionNameError
from stream_sentiment.config import AdminSettings
from stream_sentiment.engines.manifest import VERSION_PATTERN
from stream_sentiment.metrics import PipelineMetrics
from stream_sentiment.views.web import PAGE_PATH, SIGN_IN_PATH, STATIC_PREFIX, VIEW_PREFIX, AlertPage, sign_in_page

__all__ = ["OPEN_PATHS", "TOKEN_MISSING", "TOKEN_NOT_CONFIGURED", "TOKEN_REJECTED", "AdminSecurityError", "AdminServer",
           "is_loopback"]

log = logging.getLogger(__name__)

# The only paths answered without a token (GET and HEAD only).
OPEN_PATHS = frozenset({"/healthz", "/readyz", "/metrics"})
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
VIEW_COOKIE = "stream_sentiment_view"
VIEW_COOKIE_MAX_AGE_S = 12 * 3600
# Which side a token refusal is about (the ``token`` field of the answer).
TOKEN_NOT_CONFIGURED = "not_configured"  # the worker has none: its admin routes are off  # noqa: S105
TOKEN_MISSING = "missing"  # the request carries none  # noqa: S105
TOKEN_REJECTED = "rejected"  # the request's is not the worker's  # noqa: S105


class AdminSecurityError(ValueError):
    """The admin server would be reachable from the network with no token to guard it."""


def is_loopback(host: str) -> bool:
    """Whether ``host`` only accepts connections from this machine (127.0.0.0/8, ::1 or ``localhost``)."""
    host = host.strip().strip("[]").lower()
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False  # a host name or a wildcard ("", "0.0.0.0" parses, "*" does not): assume exposed


def _is_view_path(path: str) -> bool:
    return path == VIEW_PREFIX or path.startswith(VIEW_PREFIX + "/")


def _error(status: int, reason: str, headers: dict[str, str] | None = None) -> web.Response:
    return web.json_response({"error": reason}, status=status, headers=headers)


class AdminServer:
    """Serves the admin routes for one worker; ``async with AdminServer(...) as server: server.port``."""

    def __init__(self, settings: AdminSettings, control: EngineControl, metrics: PipelineMetrics,
                 views: AlertPage | None = None) -> None:
        token = settings.read_token()  # read once: a token file is a mounted secret, not re-read per request
        if token is None and not is_loopback(settings.host):
            raise AdminSecurityError(
                f"refusing to serve the admin endpoint on non-loopback address {settings.host!r} without a token; "
                "set STREAM_SENTIMENT_ADMIN_TOKEN or --admin-token-file, or bind to 127.0.0.1"
            )
        # Hashed so compare_digest sees equal lengths and the token's length does not leak through timing either.
        self._token_digest = hashlib.sha256(token.encode("utf-8")).digest() if token is not None else None
        # The page's cookie: a MAC of a fixed purpose under the token, so the cookie is not the token itself
        # and rotating the token signs every browser out.
        self._view_cookie = (hmac.new(self._token_digest, b"alert-page", hashlib.sha256).hexdigest()
                             if self._token_digest is not None else None)
        self._views = views
        self._settings = settings
        self._control = control
        self._metrics = metrics
        self._runner: web.AppRunner | None = None
        self._port: int | None = None

    # -- life cycle ---------------------------------------------------------------------------------------

    @property
    def port(self) -> int:
        """The bound port (the one the OS chose when ``settings.port`` is 0); only after :meth:`start`."""
        if self._port is None:
            raise RuntimeError("the admin server is not started")
        return self._port

    @property
    def url(self) -> str:
        """Base URL of the running server, for clients and tests."""
        host = self._settings.host
        return f"http://[{host}]:{self.port}" if ":" in host else f"http://{host}:{self.port}"

    def build_app(self) -> web.Application:
        """The aiohttp application (exposed so tests may drive it in-process)."""
        # +1: the body is then read to one byte past the limit, and _read_object's own check decides, whatever
        # aiohttp version's off-by-one applies.
        app = web.Application(client_max_size=self._settings.max_body_bytes + 1,
                              middlewares=[self._errors, self._auth, self._body_limit])
        app.router.add_get("/healthz", self._healthz)
        app.router.add_get("/readyz", self._readyz)
        app.router.add_get("/metrics", self._metrics_route)
        app.router.add_get("/admin/engines", self._list)
        app.router.add_post("/admin/engines/activate", self._activate)
        app.router.add_post("/admin/engines/rollback", self._rollback)
        if self._views is not None:
            self._views.add_routes(app)
            app.router.add_post(SIGN_IN_PATH, self._sign_in)
        return app

    async def start(self) -> None:
        if self._runner is not None:
            raise RuntimeError("the admin server is already started")
        runner = web.AppRunner(self.build_app(), access_log=log if log.isEnabledFor(logging.DEBUG) else None)
        await runner.setup()
        try:
            await web.TCPSite(runner, self._settings.host, self._settings.port).start()
        except BaseException:
            await runner.cleanup()
            raise
        self._runner = runner
        self._port = int(runner.addresses[0][1])
        log.info("admin endpoint on %s (admin routes %s)", self.url,
                 "token-guarded" if self._token_digest is not None else "disabled: no token configured")

    async def stop(self) -> None:
        runner, self._runner = self._runner, None
        if runner is not None:
            await runner.cleanup()

    async def __aenter__(self) -> Self:
        await self.start()
        return self

    async def __aexit__(self, kind: type[BaseException] | None, error: BaseException | None,
                        trace: TracebackType | None) -> None:
        await self.stop()

    # -- middlewares (first listed = outermost) -------------------------------------------------------------

    @web.middleware
    async def _errors(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        """Every error answer is JSON ``{"error": reason}``; unexpected exceptions never show their text."""
        try:
            return await handler(request)
        except AdminError as error:
            return _error(error.status, error.reason)
        except web.HTTPRequestEntityTooLarge:
            return self._too_large()
        except web.HTTPException as error:
            if error.status < 400:
                raise
            headers = {"Allow": error.headers["Allow"]} if "Allow" in error.headers else None
            return _error(error.status, error.reason, headers)
        except Exception:
            log.exception("admin request %s %s failed", request.method, request.path)
            return _error(500, "internal error")

    @web.middleware
    async def _auth(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        """Bearer token on everything but the open probes, checked before the body is touched."""
        if request.path in OPEN_PATHS and request.method in ("GET", "HEAD"):
            return await handler(request)
        if self._views is not None and _is_view_path(request.path):
            return await self._view_auth(request, handler)
        if self._token_digest is None:
            return web.json_response({"token": TOKEN_NOT_CONFIGURED, "error": (
                "this worker has no admin token configured, so its admin routes are off whatever the request "
                "carries; start the worker with STREAM_SENTIMENT_ADMIN_TOKEN or --admin-token-file to use them")},
                status=403)
        if not self._bearer_valid(request):
            challenge = {"WWW-Authenticate": "Bearer"}
            if not request.headers.get("Authorization", "").strip():
                return web.json_response({"token": TOKEN_MISSING, "error": (
                    "this request carries no admin token; send the worker's token as "
                    "'Authorization: Bearer <token>'")}, status=401, headers=challenge)
            return web.json_response({"token": TOKEN_REJECTED, "error": (
                "this request's admin token is not the one this worker was started with")},
                status=401, headers=challenge)
        return await handler(request)

    def _bearer_valid(self, request: web.Request) -> bool:
        if self._token_digest is None:
            return False
        scheme, _, presented = request.headers.get("Authorization", "").partition(" ")
        digest = hashlib.sha256(presented.strip().encode("utf-8", "surrogatepass")).digest()
        # compare_digest always runs, so a missing header and a wrong token take the same path.
        return hmac.compare_digest(digest, self._token_digest) and scheme.lower() == "bearer"

    async def _view_auth(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        """The alert page: open without a token (loopback only), else the bearer header or the page cookie."""
        if request.path.startswith(STATIC_PREFIX) and request.method in ("GET", "HEAD"):
            return await handler(request)  # the page's own script and style: public, and the sign-in page needs them
        if self._view_cookie is None:
            # Loopback-only then; a Host that is not loopback is a web page that pointed its own name at
            # 127.0.0.1 (DNS rebinding) to read the feed through this machine's browser.
            if not is_loopback(request.url.host or ""):
                return _error(403, "the alert page answers only to a loopback host name without a token")
            return await handler(request)
        if request.path == SIGN_IN_PATH:  # sign-in checks the token itself
            return await handler(request)
        cookie = request.cookies.get(VIEW_COOKIE, "")
        if hmac.compare_digest(cookie.encode("utf-8", "surrogatepass"), self._view_cookie.encode()) or \
                self._bearer_valid(request):
            return await handler(request)
        if request.path == PAGE_PATH and request.method in ("GET", "HEAD"):
            return sign_in_page()
        return _error(401, "sign in at /alerts first, or send the admin bearer token", {"WWW-Authenticate": "Bearer"})

    @web.middleware
    async def _body_limit(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        """A declared oversized body is refused before a byte of it is read; chunked ones in ``_read_object``."""
        length = request.content_length
        if length is not None and length > self._settings.max_body_bytes:
            return self._too_large()
        return await handler(request)

    def _too_large(self) -> web.Response:
        return _error(413, f"request body is larger than {self._settings.max_body_bytes} bytes")

    async def _read_object(self, request: web.Request, allowed: frozenset[str]) -> dict[str, Any]:
        """The body as a JSON object with only ``allowed`` keys; empty body = ``{}``. Raises 400/413."""
        body = await request.read()  # aiohttp stops at client_max_size, so a chunked body cannot grow unbounded
        if len(body) > self._settings.max_body_bytes:
            raise web.HTTPRequestEntityTooLarge(self._settings.max_body_bytes, len(body))
        if not body.strip():
            return {}
        try:
            data = json.loads(body)
        except ValueError:  # JSONDecodeError and UnicodeDecodeError
            raise AdminError("the request body is not valid JSON") from None
        except RecursionError:
            # "[[[[..." or '{"a": {"a": ...': the parser recurses per level and gives up (at the interpreter's
            # recursion limit) before it could find the body malformed, whatever max_body_bytes allows.
            raise AdminError("the request body is not valid JSON or is nested too deeply; "
                             "expected a flat JSON object") from None
        if not isinstance(data, dict):
            raise AdminError("the request body must be a JSON object")
        unknown = sorted(set(data) - allowed)
        if unknown:
            raise AdminError(f"unknown field(s) {unknown}; expected only {sorted(allowed)}")
        return data

    # -- routes ---------------------------------------------------------------------------------------------

    async def _healthz(self, request: web.Request) -> web.Response:
        return web.json_response({"status": "ok"})

    async def _readyz(self, request: web.Request) -> web.Response:
        ready, details = self._control.readiness()
        return web.json_response({"ready": ready, "details": details}, status=200 if ready else 503)

    async def _metrics_route(self, request: web.Request) -> web.Response:
        return web.Response(body=self._metrics.exposition(), headers={"Content-Type": CONTENT_TYPE_LATEST})

    async def _list(self, request: web.Request) -> web.Response:
        return web.json_response(self._control.list_engines())

    async def _activate(self, request: web.Request) -> web.Response:
        data = await self._read_object(request, frozenset({"version", "route"}))
        version = data.get("version")
        if not isinstance(version, str):
            raise AdminError('the body must be {"version": "<name>"} with a string version')
        # fullmatch, not match: "$" would accept a trailing newline ("v1\n").
        if VERSION_PATTERN.fullmatch(version) is None:
            raise InvalidVersionNameError("version must be a plain name inside the engine repository "
                             f"(letters, digits, '.', '_', '-'; at most 64), not {version[:80]!r}")
        route = self._route(data)
        log.info("admin: activation of engine version %r (route %s) requested from %s", version,
                 route or "default", request.remote)
        # A route only when named: a worker without routing has one, and its control takes none.
        result = await (self._control.activate(version) if route is None
                        else self._control.activate(version, route=route))  # type: ignore[call-arg]
        log.info("admin: engine version %r is active", version)
        return web.json_response(result)

    @staticmethod
    def _route(data: dict[str, Any]) -> str | None:
        route = data.get("route")
        if route is not None and (not isinstance(route, str) or VERSION_PATTERN.fullmatch(route) is None):
            raise AdminError("route must be a route's name (its model folder, a plain name)")
        return route

    async def _sign_in(self, request: web.Request) -> web.Response:
        """The page's sign-in form: a right token gets the page cookie and goes back to the page."""
        if self._token_digest is None or self._view_cookie is None:
            raise web.HTTPFound(PAGE_PATH)  # nothing to sign in to: the page is open
        form = await request.post()
        presented = str(form.get("token", "")).strip()
        digest = hashlib.sha256(presented.encode("utf-8", "surrogatepass")).digest()
        if not hmac.compare_digest(digest, self._token_digest):
            log.info("alert page: a sign-in from %s was refused", request.remote)
            return sign_in_page("The token was not accepted.")
        response = web.HTTPSeeOther(PAGE_PATH)
        # HttpOnly: scripts (and a post's text, were it ever injected) cannot read it; Strict: no other site's
        # page can make the browser send it.
        response.set_cookie(VIEW_COOKIE, self._view_cookie, max_age=VIEW_COOKIE_MAX_AGE_S, path=VIEW_PREFIX,
                            httponly=True, samesite="Strict")
        raise response

    async def _rollback(self, request: web.Request) -> web.Response:
        route = self._route(await self._read_object(request, frozenset({"route"})))
        log.info("admin: rollback (route %s) requested from %s", route or "default", request.remote)
        result = await (self._control.rollback() if route is None
                        else self._control.rollback(route=route))  # type: ignore[call-arg]
        log.info("admin: rolled back")
        return web.json_response(result)
