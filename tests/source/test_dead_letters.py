"""Malformed records go to the dead-letter topic with their reason and origin (real Tansu broker)."""

from __future__ import annotations

import asyncio
import json

from aiokafka import AIOKafkaProducer

from stream_sentiment.source.dead_letters import SourceRecord, publish_dead_letter
from stream_sentiment.source.messages import Post, Rejection, decode_post
from tests.services import consume_records

MALFORMED = [b"\xff\xfe", b"{oops", b"[1,2]", json.dumps({"id": "x", "text": ""}).encode(), b""]
VALID = [json.dumps({"id": f"ok-{i}", "text": f"post {i}"}).encode() for i in range(6)]


def test_malformed_records_are_dead_lettered_with_reason_and_origin(kafka, topic_factory):
    topic = topic_factory(partitions=3)
    dlq = topic_factory(partitions=1, prefix=f"{topic}.dlq")

    async def scenario():
        producer = AIOKafkaProducer(bootstrap_servers=kafka.bootstrap_servers)
        await producer.start()
        try:
            for index, value in enumerate(MALFORMED + VALID):
                await producer.send_and_wait(topic, value=value, key=str(index).encode())
            records = await consume_records(kafka.bootstrap_servers, topic, len(MALFORMED) + len(VALID), f"g-{topic}")
            accepted = 0
            for record in records:
                outcome = decode_post(record.value)
                if isinstance(outcome, Post):
                    accepted += 1
                    continue
                source = SourceRecord(record.topic, record.partition, record.offset, record.timestamp,
                                      record.key, record.value)
                await publish_dead_letter(producer, dlq, source, outcome)
            dead = await consume_records(kafka.bootstrap_servers, dlq, len(MALFORMED), f"g-{dlq}")
        finally:
            await producer.stop()
        return records, accepted, dead

    records, accepted, dead = asyncio.run(scenario())
    assert accepted == len(VALID)
    assert len(dead) == len(MALFORMED)
    origins = {(r.partition, r.offset): r for r in records}
    reasons = []
    for letter in dead:
        headers = {k: v.decode() for k, v in letter.headers}
        original = origins[(int(headers["dlq.original.partition"]), int(headers["dlq.original.offset"]))]
        assert headers["dlq.original.topic"] == topic
        assert letter.value == (original.value or b"") and letter.key == original.key
        rejection = decode_post(original.value)
        assert isinstance(rejection, Rejection) and headers["dlq.reason"] == rejection.reason.value
        reasons.append(headers["dlq.reason"])
    assert sorted(reasons) == sorted(["not_utf8", "not_json", "not_an_object", "empty_text", "empty_message"])
