"""The v2 training mixture (synthetic rows): label mapping, de-duplication, held-out sets, split and digest."""

from __future__ import annotations

from collections import Counter

import pytest

from stream_sentiment.modeling.corpora import LabelledTweet, parse_vader_lines
from stream_sentiment.modeling.mixture import Example, build_mixture, keys_digest, selection_score_v2


def _rated(prefix: str, count: int, *, start: int = 1) -> list[LabelledTweet]:
    # Ratings cycle -2, -0.5, 0, 0.4, 0.5, 2: both sides of each +-0.5 cut.
    ratings = (-2.0, -0.5, 0.0, 0.4, 0.5, 2.0)
    lines = [f"{i}_1\t{ratings[i % 6]}\t{prefix} sentence {i}" for i in range(start, start + count)]
    return parse_vader_lines(lines)


def _build(**overrides: object):
    tweets = [LabelledTweet(i, f"tweet {i}", ("negative", "neutral", "positive")[i % 3], 0.8) for i in range(1, 91)]
    parts: dict[str, object] = {
        "tweet_train": tweets[:80], "tweet_validation": tweets[80:],
        "reviews": {"movie": _rated("movie", 300), "amazon": _rated("amazon", 120)},
        "nyt": _rated("nyt", 60), "test": [LabelledTweet(1, "A test tweet", "positive", rating=2.0)],
    }
    parts.update(overrides)
    return build_mixture(**parts)  # type: ignore[arg-type]


def test_ratings_map_to_labels_at_the_vader_cut():
    rows = parse_vader_lines(["7_2\t-0.5\ta", "8_1\t-0.4\tb", "9_3\t0.49\tc", "10_1\t0.5\td", "\n"])
    assert [r.label for r in rows] == ["negative", "neutral", "neutral", "positive"]
    # Snippet ids are not integers: rows are numbered by line.
    assert [r.row_id for r in rows] == [1, 2, 3, 4]


def test_nyt_is_wholly_held_out_and_review_dev_is_stratified_per_source():
    mixture = _build()
    sources = Counter(e.source for e in mixture.train)
    assert "nyt" not in sources and sources["tweets"] == 80
    assert len(mixture.dev["nyt_dev"]) == 60 and len(mixture.dev["tweet_validation"]) == 10
    review_dev = Counter((e.source, e.label) for e in mixture.dev["review_dev"])
    # 10% of each source, per label: movie 300 rows = 100 per label -> 10; amazon 40 per label -> 4.
    assert review_dev == {("movie", label): 10 for label in ("negative", "neutral", "positive")} | {
        ("amazon", label): 4 for label in ("negative", "neutral", "positive")}
    keys = [e.key for e in mixture.train] + [e.key for rows in mixture.dev.values() for e in rows]
    assert len(keys) == len(set(keys)) == 90 + 60 + 420


def test_no_training_or_dev_text_is_a_test_tweet_or_a_duplicate():
    duplicate_of_nyt = LabelledTweet(999, "NYT   sentence 5", "negative", rating=-2.0)
    in_test = LabelledTweet(998, "a TEST tweet", "positive", rating=2.0)
    tweet_copy = LabelledTweet(997, "tweet 3", "neutral", rating=0.0)
    mixture = _build(reviews={"movie": [*_rated("movie", 30), duplicate_of_nyt, in_test, tweet_copy]})
    assert mixture.stats["movie_dropped_duplicate"] == 2 and mixture.stats["movie_dropped_in_test_set"] == 1
    texts = [e.text.lower() for e in mixture.train] + [e.text.lower() for rows in mixture.dev.values() for e in rows]
    assert "a test tweet" not in texts
    assert len(texts) == len(set(" ".join(t.split()) for t in texts))


def test_tweets_keep_their_confidence_and_sentences_weigh_one():
    mixture = _build()
    assert {e.weight for e in mixture.train if e.source == "tweets"} == {0.8}
    assert {e.weight for e in mixture.train if e.source != "tweets"} == {1.0}


def test_the_mixture_and_its_digest_are_reproducible():
    first, second = _build(), _build()
    assert first == second
    assert keys_digest(first.train) == keys_digest(second.train)
    assert keys_digest(first.train[:-1]) != keys_digest(first.train)
    assert keys_digest([Example("movie", 1, "x", "neutral")]) != keys_digest([Example("amazon", 1, "x", "neutral")])


def test_selection_score_weighs_its_three_parts_equally():
    reports = {"tweet_validation": {"macro_f1": 0.8}, "review_dev": {"macro_f1": 0.6},
               "nyt_dev": {"polar_accuracy": 0.7}}
    assert selection_score_v2(reports) == pytest.approx(0.7)
    with pytest.raises(KeyError):
        selection_score_v2({"tweet_validation": {"macro_f1": 0.8}})
