"""Seconds from ``kill -9`` of a worker until its partitions are consumed again, with the default settings.

Two ``stream-sentiment run`` processes share a 4-partition topic (embedded broker and Redis, INT8 CPU
engine) while posts arrive at ``--rate``/s. Each round kills one worker with SIGKILL, notes the partitions
it owned (the owners hash in Redis names the member) and their applied marks, and times until every one of
them has moved: the group noticed the dead member (``kafka_session_timeout_ms``), rebalanced, and the
survivor resumed at the marks. The killed worker is then started again for the next round. Every round
ends with Redis counting exactly the posts produced so far.

    python bench/recovery.py --rounds 3
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

import redis as redis_lib
from aiokafka import AIOKafkaProducer

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from stream_sentiment.config import Settings  # noqa: E402
from stream_sentiment.embedded import EmbeddedKafka, EmbeddedRedis  # noqa: E402

PARTITIONS = 4
TOPIC = "posts"


class Producer(threading.Thread):
    """Posts at a steady rate until stopped; counts what it sent."""

    def __init__(self, bootstrap: str, rate: float) -> None:
        super().__init__(daemon=True)
        self.bootstrap, self.rate, self.sent = bootstrap, rate, 0
        self.stop = threading.Event()

    def run(self) -> None:
        asyncio.run(self._send())

    async def _send(self) -> None:
        producer = AIOKafkaProducer(bootstrap_servers=self.bootstrap, linger_ms=5)
        await producer.start()
        try:
            while not self.stop.is_set():
                value = json.dumps({"id": f"r{self.sent}", "text": f"post {self.sent}, fine"}).encode()
                await producer.send(TOPIC, value, key=str(self.sent).encode())
                self.sent += 1
                await asyncio.sleep(1 / self.rate)
            await producer.flush()
        finally:
            await producer.stop()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--rate", type=float, default=50.0)
    args = parser.parse_args()
    defaults = Settings.load()
    rounds = []
    with EmbeddedKafka() as kafka, EmbeddedRedis() as redis_server:
        kafka.create_topic(TOPIC, PARTITIONS)
        kafka.create_topic(f"{TOPIC}.dlq", 1)
        env = {**os.environ, "STREAM_SENTIMENT_BOOTSTRAP_SERVERS": kafka.bootstrap_servers,
               "STREAM_SENTIMENT_TOPIC": TOPIC, "STREAM_SENTIMENT_REDIS_URL": redis_server.url,
               "STREAM_SENTIMENT_REDIS_PREFIX": "rec", "STREAM_SENTIMENT_ADMIN__PORT": "0"}
        client = redis_lib.Redis.from_url(redis_server.url, decode_responses=True)
        log = Path(os.environ.get("RECOVERY_LOG", str(Path(redis_server.workdir) / "workers.log")))

        def start() -> subprocess.Popen:
            return subprocess.Popen([sys.executable, "-m", "stream_sentiment.cli", "run"], cwd=REPO, env=env,
                                    stdout=log.open("ab"), stderr=subprocess.STDOUT)

        def owners() -> dict[int, str]:
            return {int(p): token.split(":")[0] for p, token in client.hgetall(f"rec:owners:{TOPIC}").items()}

        def marks() -> dict[int, int]:
            return {int(p): int(m) for p, m in client.hgetall(f"rec:offsets:{TOPIC}").items()}

        workers = [start(), start()]
        producer = Producer(kafka.bootstrap_servers, args.rate)
        producer.start()
        try:
            for _ in range(args.rounds):
                deadline = time.monotonic() + 120
                while len(set(owners().values())) < 2 or len(marks()) < PARTITIONS:  # both members own some
                    if time.monotonic() > deadline:
                        raise SystemExit(f"the two workers never shared the topic:\n{log.read_text()[-3000:]}")
                    time.sleep(0.2)
                time.sleep(2)
                victim = workers.pop(0)
                member = f"{os.uname().nodename}-{victim.pid}"
                owned = sorted(p for p, name in owners().items() if name == member)
                before = marks()
                victim.send_signal(signal.SIGKILL)
                killed = time.monotonic()
                victim.wait()
                reassigned = None
                while any(marks().get(p, 0) <= before.get(p, 0) for p in owned):
                    if reassigned is None and all(owners().get(p) != member for p in owned):
                        reassigned = time.monotonic() - killed  # the survivor claimed them
                    if time.monotonic() - killed > 120:
                        raise SystemExit(f"partitions {owned} not resumed in 120 s:\n{log.read_text()[-3000:]}")
                    time.sleep(0.05)
                recovered = time.monotonic() - killed
                reassigned = recovered if reassigned is None else reassigned
                rounds.append({"partitions": owned, "reassigned_s": round(reassigned, 2),
                               "recovery_s": round(recovered, 2)})
                print(f"killed a worker owning {owned}: reassigned after {reassigned:.2f} s, consumed again after "
                      f"{recovered:.2f} s", flush=True)
                workers.append(start())
            producer.stop.set()
            producer.join()
            deadline = time.monotonic() + 120
            while int(client.hget("rec:totals", "scored") or 0) < producer.sent and time.monotonic() < deadline:
                time.sleep(0.5)
            time.sleep(2)
            counted = int(client.hget("rec:totals", "scored") or 0)
        finally:
            for worker in workers:
                worker.send_signal(signal.SIGTERM)
            for worker in workers:
                worker.wait(30)
    times = [r["recovery_s"] for r in rounds]
    print(json.dumps({
        "kafka_session_timeout_ms": defaults.kafka_session_timeout_ms,
        "kafka_heartbeat_interval_ms": defaults.kafka_heartbeat_interval_ms,
        "rounds": rounds, "median_recovery_s": statistics.median(times), "max_recovery_s": max(times),
        "produced": producer.sent, "counted": counted, "exactly_once": counted == producer.sent,
    }, indent=2))
    return 0 if counted == producer.sent else 1


if __name__ == "__main__":
    raise SystemExit(main())
