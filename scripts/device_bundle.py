"""Fit both committed engines and the bench's wheels into one device call: an xz bundle, and what travels.

The device tool sends the working tree and the carried paths, 64 MiB in all. The two engines are 75 MB
as committed and the wheels of ``scripts/device_wheels.sh`` 22.6 MB, so a call that needs both engines
(``bench/gpu_e2e --workloads tweets,long,zh``) cannot send them as they are. LZMA shrinks the INT8
models to 61% (MiniLM, whose FFN down-projections are FP32) and 75% (the multilingual one), and the
wheels to 65% once their members are stored rather than deflated (xz cannot shrink deflated bytes):

    python3 scripts/device_bundle.py pack            # engines + .carry/wheels -> .carry/bundle/gpu.tar.xz
    git sparse-checkout set --no-cone '/*' '!/engines/' '!/tests/' '!/calibration/' '!/docs/*.json' '!/docs/*.png'
    python3 scripts/device_bundle.py size --carry .carry/bundle     # what the call would send, against 64 MiB
    # on the device machine (scripts/device_gpu_e2e.sh does this itself when the bundle is there):
    python3 scripts/device_bundle.py unpack .carry/bundle/gpu.tar.xz

``unpack`` writes the engine folders back under ``engines/`` (their manifests' sha256 are checked when
an engine loads) and the wheels into ``.carry/wheels``, each still an installable wheel. Standard
library only (lzma, tarfile, zipfile), so it runs on both machines. ``git sparse-checkout disable``
afterwards brings the left-out files back.
"""

from __future__ import annotations

import argparse
import io
import json
import lzma
import subprocess
import sys
import tarfile
import zipfile
from collections.abc import Iterable, Sequence
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DEFAULT_ENGINES = ("minilm-sentiment/v1", "multilingual-sentiment/v1")
DEFAULT_BUNDLE = Path(".carry/bundle/gpu.tar.xz")
LIMIT_BYTES = 64 * 2**20  # the device tool's working tree, carried paths included
# What unpack may write: nothing outside these, whatever the archive says.
UNPACKED_PREFIXES = ("engines/", ".carry/wheels/")


def engine_files(root: Path, engine: str) -> list[Path]:
    """``engine`` (``model/version``): its manifest and every file the manifest pins (plans are per GPU: not)."""
    folder = root / "engines" / engine
    manifest = json.loads((folder / "manifest.json").read_text())
    return [folder / "manifest.json", *(folder / name for name in sorted(manifest["files"]))]


def stored_wheel(path: Path) -> bytes:
    """The wheel with every member stored, not deflated: the same installable wheel, which xz compresses."""
    out = io.BytesIO()
    with zipfile.ZipFile(path) as source, zipfile.ZipFile(out, "w", zipfile.ZIP_STORED) as target:
        for info in source.infolist():
            copy = zipfile.ZipInfo(info.filename, info.date_time)
            copy.external_attr, copy.create_system = info.external_attr, info.create_system  # executable bits
            target.writestr(copy, source.read(info), compress_type=zipfile.ZIP_STORED)
    return out.getvalue()


def _add(archive: tarfile.TarFile, name: str, data: bytes, mode: int = 0o644) -> None:
    info = tarfile.TarInfo(name)
    info.size, info.mode, info.mtime = len(data), mode, 0  # mtime 0: the same inputs make the same bundle
    archive.addfile(info, io.BytesIO(data))


def pack(root: Path, engines: Sequence[str], wheels: Path | None, out: Path,
         preset: int = 9 | lzma.PRESET_EXTREME) -> dict[str, int]:
    """Write the bundle; returns the bytes in and out.

    The default preset is the smallest xz makes (a 64 MiB dictionary: ~700 MiB of memory and ~3 minutes
    of one core for the two engines and the wheels); unpacking takes seconds.
    """
    raw = 0
    out.parent.mkdir(parents=True, exist_ok=True)
    partial = out.with_name(out.name + ".partial")
    with lzma.open(partial, "wb", preset=preset) as compressed, \
            tarfile.open(fileobj=compressed, mode="w", format=tarfile.PAX_FORMAT) as archive:
        for engine in engines:
            for path in engine_files(root, engine):
                data = path.read_bytes()
                raw += len(data)
                _add(archive, path.relative_to(root).as_posix(), data)
        for wheel in sorted(wheels.glob("*.whl")) if wheels is not None else ():
            raw += wheel.stat().st_size
            _add(archive, f".carry/wheels/{wheel.name}", stored_wheel(wheel))
    partial.replace(out)
    return {"input_bytes": raw, "bundle_bytes": out.stat().st_size}


def unpack(bundle: Path, root: Path) -> list[str]:
    """Extract the bundle under ``root``; refuses any member outside ``UNPACKED_PREFIXES`` or not a plain file."""
    written = []
    with tarfile.open(bundle, "r:xz") as archive:
        for member in archive:
            name = member.name
            if not member.isfile() or ".." in Path(name).parts or not name.startswith(UNPACKED_PREFIXES):
                raise ValueError(f"{bundle}: refusing member {name!r}")
            target = root / name
            target.parent.mkdir(parents=True, exist_ok=True)
            source = archive.extractfile(member)
            assert source is not None
            target.write_bytes(source.read())
            written.append(name)
    return written


def travelling_bytes(root: Path, carry: Iterable[Path]) -> dict[str, int]:
    """What a device call from ``root`` sends: tracked files present in the working tree (a sparse checkout
    leaves some out), untracked files git does not ignore, and the carried paths."""

    def git(*args: str) -> list[str]:
        listing = subprocess.run(["git", "-C", str(root), *args, "-z"], check=True, capture_output=True).stdout
        return [name for name in listing.decode().split("\0") if name]

    def size(names: Iterable[str]) -> int:
        return sum(p.stat().st_size for p in (root / n for n in names) if p.is_file() and not p.is_symlink())

    def folder_size(path: Path) -> int:
        path = root / path
        return path.stat().st_size if path.is_file() else sum(p.stat().st_size for p in path.rglob("*") if p.is_file())

    # ls-files -t marks skip-worktree entries (left out by sparse-checkout) "S": those stay home.
    tracked = [entry[2:] for entry in git("ls-files", "-t") if not entry.startswith("S ")]
    sizes = {"tracked": size(tracked), "untracked": size(git("ls-files", "--others", "--exclude-standard"))}
    sizes |= {f"carry {path}": folder_size(path) for path in carry}
    sizes["total"] = sum(sizes.values())
    return sizes


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)
    packing = commands.add_parser("pack", help="engines + wheels -> one xz bundle")
    packing.add_argument("--engines", type=lambda s: [e for e in s.split(",") if e], default=list(DEFAULT_ENGINES),
                         help="model/version folders under engines/, comma-separated")
    packing.add_argument("--wheels", type=Path, default=Path(".carry/wheels"), help="folder of wheels ('' = none)")
    packing.add_argument("--out", type=Path, default=DEFAULT_BUNDLE)
    unpacking = commands.add_parser("unpack", help="the bundle's engines and wheels back into this checkout")
    unpacking.add_argument("bundle", type=Path)
    sizing = commands.add_parser("size", help="what a device call from this checkout would send")
    sizing.add_argument("--carry", type=Path, action="append", default=[], help="a carried path (repeatable)")
    args = parser.parse_args(argv)
    if args.command == "pack":
        wheels = args.wheels if str(args.wheels) not in ("", ".") else None
        result = pack(REPO, args.engines, REPO / wheels if wheels else None, REPO / args.out)
        print(f"{args.out}: {result['bundle_bytes']:,} bytes from {result['input_bytes']:,} "
              f"({result['bundle_bytes'] / result['input_bytes']:.0%})")
    elif args.command == "unpack":
        written = unpack(args.bundle, REPO)
        engines = sorted({"/".join(n.split("/")[1:3]) for n in written if n.startswith("engines/")})
        wheels = sum(n.startswith(".carry/wheels/") for n in written)
        print(f"unpacked {args.bundle}: engines {', '.join(engines) or 'none'}; {wheels} wheel(s) in .carry/wheels")
    else:
        sizes = travelling_bytes(REPO, args.carry)
        for name, value in sizes.items():
            print(f"{name:>40}: {value:>12,} bytes ({value / 2**20:.1f} MiB)")
        fits = sizes["total"] <= LIMIT_BYTES
        print(f"{'fits' if fits else 'does NOT fit'} the device tool's {LIMIT_BYTES / 2**20:.0f} MiB "
              f"({(LIMIT_BYTES - sizes['total']) / 2**20:+.1f} MiB)")
        return 0 if fits else 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
