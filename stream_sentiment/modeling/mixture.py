"""The v2 training mixture: the CrowdFlower tweets plus VADER's rated review sentences, and its dev sets.

v1 trained on tweets alone and used all 19.5k rated VADER sentences (movie reviews, Amazon reviews,
NYT editorials) only to choose between configurations. v2 trains on part of them:

* **train**: the v1 tweet training split, plus the movie-review and Amazon-review sentences
  less a stratified ``review_dev_fraction`` of each (labels by the VADER protocol: mean rating
  <= -0.5 negative, >= 0.5 positive, neutral between; the same cut as the test tweets).
* **dev** (selection only, never trained on):
  ``tweet_validation`` (the v1 validation split, the same 3,719 tweets: v1 and v2 compare on it),
  ``review_dev`` (the held-out review sentences) and ``nyt_dev``: the NYT editorial sentences,
  *wholly* held out, the out-of-domain set we keep. Nothing of the NYT file is trained on.
* **test** (record only): the VADER tweets (``tweets_GroundTruth.txt``). No text that appears in
  it, after lower-casing and whitespace folding, is in any training or dev set.

Duplicates are dropped across the whole mixture (tweets first, then NYT, then reviews), so no
training text is also a dev text. Torch-free: the CPU tests check the splits on synthetic rows;
:func:`load_mixture` reads the pinned archives.
"""

from __future__ import annotations

import hashlib
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from stream_sentiment.labels import LABELS
from stream_sentiment.modeling.corpora import (
    LabelledTweet,
    _read_vader_file,
    dedup_key,
    read_vader_tweets,
    stratified_split,
    training_corpus,
)

VADER_MOVIE = "hutto_ICWSM_2014/movieReviewSnippets_GroundTruth.txt"
VADER_AMAZON = "hutto_ICWSM_2014/amazonReviewSnippets_GroundTruth.txt"
VADER_NYT = "hutto_ICWSM_2014/nytEditorialSnippets_GroundTruth.txt"
DEV_SETS = ("tweet_validation", "review_dev", "nyt_dev")


@dataclass(frozen=True)
class Example:
    """One labelled text of the mixture; ``key`` (``source:row_id``) is unique and stable across runs."""

    source: str  # "tweets", "movie", "amazon" or "nyt"
    row_id: int
    text: str
    label: str
    weight: float = 1.0  # tweets: annotator confidence (missing -> 1.0); sentences: 1.0

    @property
    def key(self) -> str:
        return f"{self.source}:{self.row_id}"


@dataclass(frozen=True)
class Mixture:
    train: list[Example]
    dev: dict[str, list[Example]]
    stats: dict[str, int] = field(default_factory=dict)


def keys_digest(rows: Iterable[Example]) -> str:
    """sha256 of the ordered keys: soft labels written for one list of rows are refused for another."""
    digest = hashlib.sha256()
    for row in rows:
        digest.update(row.key.encode() + b"\n")
    return digest.hexdigest()


def _examples(source: str, rows: Iterable[LabelledTweet]) -> list[Example]:
    return [Example(source, r.row_id, r.text, r.label, r.confidence if r.confidence is not None else 1.0)
            for r in rows]


def build_mixture(
    tweet_train: Sequence[LabelledTweet],
    tweet_validation: Sequence[LabelledTweet],
    reviews: dict[str, Sequence[LabelledTweet]],
    nyt: Sequence[LabelledTweet],
    test: Sequence[LabelledTweet],
    *,
    review_dev_fraction: float = 0.1,
    seed: int = 13,
) -> Mixture:
    """Assemble train and dev sets from already-read rows (see the module docstring for the rules).

    ``reviews`` maps a source name ("movie", "amazon") to its rated sentences; each source is split
    stratified by label on its own, so the dev part keeps each source's share and label balance.
    """
    stats: Counter[str] = Counter()
    test_keys = {dedup_key(t.text) for t in test}
    taken: set[str] = set()

    def keep(source: str, rows: Iterable[LabelledTweet]) -> list[LabelledTweet]:
        kept = []
        for row in rows:
            key = dedup_key(row.text)
            if row.label not in LABELS or not key:
                stats[f"{source}_dropped_unusable"] += 1
            elif key in test_keys:
                stats[f"{source}_dropped_in_test_set"] += 1
            elif key in taken:
                stats[f"{source}_dropped_duplicate"] += 1
            else:
                taken.add(key)
                kept.append(row)
        return kept

    # Order matters: the tweets (already de-duplicated, v1's split) claim their texts first, then
    # the held-out NYT sentences, so a review sentence repeated in either is dropped from training.
    train = _examples("tweets", keep("tweets", tweet_train))
    dev = {"tweet_validation": _examples("tweets", keep("tweets_validation", tweet_validation)),
           "nyt_dev": _examples("nyt", keep("nyt", nyt)), "review_dev": []}
    for source, rows in reviews.items():
        usable = keep(source, rows)
        review_train, review_dev = stratified_split(usable, review_dev_fraction, seed)
        train += _examples(source, review_train)
        dev["review_dev"] += _examples(source, review_dev)
        stats.update({f"{source}_train": len(review_train), f"{source}_dev": len(review_dev)})
    stats.update({"train": len(train), **{name: len(rows) for name, rows in dev.items()}})
    return Mixture(train=train, dev={name: dev[name] for name in DEV_SETS}, stats=dict(stats))


def load_mixture(cache_dir: Path, *, review_dev_fraction: float = 0.1, seed: int = 13) -> Mixture:
    """The v2 mixture from the pinned archives in ``cache_dir``; the tweet split is v1's (``seed`` 13)."""
    tweets = training_corpus(cache_dir, validation_fraction=0.1, seed=seed)
    return build_mixture(
        tweets.train, tweets.validation,
        {"movie": _read_vader_file(cache_dir, VADER_MOVIE), "amazon": _read_vader_file(cache_dir, VADER_AMAZON)},
        _read_vader_file(cache_dir, VADER_NYT),
        read_vader_tweets(cache_dir),
        review_dev_fraction=review_dev_fraction, seed=seed,
    )


def selection_score_v2(reports: dict[str, dict[str, object]]) -> float:
    """How v2 runs (and epochs) are ranked: dev sets only, three parts equally.

    Tweet validation macro-F1 (in-domain, all three classes), review-dev macro-F1 (the VADER
    rating protocol, where "neutral" means a mean rating within +-0.5) and NYT polar accuracy
    (sentiment that transfers to a domain never trained on). The test tweets take no part.
    """
    parts = (reports["tweet_validation"]["macro_f1"], reports["review_dev"]["macro_f1"],
             reports["nyt_dev"]["polar_accuracy"])
    return round(sum(float(p) for p in parts) / 3, 4)  # type: ignore[arg-type,misc]
