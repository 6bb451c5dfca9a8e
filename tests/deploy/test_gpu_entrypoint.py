"""docker/gpu_entrypoint.py: plans land in the cache volume, are built once, rebuilt when they no longer fit."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
from collections.abc import Callable
from pathlib import Path
from types import ModuleType

import pytest

from stream_sentiment.cli import build_parser
from stream_sentiment.config import ENV_PREFIX, Settings
from stream_sentiment.engines.manifest import MANIFEST_NAME, PLANS_DIR
from tests.deploy.compose_files import REPO

ENTRYPOINT = REPO / "docker" / "gpu_entrypoint.py"
COMMITTED_MANIFEST = REPO / "engines" / "minilm-sentiment" / "v1" / MANIFEST_NAME
PLAN_NAME = "nvidia-h100-sm90-trt10.8.0.plan"


def load_entrypoint() -> ModuleType:
    # A script, not a package module: loaded from its path, as the image runs it.
    spec = importlib.util.spec_from_file_location("gpu_entrypoint", ENTRYPOINT)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture
def entrypoint() -> ModuleType:
    return load_entrypoint()


@pytest.fixture
def repository(tmp_path: Path) -> Path:
    """An engine repository with two versions: the committed manifest, none of the files it pins."""
    root = tmp_path / "engines"
    for version in ("v1", "v2"):
        folder = root / "minilm-sentiment" / version
        folder.mkdir(parents=True)
        (folder / MANIFEST_NAME).write_text(COMMITTED_MANIFEST.read_text())
    return root


def settings_for(repository: Path, streams: int = 2, buckets: tuple[int, ...] | None = None) -> Settings:
    batching = {"buckets": buckets} if buckets else {}
    return Settings.load(engine={"repository": repository, "backend": "tensorrt", "streams": streams},
                         batching=batching)


MANIFEST_BUCKETS = json.loads(COMMITTED_MANIFEST.read_text())["buckets"]


class FakeBuilder:
    """Writes a plan and its sidecar where build-engine would, counting calls."""

    def __init__(self, writes: bool = True) -> None:
        self.calls: list[tuple[Path, int, tuple[int, ...] | None]] = []
        self.writes = writes

    def plan_for(self, version_dir: Path) -> Path:
        return version_dir / PLANS_DIR / PLAN_NAME

    def build(self, version_dir: Path, streams: int, buckets: tuple[int, ...] | None) -> None:
        self.calls.append((version_dir, streams, buckets))
        if self.writes:
            plan = self.plan_for(version_dir)
            plan.parent.mkdir(parents=True, exist_ok=True)
            plan.write_bytes(b"plan")
            built = list(buckets) if buckets else MANIFEST_BUCKETS
            sidecar = {"plan_file": plan.name, "profile_sets": streams, "buckets": built}
            plan.with_suffix(".json").write_text(json.dumps(sidecar))


def test_plans_folders_become_links_into_the_cache(entrypoint: ModuleType, repository: Path, tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    model = repository / "minilm-sentiment"
    stale = model / "v2" / PLANS_DIR
    stale.mkdir()
    (stale / "old.plan").write_bytes(b"old")  # a plan baked into an image is kept, in the cache
    entrypoint.link_plans_to_cache(model, cache)
    entrypoint.link_plans_to_cache(model, cache)  # idempotent: every container start runs it
    for version in ("v1", "v2"):
        plans = model / version / PLANS_DIR
        assert plans.is_symlink() and plans.resolve() == (cache / "minilm-sentiment" / version).resolve()
    assert (cache / "minilm-sentiment" / "v2" / "old.plan").read_bytes() == b"old"


def test_plan_is_built_once_into_the_cache_then_reused(
    entrypoint: ModuleType, repository: Path, tmp_path: Path
) -> None:
    cache, builder = tmp_path / "cache", FakeBuilder()
    settings = settings_for(repository, streams=2)
    plan = entrypoint.ensure_plan(settings, cache, plan_for=builder.plan_for, build=builder.build)
    assert builder.calls == [(repository / "minilm-sentiment" / "v1", 2, None)]
    assert (cache / "minilm-sentiment" / "v1" / PLAN_NAME).read_bytes() == b"plan"  # in the volume
    assert plan.resolve() == (cache / "minilm-sentiment" / "v1" / PLAN_NAME).resolve()
    # A new container (fresh image layer, same volume) reuses it.
    entrypoint.ensure_plan(settings, cache, plan_for=builder.plan_for, build=builder.build)
    assert len(builder.calls) == 1


def test_plan_is_rebuilt_when_streams_grow_or_the_sidecar_is_missing(
    entrypoint: ModuleType, repository: Path, tmp_path: Path
) -> None:
    cache, builder = tmp_path / "cache", FakeBuilder()
    entrypoint.ensure_plan(settings_for(repository, 1), cache, plan_for=builder.plan_for, build=builder.build)
    entrypoint.ensure_plan(settings_for(repository, 2), cache, plan_for=builder.plan_for, build=builder.build)
    entrypoint.ensure_plan(settings_for(repository, 1), cache, plan_for=builder.plan_for, build=builder.build)
    assert [streams for _, streams, _ in builder.calls] == [1, 2]  # two sets serve one stream too
    (cache / "minilm-sentiment" / "v1" / PLAN_NAME).with_suffix(".json").unlink()  # a build cut short
    entrypoint.ensure_plan(settings_for(repository, 2), cache, plan_for=builder.plan_for, build=builder.build)
    assert len(builder.calls) == 3


def test_plan_is_rebuilt_for_other_batching_buckets(
    entrypoint: ModuleType, repository: Path, tmp_path: Path
) -> None:
    cache, builder = tmp_path / "cache", FakeBuilder()
    finer = (16, 32, 48, 64, 96, 128, 192, 256)
    entrypoint.ensure_plan(settings_for(repository), cache, plan_for=builder.plan_for, build=builder.build)
    entrypoint.ensure_plan(settings_for(repository, buckets=finer), cache, plan_for=builder.plan_for,
                           build=builder.build)
    entrypoint.ensure_plan(settings_for(repository, buckets=finer), cache, plan_for=builder.plan_for,
                           build=builder.build)
    assert [buckets for _, _, buckets in builder.calls] == [None, finer]


def test_build_command_is_one_the_cli_accepts(entrypoint: ModuleType, monkeypatch: pytest.MonkeyPatch) -> None:
    commands: list[list[str]] = []
    monkeypatch.setattr(subprocess, "run", lambda command, check: commands.append(command))
    entrypoint.build_with_cli(Path("/app/engines/minilm-sentiment/v1"), 3, None)
    entrypoint.build_with_cli(Path("/app/engines/minilm-sentiment/v1"), 2, (64, 128, 256))
    for command in commands:
        assert command[0] == "stream-sentiment"
        args = build_parser().parse_args(command[1:])
        assert args.handler.__name__ == "_build_engine"
        assert args.engine == Path("/app/engines/minilm-sentiment/v1")
    assert build_parser().parse_args(commands[0][1:]).streams == 3
    assert build_parser().parse_args(commands[1][1:]).buckets == (64, 128, 256)


def test_a_build_that_leaves_no_plan_stops_the_container(
    entrypoint: ModuleType, repository: Path, tmp_path: Path
) -> None:
    builder = FakeBuilder(writes=False)
    with pytest.raises(SystemExit, match="no usable plan"):
        entrypoint.ensure_plan(settings_for(repository), tmp_path / "cache", plan_for=builder.plan_for,
                               build=builder.build)


class ExecCalledError(Exception):
    """Stands in for os.execvp, which would replace the test process."""


def _record_exec(calls: list[list[str]]) -> Callable[[str, list[str]], None]:
    def execvp(file: str, args: list[str]) -> None:
        calls.append([file, *args])
        raise ExecCalledError

    return execvp


def test_main_runs_the_worker_after_the_plan_and_passes_other_commands_through(
    entrypoint: ModuleType, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls: list[list[str]] = []
    ensured: list[Settings] = []
    monkeypatch.setattr(os, "execvp", _record_exec(calls))
    monkeypatch.setattr(entrypoint, "ensure_plan", lambda settings, cache: ensured.append(settings))
    for key in list(os.environ):
        if key.startswith(ENV_PREFIX):
            monkeypatch.delenv(key)
    monkeypatch.setenv(f"{ENV_PREFIX}ENGINE__BACKEND", "tensorrt")
    with pytest.raises(ExecCalledError):
        entrypoint.main([])
    assert calls[-1] == ["stream-sentiment", "stream-sentiment", "run"] and len(ensured) == 1
    with pytest.raises(ExecCalledError):
        entrypoint.main(["engines", "list"])
    assert calls[-1][2:] == ["engines", "list"] and len(ensured) == 1
    with pytest.raises(ExecCalledError):
        entrypoint.main(["engine-server"])  # the gpu-shared profile's engine server loads the plan too
    assert calls[-1][2:] == ["engine-server"] and len(ensured) == 2
    with pytest.raises(ExecCalledError):
        entrypoint.main(["engine-server", "--streams", "3"])  # the plan gets the streams the server runs
    assert calls[-1][2:] == ["engine-server", "--streams", "3"] and ensured[-1].engine.streams == 3
    ensured.pop()
    monkeypatch.setenv(f"{ENV_PREFIX}ENGINE__BACKEND", "onnxruntime")
    with pytest.raises(ExecCalledError):
        entrypoint.main(["run"])
    assert len(ensured) == 2, "only TensorRT needs a plan"
