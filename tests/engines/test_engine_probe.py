"""The GPU engine probe's host-side arithmetic (scripts/device_engine_probe.py): FLOPs and agreement."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import numpy as np

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
