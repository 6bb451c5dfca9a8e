"""The sentiment classifier in PyTorch: a MiniLM-L6 (BERT) encoder, mean pooling, a linear head.

Written out here rather than taken from ``transformers.BertModel`` so that the
three places that run it (training, ONNX export, the CUDA backend) see the
exact same graph whatever transformers version is installed, and so the export
contains only plain ops (MatMul, Softmax, LayerNormalization, Erf) that
TensorRT fuses and ONNX Runtime quantizes. Parameter names match the Hugging
Face checkpoint, so the base weights load by name.

Mean pooling matches how all-MiniLM-L6-v2 was pre-trained (sentence-transformers
pools token states by mean), which fine-tunes faster than the untrained
``[CLS]`` pooler.

Requires torch (the ``train`` / ``torch-cuda`` extras); nothing on the CPU
serving path imports this module.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F  # noqa: N812
from torch import nn


@dataclass(frozen=True)
class EncoderConfig:
    vocab_size: int = 30522
    hidden_size: int = 384
    num_hidden_layers: int = 6
    num_attention_heads: int = 12
    intermediate_size: int = 1536
    max_position_embeddings: int = 512
    type_vocab_size: int = 2
    layer_norm_eps: float = 1e-12
    hidden_dropout_prob: float = 0.1
    attention_probs_dropout_prob: float = 0.1

    @classmethod
    def from_json(cls, path: Path) -> EncoderConfig:
        raw = json.loads(path.read_text())
        return cls(**{k: raw[k] for k in cls.__dataclass_fields__ if k in raw})

    def to_dict(self) -> dict[str, float | int]:
        return asdict(self)


class _Embeddings(nn.Module):
    def __init__(self, config: EncoderConfig) -> None:
        super().__init__()
        self.word_embeddings = nn.Embedding(config.vocab_size, config.hidden_size)
        self.position_embeddings = nn.Embedding(config.max_position_embeddings, config.hidden_size)
        self.token_type_embeddings = nn.Embedding(config.type_vocab_size, config.hidden_size)
        self.LayerNorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.dropout = nn.Dropout(config.hidden_dropout_prob)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        positions = torch.arange(input_ids.shape[1], device=input_ids.device)
        # Single-segment inputs: every token has type 0.
        summed = (
            self.word_embeddings(input_ids)
            + self.position_embeddings(positions)[None]
            + self.token_type_embeddings.weight[0]
        )
        return self.dropout(self.LayerNorm(summed))


class _SelfAttention(nn.Module):
    def __init__(self, config: EncoderConfig) -> None:
        super().__init__()
        self.heads = config.num_attention_heads
        self.head_size = config.hidden_size // config.num_attention_heads
        self.query = nn.Linear(config.hidden_size, config.hidden_size)
        self.key = nn.Linear(config.hidden_size, config.hidden_size)
        self.value = nn.Linear(config.hidden_size, config.hidden_size)
        self.dropout_p = config.attention_probs_dropout_prob

    def _split(self, x: torch.Tensor) -> torch.Tensor:
        batch, seq, _ = x.shape
        return x.view(batch, seq, self.heads, self.head_size).transpose(1, 2)

    def forward(
        self, hidden: torch.Tensor, additive_mask: torch.Tensor, fused: bool
    ) -> torch.Tensor:
        q, k, v = self._split(self.query(hidden)), self._split(self.key(hidden)), self._split(self.value(hidden))
        dropout = self.dropout_p if self.training else 0.0
        if fused:
            context = F.scaled_dot_product_attention(q, k, v, attn_mask=additive_mask, dropout_p=dropout)
        else:
            scores = torch.matmul(q, k.transpose(-1, -2)) / math.sqrt(self.head_size) + additive_mask
            probs = F.dropout(torch.softmax(scores, dim=-1), dropout, self.training)
            context = torch.matmul(probs, v)
        batch, _, seq, _ = context.shape
        return context.transpose(1, 2).reshape(batch, seq, self.heads * self.head_size)


class _DenseResidualNorm(nn.Module):
    def __init__(self, in_size: int, out_size: int, config: EncoderConfig) -> None:
        super().__init__()
        self.dense = nn.Linear(in_size, out_size)
        self.LayerNorm = nn.LayerNorm(out_size, eps=config.layer_norm_eps)
        self.dropout = nn.Dropout(config.hidden_dropout_prob)

    def forward(self, x: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
        return self.LayerNorm(self.dropout(self.dense(x)) + residual)


class _Attention(nn.Module):
    def __init__(self, config: EncoderConfig) -> None:
        super().__init__()
        self.self = _SelfAttention(config)
        self.output = _DenseResidualNorm(config.hidden_size, config.hidden_size, config)


class _Intermediate(nn.Module):
    def __init__(self, config: EncoderConfig) -> None:
        super().__init__()
        self.dense = nn.Linear(config.hidden_size, config.intermediate_size)


class _Layer(nn.Module):
    def __init__(self, config: EncoderConfig) -> None:
        super().__init__()
        self.attention = _Attention(config)
        self.intermediate = _Intermediate(config)
        self.output = _DenseResidualNorm(config.intermediate_size, config.hidden_size, config)

    def forward(self, hidden: torch.Tensor, additive_mask: torch.Tensor, fused: bool) -> torch.Tensor:
        attended = self.attention.output(self.attention.self(hidden, additive_mask, fused), hidden)
        expanded = F.gelu(self.intermediate.dense(attended))
        return self.output(expanded, attended)


class _Encoder(nn.Module):
    def __init__(self, config: EncoderConfig) -> None:
        super().__init__()
        self.layer = nn.ModuleList(_Layer(config) for _ in range(config.num_hidden_layers))


def additive_mask(mask: torch.Tensor) -> torch.Tensor:
    """The attention scores' additive mask, ``[batch, 1, 1, seq]``, from a float ``[batch, seq]`` mask."""
    # Large negative rather than -inf: fp16 softmax over -inf rows gives NaN.
    return ((1.0 - mask) * -10000.0)[:, None, None, :]


def masked_mean(hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Token states ``[batch, seq, hidden]`` averaged over a float ``[batch, seq]`` mask."""
    summed = (hidden * mask[:, :, None]).sum(dim=1)
    return summed / mask.sum(dim=1, keepdim=True).clamp(min=1.0)


class SentimentClassifier(nn.Module):
    """MiniLM encoder -> masked mean pooling -> dropout -> linear over the labels.

    Args:
        config: encoder shape, as in the base model's ``config.json``.
        num_labels: output classes (negative, neutral, positive).
        fused_attention: use ``scaled_dot_product_attention`` (training and the
            CUDA backend); the ONNX export uses the explicit MatMul/Softmax form
            that TensorRT's MHA fusion and ONNX Runtime's quantizer recognise.
    """

    def __init__(
        self, config: EncoderConfig, num_labels: int = 3, *, fused_attention: bool = True
    ) -> None:
        super().__init__()
        self.config = config
        self.fused_attention = fused_attention
        self.embeddings = _Embeddings(config)
        self.encoder = _Encoder(config)
        self.dropout = nn.Dropout(config.hidden_dropout_prob)
        self.classifier = nn.Linear(config.hidden_size, num_labels)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.dropout(self.pool(input_ids, attention_mask)))

    def pool(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """The encoder's token states, mean-pooled over the mask (the sentence embedding)."""
        mask = attention_mask.to(self.classifier.weight.dtype)
        additive = additive_mask(mask)
        hidden = self.embeddings(input_ids)
        for layer in self.encoder.layer:
            hidden = layer(hidden, additive, self.fused_attention)
        return masked_mean(hidden, mask)


def load_base_weights(model: SentimentClassifier, safetensors_path: Path) -> list[str]:
    """Load the pre-trained encoder; returns the parameter names left at their init."""
    from safetensors.torch import load_file

    state = load_file(str(safetensors_path))
    own = model.state_dict()
    loadable = {k: v.to(own[k].dtype) for k, v in state.items() if k in own}
    missing = sorted(set(own) - set(loadable))
    model.load_state_dict(loadable, strict=False)
    return missing
