"""stream-sentiment produce against the suite's real broker: sample posts and a surge."""

from __future__ import annotations

import asyncio
import itertools
import json

from stream_sentiment.cli import main
from stream_sentiment.source.language import post_language
from stream_sentiment.source.messages import Post, decode_post
from stream_sentiment.source.replay import (
    SAMPLE_REGIONS,
    Surge,
    chinese_sample_posts,
    chinese_sample_rows,
    file_post_count,
    mixed_sample_posts,
    sample_posts,
    surge_posts,
)
from tests.services import consume_records


def test_sample_posts_come_from_the_installed_package_and_are_valid():
    posts = [p for _, p in zip(range(500), sample_posts(seed=1), strict=False)]
    assert len({p["id"] for p in posts}) == 500
    assert all(isinstance(decode_post(json.dumps(p).encode()), Post) for p in posts)
    assert {p["topic"] for p in posts} > {"airline"}


def test_zh_posts_cycle_through_every_sample_with_unique_ids() -> None:
    rows = chinese_sample_rows()
    posts = list(itertools.islice(chinese_sample_posts(seed=0), 2 * len(rows)))
    assert len({p["id"] for p in posts}) == len(posts)
    for cycle in (posts[: len(rows)], posts[len(rows):]):  # each cycle: every sample once, with its own topic
        assert sorted((p["text"], p["topic"]) for p in cycle) == sorted((r["text"], r["topic"]) for r in rows)
    assert {p["region"] for p in posts} <= set(SAMPLE_REGIONS)
    assert [p["id"] for p in itertools.islice(chinese_sample_posts(seed=0), 5)] == [p["id"] for p in posts[:5]]


def test_surge_posts_are_negative_tweets_with_the_surge_dimensions():
    posts = [p for _, p in zip(range(50), surge_posts(Surge(topic="phones", region="eu")), strict=False)]
    assert all(p["topic"] == "phones" and p["region"] == "eu" for p in posts)


def test_chinese_and_mixed_samples_are_valid_posts_in_their_language():
    """``demo --lang zh`` / ``mixed``: Chinese samples keep the topic they were written for, decode as zh (their tag
    and their script agree), and the mixed stream alternates tweets (English by default) and Chinese posts."""
    rows = {row["text"]: row for row in chinese_sample_rows()}
    chinese = [p for _, p in zip(range(800), chinese_sample_posts(seed=1), strict=False)]
    assert len({p["id"] for p in chinese}) == 800 and {p["text"] for p in chinese} == set(rows)  # two cycles
    for post in chinese:
        decoded = decode_post(json.dumps(post, ensure_ascii=False).encode())
        assert isinstance(decoded, Post) and decoded.lang == "zh" and decoded.topic == rows[post["text"]]["topic"]
        assert post_language(None, post["text"]) == "zh"  # an untagged copy is routed the same way
    mixed = [decode_post(json.dumps(p, ensure_ascii=False).encode())
             for _, p in zip(range(100), mixed_sample_posts(seed=1), strict=False)]
    assert [p.lang for p in mixed if isinstance(p, Post)] == ["en", "zh"] * 50


def test_a_chinese_surge_quotes_negative_posts_written_for_its_topic():
    by_text = {row["text"]: row for row in chinese_sample_rows()}
    airline = [p for _, p in zip(range(200), surge_posts(Surge(topic="airline", lang="zh")), strict=False)]
    assert all(p["topic"] == "airline" and p["lang"] == "zh" for p in airline)
    assert all(by_text[p["text"]]["label"] == "negative" and by_text[p["text"]]["topic"] == "airline" for p in airline)
    # A topic the samples were not written for: every negative sample, tagged with it.
    other = [p for _, p in zip(range(200), surge_posts(Surge(topic="launch-day", lang="zh")), strict=False)]
    assert all(by_text[p["text"]]["label"] == "negative" and p["topic"] == "launch-day" for p in other)
    assert len({by_text[p["text"]]["topic"] for p in other}) > 1


def test_produce_command_sends_samples_and_a_surge(kafka, topic_factory, capsys):
    topic = topic_factory(partitions=3)
    code = main(["produce", "--bootstrap-servers", kafka.bootstrap_servers, "--topic", topic, "--count", "300",
                 "--rate", "1000", "--surge-topic", "phones", "--surge-start", "0", "--surge-duration", "60",
                 "--surge-rate", "500", "--no-progress"])
    assert code == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    # sent counts every record, the surge's included: what a consumer of the topic will see.
    assert summary["replayed"] == 300 and summary["surge"] > 0 and summary["failed"] == 0
    assert summary["sent"] == 300 + summary["surge"]
    records = asyncio.run(consume_records(kafka.bootstrap_servers, topic, summary["sent"], f"g-{topic}"))
    posts = [decode_post(r.value) for r in records]
    assert all(isinstance(p, Post) for p in posts)
    assert sum(p.id.startswith("surge-") and p.topic == "phones" for p in posts) == summary["surge"]


def test_produce_from_a_file_shows_its_total_and_counts_what_it_sent(kafka, topic_factory, tmp_path, capsys):
    topic = topic_factory(partitions=1)
    posts = tmp_path / "posts.jsonl"
    posts.write_text("".join(json.dumps({"id": f"p{i}", "text": f"post {i}"}) + "\n" + ("\n" if i == 2 else "")
                             for i in range(5)))
    code = main(["produce", "--bootstrap-servers", kafka.bootstrap_servers, "--topic", topic, "--file", str(posts),
                 "--rate", "0"])
    assert code == 0
    out, err = capsys.readouterr()
    assert json.loads(out.strip().splitlines()[-1]) == {"sent": 5, "replayed": 5, "surge": 0, "failed": 0}
    assert "5/5" in err  # the progress bar knew the file's total (the blank line is not a post)
    # --count smaller than the file: the bar's total is the count.
    code = main(["produce", "--bootstrap-servers", kafka.bootstrap_servers, "--topic", topic, "--file", str(posts),
                 "--rate", "0", "--count", "3"])
    assert code == 0
    out, err = capsys.readouterr()
    assert json.loads(out.strip().splitlines()[-1])["sent"] == 3 and "3/3" in err


def test_a_csv_file_counts_its_rows_not_its_lines(tmp_path):
    posts = tmp_path / "posts.csv"
    posts.write_text('id,text\n1,"two\nlines"\n2,one line\n', encoding="utf-8")
    assert file_post_count(posts) == 2
