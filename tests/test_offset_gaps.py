"""A gap in a partition's fetched offsets is read again before it is skipped.

A broker can hand out a later record batch before an earlier one is readable (the test broker, Tansu,
does it with two producers on one partition); skipping such a gap would mark its records applied
without counting them. The race cannot be produced on demand against a real broker, so this drives
the Kafka source's admission step directly with records and a consumer that only records seeks.
"""

from __future__ import annotations

import json

from aiokafka.structs import ConsumerRecord, TopicPartition

from stream_sentiment.aggregation.progress import PartitionProgress
from stream_sentiment.batching.tokenizer import PostTokenizer
from stream_sentiment.config import Settings
from stream_sentiment.engines.onnxruntime_backend import OnnxRuntimeEngine
from stream_sentiment.metrics import PipelineMetrics
from stream_sentiment.worker import Worker

TP = TopicPartition("posts", 0)


class SeekRecorder:
    def __init__(self) -> None:
        self.seeks: list[tuple[TopicPartition, int]] = []

    def seek(self, tp: TopicPartition, offset: int) -> None:
        self.seeks.append((tp, offset))


def _record(offset: int) -> ConsumerRecord:
    value = json.dumps({"id": f"p{offset}", "text": f"post {offset}"}).encode()
    return ConsumerRecord("posts", 0, offset, 1_700_000_000_000, 0, None, value, None, 0, len(value), ())


def _worker(engine_version, rereads: int) -> tuple[Worker, SeekRecorder]:
    settings = Settings.load(kafka_gap_refetches=rereads)
    engine = OnnxRuntimeEngine(engine_version)  # never activated: admission does not score
    worker = Worker(settings, engine, PostTokenizer(engine_version), metrics=PipelineMetrics())
    worker.progress[0] = PartitionProgress(0, mark=10)
    consumer = SeekRecorder()
    worker.source.consumer = consumer
    return worker, consumer


def _admit(worker: Worker, offsets: list[int]) -> list[int]:
    return [a.offset for a in worker.source._admit({TP: [_record(o) for o in offsets]})]


def test_a_gap_is_read_again_and_admitted_once_its_records_arrive(engine_version):
    worker, consumer = _worker(engine_version, rereads=2)
    assert _admit(worker, [10, 11, 14, 15]) == [10, 11]  # 12 and 13 not readable yet: back to 12
    assert consumer.seeks == [(TP, 12)]
    assert _admit(worker, [12, 13, 14, 15]) == [12, 13, 14, 15]
    assert worker.progress[0].summary() == {"mark": 10, "in_flight": 6, "first_unfinished": 10}
    assert worker.metrics.value("stream_sentiment_offset_gaps_total", {"outcome": "refetched"}) == 1
    assert worker.metrics.value("stream_sentiment_offset_gaps_total", {"outcome": "skipped"}) == 0


def test_a_gap_still_there_after_its_rereads_is_skipped_with_a_warning(engine_version, caplog):
    worker, consumer = _worker(engine_version, rereads=2)
    assert _admit(worker, [10, 13]) == [10]
    assert _admit(worker, [13, 14]) == []  # the same gap again: second re-read
    assert _admit(worker, [13, 14]) == [13, 14]  # a real gap (compaction, a transaction marker)
    assert consumer.seeks == [(TP, 11), (TP, 11)]
    assert worker.metrics.value("stream_sentiment_offset_gaps_total", {"outcome": "skipped"}) == 1
    assert "offsets 11-12 still missing after 2 re-read(s)" in caplog.text


def test_with_no_rereads_a_gap_is_skipped_at_once(engine_version):
    worker, consumer = _worker(engine_version, rereads=0)
    assert _admit(worker, [10, 12]) == [10, 12]
    assert consumer.seeks == []
