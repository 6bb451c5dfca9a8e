"""Float weights of ``SentimentClassifier`` recovered from an engine version's ONNX graph.

The repository commits only the INT8 Q/DQ ONNX (the FP32 checkpoint is not
kept), so a backend that runs the PyTorch module (``torch-cuda``) gets its
weights from the graph: int8 weights are dequantized (``q * per-channel
scale``, exactly what the graph's DequantizeLinear computes), float ones are
taken as they are. The result is the FP32 model with INT8-rounded weights, i.e.
what ``qdq_rewrite.strip_quantization`` runs. An FP32 export works the same way
(every weight is then a plain initializer).

Naming is structural, not by the exporter's node names (``/layer.0/output/dense_1``
depends on torch's scope deduplication); the anchors are the initializers the
exporter did keep under their state-dict names, the biases:

* ``MatMul(x, W)`` whose output (through a Q/DQ pair, if any) is added to the
  initializer ``P.bias`` is ``P.weight = W.T`` (ONNX MatMul weights are
  ``[in, out]``, ``nn.Linear`` is ``[out, in]``);
* ``Gemm(x, W, P.bias)`` is ``P.weight = W`` if ``transB`` else ``W.T``;
* a ``Gather`` from a constant table indexed by the ``input_ids`` graph input is
  ``embeddings.word_embeddings.weight``; the other (indexed by a Range) is
  ``embeddings.position_embeddings.weight``;
* constant folding turned ``token_type_embeddings.weight[0]`` into a ``[hidden]``
  constant added just before the embeddings LayerNorm: it becomes row 0 of
  ``embeddings.token_type_embeddings.weight`` (row 1 is zeros; the module only
  ever reads row 0, all inputs are single-segment);
* LayerNorm weights/biases and every bias are initializers named as in the state dict;
* a dynamically quantized MatMul (``DynamicQuantizeLinear`` -> ``MatMulInteger`` -> rescale, ``calibrate
  --method dynamic``) is read as the float ``MatMul`` it stands for (``qdq_rewrite.float_dynamic_matmuls``);
* a MatMul input smoothed before quantization (``Mul(x, <x>_smooth_inv)``, ``modeling.smoothing``) has
  the ``s`` that divides it multiplied into its weight's rows: folded back, ``W = diag(1 / s) W'``.

The encoder shape comes from the tables' and weights' shapes, the
LayerNormalization ``epsilon`` and, for the head count (which no weight shape
carries), the ``[0, 0, heads, head_size]`` Reshape of the query projection. v1's
manifest ``build`` section records no encoder shape; if a version's manifest
has ``build.encoder_config``, it is cross-checked against the graph.

No torch here: the CPU-only CI checks the mapping with a numpy forward pass.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from stream_sentiment.engine_build.qdq_rewrite import dequantized, float_dynamic_matmuls
from stream_sentiment.engines.manifest import EngineVersion

# A smoothed MatMul input (``modeling.smoothing``) is ``Mul(x, <x>_smooth_inv)``; its weight rows carry ``s``.
SMOOTH_SUFFIX = "_smooth_inv"
# Not in the graph: only row 0 of the token-type table survives constant folding.
TYPE_VOCAB_SIZE = 2
_FLOAT_TYPES = (1, 10, 11, 16)  # onnx.TensorProto FLOAT, FLOAT16, DOUBLE, BFLOAT16


@dataclass(frozen=True)
class ExtractedWeights:
    """What building a ``SentimentClassifier`` needs.

    Attributes:
        config: keyword arguments of ``modeling.minilm.EncoderConfig`` (shape fields only).
        num_labels: output classes (rows of the classifier weight).
        state_dict: float32 arrays, names and shapes exactly as ``SentimentClassifier.state_dict()``.
    """

    config: dict[str, int | float]
    num_labels: int
    state_dict: dict[str, np.ndarray]


def expected_shapes(config: Mapping[str, int | float], num_labels: int) -> dict[str, tuple[int, ...]]:
    """``SentimentClassifier``'s state dict as data (names and shapes), mirroring ``modeling/minilm.py``.

    Kept as data so the torch-free tests can check the extraction; the GPU test
    checks this against the real module.
    """
    hidden, inter = int(config["hidden_size"]), int(config["intermediate_size"])
    shapes: dict[str, tuple[int, ...]] = {
        "embeddings.word_embeddings.weight": (int(config["vocab_size"]), hidden),
        "embeddings.position_embeddings.weight": (int(config["max_position_embeddings"]), hidden),
        "embeddings.token_type_embeddings.weight": (int(config.get("type_vocab_size", TYPE_VOCAB_SIZE)), hidden),
        "embeddings.LayerNorm.weight": (hidden,),
        "embeddings.LayerNorm.bias": (hidden,),
    }
    linears = {
        "attention.self.query": (hidden, hidden),
        "attention.self.key": (hidden, hidden),
        "attention.self.value": (hidden, hidden),
        "attention.output.dense": (hidden, hidden),
        "intermediate.dense": (inter, hidden),
        "output.dense": (hidden, inter),
    }
    for layer in range(int(config["num_hidden_layers"])):
        prefix = f"encoder.layer.{layer}."
        for name, (out_size, in_size) in linears.items():
            shapes[f"{prefix}{name}.weight"] = (out_size, in_size)
            shapes[f"{prefix}{name}.bias"] = (out_size,)
        for norm in ("attention.output.LayerNorm", "output.LayerNorm"):
            shapes[f"{prefix}{norm}.weight"] = (hidden,)
            shapes[f"{prefix}{norm}.bias"] = (hidden,)
    shapes["classifier.weight"] = (num_labels, hidden)
    shapes["classifier.bias"] = (num_labels,)
    return shapes


class _Graph:
    """Index of an ONNX graph: who produces and consumes each tensor, and which tensors are constants."""

    def __init__(self, model: Any) -> None:
        from onnx import numpy_helper

        self.graph = model.graph
        self.initializers = {init.name: init for init in self.graph.initializer}
        self.producer = {out: node for node in self.graph.node for out in node.output}
        self.consumers: dict[str, list[Any]] = {}
        for node in self.graph.node:
            for name in node.input:
                self.consumers.setdefault(name, []).append(node)
        self._to_array = numpy_helper.to_array

    def constant(self, name: str) -> np.ndarray | None:
        """The value of a float initializer or of DequantizeLinear(initializer); None for activations."""
        if name in self.initializers:
            return self._to_array(self.initializers[name])
        node = self.producer.get(name)
        if node is not None and node.op_type == "DequantizeLinear" and node.input[0] in self.initializers:
            return dequantized(node, self.initializers)
        return None

    def through_qdq(self, name: str) -> list[Any]:
        """Consumers of ``name``, looking through activation QuantizeLinear -> DequantizeLinear pairs."""
        found = []
        for node in self.consumers.get(name, []):
            if node.op_type == "QuantizeLinear":
                for dequantize in self.consumers.get(node.output[0], []):
                    found.extend(self.through_qdq(dequantize.output[0]))
            else:
                found.append(node)
        return found


def _attribute(node: Any, name: str, default: Any = None) -> Any:
    from onnx import helper

    return next((helper.get_attribute_value(a) for a in node.attribute if a.name == name), default)


def _bias_prefix(graph: _Graph, node: Any) -> str | None:
    """``P`` if the node's output is added to an initializer named ``P.bias``."""
    for add in graph.through_qdq(node.output[0]):
        if add.op_type != "Add":
            continue
        for name in add.input:
            if name.endswith(".bias") and name in graph.initializers:
                return name[: -len(".bias")]
    return None


def _smoothing(graph: _Graph, name: str) -> np.ndarray | None:
    """``1 / s`` if activation ``name`` (looking back through a Q/DQ pair) is a smoothed input, else None."""
    node = graph.producer.get(name)
    if node is not None and node.op_type == "DequantizeLinear":
        quantize = graph.producer.get(node.input[0])
        if quantize is None or quantize.op_type != "QuantizeLinear":
            return None
        node = graph.producer.get(quantize.input[0])
    if node is None or node.op_type != "Mul":
        return None
    inverse = next((operand for operand in node.input if operand.endswith(SMOOTH_SUFFIX)), None)
    return graph.constant(inverse) if inverse is not None else None


def _linear_weights(graph: _Graph, state: dict[str, np.ndarray]) -> None:
    for node in graph.graph.node:
        if node.op_type == "MatMul":
            weight = graph.constant(node.input[1])
            prefix = _bias_prefix(graph, node) if weight is not None else None
            if weight is not None and prefix is not None:
                inverse = _smoothing(graph, node.input[0])
                if inverse is not None:  # (x / s) (diag(s) W): the module's weight is W
                    weight = weight * inverse[:, None]
                state[f"{prefix}.weight"] = weight.T
        elif node.op_type == "Gemm" and len(node.input) > 2:
            weight, bias = graph.constant(node.input[1]), graph.constant(node.input[2])
            if weight is None or bias is None:
                continue
            # The bias is a DQ output named like the parameter, or a plain initializer.
            prefix = node.input[2].removesuffix(".bias")
            state[f"{prefix}.weight"] = weight if _attribute(node, "transB", 0) else weight.T
            state[f"{prefix}.bias"] = bias


def _embeddings(graph: _Graph, state: dict[str, np.ndarray], ids_input: str) -> None:
    for node in graph.graph.node:
        if node.op_type != "Gather":
            continue
        table = graph.constant(node.input[0])
        if table is None or table.ndim != 2:
            continue
        which = "word" if node.input[1] == ids_input else "position"
        state[f"embeddings.{which}_embeddings.weight"] = table
    if "embeddings.token_type_embeddings.weight" in state:
        return  # not folded (an export without constant folding): taken with the named initializers
    norm = next(n for n in graph.graph.node if n.op_type == "LayerNormalization" and n.input[1].startswith("embed"))
    summed = graph.producer[norm.input[0]]
    row = next((c for c in map(graph.constant, summed.input) if c is not None and c.ndim == 1), None)
    if summed.op_type != "Add" or row is None:
        raise ValueError("cannot find the folded token-type row added before the embeddings LayerNorm")
    table = np.zeros((TYPE_VOCAB_SIZE, row.shape[0]), dtype=np.float32)
    table[0] = row
    state["embeddings.token_type_embeddings.weight"] = table


def _heads(graph: _Graph, hidden: int) -> int:
    """Head count from the query projection's ``[0, 0, heads, head_size]`` Reshape."""
    (add,) = graph.consumers["encoder.layer.0.attention.self.query.bias"]
    for node in graph.through_qdq(add.output[0]):
        if node.op_type == "Reshape":
            shape = graph.constant(node.input[1])
            if shape is not None and shape.shape == (4,) and int(shape[2] * shape[3]) == hidden:
                return int(shape[2])
    raise ValueError("cannot find the attention head split of layer 0's query projection")


def _config(graph: _Graph, state: dict[str, np.ndarray]) -> dict[str, int | float]:
    vocab, hidden = state["embeddings.word_embeddings.weight"].shape
    layers = {int(m.group(1)) for name in state if (m := re.match(r"encoder\.layer\.(\d+)\.", name))}
    epsilons = {float(_attribute(n, "epsilon", 1e-5)) for n in graph.graph.node if n.op_type == "LayerNormalization"}
    if len(epsilons) != 1:
        raise ValueError(f"expected one LayerNorm epsilon, found {sorted(epsilons)}")
    return {
        "vocab_size": int(vocab),
        "hidden_size": int(hidden),
        "num_hidden_layers": len(layers),
        "num_attention_heads": _heads(graph, int(hidden)),
        "intermediate_size": int(state["encoder.layer.0.intermediate.dense.weight"].shape[0]),
        "max_position_embeddings": int(state["embeddings.position_embeddings.weight"].shape[0]),
        "type_vocab_size": TYPE_VOCAB_SIZE,
        # The attribute is a float32: 1e-12 reads back as 9.99999996e-13.
        "layer_norm_eps": float(f"{epsilons.pop():.6g}"),
    }


def extract_weights(model_path: Path, *, build: Mapping[str, Any] | None = None) -> ExtractedWeights:
    """The classifier's float state dict and encoder config from an exported ONNX (Q/DQ or dynamic INT8, or FP32).

    Raises:
        ValueError: the graph does not yield exactly the module's parameters with
            their shapes, or disagrees with ``build["encoder_config"]``.
    """
    import onnx

    model = onnx.load(str(model_path))
    try:
        float_dynamic_matmuls(model.graph)
    except (KeyError, StopIteration, ValueError) as error:
        raise ValueError(f"{model_path.name} is not a SentimentClassifier export: {error!r}") from error
    graph = _Graph(model)
    state: dict[str, np.ndarray] = {}
    for name, init in graph.initializers.items():
        # Parameters the exporter kept under their own names (biases, LayerNorms; everything in an FP32 export
        # but the MatMul weights); int8 ones are "<name>_quantized" and come through the DQ consumers below.
        if re.fullmatch(r"[A-Za-z_][\w.]*\.(weight|bias)", name) and init.data_type in _FLOAT_TYPES:
            state[name] = graph.constant(name)  # type: ignore[assignment]
    try:
        _linear_weights(graph, state)
        _embeddings(graph, state, graph.graph.input[0].name)
        # Own, writable, C-ordered copies: torch.from_numpy warns on the read-only buffers onnx hands out.
        state = {k: np.array(v, dtype=np.float32, order="C") for k, v in state.items()}
        config = _config(graph, state)
    except (KeyError, StopIteration, ValueError) as error:
        raise ValueError(f"{model_path.name} is not a SentimentClassifier export: {error!r}") from error
    num_labels = int(state["classifier.weight"].shape[0]) if "classifier.weight" in state else 0
    expected = expected_shapes(config, num_labels)
    missing, unexpected = sorted(set(expected) - set(state)), sorted(set(state) - set(expected))
    wrong = sorted(k for k in expected.keys() & state.keys() if tuple(state[k].shape) != expected[k])
    if missing or unexpected or wrong:
        raise ValueError(f"{model_path.name}: missing {missing}, unexpected {unexpected}, wrong shape {wrong}")
    recorded = (build or {}).get("encoder_config") or {}
    clashes = {k: (v, config[k]) for k, v in recorded.items() if k in config and v != config[k]}
    if clashes:
        raise ValueError(f"{model_path.name}: manifest build.encoder_config disagrees with the graph: {clashes}")
    return ExtractedWeights(config=config, num_labels=num_labels, state_dict=state)


def weights_for_version(version: EngineVersion) -> ExtractedWeights:
    """:func:`extract_weights` of a verified version, checked against its manifest's labels."""
    weights = extract_weights(version.model_path, build=version.manifest.build)
    if weights.num_labels != len(version.manifest.labels):
        raise ValueError(
            f"{version.label}: classifier has {weights.num_labels} outputs, manifest lists {version.manifest.labels}"
        )
    return weights
