"""``stream-sentiment top``: a live, refreshing table of the most negative dimension values per window."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Sequence
from datetime import UTC, datetime
from typing import Any

from rich.console import Console, Group, RenderableType
from rich.live import Live
from rich.table import Table
from rich.text import Text

from stream_sentiment.views.queries import AnalystQueries, WindowRow, dimension_label, window_label

__all__ = ["TopSnapshot", "render_top", "run_top", "take_snapshot"]

BAR_WIDTH = 20
# A console that is not a terminal (a pipe, a test) has no width of its own; rich would assume 80 and cut columns.
PIPE_WIDTH = 120


class TopSnapshot:
    """The rows of every window at one moment, plus the deployment's running totals."""

    def __init__(self, at: float, windows: dict[int, list[WindowRow]], totals: dict[str, int]) -> None:
        self.at = at
        self.windows = windows
        self.totals = totals


async def take_snapshot(queries: AnalystQueries, windows: Sequence[int], *, limit: int, min_posts: int,
                        now: float | None = None) -> TopSnapshot:
    now = time.time() if now is None else now
    rows = {seconds: await queries.most_negative(seconds, limit=limit, min_posts=min_posts, now=now)
            for seconds in windows}
    raw = await queries.client.hgetall(queries.keys.totals)
    totals = {(k.decode() if isinstance(k, bytes) else k): int(v) for k, v in raw.items()}
    return TopSnapshot(now, rows, totals)


def _bar(ratio: float) -> Text:
    filled = round(ratio * BAR_WIDTH)
    style = "bold red" if ratio >= 0.6 else "yellow" if ratio >= 0.4 else "green"
    return Text("█" * filled, style=style) + Text("·" * (BAR_WIDTH - filled), style="dim")


def render_top(snapshot: TopSnapshot, *, min_posts: int) -> RenderableType:
    """One table per window, most negative share first; an alerting value is marked."""
    at = datetime.fromtimestamp(snapshot.at, UTC).strftime("%Y-%m-%d %H:%M:%S")
    totals = snapshot.totals
    header = Text.assemble(
        ("stream-sentiment top", "bold"), f"  {at}Z  scored {totals.get('scored', 0):,}  ",
        f"negative {totals.get('negative', 0):,}  dead-lettered {totals.get('dead_lettered', 0):,}",
    )
    parts: list[RenderableType] = [header]
    for seconds, rows in snapshot.windows.items():
        table = Table(title=f"most negative, last {window_label(seconds)} (values with ≥ {min_posts} posts)",
                      title_justify="left", expand=False)
        table.add_column("#", justify="right")
        table.add_column("dimension value")
        table.add_column("negative", justify="right")
        table.add_column("posts", justify="right")
        table.add_column("mean P(neg)", justify="right")
        table.add_column("share")
        table.add_column("alert")
        for rank, row in enumerate(rows, start=1):
            # Text, not str: a topic like "[/]" comes from a post and must not be parsed as rich markup.
            table.add_row(str(rank), Text(dimension_label(row.dimension, row.value)), f"{row.negative_ratio:.0%}",
                          f"{row.negative:,}/{row.posts:,}", f"{row.mean_p_negative:.2f}", _bar(row.negative_ratio),
                          Text("ALERT", style="bold red") if row.alerting else "")
        if not rows:
            table.add_row("", Text("no posts in this window", style="dim"), "", "", "", "", "")
        parts.append(table)
    return Group(*parts)


async def run_top(client: Any, queries: AnalystQueries, windows: Sequence[int], *, limit: int, min_posts: int,
                  refresh_seconds: float, once: bool, duration: float | None, console: Console | None = None) -> None:
    """Print the table once (``once``), or redraw it every ``refresh_seconds`` until Ctrl-C or ``duration``."""
    console = console or Console(width=None if Console().is_terminal else PIPE_WIDTH)
    try:
        snapshot = await take_snapshot(queries, windows, limit=limit, min_posts=min_posts)
        if once:
            console.print(render_top(snapshot, min_posts=min_posts))
            return
        end = None if duration is None else time.monotonic() + duration
        # Live redraws in place on a terminal; auto_refresh off, as frames change only when Redis is read.
        with Live(render_top(snapshot, min_posts=min_posts), console=console, auto_refresh=False) as live:
            while end is None or time.monotonic() < end:
                left = refresh_seconds if end is None else end - time.monotonic()
                await asyncio.sleep(max(0.0, min(refresh_seconds, left)))
                snapshot = await take_snapshot(queries, windows, limit=limit, min_posts=min_posts)
                live.update(render_top(snapshot, min_posts=min_posts), refresh=True)
    finally:
        await client.aclose()
