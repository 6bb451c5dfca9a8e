"""Pack what one H200 call needs for quantization-aware fine-tuning of minilm-sentiment v2 (scripts/device_qat.sh).

``.carry/qat`` (git-ignored, ~53 MB, within the device tool's 64 MiB):

* ``start/`` -- the checkpoint to fine-tune as one FP16 ``model.safetensors`` *with* its (frozen, the base's)
  word-embedding table, plus the base's ``config.json`` and tokenizer files: so it serves as train_v2's
  ``--base-model`` (config, tokenizer) and ``--init-checkpoint`` alike, and scripts/select_v2.py can tell the
  table is unchanged and leave it out of the trip back;
* ``corpora/`` -- the pinned corpus archives;
* ``soft/`` -- the teacher's soft labels (``soft.npy``, ``soft.json``, ``soft_augmented.npy``) of the transfer set.

Usage: python scripts/prepare_carry_qat.py --checkpoint build/train/v2 --soft .carry/soft-k5 \
           --base-model .carry/train16/base --corpora-dir .carry/train16/corpora --output .carry/qat
"""

from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path

from safetensors.numpy import load_file, save_file

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from stream_sentiment.modeling.checkpoint_files import copy_tokenizer_files

SOFT_FILES = ("soft.npy", "soft.json", "soft_augmented.npy")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--checkpoint", type=Path, required=True, help="checkpoint folder (checkpoint*.safetensors)")
    parser.add_argument("--soft", type=Path, required=True, help="folder with soft.npy, soft.json, soft_augmented.npy")
    parser.add_argument("--base-model", type=Path, default=Path(".carry/train16/base"))
    parser.add_argument("--corpora-dir", type=Path, default=Path(".carry/train16/corpora"))
    parser.add_argument("--output", type=Path, default=Path(".carry/qat"))
    args = parser.parse_args(argv)
    (weights,) = sorted(args.checkpoint.glob("checkpoint*.safetensors"))
    if args.output.exists():
        shutil.rmtree(args.output)
    start = args.output / "start"
    start.mkdir(parents=True)
    state = load_file(str(weights))
    save_file({k: v.astype("float16") if v.dtype.kind == "f" else v for k, v in state.items()},
              str(start / "model.safetensors"))
    shutil.copy2(args.base_model / "config.json", start / "config.json")
    copy_tokenizer_files(args.base_model, start)
    shutil.copytree(args.corpora_dir, args.output / "corpora")
    (args.output / "soft").mkdir()
    for name in SOFT_FILES:
        shutil.copy2(args.soft / name, args.output / "soft" / name)
    total = sum(f.stat().st_size for f in args.output.rglob("*") if f.is_file())
    print(f"{args.output}: {total / 2**20:.1f} MiB")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
