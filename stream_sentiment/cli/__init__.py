"""``stream-sentiment``: the command line.

Sub-commands import their modules lazily, so ``evaluate`` on the CPU path
never imports torch, and ``--help`` is instant.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

EXIT_USAGE = 2
EXIT_UNAVAILABLE = 3
# Redis lost the state this consumer group wrote: a person decides (recovery.on_redis_loss).
EXIT_STATE_LOST = 4


VADER_SHORTCUT = "vader"


def _evaluate(args: argparse.Namespace) -> int:
    from stream_sentiment.modeling.evaluate import evaluate

    data = args.data
    if str(data) == VADER_SHORTCUT and not data.exists():
        from stream_sentiment.modeling.corpora import write_vader_tweets

        cache = args.corpora_dir
        data = write_vader_tweets(cache, cache / "tweets_GroundTruth.txt")
    report = evaluate(args.engine, data, show_progress=not args.no_progress)
    print(json.dumps(report))
    return 0


def _build_engine(args: argparse.Namespace) -> int:
    from stream_sentiment.engine_build.tensorrt_build import build_plan, import_tensorrt
    from stream_sentiment.engines.manifest import load_engine_version

    if args.streams < 1:
        print(f"stream-sentiment build-engine: --streams must be at least 1, not {args.streams}", file=sys.stderr)
        return EXIT_USAGE
    version = load_engine_version(args.engine)
    if args.buckets:
        version = version.serving(args.buckets)
    trt = import_tensorrt()  # fails fast, before any work, when TensorRT is missing
    print(f"building a TensorRT plan for {version.label}: buckets {list(version.manifest.buckets)}, "
          f"{args.streams} profile set(s)", file=sys.stderr)
    info = build_plan(version, streams=args.streams, trt=trt, opt_rows=args.opt_rows, max_rows=args.max_rows,
                      show_progress=not args.no_progress)
    print(json.dumps(info.__dict__))
    return 0


def _settings(args: argparse.Namespace) -> object:
    from stream_sentiment.config import Settings

    overrides = {name: getattr(args, name) for name in CONNECTION_FLAGS}
    return Settings.load(args.config, **overrides)


def _run(args: argparse.Namespace) -> int:
    import asyncio
    import logging

    from stream_sentiment.service import serve

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    asyncio.run(serve(_run_settings(args)))  # type: ignore[arg-type]
    return 0


def _engine_server(args: argparse.Namespace) -> int:
    import logging

    from stream_sentiment.config import Settings
    from stream_sentiment.service import serve_engines

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    engine: dict[str, object] = {"backend": args.backend, "streams": args.streams, "server_socket": args.socket}
    settings = Settings.load(args.config, engine={k: v for k, v in engine.items() if v is not None})
    serve_engines(settings, preload=not args.no_preload)
    return 0


# The issue's name for the admin token; the settings' own nested form STREAM_SENTIMENT_ADMIN__TOKEN works too.
ADMIN_TOKEN_ENV = "STREAM_SENTIMENT_ADMIN_TOKEN"  # noqa: S105 (a variable name, not a secret)


def _run_settings(args: argparse.Namespace) -> object:
    """``_settings`` plus the admin flags (``STREAM_SENTIMENT_ADMIN_TOKEN`` is read by ``Settings.load``)."""
    from stream_sentiment.config import Settings

    overrides: dict[str, object] = {name: getattr(args, name) for name in CONNECTION_FLAGS}
    admin = {"host": args.admin_host, "port": args.admin_port, "token_file": args.admin_token_file}
    admin = {key: value for key, value in admin.items() if value is not None}
    if admin:
        overrides["admin"] = admin
    return Settings.load(args.config, **overrides)


def _admin_base_url(host: str, port: int) -> str:
    # A wildcard bind is reached through loopback from this machine.
    host = {"0.0.0.0": "127.0.0.1", "::": "::1", "": "127.0.0.1"}.get(host, host)  # noqa: S104
    return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"


def _engines(args: argparse.Namespace) -> int:
    """A thin client of the worker's ``/admin/engines`` routes: prints the JSON answer, exit code by status."""
    import os

    from stream_sentiment.admin.client import AdminClient, AdminUnreachableError
    from stream_sentiment.config import Settings

    name = f"stream-sentiment engines {args.action}"
    try:
        token = (args.admin_token_file.read_text(encoding="utf-8").strip() if args.admin_token_file
                 else os.environ.get(ADMIN_TOKEN_ENV, "").strip()) or None
    except OSError as error:
        print(f"{name}: cannot read the admin token file: {error}", file=sys.stderr)
        return EXIT_USAGE
    url = args.admin_url
    if url is None or token is None:  # the settings (env, config file) fill in what the flags left out
        admin = Settings.load(args.config).admin
        token = token if token is not None else admin.read_token()
        if url is None:
            if admin.port == 0:
                print(f"{name}: admin.port is 0 (any free port); pass --admin-url", file=sys.stderr)
                return EXIT_USAGE
            url = _admin_base_url(admin.host, admin.port)
    try:
        client = AdminClient(url, token, timeout=args.timeout)
    except ValueError as error:
        print(f"{name}: {error}", file=sys.stderr)
        return EXIT_USAGE
    calls = {"list": client.engines, "rollback": client.rollback,
             "activate": lambda: client.activate(args.version)}
    try:
        status, answer = calls[args.action]()
    except AdminUnreachableError as error:
        print(f"{name}: {error}", file=sys.stderr)
        return EXIT_UNAVAILABLE
    print(json.dumps(answer, indent=2))
    if 200 <= status < 300:
        return 0
    print(f"{name}: refused ({status}): {answer.get('error', answer)}", file=sys.stderr)
    return 1


def _produce(args: argparse.Namespace) -> int:
    import asyncio
    import itertools

    from aiokafka import AIOKafkaProducer
    from tqdm import tqdm

    from stream_sentiment.source.replay import Surge, file_posts, replay, sample_posts

    settings = _settings(args)
    if args.file:
        values = file_posts(args.file)
    else:
        values = (json.dumps(p).encode() for p in sample_posts(args.seed))
    surge = None
    if args.surge_topic or args.surge_region:
        surge = Surge(args.surge_topic, args.surge_region, args.surge_start, args.surge_duration, args.surge_rate)

    async def send() -> dict[str, int]:
        producer = AIOKafkaProducer(bootstrap_servers=settings.bootstrap_servers, linger_ms=5)  # type: ignore[attr-defined]
        await producer.start()
        try:
            with tqdm(total=args.count, desc="produce", unit="post", file=sys.stderr,
                      disable=args.no_progress) as bar:
                return await replay(producer, settings.topic, itertools.islice(values, None),  # type: ignore[attr-defined]
                                    rate=args.rate, count=args.count, surge=surge, progress=bar.update)
        finally:
            await producer.stop()

    print(json.dumps(asyncio.run(send())))
    return 0


def _alerts(args: argparse.Namespace) -> int:
    from redis import Redis

    from stream_sentiment.aggregation.buckets import RedisKeys
    from stream_sentiment.sinks.alert_feed import deadline, follow, format_alert, recent

    settings = _settings(args)
    client = Redis.from_url(settings.redis_url, decode_responses=True)  # type: ignore[attr-defined]
    stream = RedisKeys(settings.redis_prefix).alerts  # type: ignore[attr-defined]
    try:
        last = "$"
        for entry_id, fields in recent(client, stream, args.last):
            print(format_alert(fields), flush=True)
            last = entry_id
        if args.follow:
            for _, fields in follow(client, stream, after=last, until=deadline(args.duration)):
                print(format_alert(fields), flush=True)
    except KeyboardInterrupt:
        pass
    finally:
        client.close()
    return 0


def _top(args: argparse.Namespace) -> int:
    import asyncio

    from redis.asyncio import Redis

    from stream_sentiment.aggregation.buckets import RedisKeys
    from stream_sentiment.views.queries import AnalystQueries
    from stream_sentiment.views.terminal import run_top

    settings = _settings(args)
    windows = args.windows or settings.aggregation.windows_seconds  # type: ignore[attr-defined]
    if any(w <= 0 for w in windows) or args.limit < 1 or args.refresh <= 0:
        print("stream-sentiment top: --windows, --limit and --refresh must be positive", file=sys.stderr)
        return EXIT_USAGE
    min_posts = args.min_posts if args.min_posts is not None else settings.alerts.min_posts  # type: ignore[attr-defined]
    client = Redis.from_url(settings.redis_url, socket_timeout=10)  # type: ignore[attr-defined]
    queries = AnalystQueries(client, RedisKeys(settings.redis_prefix),  # type: ignore[attr-defined]
                             settings.aggregation.bucket_seconds)  # type: ignore[attr-defined]
    try:
        asyncio.run(run_top(client, queries, windows, limit=args.limit, min_posts=min_posts,
                            refresh_seconds=args.refresh, once=args.once, duration=args.duration))
    except KeyboardInterrupt:
        pass
    return 0


def _int_list(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(part) for part in text.split(",") if part.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, e.g. 60,300,900, not {text!r}") from None


def _demo(args: argparse.Namespace) -> int:
    from stream_sentiment.demo import main as demo

    return demo(args.duration, args.rate, args.surge_topic, args.surge_start)


def _stats(args: argparse.Namespace) -> int:
    from stream_sentiment.service import read_stats

    stats = read_stats(_settings(args))  # type: ignore[arg-type]
    if args.json:
        print(json.dumps(stats))
    else:
        for key, value in stats.items():
            print(f"{key:>24}: {value}")
    return 0


# The connection settings every service command takes as flags (and as STREAM_SENTIMENT_* env vars).
CONNECTION_FLAGS = ("bootstrap_servers", "topic", "redis_url", "redis_prefix")


def _add_connection_flags(parser: argparse.ArgumentParser) -> None:
    for name in CONNECTION_FLAGS:
        parser.add_argument(f"--{name.replace('_', '-')}", default=None,
                            help=f"overrides STREAM_SENTIMENT_{name.upper()} and the config file")
    parser.add_argument("--config", type=Path, default=None, help="TOML or JSON settings file")


def _add_admin_client_flags(parser: argparse.ArgumentParser, suppress: bool) -> None:
    # On an action sub-parser the defaults are SUPPRESSed, so they do not overwrite flags given before the action.
    def default(value: object) -> object:
        return argparse.SUPPRESS if suppress else value

    parser.add_argument("--admin-url", default=default(None),
                        help="the worker's admin endpoint (default: http://<admin.host>:<admin.port> from settings)")
    parser.add_argument("--admin-token-file", type=Path, default=default(None),
                        help=f"file holding the admin bearer token (else ${ADMIN_TOKEN_ENV} or the settings)")
    parser.add_argument("--config", type=Path, default=default(None), help="TOML or JSON settings file")
    parser.add_argument("--timeout", type=float, default=default(300.0),
                        help="seconds to wait for an answer (an activation loads and validates first)")


def _delegate(module: str, argv: list[str]) -> int:
    import importlib

    return int(importlib.import_module(module).main(argv))


DELEGATED = {
    "train": ("stream_sentiment.modeling.train", "fine-tune the classifier (needs the train extra: torch)"),
    "calibrate": ("stream_sentiment.modeling.build", "export, INT8-calibrate and package an engine version"),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="stream-sentiment", description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)

    evaluate = commands.add_parser("evaluate", help="score a labelled file and print a JSON report")
    evaluate.add_argument("--engine", type=Path, required=True, help="engine version folder")
    evaluate.add_argument("--data", type=Path, required=True,
                          help="JSONL {text, label} lines, the VADER tweets_GroundTruth.txt file, or "
                               f"'{VADER_SHORTCUT}' to fetch the pinned VADER test tweets from PyPI")
    evaluate.add_argument("--corpora-dir", type=Path, default=Path(".cache/corpora"),
                          help="where fetched corpus archives are cached")
    evaluate.add_argument("--no-progress", action="store_true", help="no progress bars on stderr")
    evaluate.set_defaults(handler=_evaluate)

    build = commands.add_parser("build-engine", help="build a TensorRT plan for this GPU")
    build.add_argument("--engine", type=Path, required=True, help="engine version folder")
    build.add_argument("--buckets", type=_int_list, default=None,
                       help="comma-separated length buckets to build profiles for (default: the manifest's); "
                            "use the same as batching.buckets")
    build.add_argument("--opt-rows", type=int, default=64, help="batch rows the kernels are tuned for")
    build.add_argument("--max-rows", type=int, default=256, help="largest batch a profile accepts")
    build.add_argument("--streams", type=int, default=1,
                       help="execution contexts the plan serves at once (set it to engine.streams): one set of "
                            "bucket profiles per stream, since TensorRT lets a profile serve one context at a time; "
                            "the plan replaces the previous one for this GPU and TensorRT version")
    build.add_argument("--no-progress", action="store_true", help="no progress bars on stderr")
    build.set_defaults(handler=_build_engine)

    run = commands.add_parser("run", help="consume, score and aggregate until SIGINT/SIGTERM")
    _add_connection_flags(run)
    run.add_argument("--admin-host", default=None, help="admin HTTP bind address (default 127.0.0.1); "
                                                         "a non-loopback one needs a token")
    run.add_argument("--admin-port", type=int, default=None, help="admin HTTP port (0 = any free port)")
    run.add_argument("--admin-token-file", type=Path, default=None,
                     help=f"file holding the admin bearer token (else ${ADMIN_TOKEN_ENV})")
    run.set_defaults(handler=_run)

    server = commands.add_parser("engine-server", help="own this host's GPU and score batches for every worker "
                                                       "whose engine.backend is engine-server")
    server.add_argument("--socket", type=Path, default=None, help="Unix socket to listen on "
                                                                  "(overrides engine.server_socket)")
    server.add_argument("--backend", choices=["torch-cuda", "tensorrt", "onnxruntime"], default=None,
                        help="the device backend (overrides engine.backend)")
    server.add_argument("--streams", type=int, default=None,
                        help="CUDA streams (execution slots) per loaded engine (overrides engine.streams)")
    server.add_argument("--config", type=Path, default=None, help="TOML or JSON settings file")
    server.add_argument("--no-preload", action="store_true",
                        help="load versions only when a worker asks (default: warm engine.version at start)")
    server.set_defaults(handler=_engine_server)

    engines = commands.add_parser("engines", help="list, activate or roll back engine versions "
                                                  "through a running worker's admin endpoint")
    _add_admin_client_flags(engines, suppress=False)
    actions = engines.add_subparsers(dest="action", required=True)
    for action, help_text in (("list", "versions in the repository, their states and the active one"),
                              ("activate", "load, validate and switch to a version (waits for the result)"),
                              ("rollback", "switch back to the previous engine")):
        sub = actions.add_parser(action, help=help_text)
        _add_admin_client_flags(sub, suppress=True)  # the flags may come before or after the action
        if action == "activate":
            sub.add_argument("version", help="version name inside the engine repository (not a path)")
    engines.set_defaults(handler=_engines)

    produce = commands.add_parser("produce", help="replay posts (a file or the bundled samples) at a rate")
    _add_connection_flags(produce)
    produce.add_argument("--file", type=Path, default=None,
                         help="JSONL post messages (sent as they are) or CSV with a text column; "
                              "default: the bundled sample tweets")
    produce.add_argument("--rate", type=float, default=100.0, help="posts per second (0 = as fast as possible)")
    produce.add_argument("--count", type=int, default=None, help="stop after this many (default: the whole file; "
                                                                 "samples repeat forever)")
    produce.add_argument("--seed", type=int, default=0, help="sample order")
    produce.add_argument("--surge-topic", default=None, help="inject a surge of negative posts with this topic")
    produce.add_argument("--surge-region", default=None, help="... and/or this region")
    produce.add_argument("--surge-start", type=float, default=30.0, help="seconds after the start")
    produce.add_argument("--surge-duration", type=float, default=30.0, help="seconds")
    produce.add_argument("--surge-rate", type=float, default=200.0, help="extra posts per second during the surge")
    produce.add_argument("--no-progress", action="store_true", help="no progress bars on stderr")
    produce.set_defaults(handler=_produce)

    alerts = commands.add_parser("alerts", help="print the alert feed readably")
    _add_connection_flags(alerts)
    alerts.add_argument("--last", type=int, default=20, help="show the last N alerts first")
    alerts.add_argument("--follow", action="store_true", help="then print new alerts as they arrive")
    alerts.add_argument("--duration", type=float, default=None, help="stop following after this many seconds")
    alerts.set_defaults(handler=_alerts)

    top = commands.add_parser("top", help="live table of the most negative dimension values per window")
    _add_connection_flags(top)
    top.add_argument("--windows", type=_int_list, default=None,
                     help="comma-separated window lengths in seconds (default: aggregation.windows_seconds)")
    top.add_argument("--limit", type=int, default=10, help="rows per window")
    top.add_argument("--min-posts", type=int, default=None,
                     help="leave out values with fewer posts in the window (default: alerts.min_posts)")
    top.add_argument("--refresh", type=float, default=2.0, help="seconds between redraws")
    top.add_argument("--once", action="store_true", help="print the table once and exit (for scripts)")
    top.add_argument("--duration", type=float, default=None, help="stop after this many seconds")
    top.set_defaults(handler=_top)

    demo = commands.add_parser("demo", help="everything on this machine: embedded broker and Redis, "
                                            "sample posts with a surge, live alerts")
    demo.add_argument("--duration", type=float, default=60.0, help="seconds, then everything stops")
    demo.add_argument("--rate", type=float, default=50.0,
                      help="sample posts per second (the surge adds 0.6 times as many)")
    demo.add_argument("--surge-topic", default="airline", help="the topic that turns negative")
    demo.add_argument("--surge-start", type=float, default=15.0, help="seconds after the start")
    demo.set_defaults(handler=_demo)

    stats = commands.add_parser("stats", help="totals from Redis")
    _add_connection_flags(stats)
    stats.add_argument("--json", action="store_true", help="one JSON object")
    stats.set_defaults(handler=_stats)

    for name, (_, help_text) in DELEGATED.items():
        commands.add_parser(name, help=help_text, add_help=False)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] in DELEGATED:
        return _delegate(DELEGATED[argv[0]][0], argv[1:])
    args = build_parser().parse_args(argv)
    from pydantic import ValidationError
    from redis.exceptions import ConnectionError as RedisConnectionError

    from stream_sentiment.admin.server import AdminSecurityError
    from stream_sentiment.engines.base import BackendUnavailableError
    from stream_sentiment.engines.manifest import EngineRepositoryError
    from stream_sentiment.engines.scoring import DataFormatError
    from stream_sentiment.sinks.checkpoint import RedisOutageError, RedisStateLostError

    try:
        return int(args.handler(args))
    except BackendUnavailableError as error:
        print(f"stream-sentiment {args.command}: {error}", file=sys.stderr)
        return EXIT_UNAVAILABLE
    except (EngineRepositoryError, DataFormatError, FileNotFoundError, ValidationError, AdminSecurityError) as error:
        print(f"stream-sentiment {args.command}: {error}", file=sys.stderr)
        return EXIT_USAGE
    except OSError as error:  # e.g. the admin port is taken
        print(f"stream-sentiment {args.command}: {error}", file=sys.stderr)
        return EXIT_UNAVAILABLE
    except RedisConnectionError as error:
        print(f"stream-sentiment {args.command}: cannot reach Redis: {error}", file=sys.stderr)
        return EXIT_UNAVAILABLE
    except RedisOutageError as error:
        print(f"stream-sentiment {args.command}: {error}", file=sys.stderr)
        return EXIT_UNAVAILABLE
    except RedisStateLostError as error:
        print(f"stream-sentiment {args.command}: {error}", file=sys.stderr)
        return EXIT_STATE_LOST


if __name__ == "__main__":
    raise SystemExit(main())
