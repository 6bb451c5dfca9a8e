"""build-engine: a clear refusal without TensorRT, and the profile and progress logic against a fake API."""

from __future__ import annotations

import importlib.util
import io
import json

import pytest

from stream_sentiment.batching.batcher import BatchingPolicy
from stream_sentiment.cli import main
from stream_sentiment.engine_build.tensorrt_build import PhaseBars, build_plan
from stream_sentiment.engines.plans import GpuIdentity, PlanInfo, profile_rows, shared_logger
from tests.engines.fake_tensorrt import FakeTensorRTBuilder

HAS_TENSORRT = importlib.util.find_spec("tensorrt") is not None


@pytest.mark.skipif(HAS_TENSORRT, reason="TensorRT is installed here")
def test_build_engine_without_tensorrt_says_so_and_fails(engine_copy, capsys):
    code = main(["build-engine", "--engine", str(engine_copy)])
    assert code != 0
    err = capsys.readouterr().err
    assert "TensorRT is not installed" in err
    assert not (engine_copy / "plans").exists()


@pytest.mark.parametrize("streams", [1, 2])
def test_one_profile_per_bucket_and_stream_with_fixed_sequence_length(engine_copy, streams):
    from stream_sentiment.engines.manifest import load_engine_version

    version = load_engine_version(engine_copy)
    fake = FakeTensorRTBuilder()
    gpu = GpuIdentity("NVIDIA H100 80GB HBM3", "9.0")
    info = build_plan(version, streams=streams, trt=fake, gpu=gpu)
    # One set of bucket profiles per stream, set after set: profile set * len(buckets) + i is bucket i.
    # Rows follow the default batching policy (64 rows, 8192 tokens): 32 at bucket 256, never 256.
    assert len(fake.profiles) == 4 * streams
    rows = {32: 64, 64: 64, 128: 64, 256: 32}
    assert [p["input_ids"] for p in fake.profiles] == [
        ((1, b), (rows[b], b), (rows[b], b)) for _ in range(streams) for b in version.manifest.buckets
    ]
    assert all(p["attention_mask"] == p["input_ids"] for p in fake.profiles)
    # The set count is not in the name: the runtime finds whichever build for this GPU is newest.
    plan = engine_copy / "plans" / "nvidia-h100-80gb-hbm3-sm90-trt10.99.fake.plan"
    assert plan.read_bytes() == b"fake-plan-bytes"
    sidecar = json.loads(plan.with_suffix(".json").read_text())
    assert sidecar["compute_capability"] == "9.0" and sidecar["engine_version"] == "v1"
    assert sidecar["profile_sets"] == info.profile_sets == streams
    # The runtime reads each bucket's rows from here (and checks them against the plan's profiles).
    assert sidecar["profile_rows"] == [[1, 64, 64], [1, 64, 64], [1, 64, 64], [1, 32, 32]]
    assert sidecar["batching"] == {"max_rows": 64, "max_tokens": 8192}
    assert PlanInfo(**sidecar).rows_for(256) == (1, 32, 32)
    assert info.buckets == [32, 64, 128, 256]
    # The plan is not part of the version's checksummed files.
    assert load_engine_version(engine_copy).manifest.files == version.manifest.files


def test_parse_failure_is_reported(engine_copy):
    from stream_sentiment.engines.manifest import load_engine_version

    with pytest.raises(RuntimeError, match="fake parser error"):
        build_plan(load_engine_version(engine_copy), trt=FakeTensorRTBuilder(parse_ok=False),
                   gpu=GpuIdentity("x", "9.0"))


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
        build_plan(version, streams=0, trt=FakeTensorRTBuilder(), gpu=gpu)
    with pytest.raises(RuntimeError, match="bucket 64 of set 1"):
        build_plan(version, streams=2, trt=FakeTensorRTBuilder(reject_profile=5), gpu=gpu)
    assert not (engine_copy / "plans").exists()


@pytest.mark.parametrize(("flags", "streams"), [([], 1), (["--streams", "3"], 3)])
def test_build_engine_passes_streams_to_build_plan(engine_copy, monkeypatch, capsys, flags, streams):
    from stream_sentiment.engine_build import tensorrt_build

    calls = []

    def fake_build_plan(version, **options):
        calls.append(options)
        return PlanInfo("p.plan", "gpu", "9.0", "10.99.fake", "v1", [32], 1, 64, 64, 1.0, options["streams"])

    monkeypatch.setattr(tensorrt_build, "import_tensorrt", lambda: FakeTensorRTBuilder())
    monkeypatch.setattr(tensorrt_build, "build_plan", fake_build_plan)
    assert main(["build-engine", "--engine", str(engine_copy), *flags]) == 0
    assert [options["streams"] for options in calls] == [streams]
    policy = calls[0]["policy"]  # the settings' batching limits by default
    assert (policy.max_rows, policy.max_tokens, calls[0]["opt_rows"]) == (64, 8192, None)
    assert json.loads(capsys.readouterr().out)["profile_sets"] == streams


def test_build_engine_refuses_streams_below_one(engine_copy, capsys):
    assert main(["build-engine", "--engine", str(engine_copy), "--streams", "0"]) != 0
    assert "--streams" in capsys.readouterr().err


@pytest.fixture
def fake_builder(monkeypatch) -> FakeTensorRTBuilder:
    """build-engine runs against the fake builder, on a made-up GPU (no cuda-python here)."""
    from stream_sentiment.engine_build import tensorrt_build

    fake = FakeTensorRTBuilder()
    monkeypatch.setattr(tensorrt_build, "import_tensorrt", lambda: fake)
    monkeypatch.setattr(tensorrt_build, "current_gpu", lambda: GpuIdentity("NVIDIA H100 80GB HBM3", "9.0"))
    return fake


def test_build_engine_draws_the_builder_phases_on_stderr(engine_copy, fake_builder, capsys):
    assert main(["build-engine", "--engine", str(engine_copy)]) == 0
    out, err = capsys.readouterr()
    # One bar per phase the builder reports; the top-level one stays and ends full (steps count from 0),
    # the nested one is drawn, then cleared when its phase finishes.
    assert "Fake engine build: 100%" in err and "2/2" in err
    assert "Fake tactic timing" in err
    assert len(fake_builder.progress_monitors) == 1 and fake_builder.monitor_errors == []
    # stdout is untouched: the sidecar JSON alone.
    assert "Fake" not in out
    assert json.loads(out.splitlines()[-1])["plan_file"] == "nvidia-h100-80gb-hbm3-sm90-trt10.99.fake.plan"


def test_build_engine_without_progress_sets_no_monitor(engine_copy, fake_builder, capsys):
    assert main(["build-engine", "--engine", str(engine_copy), "--no-progress"]) == 0
    out, err = capsys.readouterr()
    assert "building a TensorRT plan" in err and "Fake" not in err
    assert fake_builder.progress_monitors == []
    assert json.loads(out.splitlines()[-1])["profile_sets"] == 1


def test_phase_bars_nest_by_parent_and_close_what_a_failed_build_left_open():
    output = io.StringIO()
    bars = PhaseBars(output)
    bars.phase_start("build", None, 2)
    bars.phase_start("timing", "build", 3)
    assert "\x1b[A" in output.getvalue()  # the nested bar is drawn on the line below, then the cursor goes back up
    assert bars.step_complete("timing", 0) is True  # True: the build goes on
    bars.phase_finish("timing")
    bars.phase_start("timing", "build", 1)  # a name is reused once its phase has finished
    bars.step_complete("timing", 0)
    bars.step_complete("build", 0)
    bars.close()  # the build stopped with both phases open
    text = output.getvalue()
    assert "build:  50%" in text and "1/2" in text and "timing" in text
    assert bars.step_complete("build", 1) is True and output.getvalue() == text  # closed bars draw nothing more


def _version(engine_copy):
    from stream_sentiment.engines.manifest import load_engine_version

    return load_engine_version(engine_copy)


def test_profiles_follow_the_batching_policy_and_opt_rows(engine_copy):
    fake = FakeTensorRTBuilder()
    policy = BatchingPolicy(buckets=(32, 64, 128, 256), max_rows=128, max_tokens=8192)
    info = build_plan(_version(engine_copy), trt=fake, gpu=GpuIdentity("x", "9.0"), policy=policy, opt_rows=48)
    # max = min(max_rows, max_tokens // bucket); opt = opt_rows where the bucket takes that many.
    assert [p["input_ids"] for p in fake.profiles] == [
        ((1, 32), (48, 32), (128, 32)), ((1, 64), (48, 64), (128, 64)),
        ((1, 128), (48, 128), (64, 128)), ((1, 256), (32, 256), (32, 256)),
    ]
    assert (info.min_rows, info.opt_rows, info.max_rows) == (1, 48, 128)
    assert profile_rows(policy, 256) == (1, 32, 32)


def test_strongly_typed_network_from_an_fp16_export_from_tensorrt_10_12(engine_copy):
    import onnx

    fake = FakeTensorRTBuilder(version="10.12.0.36")
    info = build_plan(_version(engine_copy), trt=fake, gpu=GpuIdentity("x", "9.0"), show_progress=False)
    assert fake.network_flags == [1 << int(fake.NetworkDefinitionCreationFlag.STRONGLY_TYPED)]
    assert fake.flags == set()  # no deprecated precision flags: the network's types decide
    assert fake.build_errors == [] and info.network_typing == "strongly-typed"
    (parsed,) = fake.parsed_files
    assert parsed == str(engine_copy / "plans" / "model.fp16-qdq.onnx")
    model = onnx.load(parsed)
    types = {t.name: t.data_type for t in model.graph.initializer}
    scales = {n.input[1] for n in model.graph.node if n.op_type in ("QuantizeLinear", "DequantizeLinear")}
    assert {types[s] for s in scales if s in types} == {onnx.TensorProto.FLOAT}  # Q/DQ scales stay float32
    floats = {t for name, t in types.items() if name not in scales} & {onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16}
    assert floats == {onnx.TensorProto.FLOAT16}
    # The plan's I/O keeps its types, so the runtime binds the same tensors on both paths.
    assert [o.type.tensor_type.elem_type for o in model.graph.output] == [onnx.TensorProto.FLOAT]
    # The export lives beside the plans: not a file of the version's manifest.
    assert _version(engine_copy).manifest.files == _version(engine_copy).manifest.files


@pytest.mark.parametrize("version", ["10.0.1", "10.11.0.33"])
def test_weakly_typed_network_with_precision_flags_before_tensorrt_10_12(engine_copy, version):
    fake = FakeTensorRTBuilder(version=version)
    info = build_plan(_version(engine_copy), trt=fake, gpu=GpuIdentity("x", "9.0"), show_progress=False)
    assert fake.network_flags == [0] and fake.flags == {"int8", "fp16"}
    assert info.network_typing == "weakly-typed"
    # parse_from_file on the committed model's path: the parser finds external data beside it.
    assert fake.parsed_files == [str(engine_copy / "model.int8.onnx")]
    assert not (engine_copy / "plans" / "model.fp16-qdq.onnx").exists()


def test_precision_flags_on_a_strongly_typed_network_fail_in_the_fake():
    """The fake enforces what TensorRT does, so a regression to flags on the typed path would fail the build."""
    fake = FakeTensorRTBuilder()
    network = fake.Builder(None).create_network(1 << int(fake.NetworkDefinitionCreationFlag.STRONGLY_TYPED))
    config = fake.Builder(None).create_builder_config()
    config.set_flag(fake.BuilderFlag.FP16)
    assert fake.Builder(None).build_serialized_network(network, config) is None
    assert fake.build_errors == ["precision builder flags set on a strongly typed network"]


def test_builder_and_parser_get_the_shared_logger(engine_copy):
    fake = FakeTensorRTBuilder()
    build_plan(_version(engine_copy), trt=fake, gpu=GpuIdentity("x", "9.0"), show_progress=False)
    build_plan(_version(engine_copy), trt=fake, gpu=GpuIdentity("x", "9.0"), show_progress=False)
    assert len(fake.loggers) == 4 and all(logger is shared_logger(fake) for logger in fake.loggers)


def test_build_engine_sizes_profiles_from_flags_and_settings(engine_copy, fake_builder, monkeypatch, capsys):
    monkeypatch.setenv("STREAM_SENTIMENT_BATCHING__MAX_TOKENS", "4096")
    assert main(["build-engine", "--engine", str(engine_copy), "--max-rows", "32", "--no-progress"]) == 0
    sidecar = json.loads(capsys.readouterr().out.splitlines()[-1])
    assert sidecar["batching"] == {"max_rows": 32, "max_tokens": 4096}
    assert sidecar["profile_rows"] == [[1, 32, 32], [1, 32, 32], [1, 32, 32], [1, 16, 16]]
