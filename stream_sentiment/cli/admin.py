"""``engines list|activate|rollback``: a thin client of a running worker's ``/admin/engines`` routes."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from stream_sentiment.cli.common import ADMIN_TOKEN_ENV, EXIT_UNAVAILABLE, EXIT_USAGE, Commands, admin_base_url


def _engines(args: argparse.Namespace) -> int:
    """Prints the JSON answer; the exit code follows the HTTP status."""
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
    source = (f"--admin-token-file {args.admin_token_file}" if args.admin_token_file else f"${ADMIN_TOKEN_ENV}")
    url = args.admin_url
    if url is None or token is None:  # the settings (env, config file) fill in what the flags left out
        admin = Settings.load(args.config).admin
        if token is None:
            token, source = admin.read_token(), "the settings (admin.token / admin.token_file)"
        if url is None:
            if admin.port == 0:
                print(f"{name}: admin.port is 0 (any free port); pass --admin-url", file=sys.stderr)
                return EXIT_USAGE
            url = admin_base_url(admin.host, admin.port)
    try:
        client = AdminClient(url, token, timeout=args.timeout)
    except ValueError as error:
        print(f"{name}: {error}", file=sys.stderr)
        return EXIT_USAGE
    route = getattr(args, "route", None)
    calls = {"list": client.engines, "rollback": lambda: client.rollback(route),
             "activate": lambda: client.activate(args.version, route)}
    try:
        status, answer = calls[args.action]()
    except AdminUnreachableError as error:
        print(f"{name}: {error}", file=sys.stderr)
        return EXIT_UNAVAILABLE
    print(json.dumps(answer, indent=2))
    if 200 <= status < 300:
        return 0
    print(f"{name}: refused ({status}): {answer.get('error', answer)}", file=sys.stderr)
    hint = _token_hint(status, answer, url, source if token is not None else None)
    if hint:
        print(f"{name}: {hint}", file=sys.stderr)
    return 1


def _token_hint(status: int, answer: dict[str, object], url: str, source: str | None) -> str | None:
    """Which side lacks the admin token, and what to do there (``source``: where this command's came from)."""
    side = answer.get("token")
    if side == "not_configured" or (status == 403 and side is None and source is not None):
        sent = f"this command's token (from {source}) is not at fault" if source else "this command sent none"
        return (f"the worker at {url} was started without an admin token, so it refuses every admin call "
                f"({sent}); restart the worker with {ADMIN_TOKEN_ENV} or --admin-token-file set, "
                "then give this command the same token")
    if status != 401:
        return None
    if source is None:
        return (f"this command has no admin token: set {ADMIN_TOKEN_ENV} or pass --admin-token-file with the "
                f"token the worker at {url} was started with")
    return (f"the worker at {url} has a different admin token than this command's (from {source}); "
            "use the token the worker was started with")


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


def add_commands(commands: Commands) -> None:
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
        if action in ("activate", "rollback"):
            sub.add_argument("--route", help="with engine.routes: the route (its model name) whose engine to "
                                             "change; unset = the default route (engine.model)")
    engines.set_defaults(handler=_engines)
