"""The seam between the admin HTTP server and the worker's engine management.

The server (``admin.server``) only parses requests, checks the token and maps
errors to status codes; everything it does goes through :class:`EngineControl`,
which ``admin.engines.EngineManager`` implements. Tests of the HTTP layer can
therefore run against a real manager without a broker, and the manager is
tested without HTTP.
"""

from __future__ import annotations

from enum import StrEnum
from typing import Any, Protocol


class EngineState(StrEnum):
    """Where a loaded version is in its life; transitions are guarded by the manager."""

    LOADING = "LOADING"  # checksums verified, session/context being created and warmed up
    WARM = "WARM"  # loaded and warmed up: a candidate being validated, or the standby kept for rollback
    ACTIVE = "ACTIVE"  # scoring live batches
    DRAINING = "DRAINING"  # replaced: finishing the batches it had already started
    RETIRED = "RETIRED"  # released (or never loaded): known to the repository only


class AdminError(Exception):
    """A refused admin request; ``status`` is the HTTP status the server answers with."""

    status = 400

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class InvalidVersionNameError(AdminError):
    status = 400  # not a plain name (e.g. "../../etc"): never looked up on disk


class UnknownVersionError(AdminError):
    status = 404


class ActivationInProgressError(AdminError):
    status = 409


class NothingToRollBackError(AdminError):
    status = 409


class ValidationFailedError(AdminError):
    status = 422  # the candidate was loaded but did not pass; the active engine keeps serving


class EngineControl(Protocol):
    """What the admin routes call. Every method returns a JSON-ready dict."""

    def list_engines(self) -> dict[str, Any]:
        """``{"active": version, "engines": [{"version", "state", ...}, ...]}``."""
        ...

    async def activate(self, version: str) -> dict[str, Any]:
        """Load, warm up, validate and cut over to ``version``; raises an :class:`AdminError` when refused.

        A routed worker's control (``admin.routes``) also takes ``route=``: the server passes it only
        when the request names one.
        """
        ...

    async def rollback(self) -> dict[str, Any]:
        """Cut back to the previous (standby) engine; raises :class:`NothingToRollBackError` without one."""
        ...

    def readiness(self) -> tuple[bool, dict[str, Any]]:
        """Whether the worker can score posts now, and why not (streams lost, consumption paused...)."""
        ...
