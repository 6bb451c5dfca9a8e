"""build-engine: a clear refusal without TensorRT, and the profile logic against a fake API."""

from __future__ import annotations

import importlib.util
import json
import types

import pytest

from stream_sentiment.cli import main
from stream_sentiment.engines.tensorrt_build import GpuIdentity, PlanInfo, build_plan

HAS_TENSORRT = importlib.util.find_spec("tensorrt") is not None


@pytest.mark.skipif(HAS_TENSORRT, reason="TensorRT is installed here")
def test_build_engine_without_tensorrt_says_so_and_fails(engine_copy, capsys):
    code = main(["build-engine", "--engine", str(engine_copy)])
    assert code != 0
    err = capsys.readouterr().err
    assert "TensorRT is not installed" in err
    assert not (engine_copy / "plans").exists()


class FakeTensorRT(types.SimpleNamespace):
    """A fake of the slice of the TensorRT 10 builder API that build_plan uses. Not TensorRT."""

    def __init__(self, parse_ok: bool = True, reject_profile: int | None = None) -> None:
        super().__init__(__version__="10.99.fake")
        self.profiles: list[dict[str, tuple]] = []
        self.flags: set[str] = set()
        fake = self

        class Logger:
            WARNING = "warning"

            def __init__(self, level: str) -> None:
                self.level = level

        class Profile:
            def __init__(self) -> None:
                self.shapes: dict[str, tuple] = {}

            def set_shape(self, name, low, opt, high):
                self.shapes[name] = (low, opt, high)

        class Config:
            def set_memory_pool_limit(self, pool, size):
                fake.workspace = size

            def set_flag(self, flag):
                fake.flags.add(flag)

            def add_optimization_profile(self, profile):
                if len(fake.profiles) == reject_profile:
                    return -1  # TensorRT's answer to an invalid profile
                fake.profiles.append(profile.shapes)
                return len(fake.profiles) - 1

        class Builder:
            def __init__(self, logger):
                pass

            def create_network(self, flags):
                return object()

            def create_builder_config(self):
                return Config()

            def create_optimization_profile(self):
                return Profile()

            def build_serialized_network(self, network, config):
                return b"fake-plan-bytes"

        class OnnxParser:
            num_errors = 0 if parse_ok else 1

            def __init__(self, network, logger):
                pass

            def parse(self, data):
                fake.parsed_bytes = len(data)
                return parse_ok

            def get_error(self, index):
                return "fake parser error"

        self.Logger, self.Builder, self.OnnxParser = Logger, Builder, OnnxParser
        self.MemoryPoolType = types.SimpleNamespace(WORKSPACE="workspace")
        self.BuilderFlag = types.SimpleNamespace(INT8="int8", FP16="fp16")


@pytest.mark.parametrize("streams", [1, 2])
def test_one_profile_per_bucket_and_stream_with_fixed_sequence_length(engine_copy, streams):
    from stream_sentiment.engines.manifest import load_engine_version

    version = load_engine_version(engine_copy)
    fake = FakeTensorRT()
    gpu = GpuIdentity("NVIDIA H100 80GB HBM3", "9.0")
    info = build_plan(version, streams=streams, trt=fake, gpu=gpu, opt_rows=64, max_rows=256)
    # One set of bucket profiles per stream, set after set: profile set * len(buckets) + i is bucket i.
    assert len(fake.profiles) == 4 * streams
    assert [p["input_ids"] for p in fake.profiles] == [
        ((1, b), (64, b), (256, b)) for _ in range(streams) for b in version.manifest.buckets
    ]
    assert all(p["attention_mask"] == p["input_ids"] for p in fake.profiles)
    assert fake.flags == {"int8", "fp16"}
    # The set count is not in the name: the runtime finds whichever build for this GPU is newest.
    plan = engine_copy / "plans" / "nvidia-h100-80gb-hbm3-sm90-trt10.99.fake.plan"
    assert plan.read_bytes() == b"fake-plan-bytes"
    sidecar = json.loads(plan.with_suffix(".json").read_text())
    assert sidecar["compute_capability"] == "9.0" and sidecar["engine_version"] == "v1"
    assert sidecar["profile_sets"] == info.profile_sets == streams
    assert info.buckets == [32, 64, 128, 256]
    # The plan is not part of the version's checksummed files.
    assert load_engine_version(engine_copy).manifest.files == version.manifest.files


def test_parse_failure_is_reported(engine_copy):
    from stream_sentiment.engines.manifest import load_engine_version

    with pytest.raises(RuntimeError, match="fake parser error"):
        build_plan(load_engine_version(engine_copy), trt=FakeTensorRT(parse_ok=False), gpu=GpuIdentity("x", "9.0"))


def test_sidecars_without_profile_sets_mean_one_set():
    old = {
        "plan_file": "x.plan",
        "gpu": "NVIDIA H100",
        "compute_capability": "9.0",
        "tensorrt_version": "10.0",
        "engine_version": "v1",
        "buckets": [32],
        "min_rows": 1,
        "opt_rows": 64,
        "max_rows": 256,
        "build_seconds": 1.0,
    }
    assert PlanInfo(**old).profile_sets == 1


def test_streams_below_one_and_refused_profiles_are_errors(engine_copy):
    from stream_sentiment.engines.manifest import load_engine_version

    version, gpu = load_engine_version(engine_copy), GpuIdentity("x", "9.0")
    with pytest.raises(ValueError, match="at least one profile set"):
        build_plan(version, streams=0, trt=FakeTensorRT(), gpu=gpu)
    with pytest.raises(RuntimeError, match="bucket 64 of set 1"):
        build_plan(version, streams=2, trt=FakeTensorRT(reject_profile=5), gpu=gpu)
    assert not (engine_copy / "plans").exists()


@pytest.mark.parametrize(("flags", "streams"), [([], 1), (["--streams", "3"], 3)])
def test_build_engine_passes_streams_to_build_plan(engine_copy, monkeypatch, capsys, flags, streams):
    from stream_sentiment.engines import tensorrt_build

    calls = []

    def fake_build_plan(version, **options):
        calls.append(options)
        return PlanInfo("p.plan", "gpu", "9.0", "10.99.fake", "v1", [32], 1, 64, 256, 1.0, options["streams"])

    monkeypatch.setattr(tensorrt_build, "import_tensorrt", lambda: FakeTensorRT())
    monkeypatch.setattr(tensorrt_build, "build_plan", fake_build_plan)
    assert main(["build-engine", "--engine", str(engine_copy), *flags]) == 0
    assert [options["streams"] for options in calls] == [streams]
    assert json.loads(capsys.readouterr().out)["profile_sets"] == streams


def test_build_engine_refuses_streams_below_one(engine_copy, capsys):
    assert main(["build-engine", "--engine", str(engine_copy), "--streams", "0"]) != 0
    assert "--streams" in capsys.readouterr().err
