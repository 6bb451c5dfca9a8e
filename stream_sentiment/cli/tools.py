"""``produce``, ``alerts``, ``top``, ``demo`` and ``stats``: posts into the topic, alerts and totals out of Redis."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from stream_sentiment.cli.common import (
    EXIT_UNAVAILABLE,
    EXIT_USAGE,
    Commands,
    add_connection_flags,
    admin_base_url,
    connection_settings,
    int_list,
)


def _produce(args: argparse.Namespace) -> int:
    import asyncio
    import itertools

    from tqdm import tqdm

    from stream_sentiment.clients import kafka_producer, start_kafka
    from stream_sentiment.source.replay import Surge, file_post_count, file_posts, replay, sample_posts

    settings = connection_settings(args)
    total = args.count  # the bar's total: known for a file or a --count; the samples repeat forever
    if args.file:
        values = file_posts(args.file)
        in_file = file_post_count(args.file)
        total = in_file if total is None else min(total, in_file)
    else:
        values = (json.dumps(p).encode() for p in sample_posts(args.seed))
    surge = None
    if args.surge_topic or args.surge_region:
        surge = Surge(args.surge_topic, args.surge_region, args.surge_start, args.surge_duration, args.surge_rate)

    async def send() -> dict[str, int]:
        producer = kafka_producer(settings, linger_ms=5)  # type: ignore[arg-type]
        await start_kafka(producer, settings)  # type: ignore[arg-type]
        try:
            with tqdm(total=total, desc="produce", unit="post", file=sys.stderr,
                      disable=args.no_progress) as bar:

                def progress(replayed: int, surged: int) -> None:
                    bar.update(replayed - bar.n)
                    if surge is not None:  # surge posts come on top of the bar's total: shown beside it
                        bar.set_postfix(surge=surged, refresh=False)

                return await replay(producer, settings.topic, itertools.islice(values, None),  # type: ignore[attr-defined]
                                    rate=args.rate, count=args.count, surge=surge, progress=progress)
        finally:
            await producer.stop()

    # sent: every record the broker took, surge posts included; replayed + surge = sent + failed.
    summary = asyncio.run(send())
    print(json.dumps(summary))
    return 0 if summary["failed"] == 0 else EXIT_UNAVAILABLE


def _page_url(args: argparse.Namespace) -> int:
    """``alerts --page-url``: the alert page's address, signed in by a token in its #fragment where one is set.

    For screenshots and monitors: a headless browser opening it lands on the page, not on the sign-in form.
    The fragment never reaches a server or its logs; the page drops it from the address bar once read.
    """
    from urllib.parse import quote

    settings: Any = connection_settings(args)
    admin = settings.admin
    if args.admin_url is None and admin.port == 0:
        print("stream-sentiment alerts: admin.port is 0 (any free port); pass --admin-url", file=sys.stderr)
        return EXIT_USAGE
    base = (args.admin_url or admin_base_url(admin.host, admin.port)).rstrip("/")
    token = admin.read_token()
    print(f"{base}/alerts" + (f"#token={quote(token, safe='')}" if token else ""))
    if token:
        print("stream-sentiment alerts: this URL carries the admin token (in its #fragment, which the browser "
              "never sends to a server); treat it as the token", file=sys.stderr)
    return 0


def _alerts(args: argparse.Namespace) -> int:
    if args.page_url:
        return _page_url(args)
    from stream_sentiment.aggregation.buckets import RedisKeys
    from stream_sentiment.clients import redis_client
    from stream_sentiment.sinks.alert_feed import deadline, follow, following_line, format_alert, newest_id, recent

    settings = connection_settings(args)
    client = redis_client(settings, decode_responses=True)  # type: ignore[arg-type]
    stream = RedisKeys(settings.redis_prefix).alerts  # type: ignore[attr-defined]
    try:
        shown = recent(client, stream, args.last)
        for _, fields in shown:
            print(format_alert(fields), flush=True)
        if args.follow:
            last = shown[-1][0] if shown else newest_id(client, stream)
            # stderr: stdout stays one alert per entry for scripts; a person sees both.
            print(following_line(settings.redis_url, stream, last, shown=len(shown),  # type: ignore[attr-defined]
                                 duration=args.duration), file=sys.stderr, flush=True)
            for _, fields in follow(client, stream, after=last, until=deadline(args.duration)):
                print(format_alert(fields), flush=True)
        elif not shown:
            print(f"no alerts in {stream!r} yet (--follow waits for new ones)", file=sys.stderr)
    except KeyboardInterrupt:
        pass
    finally:
        client.close()
    return 0


def _top(args: argparse.Namespace) -> int:
    import asyncio

    from stream_sentiment.aggregation.buckets import RedisKeys
    from stream_sentiment.clients import async_redis_client
    from stream_sentiment.views.queries import AnalystQueries
    from stream_sentiment.views.terminal import run_top

    settings = connection_settings(args)
    windows = args.windows or settings.aggregation.windows_seconds  # type: ignore[attr-defined]
    if any(w <= 0 for w in windows) or args.limit < 1 or args.refresh <= 0:
        print("stream-sentiment top: --windows, --limit and --refresh must be positive", file=sys.stderr)
        return EXIT_USAGE
    min_posts = args.min_posts if args.min_posts is not None else settings.alerts.min_posts  # type: ignore[attr-defined]
    client = async_redis_client(settings, socket_timeout=10)  # type: ignore[arg-type]
    queries = AnalystQueries(client, RedisKeys(settings.redis_prefix),  # type: ignore[attr-defined]
                             settings.aggregation.bucket_seconds)  # type: ignore[attr-defined]
    try:
        asyncio.run(run_top(client, queries, windows, limit=args.limit, min_posts=min_posts,
                            refresh_seconds=args.refresh, once=args.once, duration=args.duration))
    except KeyboardInterrupt:
        pass
    return 0


def _demo(args: argparse.Namespace) -> int:
    from stream_sentiment.demo import main as demo

    return demo(args.duration, args.rate, args.surge_topic, args.surge_start, args.lang, args.engine)


def _stats(args: argparse.Namespace) -> int:
    from stream_sentiment.service import read_stats

    stats = read_stats(connection_settings(args))  # type: ignore[arg-type]
    if args.json:
        print(json.dumps(stats))
    else:
        for key, value in stats.items():
            print(f"{key:>24}: {value}")
    return 0


def add_commands(commands: Commands) -> None:
    produce = commands.add_parser("produce", help="replay posts (a file or the bundled samples) at a rate")
    add_connection_flags(produce)
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
    add_connection_flags(alerts)
    alerts.add_argument("--last", type=int, default=20, help="show the last N alerts first")
    alerts.add_argument("--follow", action="store_true", help="then print new alerts as they arrive")
    alerts.add_argument("--duration", type=float, default=None, help="stop following after this many seconds")
    alerts.add_argument("--page-url", action="store_true",
                        help="print the web alert page's URL and exit; where an admin token is set (settings, "
                             "$STREAM_SENTIMENT_ADMIN_TOKEN) it carries it as #token=..., so a script or headless "
                             "browser opens the page signed in")
    alerts.add_argument("--admin-url", default=None,
                        help="the worker serving the page (default: http://<admin.host>:<admin.port> from settings)")
    alerts.set_defaults(handler=_alerts)

    top = commands.add_parser("top", help="live table of the most negative dimension values per window")
    add_connection_flags(top)
    top.add_argument("--windows", type=int_list, default=None,
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
    demo.add_argument("--rate", type=float, default=None,
                      help="sample posts per second; default 50 for en (the surge adds 0.6 times as many), 10 for zh "
                           "(the surge adds as many), 20 for mixed (the surge adds half as many)")
    demo.add_argument("--surge-topic", default="airline", help="the topic that turns negative")
    demo.add_argument("--surge-start", type=float, default=15.0, help="seconds after the start")
    demo.add_argument("--lang", choices=("en", "zh", "mixed"), default="en",
                      help="en: the sample tweets; zh: Chinese sample posts, routed to multilingual-sentiment/v3; "
                           "mixed: both interleaved, Chinese routed there and English to minilm-sentiment/v1 "
                           "(the surge is Chinese for zh and mixed)")
    demo.add_argument("--engine", default=None, metavar="MODEL[/VERSION]",
                      help="the English engine, e.g. minilm-fast (the fast CPU student) or minilm-sentiment/v1; "
                           "default: engine.model / engine.version (minilm-sentiment/v1)")
    demo.set_defaults(handler=_demo)

    stats = commands.add_parser("stats", help="totals from Redis")
    add_connection_flags(stats)
    stats.add_argument("--json", action="store_true", help="one JSON object")
    stats.set_defaults(handler=_stats)
