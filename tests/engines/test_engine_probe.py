"""The GPU engine probe's host-side arithmetic (scripts/device_engine_probe.py): FLOPs and agreement."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[2]


def _load(name: str, path: Path) -> object:
    spec = importlib.util.spec_from_file_location(name, path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses look their module up while the file runs
    spec.loader.exec_module(module)
    return module


probe = _load("device_engine_probe", REPO / "scripts" / "device_engine_probe.py")


def test_flops_are_the_benchs() -> None:
    from bench.gpu_e2e import common, setups

    lengths = np.array([26, 98, 3])
    sums = (float(lengths.sum()), float((lengths**2).sum()))
    assert probe.encoder_flops(*sums) == common.encoder_flops(*sums)  # type: ignore[attr-defined]
    assert probe.FINE_BUCKETS == setups.DEFAULT_BUCKETS  # type: ignore[attr-defined]


def test_agreement_counts_argmax_and_logit_gaps() -> None:
    a = np.array([[1.0, 0.0, 0.0], [0.0, 2.0, 0.0], [0.0, 0.0, 3.0], [1.0, 1.5, 0.0]])
    b = a.copy()
    b[3] = [2.0, 1.5, 0.0]  # one argmax flips, by a logit gap of 1
    result = probe.agreement(a, b)  # type: ignore[attr-defined]
    assert result["argmax_agreement"] == 0.75 and result["disagreements"] == 1
    assert result["max_abs_logit_diff"] == 1.0


def test_kernels_are_sorted_into_kinds_by_their_names() -> None:
    kinds = {
        "sm90_xmma_gemm_f16f16_f16f32_f32_tn_n_tilesize128x128x64_warpgroupsize1x1x1_execute_kernel__5x_cublas": "gemm",
        "void cutlass::Kernel2<cutlass_80_tensorop_f16_s16816gemm_relu_f16_64x64_32x6_tn_align8>": "gemm",
        "triton_tem_fused_addmm_gelu_3": "gemm",
        "void pytorch_flash::flash_fwd_kernel<Flash_fwd_kernel_traits<32, 128, 128, 4>, true>": "attention",
        "fmha_cutlassF_f16_aligned_64x64_rf_sm80(PyTorchMemEffAttention::AttentionKernel<...>::Params)": "attention",
        "triton_poi_fused__scaled_dot_product_flash_attention_view_2": "elementwise, norms",
        "triton_per_fused_add_native_layer_norm_1": "elementwise, norms",
        "void at::native::vectorized_elementwise_kernel<4, at::native::GeluCUDAKernelImpl>": "elementwise, norms",
        "Memcpy HtoD (Pinned -> Device)": "copy",
        "void at::native::(anonymous namespace)::something_else<float>": "other",
    }
    assert {name: probe.kernel_kind(name) for name in kinds} == kinds  # type: ignore[attr-defined]


def test_the_largest_batch_is_the_one_with_most_real_tokens() -> None:
    from stream_sentiment.batching.tokenizer import pad_to_bucket

    small = pad_to_bucket([[5] * 30] * 4, 32)  # 120 real tokens in 128 slots
    wide = pad_to_bucket([[5] * 10] * 8, 64)  # 80 real tokens in 512 slots
    assert probe.largest_batch([wide, small]) is small  # type: ignore[attr-defined]


def test_the_kernel_breakdown_runs_and_accounts_for_its_calls() -> None:
    torch = pytest.importorskip("torch")  # the GPU host's environment; CI's has no torch
    from stream_sentiment.batching.tokenizer import pad_to_bucket

    batch = pad_to_bucket([[5] * 30] * 4, 32)
    weight = torch.randn(384, 384)

    def call(tokens, stream):  # a stand-in engine: one matmul and a GELU per call
        x = torch.randn(int(tokens.attention_mask.sum()), 384)
        return torch.nn.functional.gelu(x @ weight)

    result = probe.kernel_breakdown(call, batch, repeats=3)  # type: ignore[attr-defined]
    assert (result["rows"], result["bucket"], result["real_tokens"], result["repeats"]) == (4, 32, 120, 3)
    assert result["wall_ms_per_call"] > 0 and result["kernels"]
    assert sum(result["device_ms_per_call"].values()) > 0
    assert {k["kind"] for k in result["kernels"]} <= {"gemm", "attention", "copy", "elementwise, norms", "other"}
