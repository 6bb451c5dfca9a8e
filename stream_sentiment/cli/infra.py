"""``services`` and ``topics create``: what the pipeline runs on, locally or on any Kafka."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from stream_sentiment.cli.common import EXIT_USAGE, Commands, add_connection_flags, connection_settings

# The local topic's partitions: enough to see a consumer group share them between a few workers.
DEFAULT_PARTITIONS = 3


def _services(args: argparse.Namespace) -> int:
    from stream_sentiment.config import Settings
    from stream_sentiment.local_services import run_services

    if args.partitions < 1:
        print("stream-sentiment services: --partitions must be at least 1", file=sys.stderr)
        return EXIT_USAGE
    Settings.load(topic=args.topic)  # a bad topic name fails here, before anything starts
    return run_services(topic=args.topic, partitions=args.partitions, kafka_port=args.kafka_port,
                        redis_port=args.redis_port, env_file=args.env_file)


def _topics_create(args: argparse.Namespace) -> int:
    import asyncio

    from stream_sentiment.topics import TopicMismatchError, TopicSpec, ensure_topics

    if args.partitions < 1 or args.replication_factor < 1 or (args.dlq_partitions or 1) < 1:
        print("stream-sentiment topics create: partitions and replication factor must be at least 1", file=sys.stderr)
        return EXIT_USAGE
    settings = connection_settings(args)
    specs = [TopicSpec(settings.topic, args.partitions, args.partitions, args.replication_factor)]  # type: ignore[attr-defined]
    if not args.no_dlq:
        specs.append(TopicSpec(settings.dead_letter_topic, args.dlq_partitions, args.dlq_partitions or 1,  # type: ignore[attr-defined]
                               args.replication_factor))
    try:
        lines = asyncio.run(ensure_topics(settings, specs))  # type: ignore[arg-type]
    except TopicMismatchError as error:
        print(f"stream-sentiment topics create: {error}", file=sys.stderr)
        return EXIT_USAGE
    for line in lines:
        print(line)
    return 0


def add_commands(commands: Commands) -> None:
    services = commands.add_parser(
        "services", help="run a local Kafka-protocol broker and Redis-compatible server (from the installed wheels) "
                         "with the topic created, print the variables to use them, stop both on Ctrl-C")
    services.add_argument("--topic", default="posts", help="input topic to create, with <topic>.dlq (default posts)")
    services.add_argument("--partitions", type=int, default=DEFAULT_PARTITIONS,
                          help=f"partitions of the topic (default {DEFAULT_PARTITIONS}; the .dlq gets 1)")
    services.add_argument("--kafka-port", type=int, default=None, help="loopback port of the broker (default: free)")
    services.add_argument("--redis-port", type=int, default=None, help="loopback port of Redis (default: free)")
    services.add_argument("--env-file", type=Path, default=None,
                          help="also write the STREAM_SENTIMENT_* variables to this file (KEY=value lines), "
                               "once the topics exist; removed on exit")
    services.set_defaults(handler=_services)

    topics = commands.add_parser("topics", help="Kafka topics the pipeline needs")
    actions = topics.add_subparsers(dest="action", required=True)
    create = actions.add_parser(
        "create", help="create the topic and its dead-letter topic on any Kafka (kafka.* settings apply: TLS, "
                       "SASL); an existing one with the same partitions is fine, another count is an error")
    add_connection_flags(create)
    create.add_argument("--partitions", type=int, default=DEFAULT_PARTITIONS,
                        help=f"partitions of the topic (default {DEFAULT_PARTITIONS}); at most this many workers "
                             "share it")
    create.add_argument("--dlq-partitions", type=int, default=None,
                        help="partitions of the dead-letter topic when it is created (default 1); "
                             "an existing one is accepted with any count unless this is given")
    create.add_argument("--replication-factor", type=int, default=1,
                        help="copies of each partition (default 1, for one broker; 3 on a production cluster)")
    create.add_argument("--no-dlq", action="store_true", help="leave the dead-letter topic out")
    create.set_defaults(handler=_topics_create)
