"""Activation smoothing before INT8 (SmoothQuant): move a MatMul input's outlier channels into its weights.

Per-tensor int8 activations spend their 255 levels on the largest value of the tensor. In MiniLM the
input of each FFN up-projection (the attention block's LayerNorm output) has one channel reaching ~30
where the median channel's largest value is ~2 (v2, the calibration tweets): a step of 0.24, about 8
levels for most channels. Smoothing divides that input by a per-channel ``s`` and multiplies the
weight's matching rows by ``s`` -- ``(x / s) (diag(s) W) = x W``, the same FP32 function -- with
``s_j = max|x_j|^alpha / max|W_j|^(1 - alpha)`` (Xiao et al., SmoothQuant, 2022), so activations and
weights share the range.

The division cannot be folded into the LayerNorm as SmoothQuant does in pre-norm models: in BERT's
post-norm layers that output also feeds the residual. So it is an explicit ``Mul`` by ``1 / s`` on the
branch into the MatMul, before its QuantizeLinear, named ``<input>_smooth_inv`` (an initializer) so
``engine_build.onnx_weights`` can fold it back into the weights for the torch backends.

Which MatMuls: those that *widen* (constant weight ``[in, out]`` with ``out > in``), i.e. the FFN
up-projections of a BERT-family encoder; attention's projections keep their width and the
down-projections narrow. Channel maxima come from the calibration batches ORT's calibrator sees.
:func:`smoothed_version` does it once per build: every INT8 candidate (each calibration method, each step of the
sensitivity sweep) is then quantized from that one smoothed FP32 version.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from stream_sentiment.batching.tokenizer import PostTokenizer
from stream_sentiment.engine_build.onnx_weights import SMOOTH_SUFFIX
from stream_sentiment.engines.base import TokenBatch
from stream_sentiment.engines.manifest import EngineManifest, EngineVersion, load_engine_version, write_manifest
from stream_sentiment.modeling.quantize import uniform_calibration_batches


def widening_matmuls(model: Any) -> dict[str, list[Any]]:
    """Activation input -> the MatMuls reading it whose constant weight widens (``[in, out]``, ``out > in``)."""
    initializers = {tensor.name: tensor for tensor in model.graph.initializer}
    found: dict[str, list[Any]] = {}
    for node in model.graph.node:
        if node.op_type != "MatMul" or node.input[1] not in initializers or node.input[0] in initializers:
            continue
        shape = tuple(initializers[node.input[1]].dims)
        if len(shape) == 2 and shape[1] > shape[0]:
            found.setdefault(node.input[0], []).append(node)
    return found


def channel_maxima(model: Any, names: Sequence[str], batches: Sequence[TokenBatch]) -> dict[str, np.ndarray]:
    """Largest ``|value|`` per last-axis channel of each tensor in ``names`` over ``batches`` (ONNX Runtime, CPU)."""
    import onnx
    import onnxruntime as ort

    probe = onnx.ModelProto()
    probe.CopyFrom(model)
    for name in names:
        probe.graph.output.append(onnx.helper.make_tensor_value_info(name, onnx.TensorProto.FLOAT, None))
    session = ort.InferenceSession(probe.SerializeToString(), providers=["CPUExecutionProvider"])
    maxima: dict[str, np.ndarray] = {}
    for batch in batches:
        outputs = session.run(list(names), {"input_ids": batch.input_ids, "attention_mask": batch.attention_mask})
        for name, values in zip(names, outputs, strict=True):
            largest = np.abs(values).reshape(-1, values.shape[-1]).max(axis=0)
            maxima[name] = largest if name not in maxima else np.maximum(maxima[name], largest)
    return maxima


def smooth_widening_inputs(model_path: Path, destination: Path, batches: Sequence[TokenBatch],
                           alpha: float) -> dict[str, object]:
    """Write ``model_path`` with every widening MatMul's input smoothed to ``destination``; what was done.

    Raises ValueError for an ``alpha`` outside (0, 1) or a graph with nothing to smooth.
    """
    import onnx
    from onnx import numpy_helper

    if not 0.0 < alpha < 1.0:
        raise ValueError(f"smoothing alpha must be in (0, 1), not {alpha}")
    model = onnx.load(str(model_path))
    groups = widening_matmuls(model)
    if not groups:
        raise ValueError(f"{model_path}: no widening MatMul to smooth")
    maxima = channel_maxima(model, sorted(groups), batches)
    initializers = {tensor.name: tensor for tensor in model.graph.initializer}
    nodes = list(model.graph.node)
    inserts: list[tuple[int, Any]] = []
    ratios = []
    for name, matmuls in groups.items():
        weights = [numpy_helper.to_array(initializers[m.input[1]]) for m in matmuls]
        weight_max = np.max([np.abs(w).max(axis=1) for w in weights], axis=0)  # per input channel (row)
        scale = (np.maximum(maxima[name], 1e-5) ** alpha / np.maximum(weight_max, 1e-5) ** (1 - alpha))
        scale = scale.astype(np.float32)
        inverse = numpy_helper.from_array((1.0 / scale).astype(np.float32), name + SMOOTH_SUFFIX)
        model.graph.initializer.append(inverse)
        smoothed = name + "_smoothed"
        inserts.append((min(nodes.index(m) for m in matmuls),
                        onnx.helper.make_node("Mul", [name, inverse.name], [smoothed], name=name + "_Smooth")))
        for matmul, weight in zip(matmuls, weights, strict=True):
            matmul.input[0] = smoothed
            initializers[matmul.input[1]].CopyFrom(
                numpy_helper.from_array((weight * scale[:, None]).astype(np.float32), matmul.input[1]))
        before = maxima[name].max() / np.median(maxima[name])
        after = (maxima[name] / scale).max() / np.median(maxima[name] / scale)
        ratios.append((round(float(before), 1), round(float(after), 1)))
    for position, node in sorted(inserts, key=lambda item: -item[0]):  # from the back: positions stay valid
        model.graph.node.insert(position, node)
    onnx.save(model, str(destination))
    return {"method": "smoothquant", "alpha": alpha, "inputs": sorted(groups),
            "max_over_median_channel": ratios}


def smoothed_version(fp32: EngineVersion, texts: Sequence[str], alpha: float, folder: Path) -> EngineVersion:
    """A copy of the FP32 version ``fp32`` in ``folder`` whose model is smoothed (:func:`smooth_widening_inputs`,
    channel maxima on ``texts`` cut into calibration batches): the same FP32 function, ready to quantize."""
    if folder.exists():
        shutil.rmtree(folder)
    shutil.copytree(fp32.path, folder)
    batches = uniform_calibration_batches(PostTokenizer(fp32).encode(texts))
    smooth_widening_inputs(fp32.model_path, folder / fp32.manifest.model_file, batches, alpha)
    write_manifest(folder, EngineManifest.from_dict(json.loads(fp32.manifest.to_json())))
    return load_engine_version(folder)
