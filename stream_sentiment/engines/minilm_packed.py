"""The classifier's forward pass over a packed (unpadded) batch, for the GPU engine.

The same computation as ``minilm_torch.SentimentClassifier`` on the real tokens,
rearranged for throughput:

* the batch is one ``[tokens, hidden]`` matrix (``engines.packing``), so every
  matmul runs on real tokens only and there is no attention mask at all:
  varlen flash attention keeps each post to itself through ``cu_seqlens``;
* query, key and value are one fused ``[3 * hidden, hidden]`` projection;
* the linear layers are pluggable (FP16 ``F.linear`` here; the engine probe's FP8
  and INT8 ones live with it, in ``bench/packed_variants.py``), so lower precision
  is measured on the same graph;
* written as plain tensor code so ``torch.compile`` can fuse bias, GELU,
  residual and LayerNorm into few kernels and the activation quantization into
  the LayerNorm that produces its input.

Pooling is a mean over each post's tokens (``index_add_`` by segment); the
padding tokens' segment is a dump slot whose output is dropped.

Requires torch; imported only by the torch-cuda backend and its probe.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable

import torch
import torch.nn.functional as F  # noqa: N812
from torch import nn

from stream_sentiment.engines.minilm_torch import SentimentClassifier

# (q, k, v [tokens, heads, head_size], cu_seqlens int32, max_length) -> [tokens, heads, head_size]
Attention = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, int], torch.Tensor]
LINEAR_NAMES = ("qkv", "out", "up", "down")


def flash_varlen(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu: torch.Tensor, max_length: int) -> torch.Tensor:
    """Varlen flash attention through the aten op every torch >= 2.2 CUDA build has."""
    return torch.ops.aten._flash_attention_forward(q, k, v, cu, cu, max_length, max_length, 0.0, False, False)[0]


def reference_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu: torch.Tensor, max_length: int
) -> torch.Tensor:
    """One SDPA call per sequence: slow, any device; the ground truth for tests."""
    out = torch.empty_like(q)
    bounds = cu.tolist()
    for start, end in itertools.pairwise(bounds):
        if end > start:
            # [heads, seq, head_size] per sequence
            per = [t[start:end].transpose(0, 1) for t in (q, k, v)]
            out[start:end] = F.scaled_dot_product_attention(*per).transpose(0, 1)
    return out


ATTENTIONS: dict[str, Attention] = {"flash": flash_varlen, "reference": reference_attention}


class HalfLinear(nn.Module):
    """``x @ W.T + b`` in the model's dtype."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor) -> None:
        super().__init__()
        self.weight = nn.Parameter(weight, requires_grad=False)
        self.bias = nn.Parameter(bias, requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight, self.bias)


LinearFactory = Callable[[str, torch.Tensor, torch.Tensor], nn.Module]


def half_linears(name: str, weight: torch.Tensor, bias: torch.Tensor) -> nn.Module:
    return HalfLinear(weight, bias)


class _PackedLayer(nn.Module):
    def __init__(self, layer: nn.Module, linears: LinearFactory, eps: float) -> None:
        super().__init__()
        attn = layer.attention
        sa = attn.self
        self.heads, self.head_size = sa.heads, sa.head_size
        qkv_w = torch.cat([sa.query.weight, sa.key.weight, sa.value.weight])
        qkv_b = torch.cat([sa.query.bias, sa.key.bias, sa.value.bias])
        self.qkv = linears("qkv", qkv_w, qkv_b)
        self.out = linears("out", attn.output.dense.weight, attn.output.dense.bias)
        self.up = linears("up", layer.intermediate.dense.weight, layer.intermediate.dense.bias)
        self.down = linears("down", layer.output.dense.weight, layer.output.dense.bias)
        self.norm1 = attn.output.LayerNorm
        self.norm2 = layer.output.LayerNorm
        self.eps = eps

    def forward(self, x: torch.Tensor, cu: torch.Tensor, max_length: int, attention: Attention) -> torch.Tensor:
        tokens = x.shape[0]
        qkv = self.qkv(x).view(tokens, 3, self.heads, self.head_size)
        q, k, v = qkv.unbind(1)
        context = attention(q, k, v, cu, max_length).reshape(tokens, self.heads * self.head_size)
        attended = self.norm1(self.out(context) + x)
        return self.norm2(self.down(F.gelu(self.up(attended))) + attended)


class PackedClassifier(nn.Module):
    """``SentimentClassifier`` over packed batches: ``forward(ids, positions, segments, cu_seqlens)``.

    Args:
        model: the loaded classifier (its weights are copied into fused layouts).
        rows_capacity: sequence slots of the layout (``PackLayout.rows_capacity``).
        max_length: the varlen ``max_seqlen``.
        attention: one of :data:`ATTENTIONS` or a callable of that signature.
        linears: how each linear layer is built (FP16 by default).

    Returns ``float32 [rows_capacity, labels]`` logits; slots past the batch's rows are junk.
    """

    def __init__(
        self,
        model: SentimentClassifier,
        *,
        rows_capacity: int,
        max_length: int,
        attention: str | Attention = "flash",
        linears: LinearFactory = half_linears,
    ) -> None:
        super().__init__()
        emb = model.embeddings
        self.word = emb.word_embeddings
        self.position = emb.position_embeddings
        self.register_buffer("type_row", emb.token_type_embeddings.weight[0].detach().clone(), persistent=False)
        self.norm = emb.LayerNorm
        eps = model.config.layer_norm_eps
        with torch.no_grad():
            self.layers = nn.ModuleList(_PackedLayer(layer, linears, eps) for layer in model.encoder.layer)
        self.classifier_weight = nn.Parameter(model.classifier.weight.detach().float(), requires_grad=False)
        self.classifier_bias = nn.Parameter(model.classifier.bias.detach().float(), requires_grad=False)
        self.rows_capacity = rows_capacity
        self.max_length = max_length
        self.attention: Attention = ATTENTIONS[attention] if isinstance(attention, str) else attention

    def forward(
        self, ids: torch.Tensor, positions: torch.Tensor, segments: torch.Tensor, cu_seqlens: torch.Tensor
    ) -> torch.Tensor:
        x = self.norm(self.word(ids) + self.position(positions) + self.type_row)
        for layer in self.layers:
            x = layer(x, cu_seqlens, self.max_length, self.attention)
        slots = self.rows_capacity
        summed = torch.zeros((slots + 1, x.shape[1]), dtype=torch.float32, device=x.device)
        summed.index_add_(0, segments, x.float())
        counts = (cu_seqlens[1 : slots + 1] - cu_seqlens[:slots]).clamp(min=1).float()
        pooled = summed[:slots] / counts[:, None]
        return F.linear(pooled, self.classifier_weight, self.classifier_bias)

