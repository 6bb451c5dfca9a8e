"""The ONNX Runtime engine's INT8 model: rewritten once per model checksum, cached as a verified file.

The rewrite itself (signed to unsigned activations, so ONNX Runtime's x86
kernels fuse the Q/DQ MatMuls) is build tooling, ``engine_build.qdq_rewrite``;
this runtime module only decides where its output lives and whether a cached
copy can be trusted. It never imports the rewrite: it runs it as a child
process (``python -m stream_sentiment.engine_build.qdq_rewrite IN OUT``), the
one place the serving path calls build tooling, because the repository
commits only the TensorRT-ready signed model and an activation needs the
unsigned one (a dynamically quantized model has no activation Q/DQ: the rewrite
only folds its int8-stored tables and weight-only MatMuls).
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import stat
import subprocess
import sys
import tempfile
from pathlib import Path

# Part of the cached file's name: bump it whenever engine_build.qdq_rewrite changes its output,
# so stale cached copies are never loaded.
REWRITE_FORMAT = 1
# The rewrite child's module: build tooling, run in its own process (see the module doc).
REWRITE_MODULE = "stream_sentiment.engine_build.qdq_rewrite"
# The child's exit status when it cannot write its output: the folder is unusable, try the next.
EXIT_CANNOT_WRITE = 73  # EX_CANTCREAT
_CHUNK = 1 << 20
# The cached files' name: "onnxruntime-uint8-r<format>-<first 16 hex digits of the model's sha256>.onnx".
CACHE_PREFIX = "onnxruntime-uint8-r"


def _file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as stream:
        while chunk := stream.read(_CHUNK):
            digest.update(chunk)  # hashlib releases the GIL on large chunks
    return digest.hexdigest()


def _sidecar(target: Path) -> Path:
    return target.with_name(f"{target.name}.sha256")


def _verified(target: Path) -> bool:
    """True when ``target`` exists and matches the checksum in its sidecar (missing sidecar: False)."""
    try:
        recorded = _sidecar(target).read_text(encoding="ascii").split()
        return bool(recorded) and target.is_file() and _file_sha256(target) == recorded[0]
    except (OSError, ValueError):
        return False


def private_temp_folder() -> Path:
    """This user's cache folder in the temp dir; per-user so no other local user can plant a model in it."""
    return Path(tempfile.gettempdir()) / f"stream-sentiment-models-{os.geteuid()}"


def _private_folder_ready(folder: Path) -> bool:
    """Create ``folder`` (mode 0700) if absent; usable only as a real directory of ours, not group/other-writable."""
    try:
        with contextlib.suppress(FileExistsError):
            folder.mkdir(mode=0o700)
        info = folder.lstat()  # lstat: a symlink planted under the name is refused, not followed
    except OSError:
        return False
    return (
        stat.S_ISDIR(info.st_mode)
        and info.st_uid == os.geteuid()
        and not info.st_mode & (stat.S_IWGRP | stat.S_IWOTH)
        and os.access(folder, os.W_OK | os.X_OK)
    )


def _writable_folder(folder: Path) -> bool:
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError:  # EROFS, EACCES, ENOTDIR, ...: not only PermissionError
        return False
    return folder.is_dir() and os.access(folder, os.W_OK | os.X_OK)


def _rewrite_into(model_path: Path, target: Path) -> bool:
    """Rewrite ``model_path`` into ``target`` (plus its checksum sidecar) via a child process.

    False when the destination folder cannot be written (the caller tries the next one);
    RuntimeError when the rewrite itself fails.
    """
    temporaries: list[Path] = []

    def temporary(suffix: str) -> Path:
        # A unique name per call: two loads in one process never share a partial file.
        handle, name = tempfile.mkstemp(prefix=f".{target.name}.", suffix=suffix, dir=target.parent)
        os.close(handle)
        temporaries.append(Path(name))
        return temporaries[-1]

    try:
        partial = temporary(".partial")
        child = subprocess.run(  # noqa: S603 - our own module, run by this interpreter
            [sys.executable, "-m", REWRITE_MODULE, str(model_path), str(partial)],
            check=False,
            capture_output=True,
        )
        if child.returncode == EXIT_CANNOT_WRITE:
            return False
        if child.returncode != 0:
            raise RuntimeError(f"rewriting {model_path.name} failed: {child.stderr.decode(errors='replace')[-2000:]}")
        sidecar = temporary(".sha256.partial")
        sidecar.write_text(f"{_file_sha256(partial)}  {target.name}\n", encoding="ascii")
        for path in (partial, sidecar):
            path.chmod(0o644)  # mkstemp makes 0600; a shared plans/ folder serves other users too
        # Sidecar first: once the model is in place under its name, its checksum already is.
        # Both are atomic renames: concurrent loaders never read half a file.
        sidecar.replace(_sidecar(target))
        partial.replace(target)
        temporaries.clear()
        return True
    except OSError:
        return False
    finally:
        for path in temporaries:
            with contextlib.suppress(OSError):
                path.unlink()


def _remove_stale_copies(plans: Path, keep: str) -> None:
    """Delete the cached rewrites in a version's ``plans`` folder other than ``keep``, with their sidecars.

    That folder belongs to one version, whose model the manifest pins: another cached rewrite there was made
    from an earlier model file of the version (rebuilt in place) or by an older rewrite format, and would
    never be loaded again; each is 50-70 MB. A process that has one open keeps reading it (unlinking does not
    take a loaded file away). The shared private temp folder is never pruned: it holds every version's copy.
    """
    for path in plans.glob(f"{CACHE_PREFIX}*.onnx"):
        if path.name != keep:
            for stale in (path, _sidecar(path)):
                with contextlib.suppress(OSError):
                    stale.unlink()


def cached_unsigned_model(model_path: Path, model_sha256: str, cache_dir: Path) -> Path:
    """The rewritten model as a file, made once per model checksum and reused by every later load.

    The rewrite is ~0.4 s of protobuf and numpy work that holds the GIL in C; done inside a
    running worker (a hot swap) it would stall the event loop and every live batch with it.
    So it runs in a child process, and its result is cached under ``cache_dir`` (the version's
    ``plans/`` folder) keyed by the source checksum, or, when that cannot be written, in this
    user's private temp folder (:func:`private_temp_folder`). Each cached file has a
    ``<name>.sha256`` sidecar; a file that does not match it (or has none) is rebuilt. Writing a new one
    into ``plans/`` removes the copies made there for the version's earlier model files.
    """
    name = f"{CACHE_PREFIX}{REWRITE_FORMAT}-{model_sha256[:16]}.onnx"
    for folder, private in ((cache_dir, False), (private_temp_folder(), True)):
        if private and not _private_folder_ready(folder):
            continue  # never trust (or write) a temp folder someone else could write to
        target = folder / name
        if _verified(target):
            return target  # a read-only plans/ folder still serves a verified copy
        if not private and not _writable_folder(folder):
            continue
        if _rewrite_into(model_path, target):
            if not private:
                _remove_stale_copies(folder, keep=name)
            return target
    raise PermissionError(
        f"no writable cache folder for the rewritten {model_path.name}: {cache_dir} is not writable and "
        f"{private_temp_folder()} is not a private folder of this user"
    )
