from __future__ import annotations

import numpy as np
import pytest
from tokenizers import normalizers

from stream_sentiment.modeling.e5_tokenizer import build_tokenizer, precompiled_charsmap
from stream_sentiment.modeling.e5_weights import SentencePieceVocab

TABLE = {
    0x7: "",  # deleted
    0x9: " ",
    0x3000: " ",  # ideographic space
    0xFF21: "A",  # fullwidth A: a 3-byte key sharing its lead bytes with its neighbour
    0xFF22: "B",
    0xFB01: "fi",  # one codepoint to two
    0x1D400: "A",  # a 4-byte key
    0x2460: "1",
    0x00E9: "é",  # mapped to itself: present in the table, result unchanged
}


def test_precompiled_charsmap_maps_every_table_entry_and_leaves_the_rest():
    normalizer = normalizers.Precompiled(precompiled_charsmap(TABLE))
    for codepoint, replacement in TABLE.items():
        assert normalizer.normalize_str(chr(codepoint)) == replacement, hex(codepoint)
    untouched = [c for c in range(0x20, 0x3100) if c not in TABLE] + [0xFF23, 0x1D401, 0x20000, 0x1F600]
    for codepoint in untouched:
        assert normalizer.normalize_str(chr(codepoint)) == chr(codepoint), hex(codepoint)
    assert normalizer.normalize_str("ＡＢ\u3000ﬁne\u0007") == "AB fine"


def test_precompiled_charsmap_of_a_large_table_stays_exact():
    table = {c: chr(c - 0xFEE0) for c in range(0xFF01, 0xFF5F)}  # all fullwidth ASCII
    table |= {c: "" for c in range(0x80, 0xA0)}  # C1 controls deleted
    normalizer = normalizers.Precompiled(precompiled_charsmap(table))
    assert all(normalizer.normalize_str(chr(c)) == r for c, r in table.items())


def _vocab() -> SentencePieceVocab:
    pieces = ["<s>", "<pad>", "</s>", "<unk>", "▁", "▁hello", "▁hell", "o", "▁world", "▁que", "ry", ":",
              "好", "▁好", "评", "好评", "▁A", "<mask>"]
    scores = [0.0, 0.0, 0.0, 0.0, -3.0, -8.0, -7.0, -4.0, -8.0, -9.0, -9.0, -4.0, -6.0, -6.5, -7.0, -9.0, -5.0, 0.0]
    return SentencePieceVocab(pieces, np.asarray(scores, dtype=np.float32), 0, 2, 1, 3, {0xFF21: "A", 0x3000: " "})


def test_tokenizer_takes_the_best_unigram_path_with_metaspace_and_bos_eos():
    tokenizer = build_tokenizer(_vocab())
    encoding = tokenizer.encode("hello  world")
    # "▁hello" (-8) beats "▁hell" + "o" (-11); double spaces collapse to one.
    assert encoding.tokens == ["<s>", "▁hello", "▁world", "</s>"]
    # "▁" + "好评" (-12) beats "▁好" + "评" (-13.5): pieces may not cross the metaspace but may follow it.
    assert tokenizer.encode("好评", add_special_tokens=False).tokens == ["▁", "好评"]
    assert tokenizer.encode("Ａ", add_special_tokens=False).tokens == ["▁A"]  # normalized by the table
    assert tokenizer.encode("hello x", add_special_tokens=False).ids == [5, 4, 3]  # unknown -> <unk>


def test_query_prefix_is_added_as_fixed_ids_after_bos_and_counted_by_truncation():
    tokenizer = build_tokenizer(_vocab(), query_prefix=True)
    assert tokenizer.encode("hello").tokens == ["<s>", "▁que", "ry", ":", "▁hello", "</s>"]
    tokenizer.enable_truncation(max_length=6)
    assert tokenizer.encode("hello world hello").tokens == ["<s>", "▁que", "ry", ":", "▁hello", "</s>"]


@pytest.mark.parametrize("special", ["<s>", "</s>", "<pad>", "<mask>"])
def test_special_pieces_are_added_tokens(special):
    tokenizer = build_tokenizer(_vocab())
    assert tokenizer.token_to_id(special) == _vocab().pieces.index(special)


def test_an_empty_table_normalizes_nothing():
    normalizer = normalizers.Precompiled(precompiled_charsmap({}))
    assert normalizer.normalize_str("ＡＢ\u3000 x") == "ＡＢ\u3000 x"
