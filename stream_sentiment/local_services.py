"""``stream-sentiment services``: a local Kafka-protocol broker and Redis-compatible server to run against.

For running ``run``, ``produce``, ``stats`` and the rest by hand, with no Kafka, Redis or Docker
installed: the embedded Tansu broker and valkey server (from their wheels, as ``demo`` and the tests
use) on chosen or free loopback ports, the topic and its dead-letter topic created, and the
``STREAM_SENTIMENT_*`` variables that point the other commands at them printed (and written to an
env file on request). Stays in the foreground; Ctrl-C, SIGTERM or SIGHUP stops both servers. Their
data lives in memory and goes with them.
"""

from __future__ import annotations

import asyncio
import os
import signal
import sys
import threading
from pathlib import Path
from typing import TextIO

from stream_sentiment.config import ENV_PREFIX, Settings
from stream_sentiment.embedded import EmbeddedKafka, EmbeddedRedis
from stream_sentiment.topics import TopicSpec, ensure_topics

__all__ = ["environment", "run_services"]

# How often the foreground loop checks that both servers still run.
WATCH_INTERVAL_S = 0.5


def environment(bootstrap_servers: str, topic: str, redis_url: str) -> dict[str, str]:
    """The variables that point every other command at these services."""
    return {f"{ENV_PREFIX}BOOTSTRAP_SERVERS": bootstrap_servers, f"{ENV_PREFIX}TOPIC": topic,
            f"{ENV_PREFIX}REDIS_URL": redis_url}


def _write_env_file(path: Path, variables: dict[str, str]) -> None:
    # KEY=value lines: `set -a && . FILE && set +a` in a shell, `docker run --env-file`, systemd's EnvironmentFile.
    text = (f"# from `stream-sentiment services` (pid {os.getpid()}); removed when it stops\n"
            + "".join(f"{key}={value}\n" for key, value in variables.items()))
    partial = path.with_name(f".{path.name}.partial")
    partial.write_text(text, encoding="utf-8")
    partial.replace(path)  # whole or not at all: a script waiting for the file never reads half of it


def run_services(
    *, topic: str, partitions: int, kafka_port: int | None = None, redis_port: int | None = None,
    env_file: Path | None = None, out: TextIO = sys.stdout,
) -> int:
    """Start both servers and the topics, print the variables, and wait for a signal; the exit code.

    Returns 0 after a signal, 3 when a server cannot start or stops by itself.
    """
    stop = threading.Event()
    previous = {signum: signal.signal(signum, lambda *_: stop.set())
                for signum in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)}
    try:
        with EmbeddedKafka(port=kafka_port) as kafka, EmbeddedRedis(port=redis_port) as redis_server:
            settings = Settings.load(bootstrap_servers=kafka.bootstrap_servers, topic=topic)
            lines = asyncio.run(ensure_topics(settings, [
                TopicSpec(topic, partitions, partitions),
                # Dead letters are rare and read in order by a person: one partition.
                TopicSpec(settings.dead_letter_topic, None, 1),
            ]))
            variables = environment(kafka.bootstrap_servers, topic, redis_server.url)
            print(f"services: Kafka-protocol broker (Tansu) at {kafka.bootstrap_servers}, Redis-compatible server "
                  f"(valkey) at {redis_server.url}; data in memory only", file=out)
            for line in lines:
                print(f"services: topic {line}", file=out)
            print("services: point the other commands here with:", file=out)
            for key, value in variables.items():
                print(f"export {key}={value}", file=out)
            if env_file is not None:
                _write_env_file(env_file, variables)
                print(f"services: also written to {env_file} (load it with: set -a && . {env_file} && set +a)",
                      file=out)
            print("services: running; Ctrl-C stops both", file=out, flush=True)
            try:
                while not stop.wait(WATCH_INTERVAL_S):
                    for server in (kafka, redis_server):
                        if not server.running:
                            print(f"services: {server.name} stopped by itself; stopping", file=sys.stderr)
                            return 3
            finally:
                if env_file is not None:
                    env_file.unlink(missing_ok=True)
            print("services: stopping", file=out, flush=True)
        return 0
    except RuntimeError as error:  # a server could not start (e.g. the chosen port is taken)
        print(f"stream-sentiment services: {error}", file=sys.stderr)
        return 3
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
