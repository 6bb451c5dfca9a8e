"""Load-time rewrite of a symmetric-INT8 Q/DQ model into the form ONNX Runtime's x86 kernels fuse.

The committed INT8 model uses signed int8 activations with zero point 0, the
only activation form TensorRT accepts. ONNX Runtime fuses Q/DQ around MatMul
into integer kernels for *unsigned* activations on x86 (signed-activation
fusion is enabled on ARM only), so served as-is the model runs no faster than
FP32.

The rewrite is exact, not an approximation: int8 with scale s and zero point 0
and uint8 with scale s and zero point 128 represent the same 256 values
(``u = q + 128``), saturate at the same bounds and dequantize identically.
Only activation Q/DQ nodes are changed; weights stay signed and per-channel.
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
from typing import Any

import numpy as np

# Bumped whenever the rewrite changes, so stale cached copies are never loaded.
REWRITE_FORMAT = 1


def _dequantized(node: Any, initializers: dict[str, Any]) -> np.ndarray:
    """What a DequantizeLinear of a constant computes, per tensor or per axis: (q - zero) * scale."""
    from onnx import numpy_helper

    quantized = numpy_helper.to_array(initializers[node.input[0]]).astype(np.float32)
    scale = numpy_helper.to_array(initializers[node.input[1]]).astype(np.float32)
    zero = numpy_helper.to_array(initializers[node.input[2]]).astype(np.float32) if len(node.input) > 2 else 0.0
    if np.ndim(scale) == 1:
        shape = [1] * quantized.ndim
        shape[next((a.i for a in node.attribute if a.name == "axis"), 1)] = -1
        scale, zero = scale.reshape(shape), np.reshape(zero, shape) if np.ndim(zero) else zero
    return (quantized - zero) * scale


def _fold_gather_tables(graph: Any, initializers: dict[str, Any]) -> None:
    """Replace DequantizeLinear(int8 table) -> Gather by a float table.

    ORT does not fuse a dequantized embedding lookup, so it would dequantize
    the whole 30522x384 table on every call (12% of a batch's time) to read a
    few rows. Dequantizing once at load is the same arithmetic, done once.
    """
    from onnx import numpy_helper

    consumers: dict[str, list[Any]] = {}
    for node in graph.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node)
    for node in list(graph.node):
        if node.op_type != "DequantizeLinear" or node.input[0] not in initializers:
            continue
        users = consumers.get(node.output[0], [])
        if not users or any(u.op_type != "Gather" for u in users):
            continue
        graph.initializer.append(numpy_helper.from_array(_dequantized(node, initializers), node.output[0]))
        graph.node.remove(node)


def signed_to_unsigned_activations(model_path: Path) -> bytes:
    """Serialized copy of the model with every activation Q/DQ zero point moved to uint8 128."""
    import onnx
    from onnx import numpy_helper

    model = onnx.load(str(model_path))
    graph = model.graph
    initializers = {init.name: init for init in graph.initializer}
    _fold_gather_tables(graph, initializers)
    unsigned: dict[str, str] = {}  # signed zero-point initializer -> its uint8 twin
    for node in graph.node:
        if node.op_type not in ("QuantizeLinear", "DequantizeLinear") or len(node.input) < 3:
            continue
        if node.op_type == "DequantizeLinear" and node.input[0] in initializers:
            continue  # a weight: stays signed int8
        name = node.input[2]
        if name not in unsigned:
            values = numpy_helper.to_array(initializers[name])
            if values.dtype != np.int8 or np.any(values != 0):
                raise ValueError(f"{name}: expected a symmetric int8 zero point, got {values}")
            # A new initializer: quantizers share zero points between weights and activations.
            twin = numpy_helper.from_array(np.full(values.shape, 128, dtype=np.uint8), f"{name}__uint8")
            graph.initializer.append(twin)
            unsigned[name] = twin.name
        node.input[2] = unsigned[name]
    used = {name for node in graph.node for name in node.input}
    orphans = [init for init in graph.initializer if init.name not in used]
    for init in orphans:
        graph.initializer.remove(init)
    return model.SerializeToString()


def strip_quantization(model_path: Path) -> bytes:
    """An FP32 graph of the same shape: weights dequantized, activation Q/DQ pairs removed.

    Used as the FP32 speed baseline when the FP32 export (not committed) is not
    at hand: it performs exactly the FP32 model's float operations.
    """
    import onnx
    from onnx import numpy_helper

    model = onnx.load(str(model_path))
    graph = model.graph
    initializers = {init.name: init for init in graph.initializer}
    producers = {out: node for node in graph.node for out in node.output}
    replacements: list[tuple[Any, Any]] = []
    for node in graph.node:
        if node.op_type != "DequantizeLinear":
            continue
        if node.input[0] in initializers:
            graph.initializer.append(numpy_helper.from_array(_dequantized(node, initializers), node.output[0]))
            replacements.append((node, None))
            continue
        source = producers.get(node.input[0])
        if source is not None and source.op_type == "QuantizeLinear":
            # Identity keeps the tensor names (a graph output may be one); ORT drops it.
            replacements.append((node, onnx.helper.make_node("Identity", [source.input[0]], [node.output[0]])))
    for dequantize, identity in replacements:
        position = list(graph.node).index(dequantize)
        graph.node.remove(dequantize)
        if identity is not None:
            graph.node.insert(position, identity)
    consumed = {name for node in graph.node for name in node.input} | {o.name for o in graph.output}
    for node in [n for n in graph.node if n.op_type == "QuantizeLinear" and n.output[0] not in consumed]:
        graph.node.remove(node)
    used = {name for node in graph.node for name in node.input}
    for init in [i for i in graph.initializer if i.name not in used]:
        graph.initializer.remove(init)
    return model.SerializeToString()


# The child's exit status when it cannot write its output: the folder is unusable, try the next.
_EXIT_CANNOT_WRITE = 73  # EX_CANTCREAT
_CHUNK = 1 << 20


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
            [sys.executable, "-m", "stream_sentiment.engine_build.qdq_rewrite", str(model_path), str(partial)],
            check=False,
            capture_output=True,
        )
        if child.returncode == _EXIT_CANNOT_WRITE:
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


def cached_unsigned_model(model_path: Path, model_sha256: str, cache_dir: Path) -> Path:
    """The rewritten model as a file, made once per model checksum and reused by every later load.

    The rewrite is ~0.4 s of protobuf and numpy work that holds the GIL in C; done inside a
    running worker (a hot swap) it would stall the event loop and every live batch with it.
    So it runs in a child process, and its result is cached under ``cache_dir`` (the version's
    ``plans/`` folder) keyed by the source checksum, or, when that cannot be written, in this
    user's private temp folder (:func:`private_temp_folder`). Each cached file has a
    ``<name>.sha256`` sidecar; a file that does not match it (or has none) is rebuilt.
    """
    name = f"onnxruntime-uint8-r{REWRITE_FORMAT}-{model_sha256[:16]}.onnx"
    for folder, private in ((cache_dir, False), (private_temp_folder(), True)):
        if private and not _private_folder_ready(folder):
            continue  # never trust (or write) a temp folder someone else could write to
        target = folder / name
        if _verified(target):
            return target  # a read-only plans/ folder still serves a verified copy
        if not private and not _writable_folder(folder):
            continue
        if _rewrite_into(model_path, target):
            return target
    raise PermissionError(
        f"no writable cache folder for the rewritten {model_path.name}: {cache_dir} is not writable and "
        f"{private_temp_folder()} is not a private folder of this user"
    )


if __name__ == "__main__":
    # The child of cached_unsigned_model: lowest priority, so live batches keep the cores.
    with contextlib.suppress(OSError):
        os.nice(19)
    rewritten = signed_to_unsigned_activations(Path(sys.argv[1]))
    try:
        Path(sys.argv[2]).write_bytes(rewritten)
    except OSError as error:
        print(f"cannot write {sys.argv[2]}: {error}", file=sys.stderr)
        sys.exit(_EXIT_CANNOT_WRITE)
