"""A tiny e5.c model image, written field by field from e5.c's ``e5_parse`` (not with our writer).

Hidden 64 (two Q4_0 blocks per row), one layer, two heads, FFN 64, eight
positions; seven pieces. Every Q4_0 block has scale ``0.5 * (k + 1)`` for its
running index ``k`` and nibble ``(j + k) % 16`` for weight ``j``, so the
expected float weights follow from a formula, independently of the reader.
"""

from __future__ import annotations

import struct

import numpy as np

HIDDEN, LAYERS, HEADS, FFN, POSITIONS, TYPES = 64, 1, 2, 64, 8, 2
PIECES = ["<s>", "<pad>", "</s>", "<unk>", "▁a", "好", "<mask>"]
SCORES = [0.0, 0.0, 0.0, 0.0, -1.5, -2.25, 0.0]
VOCAB_ROWS = 9  # like the real file, more embedding rows than pieces
NORMALIZATION = {0x3000: " ", 0xFF21: "A", 0x7: "", 0xFB01: "fi"}
Q4 = {"emb.word": (VOCAB_ROWS, HIDDEN), "l0.q.w": (HIDDEN, HIDDEN), "l0.k.w": (HIDDEN, HIDDEN),
      "l0.v.w": (HIDDEN, HIDDEN), "l0.ao.w": (HIDDEN, HIDDEN), "l0.fi.w": (FFN, HIDDEN), "l0.fo.w": (HIDDEN, FFN)}
F32 = {"emb.pos": (POSITIONS, HIDDEN), "emb.type": (TYPES, HIDDEN), "emb.ln.w": (HIDDEN,), "emb.ln.b": (HIDDEN,),
       "l0.q.b": (HIDDEN,), "l0.k.b": (HIDDEN,), "l0.v.b": (HIDDEN,), "l0.ao.b": (HIDDEN,), "l0.aln.w": (HIDDEN,),
       "l0.aln.b": (HIDDEN,), "l0.fi.b": (FFN,), "l0.fo.b": (HIDDEN,), "l0.oln.w": (HIDDEN,), "l0.oln.b": (HIDDEN,)}


def q4_blocks(rows: int, cols: int) -> bytes:
    out = bytearray()
    for k in range(rows * cols // 32):
        nibbles = [(j + k) % 16 for j in range(32)]
        out += struct.pack("<e", 0.5 * (k + 1))
        out += bytes(nibbles[j] | nibbles[j + 16] << 4 for j in range(16))
    return bytes(out)


def q4_expected(rows: int, cols: int) -> np.ndarray:
    values = np.empty(rows * cols, dtype=np.float32)
    for k in range(rows * cols // 32):
        for j in range(32):
            values[32 * k + j] = (((j + k) % 16) - 8) * 0.5 * (k + 1)
    return values.reshape(rows, cols)


def f32_values(name: str, shape: tuple[int, ...]) -> np.ndarray:
    seed = sum(map(ord, name))
    return (np.arange(int(np.prod(shape)), dtype=np.float32) * 0.01 + seed).reshape(shape)


def tensors() -> dict[str, tuple[int, int, bytes]]:
    out = {}
    for name, shape in Q4.items():
        out[name] = (1, shape[0] * shape[1], q4_blocks(*shape))
    for name, shape in F32.items():
        out[name] = (0, int(np.prod(shape)), f32_values(name, shape).astype("<f4").tobytes())
    return out


def image(*, pieces: list[str] = PIECES, truncate: int | None = None) -> bytes:
    head = bytearray(b"E5S1") + struct.pack("<I", 1)
    head += struct.pack("<7i", HIDDEN, LAYERS, HEADS, FFN, VOCAB_ROWS, POSITIONS, TYPES)
    head += struct.pack("<f", 1e-12) + struct.pack("<i", 32)
    encoded = [p.encode("utf-8") for p in pieces]
    offsets = np.cumsum([0] + [len(p) for p in encoded]).astype("<u4")
    head += struct.pack("<5i", len(pieces), 0, 2, 1, 3) + struct.pack("<Q", sum(map(len, encoded)))
    head += offsets.tobytes() + np.asarray(SCORES[:len(pieces)], dtype="<f4").tobytes() + b"".join(encoded)
    norm = b"".join(struct.pack("<IB", cp, len(r)) + b"".join(struct.pack("<I", ord(c)) for c in r)
                    for cp, r in NORMALIZATION.items())
    head += struct.pack("<iI", len(NORMALIZATION), len(norm)) + norm
    data = tensors()
    head += struct.pack("<i", len(data))
    directory_size = sum(2 + len(n) + 1 + 4 + 8 + 8 for n in data)
    at = len(head) + directory_size
    body = bytearray()
    for name, (dtype, count, raw) in data.items():
        head += struct.pack("<H", len(name)) + name.encode()
        head += struct.pack("<BIQQ", dtype, count, at + len(body), len(raw))
        body += raw
    blob = bytes(head) + bytes(body)
    return blob if truncate is None else blob[:truncate]
