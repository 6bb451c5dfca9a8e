"""Dead-letter topic: rejected records, with why and where they came from.

A rejected record is re-published to ``<topic>.dlq`` with its original key and
value bytes (so it can be inspected and replayed) and headers naming the
reason and its origin. Publishing happens before the record's offset range is
applied to Redis, so the DLQ is at-least-once (a crash between the two can
publish a record twice) while the ``dead_lettered`` counters, applied through
the offset fence, count each record exactly once.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from stream_sentiment.source.messages import Rejection

HEADER_REASON = "dlq.reason"
HEADER_DETAIL = "dlq.detail"
HEADER_TOPIC = "dlq.original.topic"
HEADER_PARTITION = "dlq.original.partition"
HEADER_OFFSET = "dlq.original.offset"
HEADER_TIMESTAMP = "dlq.original.timestamp"
HEADER_TRUNCATED = "dlq.truncated"
# Kafka's default message.max.bytes is about 1 MiB; a value near it plus headers
# could be refused by the broker, and a DLQ write that fails blocks the partition.
MAX_DEAD_LETTER_BYTES = 1_000_000


@dataclass(frozen=True)
class SourceRecord:
    """The parts of a consumed Kafka record the pipeline keeps (aiokafka's ConsumerRecord has them)."""

    topic: str
    partition: int
    offset: int
    timestamp_ms: int
    key: bytes | None
    value: bytes | None


def dead_letter_headers(record: SourceRecord, rejection: Rejection, truncated: bool) -> list[tuple[str, bytes]]:
    headers = [
        (HEADER_REASON, rejection.reason.value.encode()),
        (HEADER_DETAIL, rejection.detail.encode("utf-8", "replace")[:512]),
        (HEADER_TOPIC, record.topic.encode()),
        (HEADER_PARTITION, str(record.partition).encode()),
        (HEADER_OFFSET, str(record.offset).encode()),
        (HEADER_TIMESTAMP, str(record.timestamp_ms).encode()),
    ]
    if truncated:
        headers.append((HEADER_TRUNCATED, b"1"))
    return headers


async def send_dead_letter(producer: Any, dlq_topic: str, record: SourceRecord, rejection: Rejection) -> Any:
    """Queue one rejected record in the producer (aiokafka); returns the future of the broker's acknowledgement.

    Queueing several before awaiting any lets the producer batch them: one round trip for a fetch's dead letters.
    """
    value = record.value or b""
    truncated = len(value) > MAX_DEAD_LETTER_BYTES
    return await producer.send(
        dlq_topic,
        value=value[:MAX_DEAD_LETTER_BYTES],
        key=record.key,
        partition=None,
        headers=dead_letter_headers(record, rejection, truncated),
    )


async def publish_dead_letter(producer: Any, dlq_topic: str, record: SourceRecord, rejection: Rejection) -> None:
    """Publish one rejected record and wait for the broker's acknowledgement."""
    await (await send_dead_letter(producer, dlq_topic, record, rejection))
