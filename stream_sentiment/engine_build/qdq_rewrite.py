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

Run as a module (``python -m stream_sentiment.engine_build.qdq_rewrite IN OUT``)
it writes the rewritten model: the child process that
``engines.rewrite_cache.cached_unsigned_model`` starts when a worker activates
the INT8 version. ``strip_quantization`` (an FP32 graph of the same shape) is
the benchmarks' FP32 baseline; ``dequantized`` and ``float_dynamic_matmuls`` are shared with
``onnx_weights``.

A *dynamically* quantized model (``calibrate --method dynamic``: ONNX Runtime's
``DynamicQuantizeLinear`` -> ``MatMulInteger``, activation ranges measured per batch at run time)
has no activation Q/DQ nodes to rewrite: ORT runs its integer MatMuls as they are; only its
int8-stored embedding tables and weight-only MatMuls are folded here, as for the static form.
"""

from __future__ import annotations

import contextlib
import os
import sys
from pathlib import Path
from typing import Any

import numpy as np

from stream_sentiment.engines.rewrite_cache import EXIT_CANNOT_WRITE


def dequantized(node: Any, initializers: dict[str, Any]) -> np.ndarray:
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


def remove_unread_nodes(graph: Any, op_type: str, among: set[str] | None = None) -> None:
    """Remove the ``op_type`` nodes none of whose outputs a node or a graph output reads (only those with an
    output in ``among``, if given): what a rewrite left without consumers."""
    read = {name for node in graph.node for name in node.input} | {output.name for output in graph.output}
    for node in [n for n in graph.node if n.op_type == op_type]:
        if not read & set(node.output) and (among is None or among & set(node.output)):
            graph.node.remove(node)


def remove_unread_initializers(graph: Any) -> None:
    """Remove the initializers no node reads any more."""
    read = {name for node in graph.node for name in node.input}
    for init in [i for i in graph.initializer if i.name not in read]:
        graph.initializer.remove(init)


DYNAMIC_QUANTIZATION_OPS = ("DynamicQuantizeLinear", "MatMulInteger")


def is_dynamically_quantized(model_path: Path) -> bool:
    """Whether the model quantizes activations at run time (ONNX Runtime's dynamic form), not with Q/DQ pairs."""
    import onnx

    model = onnx.load(str(model_path), load_external_data=False)
    return any(node.op_type in DYNAMIC_QUANTIZATION_OPS for node in model.graph.node)


def float_dynamic_matmuls(graph: Any) -> int:
    """Rewrite, in place, each dynamically quantized MatMul of ``graph`` back to a float ``MatMul``.

    ONNX Runtime's dynamic quantizer writes ``x @ W`` as ``DynamicQuantizeLinear(x) -> (xq, xs, xz)``,
    ``MatMulInteger(xq, Wq, xz, Wz) -> Cast(float) -> Mul(., Mul(xs, Ws))``. The float form is
    ``MatMul(x, (Wq - Wz) * Ws)`` (``Ws`` per output column, or one scale): the same weights, no
    activation rounding. A ``DynamicQuantizeLinear`` left without consumers is removed. Returns how many
    MatMuls were rewritten; a graph without ``MatMulInteger`` is left as it is.
    """
    from onnx import helper, numpy_helper

    initializers = {init.name: init for init in graph.initializer}
    producers = {out: node for node in graph.node for out in node.output}
    consumers: dict[str, list[Any]] = {}
    for node in graph.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node)

    def only_consumer(name: str, op_type: str) -> Any:
        users = consumers.get(name, [])
        if len(users) != 1 or users[0].op_type != op_type:
            raise ValueError(f"{name}: expected one {op_type} consumer, found {[u.op_type for u in users]}")
        return users[0]

    rewritten = 0
    scale_products: set[str] = set()  # the scale Muls' outputs: removed at the end once nothing reads them
    for node in [n for n in graph.node if n.op_type == "MatMulInteger" and n.input[1] in initializers]:
        quantize = producers.get(node.input[0])
        if quantize is None or quantize.op_type != "DynamicQuantizeLinear":
            raise ValueError(f"{node.name}: its activation does not come from a DynamicQuantizeLinear")
        cast = only_consumer(node.output[0], "Cast")
        rescale = only_consumer(cast.output[0], "Mul")
        scales = producers[next(name for name in rescale.input if name != cast.output[0])]
        weight_scale = next(name for name in scales.input if name != quantize.output[1])
        weight_name = f"{node.input[1]}_dequantized"
        if weight_name not in initializers:  # a weight two MatMuls share is dequantized once
            quantized = numpy_helper.to_array(initializers[node.input[1]]).astype(np.float32)
            zero = (numpy_helper.to_array(initializers[node.input[3]]).astype(np.float32)
                    if len(node.input) > 3 and node.input[3] else np.float32(0))
            weight = (quantized - zero) * numpy_helper.to_array(initializers[weight_scale]).astype(np.float32)
            initializers[weight_name] = numpy_helper.from_array(weight, weight_name)
            graph.initializer.append(initializers[weight_name])
        # In the rescale's place: after everything it read, before everything that reads its output.
        graph.node.insert(list(graph.node).index(rescale), helper.make_node(
            "MatMul", [quantize.input[0], weight_name], [rescale.output[0]], name=node.name.removesuffix("_quant")))
        for old in (node, cast, rescale):
            graph.node.remove(old)
        scale_products.add(scales.output[0])
        rewritten += 1
    if rewritten:  # in this order: a scale Mul reads its DynamicQuantizeLinear's scale output
        remove_unread_nodes(graph, "Mul", among=scale_products)
        remove_unread_nodes(graph, "DynamicQuantizeLinear")
        remove_unread_initializers(graph)
    return rewritten


def _fold_unfused_weights(graph: Any, initializers: dict[str, Any]) -> None:
    """Replace DequantizeLinear(int8 constant) by a float constant where ORT would not fuse it.

    Two cases. An embedding table feeding Gather: ORT does not fuse a dequantized lookup, so it
    would dequantize the whole 30522x384 table on every call (12% of a batch's time) to read a
    few rows. A weight-only quantized MatMul (float activations, int8 weights: the FFN
    down-projections of versions built with ``--down-projections int8-weights``): no integer
    kernel applies, so ORT would dequantize the weight on every call. Dequantizing once at load
    is the same arithmetic, done once; the file on disk stays int8.
    """
    from onnx import numpy_helper

    consumers: dict[str, list[Any]] = {}
    for node in graph.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node)
    producers = {out: node for node in graph.node for out in node.output}

    def float_activations(user: Any, weight: str) -> bool:
        if user.op_type not in ("MatMul", "Gemm"):
            return False
        others = [name for name in user.input if name != weight]
        return all(producers.get(name) is None or producers[name].op_type != "DequantizeLinear" for name in others)

    for node in list(graph.node):
        if node.op_type != "DequantizeLinear" or node.input[0] not in initializers:
            continue
        users = consumers.get(node.output[0], [])
        if not users or not all(u.op_type == "Gather" or float_activations(u, node.output[0]) for u in users):
            continue
        graph.initializer.append(numpy_helper.from_array(dequantized(node, initializers), node.output[0]))
        graph.node.remove(node)


def signed_to_unsigned_activations(model_path: Path) -> bytes:
    """Serialized copy of the model with every activation Q/DQ zero point moved to uint8 128."""
    import onnx
    from onnx import numpy_helper

    model = onnx.load(str(model_path))
    graph = model.graph
    initializers = {init.name: init for init in graph.initializer}
    _fold_unfused_weights(graph, initializers)
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
    remove_unread_initializers(graph)
    return model.SerializeToString()


def strip_quantization(model_path: Path) -> bytes:
    """An FP32 graph of the same shape: weights dequantized, activation Q/DQ pairs removed (and dynamically
    quantized MatMuls made float again, :func:`float_dynamic_matmuls`).

    Used as the FP32 speed baseline when the FP32 export (not committed) is not
    at hand: it performs exactly the FP32 model's float operations.
    """
    import onnx
    from onnx import numpy_helper

    model = onnx.load(str(model_path))
    graph = model.graph
    float_dynamic_matmuls(graph)
    initializers = {init.name: init for init in graph.initializer}
    producers = {out: node for node in graph.node for out in node.output}
    replacements: list[tuple[Any, Any]] = []
    for node in graph.node:
        if node.op_type != "DequantizeLinear":
            continue
        if node.input[0] in initializers:
            graph.initializer.append(numpy_helper.from_array(dequantized(node, initializers), node.output[0]))
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
    remove_unread_nodes(graph, "QuantizeLinear")
    remove_unread_initializers(graph)
    return model.SerializeToString()


if __name__ == "__main__":
    # The child of engines.rewrite_cache.cached_unsigned_model: lowest priority, so live batches keep the cores.
    with contextlib.suppress(OSError):
        os.nice(19)
    rewritten = signed_to_unsigned_activations(Path(sys.argv[1]))
    try:
        Path(sys.argv[2]).write_bytes(rewritten)
    except OSError as error:
        print(f"cannot write {sys.argv[2]}: {error}", file=sys.stderr)
        sys.exit(EXIT_CANNOT_WRITE)
