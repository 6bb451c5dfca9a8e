"""The engine probe's packed-forward variants that serving does not use (scripts/device_engine_probe.py).

* ``varlen_api``: ``torch.nn.attention.varlen.varlen_attn`` (torch >= 2.10) as the packed forward's
  attention, against the aten flash op serving uses (``minilm_packed.flash_varlen``);
* ``Fp8Linear`` / ``Int8Linear`` and :func:`quantized_linears`: the packed forward's linear layers in
  FP8 (``torch._scaled_mm``) or INT8 (``torch._int_mm``), with per-token activation scales and
  per-channel weight scales, so lower precision is measured on the same graph as FP16.

Kept out of ``stream_sentiment/engines/minilm_packed.py`` because nothing that serves runs them; they
plug into its ``PackedClassifier`` through its ``attention`` and ``linears`` arguments. Requires torch.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn

from stream_sentiment.engines.minilm_packed import ATTENTIONS, LINEAR_NAMES, Attention, HalfLinear, LinearFactory

try:
    from torch.nn.attention.varlen import varlen_attn
except ImportError:  # torch < 2.10
    varlen_attn = None

FP8_MAX = 448.0  # float8_e4m3fn


def varlen_api(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu: torch.Tensor, max_length: int) -> torch.Tensor:
    """``torch.nn.attention.varlen.varlen_attn`` (torch >= 2.10): a custom op made for torch.compile."""
    if varlen_attn is None:
        raise RuntimeError(f"torch {torch.__version__} has no torch.nn.attention.varlen")
    out = varlen_attn(q, k, v, cu, cu, max_length, max_length)
    return out[0] if isinstance(out, tuple) else out


# Serving's attentions and the probe's own.
PROBE_ATTENTIONS: dict[str, Attention] = {**ATTENTIONS, "varlen": varlen_api}


def _row_scales(x: torch.Tensor, top: float) -> torch.Tensor:
    """Per-row symmetric scales ``amax / top`` in float32, ``[rows, 1]``."""
    return (x.abs().amax(dim=-1, keepdim=True).float() / top).clamp(min=1e-12)


class Fp8Linear(nn.Module):
    """``torch._scaled_mm`` with e4m3 activations (a scale per token) and weights (a scale per output).

    ``emulate``: the same quantization, multiplied in float32 (for CPU tests).
    ``out_dtype``: what ``_scaled_mm`` writes; row-wise scaling needs bfloat16 on some torch versions.
    """

    def __init__(
        self, weight: torch.Tensor, bias: torch.Tensor, *, out_dtype: torch.dtype, emulate: bool = False
    ) -> None:
        super().__init__()
        w = weight.float()
        w_scale = _row_scales(w, FP8_MAX)  # [out, 1]
        quantized = (w / w_scale).clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn)
        # _scaled_mm wants the second operand column-major: the transpose of a row-major [out, in].
        self.register_buffer("weight_t", quantized.t(), persistent=False)
        self.register_buffer("weight_scale", w_scale.t().contiguous(), persistent=False)  # [1, out]
        self.register_buffer("bias", bias.float(), persistent=False)
        self.out_dtype = out_dtype
        self.emulate = emulate

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        scale = _row_scales(x, FP8_MAX)
        xq = (x.float() / scale).clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn)
        if self.emulate:
            y = (xq.float() * scale) @ (self.weight_t.float() * self.weight_scale)
        else:
            y = torch._scaled_mm(xq, self.weight_t, scale_a=scale, scale_b=self.weight_scale, out_dtype=self.out_dtype)
        return (y.float() + self.bias).to(x.dtype)


class Int8Linear(nn.Module):
    """``torch._int_mm`` with int8 activations (a scale per token) and weights (a scale per output).

    For an INT8 version's dequantized weights (per-channel symmetric, max level 127)
    the weight quantization here gives back the original int8 values.
    """

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor) -> None:
        super().__init__()
        w = weight.float()
        w_scale = _row_scales(w, 127.0)
        quantized = (w / w_scale).round().clamp(-127, 127).to(torch.int8)
        self.register_buffer("weight_t", quantized.t(), persistent=False)
        self.register_buffer("weight_scale", w_scale.t().contiguous(), persistent=False)
        self.register_buffer("bias", bias.float(), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        scale = _row_scales(x, 127.0)
        xq = (x.float() / scale).round().clamp(-127, 127).to(torch.int8)
        acc = torch._int_mm(xq, self.weight_t)
        return (acc.float() * scale * self.weight_scale + self.bias).to(x.dtype)


def quantized_linears(kind: str, names: Iterable[str], *, out_dtype: torch.dtype = torch.bfloat16,
                      emulate: bool = False) -> LinearFactory:
    """A factory quantizing the linears named in ``names`` (of :data:`LINEAR_NAMES`) to ``fp8`` or ``int8``."""
    chosen = frozenset(names)
    unknown = chosen - set(LINEAR_NAMES)
    if unknown or kind not in ("fp8", "int8"):
        raise ValueError(f"kind must be fp8/int8 and names of {LINEAR_NAMES}, got {kind!r}, {sorted(unknown)}")

    def make(name: str, weight: torch.Tensor, bias: torch.Tensor) -> nn.Module:
        if name not in chosen:
            return HalfLinear(weight, bias)
        if kind == "fp8":
            return Fp8Linear(weight, bias, out_dtype=out_dtype, emulate=emulate)
        return Int8Linear(weight, bias)

    return make
