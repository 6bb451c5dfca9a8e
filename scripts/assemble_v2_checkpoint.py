"""Rebuild a checkpoint folder ``stream-sentiment calibrate`` packages from what device_train_v2.sh sent back.

The call returns, per chosen run, FP16 parts of the checkpoint without the frozen word-embedding
table (it equals the carried base's, checked on the device) and, in ``train_v2_report.json``, the
run's encoder config and training record. This joins the parts, puts the table back from the same
carried base file (so the values are bit-identical to those trained with), and adds the tokenizer.

Usage: python scripts/assemble_v2_checkpoint.py OUT GROUP DEST [--base-model .carry/train16/base]
e.g.   python scripts/assemble_v2_checkpoint.py build/device-v2 v2 build/train/v2
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

from safetensors.numpy import load, load_file, save_file

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from stream_sentiment.modeling.checkpoint_files import TOKENIZER_FILES


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("out", type=Path, help="the device call's returned folder")
    parser.add_argument("group", help="v2, fast-l2, fast-l2-ffn768, ...")
    parser.add_argument("dest", type=Path)
    parser.add_argument("--base-model", type=Path, default=Path(".carry/train16/base"))
    args = parser.parse_args(argv)
    shipped = json.loads((args.out / "train_v2_report.json").read_text())["shipped"][args.group]
    parts = [args.out / args.group / f"checkpoint.fp16.part{i}" for i in range(shipped["parts"])]
    blob = b"".join(part.read_bytes() for part in parts)
    if len(blob) != shipped["bytes"]:
        raise SystemExit(f"{args.group}: {len(blob)} bytes in {len(parts)} parts, the report says {shipped['bytes']}")
    state = load(blob)
    base = load_file(str(args.base_model / "model.safetensors"))
    for name in shipped["left_out_equal_to_base"]:
        state[name] = base[name]
    args.dest.mkdir(parents=True, exist_ok=True)
    save_file(state, str(args.dest / "checkpoint.fp16.safetensors"))
    (args.dest / "encoder_config.json").write_text(json.dumps(shipped["encoder_config"], indent=2))
    (args.dest / "training.json").write_text(json.dumps(shipped["training"], indent=2))
    for name in TOKENIZER_FILES:
        shutil.copy2(args.base_model / name, args.dest / name)
    print(json.dumps({"group": args.group, "run": shipped["run"], "tensors": len(state), "dest": str(args.dest)}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
