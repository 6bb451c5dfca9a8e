"""``stream-sentiment``: the command line.

Sub-commands import their modules lazily, so ``evaluate`` on the CPU path
never imports torch, and ``--help`` is instant. Each command group lives in
its own module with its handlers and flags: ``model`` (evaluate,
build-engine), ``service`` (run, engine-server), ``admin`` (engines),
``tools`` (produce, alerts, top, demo, stats), ``infra`` (services, topics
create); ``train`` and ``calibrate`` are handed to ``modeling/`` whole.
"""

from __future__ import annotations

import argparse
import sys

from stream_sentiment.cli import admin, infra, model, service, tools
from stream_sentiment.cli.common import EXIT_STATE_LOST, EXIT_UNAVAILABLE, EXIT_USAGE

__all__ = ["EXIT_STATE_LOST", "EXIT_UNAVAILABLE", "EXIT_USAGE", "build_parser", "main"]


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
    for group in (model, service, admin, tools, infra):  # the order of the commands in --help
        group.add_commands(commands)
    for name, (_, help_text) in DELEGATED.items():
        commands.add_parser(name, help=help_text, add_help=False)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] in DELEGATED:
        return _delegate(DELEGATED[argv[0]][0], argv[1:])
    args = build_parser().parse_args(argv)
    from aiokafka.errors import KafkaConnectionError
    from pydantic import ValidationError
    from redis.exceptions import ConnectionError as RedisConnectionError
    from redis.exceptions import NoPermissionError

    from stream_sentiment.admin.server import AdminSecurityError
    from stream_sentiment.clients import ServiceConfigError, ServiceConnectionError, describe_redis_error
    from stream_sentiment.engines.base import BackendUnavailableError
    from stream_sentiment.engines.manifest import EngineRepositoryError
    from stream_sentiment.engines.scoring import DataFormatError
    from stream_sentiment.sinks.checkpoint import RedisOutageError, RedisStateLostError

    try:
        return int(args.handler(args))
    except BackendUnavailableError as error:
        print(f"stream-sentiment {args.command}: {error}", file=sys.stderr)
        return EXIT_UNAVAILABLE
    except ServiceConnectionError as error:  # names the side (Kafka or Redis) and the reason
        print(f"stream-sentiment {args.command}: {error}", file=sys.stderr)
        return EXIT_UNAVAILABLE
    except (EngineRepositoryError, DataFormatError, FileNotFoundError, ValidationError, AdminSecurityError,
            ServiceConfigError) as error:
        print(f"stream-sentiment {args.command}: {error}", file=sys.stderr)
        return EXIT_USAGE
    except OSError as error:  # e.g. the admin port is taken
        print(f"stream-sentiment {args.command}: {error}", file=sys.stderr)
        return EXIT_UNAVAILABLE
    except (RedisConnectionError, NoPermissionError) as error:
        failure = describe_redis_error(error)
        print(f"stream-sentiment {args.command}: {failure or f'Redis: cannot reach it: {error}'}", file=sys.stderr)
        return EXIT_UNAVAILABLE
    except KafkaConnectionError as error:
        print(f"stream-sentiment {args.command}: Kafka: cannot reach it: {error}", file=sys.stderr)
        return EXIT_UNAVAILABLE
    except RedisOutageError as error:
        print(f"stream-sentiment {args.command}: {error}", file=sys.stderr)
        return EXIT_UNAVAILABLE
    except RedisStateLostError as error:
        print(f"stream-sentiment {args.command}: {error}", file=sys.stderr)
        return EXIT_STATE_LOST
