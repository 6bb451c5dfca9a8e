"""``stream-sentiment top`` against real Redis data written by the service's sink."""

from __future__ import annotations

import asyncio
import subprocess
import sys
import time
from pathlib import Path

from stream_sentiment.aggregation.buckets import BucketRules, RedisKeys
from stream_sentiment.cli import main
from stream_sentiment.views.queries import AnalystQueries
from tests.views.seed import alert_record, write_posts

REPO = Path(__file__).resolve().parents[2]
RULES = BucketRules(bucket_seconds=10, allowed_lateness=60, dimensions=("global", "topic", "region"), sample_posts=3)


def _seed(redis_factory, prefix: str, now: float) -> None:
    async def seed() -> None:
        client = redis_factory(async_client=True)
        offset = await write_posts(client, prefix, RULES, now - 2,
                                   {"airline": (10, 8), "weather": (10, 2), "tiny": (3, 3)}, region="eu")
        # 200 s ago: inside the 5-minute window only.
        await write_posts(client, prefix, RULES, now - 200, {"weather": (30, 30)}, offset=offset)
        await client.xadd(RedisKeys(prefix).alerts, alert_record("topic", "airline", now - 1))
        await client.aclose()

    asyncio.run(seed())


def _table_rows(output: str, title: str) -> list[str]:
    """The data lines of the table whose title contains ``title``."""
    lines = output.splitlines()
    start = next(i for i, line in enumerate(lines) if title in line)
    rows = []
    for line in lines[start + 1:]:
        if "most negative" in line:
            break
        if line.startswith("│") and "dimension value" not in line:
            rows.append(" ".join(line.replace("│", " ").split()))
    return rows


def test_top_once_ranks_values_by_negative_share_per_window(redis_server, redis_factory, capsys):
    now = time.time()
    _seed(redis_factory, "top", now)
    code = main(["top", "--once", "--redis-url", redis_server.url, "--redis-prefix", "top",
                 "--windows", "60,300", "--min-posts", "5", "--limit", "5"])
    output = capsys.readouterr().out
    assert code == 0
    assert "scored 53" in output and "negative 43" in output
    minute = _table_rows(output, "last 1 min")
    # airline 8/10 first and marked (an alert within the window); 3-post "tiny" is below --min-posts.
    assert minute[0].startswith("1 topic=airline 80% 8/10 0.73") and minute[0].endswith("ALERT"), minute
    assert [row.split()[1] for row in minute] == ["topic=airline", "all", "region=eu", "topic=weather"]
    assert minute[1].startswith("2 all posts 57% 13/23")
    assert "tiny" not in output
    five = _table_rows(output, "last 5 min")
    # Over 5 minutes the older weather posts count: 32/40 ties airline's 80%; the larger count ranks first.
    assert [row.split(" █")[0] for row in five[:3]] == [
        "1 all posts 81% 43/53 0.74", "2 topic=weather 80% 32/40 0.73", "3 topic=airline 80% 8/10 0.73"], five


def test_top_refreshes_until_its_duration_ends(redis_server, redis_factory):
    now = time.time()
    process = subprocess.Popen(
        [sys.executable, "-m", "stream_sentiment.cli", "top", "--redis-url", redis_server.url, "--redis-prefix",
         "live", "--windows", "60", "--min-posts", "1", "--refresh", "0.3", "--duration", "4"],
        cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    time.sleep(1.5)  # the first frame is drawn on an empty Redis
    _seed(redis_factory, "live", now)
    output, errors = process.communicate(timeout=30)
    assert process.returncode == 0, errors
    # Not a terminal: rich prints the last frame when the live view stops, so it shows the later data.
    assert "topic=airline" in output and "80%" in output, output


def test_a_value_that_looks_like_markup_is_shown_as_it_is(redis_server, redis_factory, capsys):
    async def seed() -> None:
        client = redis_factory(async_client=True)
        await write_posts(client, "markup", RULES, time.time() - 2, {"oops[/]": (6, 6), "[bold]x[/bold]": (6, 1)})
        await client.aclose()

    asyncio.run(seed())
    assert main(["top", "--once", "--redis-url", redis_server.url, "--redis-prefix", "markup", "--windows", "60",
                 "--min-posts", "5"]) == 0
    output = capsys.readouterr().out
    assert "topic=oops[/]" in output and "topic=[bold]x[/bold]" in output


def test_an_empty_window_says_so(redis_server, redis_factory, capsys):
    redis_factory()  # flushes
    assert main(["top", "--once", "--redis-url", redis_server.url, "--redis-prefix", "empty", "--windows", "60"]) == 0
    assert "no posts in this window" in capsys.readouterr().out


def test_series_has_a_gap_where_a_bucket_had_no_posts(redis_factory):
    async def run() -> list:
        client = redis_factory(async_client=True)
        await write_posts(client, "s", RULES, 1_700_000_005, {"airline": (4, 1)})
        await write_posts(client, "s", RULES, 1_700_000_025, {"airline": (2, 2)}, offset=4)
        points = await AnalystQueries(client, RedisKeys("s"), 10).series("topic", "airline", 30, now=1_700_000_029)
        await client.aclose()
        return points

    points = asyncio.run(run())
    assert [(p.start, p.posts, p.negative_ratio, p.complete) for p in points] == [
        (1_700_000_000, 4, 0.25, True), (1_700_000_010, 0, None, True),
        (1_700_000_020, 2, 1.0, False)]  # 1_700_000_029: the last bucket is still filling


def test_chinese_values_keep_the_table_columns_aligned(redis_server, redis_factory, capsys):
    """Chinese topic and region values take two terminal columns per character: every line of a table must
    still be as wide as its border, in display columns (rich measures cells, not characters)."""
    from rich.cells import cell_len

    async def seed() -> None:
        client = redis_factory(async_client=True)
        counts = {"航空公司": (10, 8), "天气": (10, 2), "phones": (10, 5)}
        await write_posts(client, "zh", RULES, time.time() - 2, counts, region="华东")
        await client.aclose()

    asyncio.run(seed())
    assert main(["top", "--once", "--redis-url", redis_server.url, "--redis-prefix", "zh", "--windows", "60",
                 "--min-posts", "5"]) == 0
    output = capsys.readouterr().out
    table = [line for line in output.splitlines() if line[:1] in "┏┃┡│└"]
    assert len(table) >= 7, output  # head, header, rule, 5 rows (all, region, three topics), foot
    widths = {cell_len(line) for line in table}
    assert len(widths) == 1, [(cell_len(line), line) for line in table]
    # The column separators sit at the same display columns on every row.
    columns = {tuple(cell_len(line[:i]) for i, ch in enumerate(line) if ch == "│") for line in table if line[0] == "│"}
    assert len(columns) == 1, output
    rows = _table_rows(output, "last 1 min")
    assert rows[0].startswith("1 topic=航空公司 80% 8/10") and any("region=华东" in row for row in rows), rows
