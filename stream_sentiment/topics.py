"""Creating the input topic and its dead-letter topic on any Kafka (``stream-sentiment topics create``).

Idempotent, so a deployment script may run it every time: a topic that exists with the partition
count asked for is left alone; one with another count is an error that says so, since partitions
can only grow and growing them moves keys to other partitions (an operator decides that, not a script).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from stream_sentiment.clients import kafka_admin, start_kafka
from stream_sentiment.config import Settings

__all__ = ["TopicMismatchError", "TopicSpec", "ensure_topics"]

# Kafka error codes the creation answers with.
_TOPIC_ALREADY_EXISTS = 36


class TopicMismatchError(ValueError):
    """A topic exists with another partition count than the one asked for."""


@dataclass(frozen=True)
class TopicSpec:
    """A topic to have. ``partitions`` None: any count will do if it exists, ``create_partitions`` if not."""

    name: str
    partitions: int | None
    create_partitions: int
    replication_factor: int = 1


def _partitions(count: int | None) -> str:
    return f"{count} partition" if count == 1 else f"{count} partitions"


async def _partition_counts(admin: Any, names: list[str]) -> dict[str, int]:
    existing = set(await admin.list_topics())
    wanted = [name for name in names if name in existing]
    if not wanted:
        return {}
    return {entry["topic"]: len(entry["partitions"]) for entry in await admin.describe_topics(wanted)
            if entry["error_code"] == 0}


async def ensure_topics(settings: Settings, specs: list[TopicSpec]) -> list[str]:
    """Create the missing topics and check the existing ones; one line per topic saying which.

    Raises:
        TopicMismatchError: a topic exists with a partition count other than its spec's.
        ServiceConnectionError: the cluster cannot be reached or refused the credentials.
    """
    from aiokafka.admin import NewTopic
    from aiokafka.errors import KafkaError

    admin = kafka_admin(settings, request_timeout_ms=30000)
    await start_kafka(admin, settings)
    try:
        counts = await _partition_counts(admin, [spec.name for spec in specs])
        missing = [spec for spec in specs if spec.name not in counts]
        created = set()
        if missing:
            response = await admin.create_topics([NewTopic(spec.name, spec.create_partitions, spec.replication_factor)
                                                  for spec in missing])
            for entry in response.topic_errors:  # (topic, error code[, message]) by protocol version
                name, code, message = entry[0], entry[1], entry[2] if len(entry) > 2 else None
                if code == 0:
                    created.add(name)
                elif code != _TOPIC_ALREADY_EXISTS:  # created meanwhile by someone else: checked below
                    raise KafkaError(f"creating topic {name!r} failed: error {code} {message or ''}".strip())
            counts.update(await _partition_counts(admin, [spec.name for spec in missing if spec.name not in created]))
    finally:
        await admin.close()
    lines, mismatched = [], []
    for spec in specs:
        if spec.name in created:
            lines.append(f"created {spec.name} ({_partitions(spec.create_partitions)}, replication factor "
                         f"{spec.replication_factor})")
        elif spec.partitions is not None and counts.get(spec.name) != spec.partitions:
            mismatched.append(f"{spec.name} exists with {_partitions(counts.get(spec.name))}, not {spec.partitions}")
        else:
            lines.append(f"{spec.name} exists ({_partitions(counts.get(spec.name))}): left as it is")
    if mismatched:
        raise TopicMismatchError(
            "; ".join(mismatched) + ". Partitions cannot shrink, and adding some moves keys to other partitions: ask "
            "for the existing count, or change the topic with your Kafka tooling on purpose")
    return lines
