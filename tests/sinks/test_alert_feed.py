"""stream-sentiment alerts: readable lines from the real Redis alert stream, and --follow."""

from __future__ import annotations

import asyncio
import json
import threading
import time

from rich.cells import cell_len

from stream_sentiment.aggregation.alerts import AlertRules
from stream_sentiment.aggregation.buckets import BucketRules, RedisKeys
from stream_sentiment.aggregation.monitor import AlertMonitor
from stream_sentiment.cli import main
from stream_sentiment.sinks.alert_feed import following_line, format_alert
from tests.views.seed import write_posts

ALERT = {
    "rule": "surge", "dimension": "topic", "value": "airline", "window_seconds": "60", "window_start": "0",
    "window_end": "60", "posts": "200", "negative": "70", "negative_ratio": "0.3500", "mean_p_negative": "0.33",
    "baseline_negative": "20.40", "z": "10.98", "engine_version": "v1", "at": "1795339800.0",
}


def test_alerts_prints_recent_alerts_readably(redis_server, redis_factory, capsys):
    client = redis_factory()
    client.xadd("feed:alerts", ALERT)
    client.xadd("feed:alerts", {**ALERT, "rule": "ratio", "dimension": "region", "value": "eu"})
    assert main(["alerts", "--redis-url", redis_server.url, "--redis-prefix", "feed", "--last", "5"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines == [
        "2026-11-22 09:30:00Z  SURGE  topic=airline  window 60s  negative 70/200 (35%)  "
        "z 11.0 vs baseline 20.4  engine v1",
        "2026-11-22 09:30:00Z  RATIO  region=eu  window 60s  negative 70/200 (35%)  "
        "z 11.0 vs baseline 20.4  engine v1",
    ]


def test_alerts_follow_prints_new_alerts_as_they_arrive(redis_server, redis_factory, capsys):
    client = redis_factory()
    client.xadd("follow:alerts", ALERT)  # old: shown by --last, not again by --follow

    def later() -> None:
        time.sleep(0.8)
        client.xadd("follow:alerts", {**ALERT, "value": "trains"})

    writer = threading.Thread(target=later)
    writer.start()
    code = main(["alerts", "--redis-url", redis_server.url, "--redis-prefix", "follow", "--last", "1",
                 "--follow", "--duration", "2.5"])
    writer.join()
    assert code == 0
    out, err = capsys.readouterr()
    lines = out.strip().splitlines()
    assert [line.split("  ")[2] for line in lines] == ["topic=airline", "topic=trains"]
    # Before the first new alert it said what it follows, where, and from which entry (on stderr: stdout is alerts).
    first_id = client.xrange("follow:alerts")[0][0]
    assert err.splitlines()[0] == (
        f"following alert stream 'follow:alerts' on {redis_server.url} after the 1 shown above (entry {first_id}) "
        "for 2.5 s; new alerts print as workers raise them (a window is judged seconds after it closes)")


def test_follow_from_now_says_so_and_an_empty_feed_says_it_is_empty(redis_server, redis_factory, capsys):
    client = redis_factory()
    assert main(["alerts", "--redis-url", redis_server.url, "--redis-prefix", "quiet"]) == 0
    out, err = capsys.readouterr()
    assert out == "" and err == "no alerts in 'quiet:alerts' yet (--follow waits for new ones)\n"
    assert main(["alerts", "--redis-url", redis_server.url, "--redis-prefix", "quiet", "--follow",
                 "--duration", "0.1"]) == 0
    err = capsys.readouterr().err
    assert "'quiet:alerts'" in err and "from its first entry (it has none yet)" in err
    newest = client.xadd("quiet:alerts", ALERT)
    assert main(["alerts", "--redis-url", redis_server.url, "--redis-prefix", "quiet", "--last", "0", "--follow",
                 "--duration", "0.1"]) == 0
    out, err = capsys.readouterr()
    assert out == "" and f"from now (after entry {newest}) for 0.1 s" in err


def test_a_redis_password_never_shows_in_the_following_line():
    line = following_line("redis://analyst:hunter2@redis.internal:6380/0", "ss:alerts", "0-0", shown=0, duration=None)
    assert "redis://analyst:***@redis.internal:6380/0" in line and "hunter2" not in line


def test_an_entry_this_service_did_not_write_is_shown_raw_not_a_crash(redis_server, redis_factory, capsys):
    client = redis_factory()
    client.xadd("odd:alerts", {"rule": "surge", "at": "yesterday", "posts": "many"})
    assert main(["alerts", "--redis-url", redis_server.url, "--redis-prefix", "odd"]) == 0
    assert capsys.readouterr().out.startswith("unreadable alert entry: {'rule': 'surge'")


def test_an_alert_quotes_every_stored_sample_post_under_its_line():
    samples = [
        {"id": "p1", "text": "flight   cancelled\nagain, no refund", "p_negative": 0.98},
        {"id": "p2", "text": "x" * 150, "p_negative": 0.97},
        {"id": "p3", "text": "the third is shown too", "p_negative": 0.9},
    ]
    lines = format_alert({**ALERT, "samples": json.dumps(samples)}).splitlines()
    assert lines[0].startswith("2026-11-22 09:30:00Z  SURGE  topic=airline")
    assert lines[1:] == [
        '    e.g. "flight cancelled again, no refund"  (post p1, P(negative) 0.98)',
        f'    e.g. "{"x" * 99}…"  (post p2, P(negative) 0.97)',
        '    e.g. "the third is shown too"  (post p3, P(negative) 0.9)',
    ]


def test_a_chinese_sample_is_cut_by_terminal_columns_not_characters():
    """A Chinese character takes two terminal columns: a cut at 100 characters made a Chinese sample 200 wide."""
    chinese = "航班取消了，客服电话一直打不通，柜台只有一个人，" * 8  # 200 characters, 384 columns
    mixed = "MU5123 " + "延误六小时" * 30
    samples = [{"id": "z1", "text": chinese, "p_negative": 0.99}, {"id": "z2", "text": mixed, "p_negative": 0.98},
               {"id": "z3", "text": "航班取消了", "p_negative": 0.97}]
    lines = format_alert({**ALERT, "value": "航空", "samples": json.dumps(samples, ensure_ascii=False)}).splitlines()
    assert "  topic=航空  " in lines[0]
    quoted = [line.split('"')[1] for line in lines[1:]]
    # 49 wide characters fill 98 columns; the 99th column cannot hold half of one, so the cut is at 98 + "…".
    assert quoted[0] == chinese[:49] + "…"
    # "MU5123 " is 7 columns, then 46 characters of 2 columns: 99.
    assert quoted[1] == mixed[:7 + 46] + "…"
    assert quoted[2] == "航班取消了"  # short: whole, no ellipsis
    assert all(cell_len(text) <= 100 for text in quoted)


def test_an_alert_over_several_engines_names_each_with_its_posts():
    engines = {"multilingual-sentiment/v1": 300, "minilm-sentiment/v1": 120}
    line = format_alert({**ALERT, "engine_version": "multilingual-sentiment/v1, minilm-sentiment/v1",
                         "engines": json.dumps(engines)})
    assert line.endswith("engines multilingual-sentiment/v1 (300), minilm-sentiment/v1 (120)")
    one = format_alert({**ALERT, "engine_version": "multilingual-sentiment/v1",
                        "engines": json.dumps({"multilingual-sentiment/v1": 300})})
    assert one.endswith("z 11.0 vs baseline 20.4  engine multilingual-sentiment/v1")


def test_unreadable_samples_do_not_hide_the_alert():
    assert format_alert({**ALERT, "samples": "{not json"}).count("\n") == 0


def test_follow_prints_an_alert_the_monitor_raised_from_scored_posts(redis_server, redis_factory, capsys):
    """End to end over real data: posts through the fenced sink, the alert monitor, then `alerts --follow`."""
    buckets = BucketRules(bucket_seconds=1, allowed_lateness=3600, dimensions=("global", "topic"), sample_posts=3,
                          max_out_of_orderness=0)
    rules = AlertRules(ratio_threshold=0.6, min_posts=10, surge_z=3.0, ewma_alpha=0.2, cooldown_seconds=60)
    start = 1_800_000_000

    async def raise_alerts() -> None:
        client = redis_factory(async_client=True)
        await write_posts(client, "real", buckets, start + 0.5, {"airline": (20, 18)})
        # A later post moves the partition's stream time past the window's end: the window is judged.
        await write_posts(client, "real", buckets, start + 1.2, {"airline": (1, 0)}, offset=20)
        monitor = AlertMonitor(client, RedisKeys("real"), buckets, windows=(1,), rules=rules, engine_version="v1",
                               sample_posts=3)
        assert len(await monitor.judge_due(partitions=1)) == 2  # topic=airline and global=all
        await client.aclose()

    writer = threading.Thread(target=lambda: (time.sleep(0.8), asyncio.run(raise_alerts())))
    writer.start()
    code = main(["alerts", "--redis-url", redis_server.url, "--redis-prefix", "real", "--last", "0",
                 "--follow", "--duration", "3"])
    writer.join()
    assert code == 0
    lines = capsys.readouterr().out.strip().splitlines()
    headlines = [line for line in lines if not line.startswith(" ")]
    assert [line.split("  ")[2] for line in headlines] == ["global=all", "topic=airline"], lines
    airline = lines.index(headlines[1])
    assert headlines[1].endswith("RATIO  topic=airline  window 1s  negative 18/20 (90%)  no baseline yet  engine v1")
    quotes = lines[airline + 1:]
    assert len(quotes) == 3 and all(q.startswith('    e.g. "airline post ') and "awful" in q for q in quotes), lines
    assert all(q.endswith("P(negative) 0.9)") for q in quotes), quotes
