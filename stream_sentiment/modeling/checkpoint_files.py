"""A checkpoint folder as ``calibrate`` packages it: weights, encoder config and the tokenizer's files.

Training (``train``, ``train_v2``), the random students of the speed measurements (``student``) and the
export all write or read this one layout; torch is imported only when weights are written.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Mapping
from pathlib import Path
from typing import Any

# A WordPiece tokenizer has all four; a SentencePiece one tokenizer.json alone (copy what exists).
TOKENIZER_FILES = ("tokenizer.json", "vocab.txt", "tokenizer_config.json", "special_tokens_map.json")


def copy_tokenizer_files(source: Path, destination: Path) -> None:
    """The tokenizer files ``source`` has, copied into ``destination``."""
    for name in TOKENIZER_FILES:
        if (source / name).exists():
            shutil.copy2(source / name, destination / name)


def write_checkpoint(destination: Path, state: Mapping[str, Any], encoder_config: Mapping[str, Any],
                     tokenizer_dir: Path) -> None:
    """``checkpoint.safetensors`` from ``state`` (tensors), ``encoder_config.json``, and ``tokenizer_dir``'s
    tokenizer files, into ``destination`` (created)."""
    from safetensors.torch import save_file

    destination.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in state.items()}, str(destination / "checkpoint.safetensors"))
    (destination / "encoder_config.json").write_text(json.dumps(dict(encoder_config), indent=2))
    copy_tokenizer_files(tokenizer_dir, destination)
