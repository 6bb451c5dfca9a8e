"""The distillation transfer set: deterministic, copy-major, never empty, words from the corpus only."""

from stream_sentiment.modeling.augment import augmented_texts, texts_digest

TEXTS = [
    "the service was awful and the food was cold",
    "loved it",
    "",
    "meh",
    "what a great day at the beach with friends and family",
]


def test_layout_is_copy_major_and_deterministic() -> None:
    first = augmented_texts(TEXTS, copies=3, seed=7)
    assert len(first) == 3 * len(TEXTS)
    assert first == augmented_texts(TEXTS, copies=3, seed=7)
    assert texts_digest(first) == texts_digest(augmented_texts(TEXTS, copies=3, seed=7))
    # Copy c of text i depends on (seed, i, c) alone: the first two copies are the same with a third or not.
    assert augmented_texts(TEXTS, copies=2, seed=7) == first[: 2 * len(TEXTS)]
    assert augmented_texts(TEXTS, copies=3, seed=8) != first


def test_variants_use_corpus_words_and_are_never_empty() -> None:
    corpus = {word for text in TEXTS for word in text.split()}
    variants = augmented_texts(TEXTS, copies=20)
    for index, variant in enumerate(variants):
        source = TEXTS[index % len(TEXTS)]
        if not source:
            assert variant == ""  # nothing to perturb
            continue
        assert variant.split(), f"empty variant of {source!r}"
        assert set(variant.split()) <= corpus
    # Perturbation really happens: most variants of the long texts differ from their source.
    long_pairs = [(v, TEXTS[i % len(TEXTS)]) for i, v in enumerate(variants) if len(TEXTS[i % len(TEXTS)].split()) > 5]
    assert sum(variant != source for variant, source in long_pairs) > len(long_pairs) // 2


def test_digest_depends_on_order_and_boundaries() -> None:
    assert texts_digest(["ab", "c"]) != texts_digest(["a", "bc"])
    assert texts_digest(["a", "b"]) != texts_digest(["b", "a"])
