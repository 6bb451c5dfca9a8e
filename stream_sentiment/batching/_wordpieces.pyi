"""Types of the C extension built from ``_wordpieces.c`` (see there and ``tokenizer.AsciiWordPieces``)."""

from collections.abc import Sequence

class WordMemo:
    """Each word's WordPiece ids, as the C loop memoizes them, hashed under ``key`` (16 random bytes)."""

    def __init__(self, key: bytes) -> None: ...
    def __len__(self) -> int: ...
    def clear(self) -> None: ...

def normalize_encode(
    texts: list[str],
    normalization: int,
    refused: str,
    memo: WordMemo,
    max_words: int,
    vocab: dict[str, int],
    continuation: str,
    prefix: tuple[int, ...],
    suffix: tuple[int, ...],
    keep: int,
    unknown: tuple[int, ...],
    longest: int,
) -> list[tuple[int, ...] | None]:
    """``encode`` of each raw text normalized (0: none, 1: twitter-v1); None where it cannot take the text."""

def pad(rows: list[Sequence[int]], bucket: int) -> tuple[bytearray, bytearray]:
    """Rows zero-padded to ``bucket``: input ids and attention mask, native int64, row-major."""
