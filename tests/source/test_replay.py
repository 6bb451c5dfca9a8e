"""stream-sentiment produce against the suite's real broker: sample posts and a surge."""

from __future__ import annotations

import asyncio
import json

from stream_sentiment.cli import main
from stream_sentiment.source.messages import Post, decode_post
from stream_sentiment.source.replay import Surge, sample_posts, surge_posts
from tests.services import consume_records


def test_sample_posts_come_from_the_installed_package_and_are_valid():
    posts = [p for _, p in zip(range(500), sample_posts(seed=1), strict=False)]
    assert len({p["id"] for p in posts}) == 500
    assert all(isinstance(decode_post(json.dumps(p).encode()), Post) for p in posts)
    assert {p["topic"] for p in posts} > {"airline"}


def test_surge_posts_are_negative_tweets_with_the_surge_dimensions():
    posts = [p for _, p in zip(range(50), surge_posts(Surge(topic="phones", region="eu")), strict=False)]
    assert all(p["topic"] == "phones" and p["region"] == "eu" for p in posts)


def test_produce_command_sends_samples_and_a_surge(kafka, topic_factory, capsys):
    topic = topic_factory(partitions=3)
    code = main(["produce", "--bootstrap-servers", kafka.bootstrap_servers, "--topic", topic, "--count", "300",
                 "--rate", "1000", "--surge-topic", "phones", "--surge-start", "0", "--surge-duration", "60",
                 "--surge-rate", "500", "--no-progress"])
    assert code == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["sent"] == 300 and summary["surge"] > 0
    records = asyncio.run(consume_records(kafka.bootstrap_servers, topic, 300 + summary["surge"], f"g-{topic}"))
    posts = [decode_post(r.value) for r in records]
    assert all(isinstance(p, Post) for p in posts)
    assert sum(p.id.startswith("surge-") and p.topic == "phones" for p in posts) == summary["surge"]
