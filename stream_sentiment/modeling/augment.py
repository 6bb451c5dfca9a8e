"""Perturbed copies of the training texts: a transfer set for distillation.

A teacher's probabilities on its own training rows are close to their gold labels (the MPNet teachers
agree with gold on ~90% of them), so a student distilled on those rows alone learns little beyond the
labels. Perturbed copies -- words dropped, words swapped for other words of the corpus, a text cut to
a contiguous span -- are texts the teacher never trained on, labelled by the teacher alone (TinyBERT's
data augmentation, with corpus words instead of a masked language model's guesses).

Deterministic: copy ``c`` of text ``i`` depends only on ``(seed, i, c)`` and the corpus, so a teacher
run and a student run rebuild the same texts; :func:`texts_digest` lets the student check that.
"""

from __future__ import annotations

import hashlib
import math
import random
from collections.abc import Sequence

DROP_PROBABILITY = 0.1
REPLACE_PROBABILITY = 0.1
CROP_PROBABILITY = 0.5
CROP_MIN_FRACTION = 0.6


def augmented_texts(texts: Sequence[str], copies: int, seed: int = 13) -> list[str]:
    """``copies`` perturbed versions of every text, copy-major: index ``c * len(texts) + i``.

    Replacement words are drawn from all word positions of ``texts`` (so by corpus frequency).
    A variant is never empty: a text whose words were all dropped keeps its first kept-or-original word.
    """
    words = [text.split() for text in texts]
    corpus = [word for row in words for word in row]
    out: list[str] = []
    for copy in range(copies):
        for index, row in enumerate(words):
            rng = random.Random(f"augment:{seed}:{index}:{copy}")
            out.append(" ".join(_perturb(row, corpus, rng)) if row else texts[index])
    return out


def _perturb(row: list[str], corpus: list[str], rng: random.Random) -> list[str]:
    if len(row) > 2 and rng.random() < CROP_PROBABILITY:
        length = rng.randint(math.ceil(CROP_MIN_FRACTION * len(row)), len(row))
        start = rng.randint(0, len(row) - length)
        row = row[start : start + length]
    kept: list[str] = []
    for word in row:
        draw = rng.random()
        if draw < DROP_PROBABILITY:
            continue
        kept.append(corpus[rng.randrange(len(corpus))] if draw < DROP_PROBABILITY + REPLACE_PROBABILITY else word)
    return kept or row[:1]


def texts_digest(texts: Sequence[str]) -> str:
    """sha256 over the texts in order (a teacher's and a student's transfer sets must match)."""
    digest = hashlib.sha256()
    for text in texts:
        digest.update(text.encode("utf-8"))
        digest.update(b"\0")
    return digest.hexdigest()
