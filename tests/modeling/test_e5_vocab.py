from __future__ import annotations

import numpy as np
from tokenizers import Tokenizer

from stream_sentiment.modeling.e5_tokenizer import build_tokenizer
from stream_sentiment.modeling.e5_vocab import (
    WORD_EMBEDDINGS,
    is_cjk,
    prune_e5_image,
    prune_embeddings,
    prune_vocabulary,
    single_cjk_ids,
    tokenization_changes,
    used_ids,
)
from stream_sentiment.modeling.e5_weights import SentencePieceVocab, bert_state_dict, parse_e5
from tests.modeling import e5_synthetic as syn

PIECES = ["<s>", "<pad>", "</s>", "<unk>", "▁", "▁hello", "▁hell", "o", "▁world", "好", "▁好", "评", "好评", "▁cat",
          "Ж", "<mask>"]


def _vocab() -> SentencePieceVocab:
    scores = -np.arange(len(PIECES), dtype=np.float32)
    scores[[0, 1, 2, 3, len(PIECES) - 1]] = 0.0
    return SentencePieceVocab(PIECES, scores, 0, 2, 1, 3, {})


def test_is_cjk_covers_the_unified_ideographs_and_extensions_only():
    assert all(is_cjk(c) for c in "好评中文\u3400\U00020000")
    assert not any(is_cjk(c) for c in "aЖ。，ア한😀")


def test_single_cjk_ids_with_and_without_metaspace():
    assert single_cjk_ids(_vocab()) == {9, 10, 11}


def test_prune_keeps_order_specials_cjk_and_the_requested_pieces():
    pruned = prune_vocabulary(_vocab(), {5, 8})
    assert pruned.old_ids.tolist() == [0, 1, 2, 3, 5, 8, 9, 10, 11, 15]
    assert pruned.vocab.pieces == ["<s>", "<pad>", "</s>", "<unk>", "▁hello", "▁world", "好", "▁好", "评", "<mask>"]
    assert (pruned.vocab.bos_id, pruned.vocab.pad_id, pruned.vocab.eos_id, pruned.vocab.unk_id) == (0, 1, 2, 3)
    np.testing.assert_array_equal(pruned.vocab.scores, _vocab().scores[pruned.old_ids])
    assert pruned.remap()[8] == 5
    assert prune_vocabulary(_vocab(), set(), cjk_characters=False).size == 5


def test_texts_whose_pieces_are_kept_tokenize_as_before_and_others_fall_back():
    vocab = _vocab()
    full = build_tokenizer(vocab)
    seen = used_ids(full, ["hello world", "好评"])
    pruned = prune_vocabulary(vocab, seen)
    small: Tokenizer = build_tokenizer(pruned.vocab)
    same = tokenization_changes(full, small, pruned, ["hello world", "world hello 好评"])
    assert same["changed_share"] == 0.0 and same["tokens_full"] == same["tokens_pruned"]
    other = tokenization_changes(full, small, pruned, ["cat"])
    assert other["changed_share"] == 1.0 and other["unk_rate"] > 0


def test_pruned_embeddings_and_the_pruned_4bit_image_agree():
    e5 = parse_e5(syn.image())
    pruned = prune_vocabulary(e5.vocab, {4})  # "▁a"; 好 (5) is a single CJK piece, kept anyway
    assert pruned.old_ids.tolist() == [0, 1, 2, 3, 4, 5, 6]
    pruned = prune_vocabulary(e5.vocab, set(), cjk_characters=False)
    state = bert_state_dict(e5)
    small = prune_embeddings(state, pruned)
    np.testing.assert_array_equal(small[WORD_EMBEDDINGS], state[WORD_EMBEDDINGS][[0, 1, 2, 3, 6]])
    image = parse_e5(prune_e5_image(e5, pruned))
    assert image.header.vocab_rows == 5 and image.vocab.pieces == ["<s>", "<pad>", "</s>", "<unk>", "<mask>"]
    from_image = bert_state_dict(image)
    assert all(np.array_equal(from_image[k], small[k]) for k in small)
