"""``run`` and ``engine-server``: the long-running processes of a deployment."""

from __future__ import annotations

import argparse
from pathlib import Path

from stream_sentiment.cli.common import ADMIN_TOKEN_ENV, CONNECTION_FLAGS, Commands, add_connection_flags

LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


def run_settings(args: argparse.Namespace) -> object:
    """The connection flags plus the admin flags (``STREAM_SENTIMENT_ADMIN_TOKEN`` is read by ``Settings.load``)."""
    from stream_sentiment.config import Settings

    overrides: dict[str, object] = {name: getattr(args, name) for name in CONNECTION_FLAGS}
    admin = {"host": args.admin_host, "port": args.admin_port, "token_file": args.admin_token_file}
    admin = {key: value for key, value in admin.items() if value is not None}
    if admin:
        overrides["admin"] = admin
    return Settings.load(args.config, **overrides)


def _run(args: argparse.Namespace) -> int:
    import asyncio
    import logging

    from stream_sentiment.service import serve

    logging.basicConfig(level=logging.INFO, format=LOG_FORMAT)
    asyncio.run(serve(run_settings(args)))  # type: ignore[arg-type]
    return 0


def _engine_server(args: argparse.Namespace) -> int:
    import logging

    from stream_sentiment.config import Settings
    from stream_sentiment.service import serve_engines

    logging.basicConfig(level=logging.INFO, format=LOG_FORMAT)
    engine: dict[str, object] = {"backend": args.backend, "streams": args.streams, "server_socket": args.socket}
    settings = Settings.load(args.config, engine={k: v for k, v in engine.items() if v is not None})
    serve_engines(settings, preload=not args.no_preload)
    return 0


def add_commands(commands: Commands) -> None:
    run = commands.add_parser("run", help="consume, score and aggregate until SIGINT/SIGTERM")
    add_connection_flags(run)
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
                        help="load versions only when a worker asks (default: warm engine.version, and each "
                             "engine.routes model's version, at start)")
    server.set_defaults(handler=_engine_server)
