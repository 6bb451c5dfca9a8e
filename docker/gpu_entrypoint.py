#!/usr/bin/env python3
"""Entrypoint of the GPU worker image: make sure this GPU has a TensorRT plan, then run the worker.

A TensorRT plan only loads on the GPU model, compute capability and TensorRT version it was built
for, so it is built at start-up, not into the image, and kept in ``PLAN_CACHE_DIR`` (a named
volume) so it is built once per GPU rather than once per container. Every engine version's
``plans/`` folder is made a symlink to ``<cache>/<model>/<version>``: that is where
``stream-sentiment build-engine`` writes and where the TensorRT backend looks
(``engines.plans.plan_path``), so neither needs to know about the cache, and a version
activated later through the admin endpoint finds its plans in the volume too.

A plan is built only when the cache has none for this GPU and TensorRT version, or when it no
longer fits the settings: fewer optimization-profile sets than ``engine.streams``, or other length
buckets than the worker batches by (``batching.buckets``, else the manifest's). Replicas sharing
the volume serialise on a file lock, so one builds and the others reuse its plan.

``run`` (the default command) does the above, then becomes ``stream-sentiment run``;
``engine-server`` (compose's gpu-shared profile) does the same for the host's engine server. Any
other command goes to ``stream-sentiment`` untouched (``docker compose run worker-gpu engines list``).
"""

from __future__ import annotations

import argparse
import fcntl
import json
import os
import shutil
import subprocess
import sys
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from stream_sentiment.config import Settings

COMMAND = "stream-sentiment"
PLAN_CACHE_ENV = "PLAN_CACHE_DIR"
DEFAULT_PLAN_CACHE = Path("/var/cache/stream-sentiment/plans")
LOCK_NAME = ".build.lock"
# The commands that load the TensorRT engine, so need this GPU's plan first.
PLAN_COMMANDS = ("run", "engine-server")


def log(message: str) -> None:
    print(f"gpu-entrypoint: {message}", file=sys.stderr, flush=True)


def link_plans_to_cache(model_dir: Path, cache: Path) -> None:
    """Make each version's ``plans/`` under ``model_dir`` a symlink to ``cache/<model>/<version>``."""
    from stream_sentiment.engines.manifest import MANIFEST_NAME, PLANS_DIR

    for version_dir in sorted(p for p in model_dir.iterdir() if (p / MANIFEST_NAME).is_file()):
        target = cache / model_dir.name / version_dir.name
        target.mkdir(parents=True, exist_ok=True)
        plans = version_dir / PLANS_DIR
        if plans.is_symlink():
            if plans.resolve() == target.resolve():
                continue
            plans.unlink()
        elif plans.is_dir():
            # A real folder (an image built without .dockerignore): keep what it holds, in the cache.
            for item in plans.iterdir():
                if not (target / item.name).exists():
                    shutil.move(item, target / item.name)
            shutil.rmtree(plans)
        plans.symlink_to(target, target_is_directory=True)


def cached_plan_fits(plan: Path, streams: int, buckets: Sequence[int]) -> bool:
    """Whether ``plan`` is complete, has a profile set for each of ``streams`` contexts, and ``buckets``."""
    sidecar = plan.with_suffix(".json")
    # build_plan writes the sidecar after the plan, so a plan without one may be cut short.
    if not (plan.is_file() and sidecar.is_file()):
        return False
    try:
        info = json.loads(sidecar.read_text(encoding="utf-8"))
        sets = int(info.get("profile_sets", 1))  # sidecars older than profile sets describe one set
    except (OSError, ValueError, TypeError, AttributeError):
        return False
    # The plan's file name says nothing of its buckets: the sidecar does.
    return info.get("plan_file") == plan.name and sets >= streams and info.get("buckets") == list(buckets)


@contextmanager
def exclusive(lock_path: Path) -> Iterator[None]:
    """Hold an exclusive flock on ``lock_path``: containers sharing the volume share the kernel lock."""
    with lock_path.open("a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def plan_for_this_gpu(version_dir: Path) -> Path:
    """Where the TensorRT backend will look for the plan of ``version_dir`` on GPU 0."""
    from stream_sentiment.engines.manifest import load_engine_version
    from stream_sentiment.engines.plans import current_gpu, import_tensorrt, plan_path

    # verify=False: the worker checks every checksum when it loads the version anyway.
    version = load_engine_version(version_dir, verify=False)
    return plan_path(version, current_gpu(), import_tensorrt().__version__)


def build_with_cli(version_dir: Path, streams: int, buckets: Sequence[int] | None) -> None:
    """``stream-sentiment build-engine``; ``buckets`` None = the manifest's."""
    command = [COMMAND, "build-engine", "--engine", str(version_dir), "--streams", str(streams)]
    if buckets is not None:
        command += ["--buckets", ",".join(str(bucket) for bucket in buckets)]
    subprocess.run(command, check=True)  # noqa: S603 - our own CLI, arguments from the settings


def ensure_plan(
    settings: Settings,
    cache: Path,
    *,
    plan_for: Callable[[Path], Path] = plan_for_this_gpu,
    build: Callable[[Path, int, Sequence[int] | None], None] = build_with_cli,
) -> Path:
    """The plan for the configured engine version on this GPU, built into ``cache`` unless one fits."""
    from stream_sentiment.engines.manifest import EngineRepository, load_engine_version

    engine, chosen_buckets = settings.engine, settings.batching.buckets
    version_dir = EngineRepository(engine.repository, engine.model).path_of(engine.version)
    # The shapes the worker will batch: its plan needs a profile for each.
    buckets = chosen_buckets or load_engine_version(version_dir, verify=False).manifest.buckets
    cache.mkdir(parents=True, exist_ok=True)
    link_plans_to_cache(version_dir.parent, cache)
    plan = plan_for(version_dir)
    with exclusive(cache / LOCK_NAME):
        if cached_plan_fits(plan, engine.streams, buckets):
            log(f"using the cached plan {plan.name} for {engine.model}/{engine.version}")
            return plan
        log(f"no cached plan for this GPU with {engine.streams} profile set(s) and buckets {list(buckets)}: "
            f"building {plan.name} (minutes; once per GPU, TensorRT version and settings)")
        build(version_dir, engine.streams, chosen_buckets)
        if not cached_plan_fits(plan, engine.streams, buckets):
            raise SystemExit(f"gpu-entrypoint: build-engine finished but left no usable plan at {plan}")
    return plan


def load_settings(run_args: list[str]) -> Settings:
    """The settings the command will see: environment, the ``--config`` file if given, and the engine
    flags ``engine-server`` takes (``--backend``, ``--streams``), so its plan has the streams it runs."""
    from stream_sentiment.config import Settings

    parser = argparse.ArgumentParser(add_help=False)
    parser.add_argument("--config", type=Path, default=None)
    parser.add_argument("--backend", default=None)
    parser.add_argument("--streams", type=int, default=None)
    known, _ = parser.parse_known_args(run_args)
    engine = {key: value for key, value in (("backend", known.backend), ("streams", known.streams))
              if value is not None}
    return Settings.load(known.config, **({"engine": engine} if engine else {}))


def main(argv: list[str]) -> None:
    args = argv or ["run"]
    if args[0] in PLAN_COMMANDS:
        settings = load_settings(args[1:])
        if settings.engine.backend == "tensorrt":
            ensure_plan(settings, Path(os.environ.get(PLAN_CACHE_ENV) or DEFAULT_PLAN_CACHE))
        else:
            log(f"engine.backend is {settings.engine.backend}: no TensorRT plan needed")
    # exec: the worker takes over PID 1 and gets docker's SIGTERM itself, so it drains before stopping.
    os.execvp(COMMAND, [COMMAND, *args])  # noqa: S606 - the image's own CLI, found on its PATH


if __name__ == "__main__":
    main(sys.argv[1:])
