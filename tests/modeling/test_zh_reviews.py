from __future__ import annotations

import random
from collections import Counter

from stream_sentiment.modeling.zh_reviews import label_reviews, split_of


def _lines() -> dict[str, list[str]]:
    positive = [f"好评 {i}" for i in range(300)] + ["质量很好", "质量很好 ", "", "优点："]
    negative = [f"差评 {i}" for i in range(300)] + ["优点：", "太差了", "太差了"]
    return {"positive": positive, "negative": negative}


def test_duplicates_collapse_conflicts_and_empty_lines_are_dropped():
    reviews, stats = label_reviews(_lines())
    texts = Counter(r.text for r in reviews)
    assert texts["质量很好"] == 1 and texts["太差了"] == 1
    assert "优点：" not in texts
    assert stats["dropped_in_both"] == 1 and stats["dropped_empty"] == 1
    assert stats["unique_positive"] == 302 and stats["unique_negative"] == 302
    assert stats["kept"] == len(reviews) == 602
    assert {r.label for r in reviews if r.text == "太差了"} == {"negative"}


def test_the_split_is_a_function_of_the_text_alone():
    lines = _lines()
    shuffled = {label: random.Random(3).sample(texts, len(texts)) for label, texts in reversed(lines.items())}
    first, _ = label_reviews(lines)
    second, _ = label_reviews(shuffled)
    assert [(r.text, r.label, r.split) for r in first] == [(r.text, r.label, r.split) for r in second]
    assert all(r.split == split_of(r.key) for r in first)


def test_split_shares_are_about_80_10_10_and_pinned():
    shares = Counter(split_of(f"review {i}") for i in range(20_000))
    assert abs(shares["test"] / 20_000 - 0.10) < 0.01
    assert abs(shares["dev"] / 20_000 - 0.10) < 0.01
    # Pinned: a change of hash, bucket size or order would silently move texts between splits.
    pinned = {"k0": "dev", "k18": "test", "k21": "dev", "k39": "test", "这个手机很好用": "train"}
    assert {key: split_of(key) for key in pinned} == pinned


def test_calibration_reviews_are_chosen_by_text_hash_not_by_order():
    from stream_sentiment.modeling.zh_reviews import calibration_reviews

    train = [r for r in label_reviews(_lines())[0] if r.split == "train"]
    chosen = calibration_reviews(train, 50)
    assert len(chosen) == 50 == len(set(chosen))
    assert calibration_reviews(list(reversed(train)), 50) == chosen
    assert calibration_reviews(train, 10) == chosen[:10]


def test_gold_standards_relabelled_and_consensus_follow_the_annotation():
    import pytest

    from stream_sentiment.modeling.zh_reviews import Review, gold_rows, key_digest

    reviews = [Review("很好", "positive", "test", "a"), Review("很差", "negative", "test", "b"),
               Review("一、硬件", "positive", "test", "c"), Review("床硬但早餐好", "negative", "test", "d"),
               Review("房间旧，隔音差", "positive", "test", "e")]
    relabels = {key_digest("a"): "positive", key_digest("b"): "negative", key_digest("c"): "none",
                key_digest("d"): "mixed", key_digest("e"): "negative"}
    assert [row["label"] for row in gold_rows(reviews, "original", relabels)] == [r.label for r in reviews]
    # The annotator's polar labels replace the corpus's; fragments and mixed reviews leave the polar test.
    assert gold_rows(reviews, "relabelled", relabels) == [
        {"text": "很好", "label": "positive"}, {"text": "很差", "label": "negative"},
        {"text": "房间旧，隔音差", "label": "negative"}]
    # Consensus keeps only what both labels agree on.
    assert [row["text"] for row in gold_rows(reviews, "consensus", relabels)] == ["很好", "很差"]
    with pytest.raises(ValueError, match="no annotation"):
        gold_rows(reviews, "relabelled", {key_digest("a"): "positive"})


def test_the_committed_re_annotation_covers_the_test_split_without_text():
    from stream_sentiment.modeling.zh_reviews import RELABEL_FILE, read_relabels

    labels = read_relabels()
    # One row per review of the test split (1,739 after de-duplication), keyed by hash: no text.
    assert len(labels) == 1739
    assert all(len(digest) == 64 and set(digest) <= set("0123456789abcdef") for digest in labels)
    assert "text" not in RELABEL_FILE.read_text(encoding="utf-8")
    polar = sum(label in ("negative", "positive") for label in labels.values())
    assert 0.8 < polar / len(labels) < 1.0  # fragments and mixed reviews leave the polar test
