"""Hot swap per route: one :class:`EngineManager` per route of a routed worker (``engine.routes``).

Each route's engine is loaded, validated (against that route's own shadow sample and tokenizer), cut
over and rolled back on its own scheduler; the other routes keep scoring on their engines throughout.
The admin calls name the route (``{"version": "v2", "route": "multilingual-sentiment"}``); without one
they act on the default route, as on a worker without routing.
"""

from __future__ import annotations

from typing import Any

from stream_sentiment.admin.control import AdminError
from stream_sentiment.admin.engines import EngineManager, OpenEngine
from stream_sentiment.config import Settings
from stream_sentiment.worker import Worker


class UnknownRouteError(AdminError):
    status = 404


class RoutedEngineManager:
    """Implements :class:`stream_sentiment.admin.control.EngineControl` for every route of one worker."""

    def __init__(self, settings: Settings, worker: Worker, open_engine: OpenEngine, redis: Any = None) -> None:
        self.worker = worker
        self.managers = {name: EngineManager(settings, worker, open_engine, redis, route=name)
                         for name in worker.routes}
        self.default = self.managers[worker.scheduler.route]

    def manager(self, route: str | None) -> EngineManager:
        if route is None:
            return self.default
        found = self.managers.get(route)
        if found is None:
            raise UnknownRouteError(f"no route {route!r}; routes: {sorted(self.managers)}")
        return found

    def list_engines(self) -> dict[str, Any]:
        """The default route's versions, as without routing, and every route's under ``routes``."""
        return {**self.default.list_engines(), "default_route": self.default.route,
                "routes": {name: manager.list_engines() for name, manager in self.managers.items()}}

    async def activate(self, version: str, route: str | None = None) -> dict[str, Any]:
        manager = self.manager(route)
        return {**await manager.activate(version), "route": manager.route}

    async def rollback(self, route: str | None = None) -> dict[str, Any]:
        manager = self.manager(route)
        return {**await manager.rollback(), "route": manager.route}

    def readiness(self) -> tuple[bool, dict[str, Any]]:
        ready, details = self.default.readiness()  # the worker's readiness covers every route's engine
        details["activating"] = {name: m.activating for name, m in self.managers.items() if m.activating}
        return ready, details

    async def close(self) -> None:
        for manager in self.managers.values():
            await manager.close()
