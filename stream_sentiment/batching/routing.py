"""Language routing: which engine scores a post of each language (``engine.routes``).

A route is one engine model and the posts of the languages routed to it; each route has its own
scheduler (tokenizer, length buckets, slots) in the worker, so a batch never mixes engines. Routes are
named by their model folder, not by the version, so a route keeps its name (and its metrics series)
across a hot swap. One version per model: two languages routed to two versions of one model would be
two routes with one name, refused here.

The default route is the engine the service is configured with (``engine.model``/``engine.version``):
every language ``engine.routes`` does not name goes there. With no routes there is only that one,
and the worker runs exactly as before routing existed.

Resolving the plan reads only the repository's folders; whether an engine's manifest lists the
languages routed to it is checked when the engines are open (:meth:`RoutePlan.check_manifest`):
refused, not warned, as an English WordPiece vocabulary turns Chinese text into unknown tokens and
scores it with confidence, silently, and the manifest is the one statement of what the engine was
built and measured for. The default route is checked only for the languages named for it: an
unnamed language cannot be checked against anything.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TypeVar

from stream_sentiment.batching.tokenizer import PostTokenizer
from stream_sentiment.config import EngineSettings, Settings
from stream_sentiment.engines.base import Engine
from stream_sentiment.engines.manifest import EngineManifest, EngineRepository, EngineRepositoryError

__all__ = ["RoutePlan", "RouteTarget", "RoutedEngines", "plan_routes", "route_settings", "split_by_route"]

Item = TypeVar("Item")
_NUMBER = re.compile(r"(\d+)")


@dataclass(frozen=True)
class RouteTarget:
    """One route: the engine model/version its posts go to and the languages named for it."""

    name: str
    model: str
    version: str
    languages: tuple[str, ...] = ()


@dataclass(frozen=True)
class RoutePlan:
    """Language -> route name, and each route's target; ``default`` takes every language not named."""

    default: str
    targets: Mapping[str, RouteTarget]
    by_language: Mapping[str, str] = field(default_factory=dict)

    @property
    def routed(self) -> bool:
        """Whether more than one engine serves (else the worker runs one scheduler, as without routing)."""
        return len(self.targets) > 1

    def route_of(self, language: str) -> str:
        return self.by_language.get(language, self.default)

    def check_manifest(self, route: str, manifest: EngineManifest) -> None:
        """Refuse an engine for ``route`` that is not the planned model/version or lacks a routed language."""
        target = self.targets[route]
        if (manifest.model, manifest.version) != (target.model, target.version):
            raise EngineRepositoryError(
                f"route {route!r} is planned for {target.model}/{target.version}, "
                f"but its engine is {manifest.model}/{manifest.version}")
        missing = sorted(set(target.languages) - set(manifest.languages))
        if missing:
            raise EngineRepositoryError(
                f"engine.routes sends {missing} to {target.model}/{target.version}, whose manifest lists only "
                f"{list(manifest.languages)}: it was not built or measured for them. Route them to an engine "
                "that lists them (e.g. multilingual-sentiment for zh)")


def latest_version(versions: Sequence[str]) -> str:
    """The newest of ``versions`` by natural order (``v10`` after ``v9``)."""
    return max(versions, key=lambda name: [int(part) if part.isdigit() else part for part in _NUMBER.split(name)])


def version_for(engine: EngineSettings, model: str) -> str:
    """The version a bare model name means: the one ``engine`` serves if it is ``engine.model``, else the
    repository's newest (``engine.routes``, ``demo --engine`` and the CPU bench read a bare name alike)."""
    if model == engine.model:
        return engine.version
    versions = EngineRepository(engine.repository, model).versions()
    if not versions:
        raise EngineRepositoryError(f"no model {model!r} in {engine.repository} "
                                    f"(models there: {_models(engine.repository)})")
    return latest_version(versions)


def plan_routes(settings: Settings) -> RoutePlan:
    """The routes ``settings`` ask for, versions resolved; unknown models or versions refused clearly."""
    engine = settings.engine
    default = RouteTarget(engine.model, engine.model, engine.version)
    targets: dict[str, RouteTarget] = {default.name: default}
    by_language: dict[str, str] = {}
    for language, spec in sorted(engine.routes.items()):
        model, _, version = spec.partition("/")
        repository = EngineRepository(engine.repository, model)
        if not version:
            try:
                version = version_for(engine, model)
            except EngineRepositoryError as error:
                raise EngineRepositoryError(f"engine.routes[{language!r}]: {error}") from None
        try:
            repository.path_of(version)
        except EngineRepositoryError as error:
            raise EngineRepositoryError(f"engine.routes[{language!r}] = {spec!r}: {error}") from error
        known = targets.get(model)
        if known is not None and known.version != version:
            raise EngineRepositoryError(
                f"engine.routes[{language!r}] = {spec!r}, but {model} is already served as {model}/{known.version}: "
                "one version per model (a route is named by its model, and hot-swapped as one)")
        languages = (*known.languages, language) if known is not None else (language,)
        targets[model] = RouteTarget(model, model, version, languages)
        by_language[language] = model
    return RoutePlan(default.name, targets, by_language)


def _models(root: Path) -> list[str]:
    return sorted(p.name for p in root.iterdir() if p.is_dir()) if root.is_dir() else []


def route_settings(settings: Settings, target: RouteTarget) -> Settings:
    """``settings`` whose engine is ``target``'s model and version (what ``open_engine`` opens)."""
    engine = settings.engine.model_copy(update={"model": target.model, "version": target.version})
    return settings.model_copy(update={"engine": engine})


def split_by_route(items: Sequence[Item], languages: Sequence[str], plan: RoutePlan) -> dict[str, list[Item]]:
    """``items`` grouped by the route of their language, each group in the items' order.

    One dict lookup per post (a post's language is its own), the grouping a list comprehension per route
    present: the scheduler then tokenizes and queues each group as one fetch.
    """
    by_language, default = plan.by_language, plan.default
    routes = [by_language.get(language, default) for language in languages]
    present = set(routes)
    if len(present) == 1:
        return {routes[0]: list(items)} if routes else {}
    return {route: [item for item, mine in zip(items, routes, strict=True) if mine == route]
            for route in plan.targets if route in present}


@dataclass(frozen=True)
class RoutedEngines:
    """What a worker needs to route: the plan, and each non-default route's active engine and tokenizer."""

    plan: RoutePlan
    engines: Mapping[str, tuple[Engine, PostTokenizer]]
