"""Quantization-aware fine-tuning: the classifier's forward pass with ORT's INT8 rounding simulated.

``calibrate`` quantizes a trained MiniLM with ONNX Runtime's static QDQ recipe
(:func:`stream_sentiment.modeling.quantize.quantize_model`): per-output-channel symmetric int8 weights,
per-tensor symmetric int8 activations with min-max ranges from the calibration tweets. A model trained in
float alone loses a few tenths of a point to that rounding, spread over the network
(``minilm-sentiment`` v2's static build: 0.903 -> 0.894 VADER polar; the committed v2 is quantized dynamically
since, ``quantize.quantize_model``, which this does not simulate). :class:`QuantAwareClassifier` runs the same
network with the rounding in place -- at every tensor where ORT's quantizer puts a QuantizeLinear
(read from v2's static INT8 graph, as committed then: each quantized MatMul's inputs *and* output, attention's
activation-by-activation MatMuls, the LayerNorm output that feeds both the FFN and the residual, the
classifier's input and logits, the embedding tables) -- so fine-tuning through it (straight-through
gradients) learns weights whose INT8 export answers like their float one.

Activation ranges are measured the way ORT's min-max calibrator does (largest magnitude over the same
calibration batches, in float) by :meth:`QuantAwareClassifier.calibrate`, and re-measured as the weights
move. The FFN down-projections keep float activations with int8 weights (``--down-projections
int8-weights``), as the shipped engines do.

Training only: serving code never imports this module.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence

import torch
import torch.nn.functional as F  # noqa: N812
from torch import nn

from stream_sentiment.engines.minilm_torch import additive_mask, masked_mean
from stream_sentiment.modeling.minilm import SentimentClassifier
from stream_sentiment.modeling.quantize import uniform_calibration_batches

# Symmetric int8 as ORT's quantizer configures it here (ActivationSymmetric / WeightSymmetric, no reduced
# range): levels -127..127, scale = largest magnitude / 127.
LEVEL = 127.0


def _round_through(x: torch.Tensor, scale: torch.Tensor | float) -> torch.Tensor:
    """``x`` rounded to the int8 grid of ``scale``, with the identity's gradient (straight-through)."""
    rounded = torch.clamp(torch.round(x / scale), -LEVEL, LEVEL) * scale
    return x + (rounded - x).detach()


def fake_quant_per_channel(weight: torch.Tensor) -> torch.Tensor:
    """A Linear weight (``[out, in]``) rounded per output channel, as ORT stores a MatMul's weight."""
    scale = weight.detach().abs().amax(dim=1, keepdim=True).clamp(min=1e-12) / LEVEL
    return _round_through(weight, scale)


def fake_quant_per_tensor(weight: torch.Tensor) -> torch.Tensor:
    """A table rounded with one scale, as ORT stores a Gather's data."""
    return _round_through(weight, weight.detach().abs().max().clamp(min=1e-12) / LEVEL)


class QuantAwareClassifier(nn.Module):
    """``inner``'s forward pass with ORT's int8 rounding simulated (see the module docstring).

    Until :meth:`calibrate` has measured the activation ranges, the forward pass is plain float.
    ``inner`` keeps the weights: its ``state_dict`` is the checkpoint to export. ``dropout``: whether training
    mode drops out as ``inner`` was trained to (off by default, see :meth:`train`).
    """

    def __init__(self, inner: SentimentClassifier, *, dropout: bool = False) -> None:
        super().__init__()
        self.inner = inner
        self.ranges: dict[str, float] = {}
        self.dropout = dropout
        self._observing = False

    def train(self, mode: bool = True) -> QuantAwareClassifier:
        """As ``nn.Module.train``, but dropout stays off unless asked for: the activation ranges were measured
        without it, and its 1 / (1 - p) rescaling would push activations past them (clipped, unlike at serving)."""
        super().train(mode)
        if mode and not self.dropout:
            for module in self.inner.modules():
                if isinstance(module, nn.Dropout) or hasattr(module, "dropout_p"):
                    module.eval()
        return self

    def _activation(self, name: str, x: torch.Tensor) -> torch.Tensor:
        if self._observing:
            self.ranges[name] = max(self.ranges.get(name, 0.0), float(x.detach().abs().max()))
            return x
        if not self.ranges:
            return x
        return _round_through(x, max(self.ranges[name], 1e-12) / LEVEL)

    @torch.no_grad()
    def calibrate(self, batches: Iterable[tuple[torch.Tensor, torch.Tensor]]) -> dict[str, float]:
        """Measure every quantized activation's largest magnitude over ``batches``, in float and eval mode
        (ORT calibrates the FP32 export); returns the ranges."""
        was_training = self.training
        self.eval()
        self.ranges, self._observing = {}, True
        try:
            for ids, mask in batches:
                self(ids, mask)
        finally:
            self._observing = False
            self.train(was_training)
        return dict(self.ranges)

    def _weight(self, linear: nn.Linear) -> torch.Tensor:
        return fake_quant_per_channel(linear.weight) if self._rounding else linear.weight

    def _table(self, embedding: nn.Embedding) -> torch.Tensor:
        return fake_quant_per_tensor(embedding.weight) if self._rounding else embedding.weight

    @property
    def _rounding(self) -> bool:
        return not self._observing and bool(self.ranges)

    def _project(self, linear: nn.Linear, name: str, x: torch.Tensor) -> torch.Tensor:
        # ORT rounds a MatMul's output before the bias Add.
        return self._activation(name, F.linear(x, self._weight(linear))) + linear.bias

    def _layer(self, prefix: str, layer: nn.Module, hidden: torch.Tensor, additive: torch.Tensor) -> torch.Tensor:
        act = self._activation
        attention = layer.attention.self
        batch, seq, _ = hidden.shape
        heads, head_size = attention.heads, attention.head_size

        def split(x: torch.Tensor) -> torch.Tensor:
            return x.view(batch, seq, heads, head_size).transpose(1, 2)

        layer_input = act(prefix + "input", hidden)
        query = act(prefix + "query_heads", split(self._project(attention.query, prefix + "query", layer_input)))
        key = split(self._project(attention.key, prefix + "key", layer_input))
        key_t = act(prefix + "key_heads", key.transpose(-1, -2))
        value = act(prefix + "value_heads", split(self._project(attention.value, prefix + "value", layer_input)))
        scores = act(prefix + "scores", torch.matmul(query, key_t)) / math.sqrt(head_size) + additive
        probabilities = F.dropout(torch.softmax(scores, dim=-1), attention.dropout_p, attention.training)
        context = act(prefix + "context", torch.matmul(act(prefix + "probabilities", probabilities), value))
        context = act(prefix + "context_flat", context.transpose(1, 2).reshape(batch, seq, heads * head_size))
        out = layer.attention.output
        # ORT rounds this LayerNorm's output once, for the FFN and for the residual alike.
        attended = act(prefix + "attended", out.LayerNorm(
            out.dropout(self._project(out.dense, prefix + "attention_out", context)) + hidden))
        expanded = F.gelu(self._project(layer.intermediate.dense, prefix + "ffn_up", attended))
        down = layer.output
        # The down-projection: int8 weights, float activations (the shipped --down-projections int8-weights).
        return down.LayerNorm(down.dropout(F.linear(expanded, self._weight(down.dense), down.dense.bias)) + attended)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        model = self.inner
        mask = attention_mask.to(model.classifier.weight.dtype)
        additive = additive_mask(mask)
        embeddings = model.embeddings
        positions = torch.arange(input_ids.shape[1], device=input_ids.device)
        # A Gather's output shares its table's scale in ORT's QDQ graph: rounding the table is enough.
        summed = (F.embedding(input_ids, self._table(embeddings.word_embeddings))
                  + F.embedding(positions, self._table(embeddings.position_embeddings))[None]
                  + embeddings.token_type_embeddings.weight[0])
        hidden = embeddings.dropout(embeddings.LayerNorm(summed))
        for index, layer in enumerate(model.encoder.layer):
            hidden = self._layer(f"layer.{index}.", layer, hidden, additive)
        pooled = self._activation("pooled", model.dropout(masked_mean(hidden, mask)))
        return self._activation("logits", F.linear(pooled, self._weight(model.classifier), model.classifier.bias))


def calibration_tensors(token_ids: Sequence[Sequence[int]]) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """``token_ids`` batched as ``calibrate`` feeds ORT (``quantize.uniform_calibration_batches``), as
    ``(input_ids, attention_mask)`` tensors for :meth:`QuantAwareClassifier.calibrate`."""
    return [(torch.from_numpy(batch.input_ids), torch.from_numpy(batch.attention_mask))
            for batch in uniform_calibration_batches(token_ids)]
