"""The admin HTTP server against a real socket: open probes, the token, body limits, version names, errors."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from pydantic import SecretStr

from stream_sentiment.admin.control import (
    ActivationInProgressError,
    EngineState,
    NothingToRollBackError,
    UnknownVersionError,
    ValidationFailedError,
)
from stream_sentiment.admin.server import AdminSecurityError, AdminServer, is_loopback
from stream_sentiment.config import AdminSettings
from stream_sentiment.metrics import PipelineMetrics

TOKEN = "s3cret-admin-token"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
MAX_BODY = 256


class RecordingControl:
    """records calls; the real EngineManager is tested elsewhere."""

    def __init__(self, *, ready: bool = True, activate_error: Exception | None = None,
                 rollback_error: Exception | None = None, list_error: Exception | None = None) -> None:
        self.calls: list[tuple[str, ...]] = []
        self.ready = ready
        self.activate_error = activate_error
        self.rollback_error = rollback_error
        self.list_error = list_error
        self.active = "v1"

    def list_engines(self) -> dict[str, Any]:
        self.calls.append(("list",))
        if self.list_error is not None:
            raise self.list_error
        return {"active": self.active, "engines": [
            {"version": "v1", "state": EngineState.ACTIVE if self.active == "v1" else EngineState.WARM},
            {"version": "v2", "state": EngineState.ACTIVE if self.active == "v2" else EngineState.RETIRED},
        ]}

    async def activate(self, version: str) -> dict[str, Any]:
        self.calls.append(("activate", version))
        if self.activate_error is not None:
            raise self.activate_error
        previous, self.active = self.active, version
        return {"active": version, "previous": previous}

    async def rollback(self) -> dict[str, Any]:
        self.calls.append(("rollback",))
        if self.rollback_error is not None:
            raise self.rollback_error
        self.active = "v1"
        return {"active": "v1"}

    def readiness(self) -> tuple[bool, dict[str, Any]]:
        return self.ready, {"engine": self.active, "consuming": self.ready}

    @property
    def activations(self) -> list[tuple[str, ...]]:
        return [call for call in self.calls if call[0] == "activate"]


def settings(**values: Any) -> AdminSettings:
    values.setdefault("host", "127.0.0.1")
    values.setdefault("port", 0)
    values.setdefault("max_body_bytes", MAX_BODY)
    if "token" not in values and "token_file" not in values:
        values["token"] = SecretStr(TOKEN)
    return AdminSettings(**values)


def request(control: RecordingControl, method: str, path: str, *, admin: AdminSettings | None = None,
            **kwargs: Any) -> tuple[int, Any, dict[str, str]]:
    """Start a server on a free port, make one request, stop it: (status, JSON or text, headers)."""

    async def scenario() -> tuple[int, Any, dict[str, str]]:
        async with AdminServer(admin or settings(), control, PipelineMetrics()) as server:
            assert server.port != 0
            async with aiohttp.ClientSession() as session, \
                    session.request(method, f"http://127.0.0.1:{server.port}{path}", **kwargs) as response:
                text = await response.text()
                body = await response.json() if response.content_type == "application/json" else text
                return response.status, body, dict(response.headers)

    return asyncio.run(scenario())


# -- open routes ------------------------------------------------------------------------------------------


def test_healthz_is_open() -> None:
    status, body, _ = request(RecordingControl(), "GET", "/healthz")
    assert (status, body) == (200, {"status": "ok"})


@pytest.mark.parametrize(("ready", "expected"), [(True, 200), (False, 503)])
def test_readyz_reports_the_controls_readiness(ready: bool, expected: int) -> None:
    status, body, _ = request(RecordingControl(ready=ready), "GET", "/readyz")
    assert status == expected
    assert body == {"ready": ready, "details": {"engine": "v1", "consuming": ready}}


def test_metrics_is_open_and_prometheus_formatted() -> None:
    status, body, headers = request(RecordingControl(), "GET", "/metrics")
    assert status == 200
    assert headers["Content-Type"].startswith("text/plain")
    assert "stream_sentiment_" in body


# -- the token --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("headers", [
    {},
    {"Authorization": "Bearer wrong-token"},
    {"Authorization": f"Bearer {TOKEN}x"},
    {"Authorization": f"Basic {TOKEN}"},
    {"Authorization": TOKEN},
    {"Authorization": "Bearer"},
], ids=["none", "wrong", "longer", "basic", "no-scheme", "empty"])
def test_admin_routes_refuse_without_the_right_token(headers: dict[str, str]) -> None:
    control = RecordingControl()
    status, body, response_headers = request(control, "GET", "/admin/engines", headers=headers)
    assert status == 401
    assert response_headers["WWW-Authenticate"] == "Bearer"
    # The answer says whether the request had no token or the wrong one: the caller's side either way.
    if headers:
        assert body == {"token": "rejected",
                        "error": "this request's admin token is not the one this worker was started with"}
    else:
        assert body["token"] == "missing" and "carries no admin token" in body["error"]
    assert control.calls == []


def test_the_right_token_lists_engines() -> None:
    control = RecordingControl()
    status, body, _ = request(control, "GET", "/admin/engines", headers={"Authorization": f"bearer  {TOKEN} "})
    assert status == 200
    assert body["active"] == "v1"
    assert [(e["version"], e["state"]) for e in body["engines"]] == [("v1", "ACTIVE"), ("v2", "RETIRED")]


def test_token_from_a_file(tmp_path: Path) -> None:
    token_file = tmp_path / "token"
    token_file.write_text(f"{TOKEN}\n")
    status, _, _ = request(RecordingControl(), "GET", "/admin/engines", headers=AUTH,
                           admin=settings(token_file=token_file))
    assert status == 200


@pytest.mark.parametrize("headers", [{}, {"Authorization": "Bearer anything"}], ids=["no-token", "a-token"])
def test_without_a_configured_token_every_admin_call_is_refused_as_the_workers_side(headers: dict[str, str]) -> None:
    control = RecordingControl()
    status, body, response_headers = request(control, "POST", "/admin/engines/activate", json={"version": "v2"},
                                             headers=headers, admin=AdminSettings(port=0))
    # 403, not 401: no token the caller could send would help, so nothing asks it to authenticate.
    assert status == 403 and "WWW-Authenticate" not in response_headers
    assert body["token"] == "not_configured"
    assert body["error"].startswith("this worker has no admin token configured, so its admin routes are off")
    assert "STREAM_SENTIMENT_ADMIN_TOKEN" in body["error"]
    assert control.calls == []


def test_unknown_paths_are_guarded_too() -> None:
    # Deny by default: an unauthenticated caller cannot even learn which admin routes exist.
    assert request(RecordingControl(), "GET", "/admin/secret")[0] == 401
    assert request(RecordingControl(), "POST", "/healthz")[0] == 401
    status, body, _ = request(RecordingControl(), "GET", "/admin/secret", headers=AUTH)
    assert status == 404
    assert "error" in body


def test_wrong_method_is_405_json() -> None:
    status, body, headers = request(RecordingControl(), "GET", "/admin/engines/activate", headers=AUTH)
    assert status == 405
    assert "error" in body
    assert "POST" in headers["Allow"]


def test_the_token_is_never_logged(caplog: pytest.LogCaptureFixture, tmp_path: Path) -> None:
    with caplog.at_level(logging.DEBUG):
        request(RecordingControl(), "POST", "/admin/engines/activate", json={"version": "v2"}, headers=AUTH)
        request(RecordingControl(), "GET", "/admin/engines", headers={"Authorization": f"Bearer {TOKEN}-wrong"})
        request(RecordingControl(list_error=RuntimeError("boom")), "GET", "/admin/engines", headers=AUTH)
    assert "activation of engine version 'v2'" in caplog.text
    assert TOKEN not in caplog.text


# -- activation and rollback ------------------------------------------------------------------------------


def test_activate_returns_the_controls_answer() -> None:
    control = RecordingControl()
    status, body, _ = request(control, "POST", "/admin/engines/activate", json={"version": "v2"}, headers=AUTH)
    assert (status, body) == (200, {"active": "v2", "previous": "v1"})
    assert control.activations == [("activate", "v2")]


@pytest.mark.parametrize("version", [
    "../../etc", "..", ".", "a/b", "/etc/passwd", "%2e%2e%2fetc", "..\\..\\windows", "v1\n", "v1/../v2",
    "", " v1", "x" * 65, "~root", ".hidden",
])
def test_path_like_versions_are_refused_before_the_manager(version: str) -> None:
    control = RecordingControl()
    status, body, _ = request(control, "POST", "/admin/engines/activate", json={"version": version}, headers=AUTH)
    assert status == 400
    assert "plain name" in body["error"]
    assert control.calls == []


@pytest.mark.parametrize(("error", "status"), [
    (UnknownVersionError("no version 'v9' in the repository"), 404),
    (ActivationInProgressError("v3 is being activated"), 409),
    (ValidationFailedError("accuracy 0.41 < 0.85 on the validation set; v1 keeps serving"), 422),
])
def test_control_refusals_keep_their_status_and_reason(error: Exception, status: int) -> None:
    control = RecordingControl(activate_error=error)
    got, body, _ = request(control, "POST", "/admin/engines/activate", json={"version": "v9"}, headers=AUTH)
    assert (got, body) == (status, {"error": str(error)})


def test_rollback_with_an_empty_body_or_an_empty_object() -> None:
    for kwargs in ({}, {"json": {}}):
        control = RecordingControl()
        status, body, _ = request(control, "POST", "/admin/engines/rollback", headers=AUTH, **kwargs)
        assert (status, body) == (200, {"active": "v1"})
        assert control.calls == [("rollback",)]


class RoutedControl(RecordingControl):
    """A routed worker's control (``admin.routes``): activate and rollback take a route."""

    async def activate(self, version: str, route: str | None = None) -> dict[str, Any]:  # type: ignore[override]
        self.calls.append(("activate", version, str(route)))
        return {"active": version, "route": route}

    async def rollback(self, route: str | None = None) -> dict[str, Any]:  # type: ignore[override]
        self.calls.append(("rollback", str(route)))
        return {"active": "v1", "route": route}


def test_a_named_route_is_passed_on_and_a_malformed_one_refused_before_the_control() -> None:
    control = RoutedControl()
    for path, body in (("activate", {"version": "v2", "route": "multilingual-sentiment"}),
                       ("rollback", {"route": "multilingual-sentiment"}), ("activate", {"version": "v3"})):
        status, _, _ = request(control, "POST", f"/admin/engines/{path}", json=body, headers=AUTH)
        assert status == 200
    assert control.calls == [("activate", "v2", "multilingual-sentiment"), ("rollback", "multilingual-sentiment"),
                             ("activate", "v3", "None")]
    for body in ({"version": "v2", "route": 5}, {"version": "v2", "route": "../x"}, {"route": ""}):
        path = "activate" if "version" in body else "rollback"
        status, answer, _ = request(control, "POST", f"/admin/engines/{path}", json=body, headers=AUTH)
        assert (status, "route must be" in answer["error"]) == (400, True)
    assert len(control.calls) == 3


def test_rollback_without_a_standby_is_409() -> None:
    control = RecordingControl(rollback_error=NothingToRollBackError("no previous engine"))
    status, body, _ = request(control, "POST", "/admin/engines/rollback", headers=AUTH)
    assert (status, body) == (409, {"error": "no previous engine"})


@pytest.mark.parametrize("payload", [
    b"{not json", b"\xff\xfe", b'"v2"', b'["v2"]', b"{}", b'{"version": 2}', b'{"version": null}',
    b'{"version": "v2", "force": true}',
], ids=["broken", "not-utf8", "string", "list", "missing", "number", "null", "extra-field"])
def test_malformed_bodies_are_400(payload: bytes) -> None:
    control = RecordingControl()
    status, body, _ = request(control, "POST", "/admin/engines/activate", data=payload,
                              headers={**AUTH, "Content-Type": "application/json"})
    assert status == 400
    assert "error" in body
    assert control.calls == []


DEFAULT_MAX_BODY = AdminSettings().max_body_bytes
RAISED_MAX_BODY = 1 << 20


@pytest.mark.parametrize(("payload", "max_body"), [
    (b"[" * 4000, DEFAULT_MAX_BODY),
    (b'{"a":' * 800, DEFAULT_MAX_BODY),  # as deep as 4 KiB allows
    (b"[" * 2000 + b"]" * 2000, DEFAULT_MAX_BODY),  # well-formed, but an array nested 2,000 deep
    (b'{"version": ' + b"[" * 2000 + b"]" * 2000 + b"}", DEFAULT_MAX_BODY),
    (b"[" * 100_000, RAISED_MAX_BODY),
    (b'{"a":' * 100_000, RAISED_MAX_BODY),
], ids=["open-arrays", "open-objects", "closed-arrays", "deep-version", "open-arrays-1MiB", "open-objects-1MiB"])
def test_deeply_nested_bodies_are_400_not_500(payload: bytes, max_body: int) -> None:
    assert len(payload) <= max_body  # within the limit: refused by parsing, not by the 413 check
    control = RecordingControl()
    status, body, _ = request(control, "POST", "/admin/engines/activate", data=payload,
                              headers={**AUTH, "Content-Type": "application/json"},
                              admin=settings(max_body_bytes=max_body))
    assert status == 400
    # Past the parser's depth: "... or is nested too deeply"; a shallower malformed one: the plain message.
    assert body["error"].startswith("the request body is not valid JSON")
    assert control.calls == []


def test_a_deeply_nested_rollback_body_is_400() -> None:
    control = RecordingControl()
    status, body, _ = request(control, "POST", "/admin/engines/rollback", data=b"[" * 4000, headers=AUTH,
                              admin=settings(max_body_bytes=DEFAULT_MAX_BODY))
    assert status == 400
    assert "nested too deeply" in body["error"]
    assert control.calls == []


# -- body size --------------------------------------------------------------------------------------------


def _padded(size: int) -> bytes:
    body = b'{"version": "v2"}'
    return body + b" " * (size - len(body))


def test_a_body_at_the_limit_is_accepted() -> None:
    control = RecordingControl()
    status, _, _ = request(control, "POST", "/admin/engines/activate", data=_padded(MAX_BODY), headers=AUTH)
    assert status == 200
    assert control.activations == [("activate", "v2")]


def test_an_oversized_body_is_413_and_nothing_is_activated() -> None:
    control = RecordingControl()
    status, body, _ = request(control, "POST", "/admin/engines/activate", data=_padded(MAX_BODY + 1), headers=AUTH)
    assert status == 413
    assert str(MAX_BODY) in body["error"]
    assert control.calls == []


def test_an_oversized_chunked_body_is_413() -> None:
    async def chunks() -> AsyncIterator[bytes]:
        yield b'{"version": "v2"'
        for _ in range(MAX_BODY):
            yield b" "
        yield b"}"

    control = RecordingControl()
    status, _, _ = request(control, "POST", "/admin/engines/activate", data=chunks(), headers=AUTH)
    assert status == 413
    assert control.calls == []


def test_the_token_is_checked_before_the_body() -> None:
    # An unauthenticated caller gets 401, never a hint from body handling.
    status, _, _ = request(RecordingControl(), "POST", "/admin/engines/activate", data=_padded(MAX_BODY * 4))
    assert status == 401


# -- failures and binding ---------------------------------------------------------------------------------


def test_an_unexpected_error_is_500_without_details(caplog: pytest.LogCaptureFixture) -> None:
    control = RecordingControl(list_error=RuntimeError("database password is hunter2"))
    with caplog.at_level(logging.ERROR):
        status, body, _ = request(control, "GET", "/admin/engines", headers=AUTH)
    assert (status, body) == (500, {"error": "internal error"})
    assert "hunter2" in caplog.text  # logged for the operator, not sent to the caller


def test_refuses_a_non_loopback_address_without_a_token() -> None:
    with pytest.raises(AdminSecurityError, match=r"non-loopback address '0\.0\.0\.0'"):
        AdminServer(AdminSettings(host="0.0.0.0", port=0), RecordingControl(), PipelineMetrics())


def test_starts_on_a_non_loopback_address_with_a_token() -> None:
    status, _, _ = request(RecordingControl(), "GET", "/admin/engines", headers=AUTH,
                           admin=settings(host="0.0.0.0"))
    assert status == 200


def test_port_is_only_known_once_started() -> None:
    server = AdminServer(settings(), RecordingControl(), PipelineMetrics())
    with pytest.raises(RuntimeError):
        _ = server.port


@pytest.mark.parametrize(("host", "loopback"), [
    ("127.0.0.1", True), ("127.3.2.1", True), ("::1", True), ("[::1]", True), ("localhost", True),
    ("LOCALHOST", True), ("0.0.0.0", False), ("::", False), ("10.1.2.3", False), ("example.com", False),
    ("", False),
])
def test_is_loopback(host: str, loopback: bool) -> None:
    assert is_loopback(host) is loopback
