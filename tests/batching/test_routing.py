"""The route plan (``engine.routes``): resolution, refusals, manifest languages, and splitting a fetch."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from pydantic import ValidationError

from stream_sentiment.batching.routing import latest_version, plan_routes, route_settings, split_by_route
from stream_sentiment.config import Settings
from stream_sentiment.engines.manifest import EngineManifest, EngineRepositoryError
from tests.conftest import REPO


def _manifest(model: str, version: str = "v1") -> EngineManifest:
    return EngineManifest.from_dict(json.loads((REPO / "engines" / model / version / "manifest.json").read_text()))


def _settings(routes: dict[str, str], repository: Path = REPO / "engines", **engine: object) -> Settings:
    return Settings.load(engine={"repository": repository, "routes": routes, **engine})


def _stub_repository(root: Path, versions: dict[str, list[str]]) -> Path:
    """Folders with a manifest file each: all the plan reads (engines are loaded later, by the service)."""
    for model, names in versions.items():
        for name in names:
            (root / model / name).mkdir(parents=True)
            (root / model / name / "manifest.json").write_text("{}")
    return root


def test_no_routes_is_one_route_the_configured_engine():
    plan = plan_routes(_settings({}))
    assert not plan.routed and plan.default == "minilm-sentiment"
    assert [(t.model, t.version) for t in plan.targets.values()] == [("minilm-sentiment", "v1")]
    assert plan.route_of("zh") == plan.route_of("en") == "minilm-sentiment"


def test_routes_resolve_bare_models_and_group_languages_by_model(tmp_path):
    root = _stub_repository(tmp_path, {"minilm-sentiment": ["v1", "v2"], "multi": ["v2", "v9", "v10"]})
    plan = plan_routes(_settings({"zh": "multi", "ja": "multi/v10", "fr": "minilm-sentiment"}, root, version="v2"))
    assert plan.routed and plan.default == "minilm-sentiment"
    # A bare model: the configured version for the configured model, else the repository's newest (natural order).
    assert {n: (t.version, t.languages) for n, t in plan.targets.items()} == {
        "minilm-sentiment": ("v2", ("fr",)), "multi": ("v10", ("ja", "zh"))}
    assert [plan.route_of(lang) for lang in ("zh", "ja", "fr", "de")] == ["multi", "multi", *["minilm-sentiment"] * 2]
    routed = route_settings(Settings.load(), plan.targets["multi"])
    assert (routed.engine.model, routed.engine.version) == ("multi", "v10")


@pytest.mark.parametrize(("routes", "message"), [
    ({"zh": "no-such-model"}, r"no model 'no-such-model'.*models there: \['minilm-sentiment', 'multi'\]"),
    ({"zh": "multi/v3"}, r"engine.routes\['zh'\] = 'multi/v3': unknown version 'v3'"),
    ({"zh": "minilm-sentiment/v2"}, r"already served as minilm-sentiment/v1: one version per model"),
    ({"ja": "multi/v1", "zh": "multi/v2"}, r"already served as multi/v1"),
])
def test_unknown_targets_and_two_versions_of_one_model_are_refused(tmp_path, routes, message):
    root = _stub_repository(tmp_path, {"minilm-sentiment": ["v1", "v2"], "multi": ["v1", "v2"]})
    with pytest.raises(EngineRepositoryError, match=message):
        plan_routes(_settings(routes, root))


def test_a_language_missing_from_the_engines_manifest_is_refused():
    plan = plan_routes(_settings({"zh": "minilm-sentiment", "en": "multilingual-sentiment/v1"}))
    with pytest.raises(EngineRepositoryError, match=r"sends \['zh'\] to minilm-sentiment/v1, whose manifest lists "
                                                     r"only \['en'\]"):
        plan.check_manifest("minilm-sentiment", _manifest("minilm-sentiment"))
    plan.check_manifest("multilingual-sentiment", _manifest("multilingual-sentiment"))  # en is listed in v1's
    with pytest.raises(EngineRepositoryError, match="planned for multilingual-sentiment/v1"):
        plan.check_manifest("multilingual-sentiment", _manifest("minilm-sentiment"))
    # A bare model name routes to its latest version: v3, which serves Chinese only.
    latest = plan_routes(_settings({"en": "multilingual-sentiment"}))
    with pytest.raises(EngineRepositoryError, match=r"sends \['en'\] to multilingual-sentiment/v3, whose manifest "
                                                     r"lists only \['zh'\]"):
        latest.check_manifest("multilingual-sentiment", _manifest("multilingual-sentiment", "v3"))


def test_routes_are_validated_with_the_settings():
    # The engine server hosts every route's model (tests/engines/test_engine_server_routes.py).
    served = _settings({"zh": "multilingual-sentiment"}, backend="engine-server", server_socket="/tmp/s.sock")
    assert plan_routes(served).route_of("zh") == "multilingual-sentiment"
    for routes in ({"Chinese": "multilingual-sentiment"}, {"zh": "../etc"}, {"zh": "a/b/c"}):
        with pytest.raises(ValidationError):
            _settings(routes)


def test_split_keeps_each_routes_posts_in_fetch_order():
    plan = plan_routes(_settings({"zh": "multilingual-sentiment"}))
    items = ["e0", "z1", "e2", "z3", "x4"]
    groups = split_by_route(items, ["en", "zh", "en", "zh", "fr"], plan)
    assert groups == {"minilm-sentiment": ["e0", "e2", "x4"], "multilingual-sentiment": ["z1", "z3"]}
    assert split_by_route(items[:1], ["zh"], plan) == {"multilingual-sentiment": ["e0"]}
    assert split_by_route([], [], plan) == {}
    assert latest_version(["v2", "v10", "v9"]) == "v10"
