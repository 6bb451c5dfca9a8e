"""Pruning the e5 vocabulary (and its embedding rows) to what the languages we serve use.

96.0M of multilingual-e5-small's 117.5M parameters are the 250,037 x 384 word
embeddings, most of them for scripts our posts never use. We keep:

* the pieces the training corpora's tokenization uses (English tweets and
  Chinese reviews, tokenized with the full vocabulary),
* the special pieces (``<s> <pad> </s> <unk> <mask>``),
* every piece that is one CJK character (with or without ``▁``), so that any
  Chinese text in the served scripts still tokenizes to characters, not ``<unk>``,
* optionally anything else a caller selects (e.g. all single-character pieces).

Pruning keeps the pieces' order (new id = rank of the old id among the kept),
so ``<s> <pad> </s> <unk>`` stay 0-3, and keeps their scores. A text whose
full-vocabulary pieces were all kept tokenizes exactly as before (the Viterbi
optimum over all pieces is still available and still optimal); other texts fall
back to shorter pieces, which is what :func:`tokenization_changes` counts.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, replace

import numpy as np
from tokenizers import Tokenizer

from stream_sentiment.modeling.e5_weights import Q4_BLOCK, QK, E5File, SentencePieceVocab, raw_tensor, write_e5

WORD_EMBEDDINGS = "embeddings.word_embeddings.weight"
_METASPACE = "▁"
# CJK Unified Ideographs, Extension A, compatibility ideographs, Extensions B-I.
_CJK_RANGES = (
    (0x3400, 0x4DBF), (0x4E00, 0x9FFF), (0xF900, 0xFAFF), (0x20000, 0x2EBEF), (0x30000, 0x323AF),
)


def is_cjk(char: str) -> bool:
    code = ord(char)
    return any(low <= code <= high for low, high in _CJK_RANGES)


def single_cjk_ids(vocab: SentencePieceVocab) -> set[int]:
    """Ids of the pieces that are one CJK ideograph, bare or after ``▁``."""
    out = set()
    for index, piece in enumerate(vocab.pieces):
        body = piece.removeprefix(_METASPACE)
        if len(body) == 1 and is_cjk(body):
            out.add(index)
    return out


def special_ids(vocab: SentencePieceVocab) -> set[int]:
    return set(vocab.special_ids) | {i for i, p in enumerate(vocab.pieces) if p == "<mask>"}


def used_ids(tokenizer: Tokenizer, texts: Sequence[str], batch_size: int = 4096) -> set[int]:
    """Every id the tokenizer gives these texts (no ``<s>``/``</s>``)."""
    seen: set[int] = set()
    for start in range(0, len(texts), batch_size):
        for encoding in tokenizer.encode_batch(list(texts[start:start + batch_size]), add_special_tokens=False):
            seen.update(encoding.ids)
    return seen


@dataclass(frozen=True)
class PrunedVocabulary:
    """The kept pieces as a vocabulary of their own, and where each came from."""

    vocab: SentencePieceVocab
    old_ids: np.ndarray  # new id -> old id, increasing

    @property
    def size(self) -> int:
        return len(self.old_ids)

    def remap(self) -> dict[int, int]:
        return {int(old): new for new, old in enumerate(self.old_ids)}


def prune_vocabulary(
    vocab: SentencePieceVocab, keep: Iterable[int], *, cjk_characters: bool = True
) -> PrunedVocabulary:
    """Keep ``keep``, the specials and (by default) every single-CJK-character piece."""
    kept = set(keep) | special_ids(vocab)
    if cjk_characters:
        kept |= single_cjk_ids(vocab)
    old_ids = np.array(sorted(kept), dtype=np.int64)
    if old_ids[0] < 0 or old_ids[-1] >= len(vocab.pieces):
        raise ValueError("an id to keep is outside the vocabulary")
    remap = {int(old): new for new, old in enumerate(old_ids)}
    pruned = replace(
        vocab,
        pieces=[vocab.pieces[i] for i in old_ids],
        scores=vocab.scores[old_ids].copy(),
        bos_id=remap[vocab.bos_id], eos_id=remap[vocab.eos_id],
        pad_id=remap[vocab.pad_id], unk_id=remap[vocab.unk_id],
    )
    return PrunedVocabulary(pruned, old_ids)


def prune_embeddings(state: Mapping[str, np.ndarray], pruned: PrunedVocabulary) -> dict[str, np.ndarray]:
    """The state dict with the word-embedding rows of the kept pieces only, in their new order."""
    out = dict(state)
    out[WORD_EMBEDDINGS] = np.ascontiguousarray(state[WORD_EMBEDDINGS][pruned.old_ids])
    return out


def prune_e5_image(e5: E5File, pruned: PrunedVocabulary) -> bytes:
    """The e5.c model image with the kept pieces and their 4-bit embedding rows only.

    Still Q4_0 (the rows are copied, never re-quantized), so dequantizing it gives
    exactly :func:`prune_embeddings` of the full model; e5.c can load it too.
    """
    row_bytes = e5.header.hidden_size // QK * Q4_BLOCK.itemsize
    word = np.frombuffer(raw_tensor(e5, "emb.word"), dtype=np.uint8).reshape(e5.header.vocab_rows, row_bytes)
    tensors = {name: (entry.dtype, entry.count, raw_tensor(e5, name)) for name, entry in e5.tensors.items()}
    tensors["emb.word"] = (e5.tensors["emb.word"].dtype, pruned.size * e5.header.hidden_size,
                           np.ascontiguousarray(word[pruned.old_ids]).tobytes())
    return write_e5(replace(e5.header, vocab_rows=pruned.size), pruned.vocab, tensors)


def tokenization_changes(full: Tokenizer, pruned: Tokenizer, pruned_vocab: PrunedVocabulary,
                         texts: Sequence[str]) -> dict[str, float]:
    """How the pruned tokenizer differs from the full one on ``texts``.

    Returns the share of texts tokenized differently, the token counts of both,
    and the ``<unk>`` rate of the pruned tokenizer.
    """
    remap = pruned_vocab.remap()
    unk = pruned_vocab.vocab.unk_id
    changed = full_tokens = pruned_tokens = unknown = 0
    for a, b in zip(full.encode_batch(list(texts), add_special_tokens=False),
                    pruned.encode_batch(list(texts), add_special_tokens=False), strict=True):
        expected = [remap.get(i, -1) for i in a.ids]
        changed += expected != b.ids
        full_tokens += len(a.ids)
        pruned_tokens += len(b.ids)
        unknown += b.ids.count(unk)
    return {
        "texts": len(texts),
        "changed_share": changed / max(len(texts), 1),
        "tokens_full": full_tokens,
        "tokens_pruned": pruned_tokens,
        "unk_rate": unknown / max(pruned_tokens, 1),
    }
