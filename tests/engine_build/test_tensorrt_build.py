"""build-engine: a clear refusal without TensorRT, and the profile and progress logic against a fake API."""

from __future__ import annotations

import importlib.util
import io
import json

import pytest

from stream_sentiment.cli import main
from stream_sentiment.engine_build.tensorrt_build import PhaseBars, build_plan
from stream_sentiment.engines.plans import GpuIdentity, PlanInfo
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
        return PlanInfo("p.plan", "gpu", "9.0", "10.99.fake", "v1", [32], 1, 64, 256, 1.0, options["streams"])

    monkeypatch.setattr(tensorrt_build, "import_tensorrt", lambda: FakeTensorRTBuilder())
    monkeypatch.setattr(tensorrt_build, "build_plan", fake_build_plan)
    assert main(["build-engine", "--engine", str(engine_copy), *flags]) == 0
    assert [options["streams"] for options in calls] == [streams]
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
