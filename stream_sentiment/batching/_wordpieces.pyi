"""Types of the C extension built from ``_wordpieces.c`` (see there and ``tokenizer.AsciiWordPieces``)."""

def encode(
    texts: list[str],
    memo: dict[str, tuple[int, ...]],
    extra: dict[str, tuple[int, ...]] | None,
    prefix: tuple[int, ...],
    suffix: tuple[int, ...],
    keep: int,
    unknown: tuple[int, ...],
    longest: int,
) -> list[tuple[int, ...]] | set[str]:
    """The texts' token ids, or, if some words are in neither mapping, the set of those words."""
