"""An FP16-typed copy of a Q/DQ INT8 ONNX model, for TensorRT's strongly typed networks (TensorRT >= 10.12).

In a strongly typed network TensorRT takes every tensor's type from the network itself instead of
from the deprecated INT8/FP16 builder flags: INT8 where the Q/DQ nodes say, and the float parts in
whatever type the ONNX declares. Our committed model declares them float32, so strongly typed it
would run its unquantized layers (LayerNorm, softmax, GELU, the residual adds) in FP32. This pass
writes a copy whose float parts are FP16, with a pure-onnx graph rewrite (no torch, no
onnxconverter-common):

* float32 initializers and ``Constant`` values become float16, clipped to FP16's finite range
  (+-65504) so a "minus infinity" mask constant such as float32's lowest stays finite instead of
  turning ``0 * -inf`` into NaN; ``Cast(to=float)`` becomes ``Cast(to=float16)``;
* the Q/DQ nodes keep their float32 scales, as TensorRT wants and as ``QuantizeLinear`` /
  ``DequantizeLinear`` of opset < 19 require, so ``Cast(float16 -> float32)`` is inserted before
  each ``QuantizeLinear`` of an activation and ``Cast(float32 -> float16)`` after each
  ``DequantizeLinear``; a scale also read by another node gets a float16 copy for it;
* the graph's float inputs and outputs keep their float32 type through a Cast at the boundary, so
  the plan's I/O tensors (what the runtime binds) are the same for both build paths.

What this does not know: whether TensorRT fuses those boundary Casts into its INT8 kernels as it
fuses plain Q/DQ pairs. It is checked here for structure (onnx's checker) and numerically on ONNX
Runtime (CPU), never on TensorRT, which could not be obtained for our GPUs. If a real build shows
unfused casts, the alternative is opset 19, whose ``DequantizeLinear`` may take float16 scales and
emit float16 directly (at the price of scales rounded to FP16).

Usage: ``python -m stream_sentiment.engine_build.fp16_qdq IN.onnx OUT.onnx``; ``build-engine`` calls
:func:`write_fp16_qdq` itself for the strongly typed path.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import numpy as np

FP16_MAX = float(np.finfo(np.float16).max)
QDQ = ("QuantizeLinear", "DequantizeLinear")
# Protobuf's limit on one serialized model; larger ones keep their weights as external data.
PROTOBUF_LIMIT = 2**31 - 1


def _to_fp16(tensor: Any) -> Any:
    from onnx import numpy_helper

    values = np.clip(numpy_helper.to_array(tensor), -FP16_MAX, FP16_MAX).astype(np.float16)
    return numpy_helper.from_array(values, tensor.name)


def convert_fp16_qdq(model: Any) -> Any:
    """The FP16-typed copy of ``model`` (an ``onnx.ModelProto``, left unchanged); see the module docstring."""
    import onnx
    from onnx import TensorProto, helper

    model = onnx.ModelProto.FromString(model.SerializeToString())
    graph = model.graph
    if any(a.type in (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS) for n in graph.node for a in n.attribute):
        raise ValueError("models with subgraphs (If, Loop, Scan) are not supported by the FP16 pass")
    float32 = TensorProto.FLOAT
    scales = {node.input[1] for node in graph.node if node.op_type in QDQ}
    initializers = {tensor.name: tensor for tensor in graph.initializer}
    # Weights quantized by a QuantizeLinear of a float constant stay float32, like the scales.
    keep = scales | {n.input[0] for n in graph.node if n.op_type == "QuantizeLinear" and n.input[0] in initializers}

    copies: dict[str, str] = {}  # a kept float32 initializer -> its float16 copy, for its other readers
    for node in graph.node:
        for index, name in enumerate(node.input):
            is_qdq_own_input = node.op_type in QDQ and (index == 1 or name in keep)
            tensor = initializers.get(name)
            if name in keep and not is_qdq_own_input and tensor is not None and tensor.data_type == float32:
                if name not in copies:
                    copies[name] = f"{name}__fp16"
                    graph.initializer.append(_to_fp16(tensor))
                    graph.initializer[-1].name = copies[name]
                node.input[index] = copies[name]
    for tensor in graph.initializer:
        if tensor.data_type == float32 and tensor.name not in keep:
            tensor.CopyFrom(_to_fp16(tensor))

    to_fp32: dict[str, str] = {}  # float16 activation -> its float32 cast, shared by the Q nodes reading it
    inputs = [i for i in graph.input if i.type.tensor_type.elem_type == float32 and i.name not in initializers]
    # The graph keeps float32 inputs; the network reads float16 copies.
    nodes: list[Any] = [helper.make_node("Cast", [i.name], [f"{i.name}__fp16"], to=TensorProto.FLOAT16)
                        for i in inputs]
    renamed_inputs = {i.name: f"{i.name}__fp16" for i in inputs}
    for node in graph.node:
        for index, name in enumerate(node.input):
            if name in renamed_inputs:
                node.input[index] = renamed_inputs[name]
        _retype(node, keep)
        if node.op_type == "QuantizeLinear" and node.input[0] not in keep:
            source = node.input[0]
            if source not in to_fp32:
                to_fp32[source] = f"{source}__fp32"
                nodes.append(helper.make_node("Cast", [source], [to_fp32[source]], to=float32))
            node.input[0] = to_fp32[source]
        nodes.append(node)
        if node.op_type == "DequantizeLinear":
            output = node.output[0]
            node.output[0] = f"{output}__fp32"
            nodes.append(helper.make_node("Cast", [node.output[0]], [output], to=TensorProto.FLOAT16))
    for graph_output in graph.output:
        if graph_output.type.tensor_type.elem_type != float32:
            continue
        name = graph_output.name
        for node in nodes:  # the producer now writes float16; a Cast restores the declared float32
            node.output[:] = [f"{name}__fp16" if out == name else out for out in node.output]
            node.input[:] = [f"{name}__fp16" if inp == name else inp for inp in node.input]
        nodes.append(helper.make_node("Cast", [f"{name}__fp16"], [name], to=float32))
    del graph.node[:]
    graph.node.extend(nodes)
    del graph.value_info[:]  # their float32 types are stale; TensorRT and onnx infer them again
    return model


def _retype(node: Any, keep: set[str]) -> None:
    """Make a node that creates float32 values create float16 ones (its output is not a kept scale)."""
    from onnx import TensorProto, helper

    if node.op_type == "Cast":
        for attribute in node.attribute:
            if attribute.name == "to" and attribute.i == TensorProto.FLOAT:
                attribute.i = TensorProto.FLOAT16
    elif node.op_type in ("Constant", "ConstantOfShape") and not set(node.output) & keep:
        for attribute in node.attribute:
            if attribute.name == "value" and attribute.t.data_type == TensorProto.FLOAT:
                attribute.t.CopyFrom(_to_fp16(attribute.t))
            elif attribute.name in ("value_float", "value_floats"):
                values = [attribute.f] if attribute.name == "value_float" else list(attribute.floats)
                shape = [] if attribute.name == "value_float" else [len(values)]
                tensor = helper.make_tensor("value", TensorProto.FLOAT, shape, values)
                attribute.CopyFrom(helper.make_attribute("value", _to_fp16(tensor)))


def write_fp16_qdq(source: Path, destination: Path) -> Path:
    """Convert ``source`` (external data read beside it) and write ``destination``; returns it."""
    import onnx

    model = convert_fp16_qdq(onnx.load(str(source)))
    onnx.checker.check_model(model)
    destination.parent.mkdir(parents=True, exist_ok=True)
    large = model.ByteSize() > PROTOBUF_LIMIT
    # A model past protobuf's limit keeps its weights beside it, which TensorRT's parse_from_file reads.
    onnx.save_model(model, str(destination), save_as_external_data=large,
                    location=f"{destination.name}.data" if large else None)
    return destination


def main(argv: list[str] | None = None) -> int:
    source, destination = (argv if argv is not None else sys.argv[1:])[:2]
    write_fp16_qdq(Path(source), Path(destination))
    return 0


if __name__ == "__main__":
    sys.exit(main())
