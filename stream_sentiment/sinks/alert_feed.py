"""Reading the alert stream for people: ``stream-sentiment alerts [--follow]``."""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable, Iterator, Mapping
from datetime import UTC, datetime
from typing import Any

from rich.cells import cell_len, set_cell_size


def format_alert(fields: Mapping[str, str]) -> str:
    """One line an analyst can read: when, what, where, how bad, against what baseline.

    An entry this service did not write (bad numbers) is shown raw, never a crash.
    """
    try:
        return _format(fields)
    except (ValueError, OverflowError, OSError):
        return f"unreadable alert entry: {dict(fields)}"


def _format(fields: Mapping[str, str]) -> str:
    at = datetime.fromtimestamp(float(fields.get("at", 0)), UTC).strftime("%Y-%m-%d %H:%M:%S")
    posts, negative = int(fields.get("posts", 0)), int(fields.get("negative", 0))
    ratio = float(fields.get("negative_ratio", 0.0))
    z = float(fields.get("z", "nan"))
    versus = (f"z {z:.1f} vs baseline {float(fields.get('baseline_negative', 0.0)):.1f}" if math.isfinite(z)
              else "no baseline yet")
    headline = (
        f"{at}Z  {fields.get('rule', '?').upper():<5}  {fields.get('dimension')}={fields.get('value')}  "
        f"window {fields.get('window_seconds')}s  negative {negative}/{posts} ({ratio:.0%})  "
        f"{versus}  {_engines(fields)}"
    )
    # Every sample the entry stores (``alerts.sample_posts``, 3 by default), as the web page shows them:
    # what a reader sees in one view is what the other shows too.
    return "\n".join([headline, *(_sample_line(sample) for sample in _samples(fields))])


def _engines(fields: Mapping[str, str]) -> str:
    """``engine m/v``, or with several (language routing) ``engines m/v (posts), m2/v2 (posts)``."""
    try:
        engines = json.loads(fields.get("engines") or "{}")
    except json.JSONDecodeError:
        engines = {}
    if isinstance(engines, dict) and len(engines) > 1:
        return "engines " + ", ".join(f"{name} ({count})" for name, count in engines.items())
    return f"engine {fields.get('engine_version')}"


# A quoted sample is cut to this many terminal columns, not characters: a Chinese character takes two, so a
# cut by characters made a Chinese sample twice as wide as an English one.
SAMPLE_COLUMNS = 100


def _samples(fields: Mapping[str, str]) -> list[dict[str, Any]]:
    try:
        samples = json.loads(fields.get("samples") or "[]")
    except json.JSONDecodeError:
        return []
    return [s for s in samples if isinstance(s, dict)] if isinstance(samples, list) else []


def _sample_line(sample: Mapping[str, Any]) -> str:
    text = " ".join(str(sample.get("text", "")).split())
    if cell_len(text) > SAMPLE_COLUMNS:
        # set_cell_size pads where a wide character would straddle the cut: that padding is dropped.
        text = set_cell_size(text, SAMPLE_COLUMNS - 1).rstrip() + "…"
    quoted = json.dumps(text, ensure_ascii=False)
    return f"    e.g. {quoted}  (post {sample.get('id')}, P(negative) {sample.get('p_negative')})"


def recent(client: Any, stream: str, count: int) -> list[tuple[str, dict[str, str]]]:
    """The last ``count`` alerts, oldest first (none for ``count`` 0: ``--last 0 --follow`` shows only new ones)."""
    return list(reversed(client.xrevrange(stream, count=count))) if count > 0 else []


def newest_id(client: Any, stream: str) -> str:
    """The id of the stream's newest entry, ``0-0`` when it has none: where following "from now" starts.

    A concrete id, not ``$``: ``$`` is re-read as "now" by every XREAD, so an alert appended between two
    blocking reads would be skipped.
    """
    newest = client.xrevrange(stream, count=1)
    return str(newest[0][0]) if newest else "0-0"


def following_line(redis_url: str, stream: str, after: str, *, shown: int, duration: float | None) -> str:
    """What ``alerts --follow`` says before it waits: which Redis, which stream, from where, for how long.

    Said at once because the first alert may be minutes away, and silence reads as a hang.
    """
    if after == "0-0":
        start = "from its first entry (it has none yet)"
    elif shown:
        start = f"after the {shown} shown above (entry {after})"
    else:
        start = f"from now (after entry {after})"
    from stream_sentiment.clients import redacted_url

    until = f" for {duration:g} s" if duration is not None else "; Ctrl-C stops"
    return (f"following alert stream {stream!r} on {redacted_url(redis_url)} {start}{until}; "
            "new alerts print as workers raise them (a window is judged seconds after it closes)")


def follow(
    client: Any, stream: str, *, after: str, until: Callable[[], bool] = lambda: False, block_ms: int = 1000
) -> Iterator[tuple[str, dict[str, str]]]:
    """New alerts after entry ``after`` as they arrive (XREAD BLOCK), until ``until()`` is true."""
    last = after
    while not until():
        for _, entries in client.xread({stream: last}, block=block_ms, count=100) or []:
            for entry_id, fields in entries:
                last = entry_id
                yield entry_id, fields


def deadline(seconds: float | None) -> Callable[[], bool]:
    if seconds is None:
        return lambda: False
    end = time.monotonic() + seconds
    return lambda: time.monotonic() >= end
