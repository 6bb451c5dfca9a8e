"""What every command group of the CLI shares: exit codes, the connection flags, the admin token variable."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

# What ``add_subparsers()`` returns, which each group's ``add_commands`` fills (argparse keeps its class private).
Commands = Any

EXIT_USAGE = 2
EXIT_UNAVAILABLE = 3
# Redis lost the state this consumer group wrote: a person decides (recovery.on_redis_loss).
EXIT_STATE_LOST = 4

# The connection settings every service command takes as flags (and as STREAM_SENTIMENT_* env vars).
CONNECTION_FLAGS = ("bootstrap_servers", "topic", "redis_url", "redis_prefix")
# The issue's name for the admin token; the settings' own nested form STREAM_SENTIMENT_ADMIN__TOKEN works too.
ADMIN_TOKEN_ENV = "STREAM_SENTIMENT_ADMIN_TOKEN"  # noqa: S105 (a variable name, not a secret)


def add_connection_flags(parser: argparse.ArgumentParser) -> None:
    for name in CONNECTION_FLAGS:
        parser.add_argument(f"--{name.replace('_', '-')}", default=None,
                            help=f"overrides STREAM_SENTIMENT_{name.upper()} and the config file")
    parser.add_argument("--config", type=Path, default=None, help="TOML or JSON settings file")


def connection_settings(args: argparse.Namespace) -> object:
    """The settings with the connection flags given on the command line applied."""
    from stream_sentiment.config import Settings

    overrides = {name: getattr(args, name) for name in CONNECTION_FLAGS}
    return Settings.load(args.config, **overrides)


def admin_base_url(host: str, port: int) -> str:
    """The URL this machine reaches a worker's admin server at (``admin.host``, ``admin.port``)."""
    # A wildcard bind is reached through loopback from this machine.
    host = {"0.0.0.0": "127.0.0.1", "::": "::1", "": "127.0.0.1"}.get(host, host)  # noqa: S104
    return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"


def int_list(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(part) for part in text.split(",") if part.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, e.g. 60,300,900, not {text!r}") from None
