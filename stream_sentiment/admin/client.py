"""A stdlib (urllib) client of the admin endpoint, for ``stream-sentiment engines`` and scripts.

Stdlib only, so the CLI needs no HTTP library beyond what the worker already has, and starts fast.
Refusals are answers, not errors: every method returns ``(status, json)`` whatever the status, so the
caller decides what a 409 means; only an unreachable server raises (:class:`AdminUnreachableError`).
"""

from __future__ import annotations

import http.client
import json
import urllib.error
import urllib.request
from typing import Any
from urllib.parse import urlsplit

__all__ = ["DEFAULT_TIMEOUT_S", "AdminClient", "AdminUnreachableError"]

# Activation loads, warms up and validates an engine before it answers; minutes on a slow CPU.
DEFAULT_TIMEOUT_S = 300.0


class AdminUnreachableError(ConnectionError):
    """No HTTP answer: nothing listens there, the connection broke, or the call timed out."""


class AdminClient:
    """Calls one worker's admin endpoint; ``token`` is sent as ``Authorization: Bearer``."""

    def __init__(self, base_url: str, token: str | None, timeout: float = DEFAULT_TIMEOUT_S) -> None:
        parts = urlsplit(base_url)
        if parts.scheme not in ("http", "https") or not parts.netloc:
            raise ValueError(f"admin URL must be http(s)://host:port, not {base_url!r}")
        self.base_url = base_url.rstrip("/")
        self._token = token
        self.timeout = timeout

    def __repr__(self) -> str:  # never the token
        return f"AdminClient({self.base_url!r})"

    def engines(self) -> tuple[int, dict[str, Any]]:
        """``GET /admin/engines``: the repository's versions, their states and the active one."""
        return self._call("GET", "/admin/engines")

    def activate(self, version: str, route: str | None = None) -> tuple[int, dict[str, Any]]:
        """``POST /admin/engines/activate``; answers once the version is active or refused.

        ``route``: which route's engine (``engine.routes``, a model name); unset = the default route.
        """
        body = {"version": version} if route is None else {"version": version, "route": route}
        return self._call("POST", "/admin/engines/activate", body)

    def rollback(self, route: str | None = None) -> tuple[int, dict[str, Any]]:
        """``POST /admin/engines/rollback``: back to the standby engine (of ``route``, else the default route)."""
        return self._call("POST", "/admin/engines/rollback", {} if route is None else {"route": route})

    def _call(self, method: str, path: str, body: dict[str, Any] | None = None) -> tuple[int, dict[str, Any]]:
        headers = {"Accept": "application/json"}
        if self._token is not None:
            headers["Authorization"] = f"Bearer {self._token}"
        data = None
        if body is not None:
            data = json.dumps(body).encode("utf-8")
            headers["Content-Type"] = "application/json"
        # The scheme is checked in __init__ (http/https only), so no file:// or ftp:// here.
        request = urllib.request.Request(self.base_url + path, data=data, headers=headers, method=method)  # noqa: S310
        try:
            with urllib.request.urlopen(request, timeout=self.timeout) as response:  # noqa: S310
                return response.status, _decode(response.read())
        except urllib.error.HTTPError as error:  # a status >= 400 is an answer
            with error:
                return error.code, _decode(error.read())
        except (urllib.error.URLError, OSError, http.client.HTTPException) as error:  # refused, reset, timed out...
            reason = getattr(error, "reason", error)
            raise AdminUnreachableError(f"cannot reach the admin endpoint at {self.base_url}: {reason}") from error


def _decode(raw: bytes) -> dict[str, Any]:
    """The answer's JSON object; anything else (a proxy's HTML page) becomes ``{"error": <its start>}``."""
    try:
        data = json.loads(raw)
    except ValueError:
        return {"error": raw[:200].decode("utf-8", "replace").strip() or "empty answer"}
    return data if isinstance(data, dict) else {"result": data}
