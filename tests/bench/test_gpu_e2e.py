"""bench/gpu_e2e's own arithmetic, without running it: the per-post latency split, one run's summary, the plot's data.

The bench itself runs end to end only as its CPU smoke test (``python3 bench/gpu_e2e --backend onnxruntime ...``),
too slow for CI; these check the parts a wrong figure would come from.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import redis.asyncio

from bench.gpu_e2e.children import PostTimes
from bench.gpu_e2e.measure import RunResult, summarize
from bench.gpu_e2e.plot import curves
from bench.gpu_e2e.report import acceptance, p99_spread, ratio_table, repeat_table
from bench.gpu_e2e.setups import build_setups
from stream_sentiment.aggregation.buckets import BucketRules, RedisKeys, ScoredPost
from stream_sentiment.metrics import PipelineMetrics
from stream_sentiment.sinks.checkpoint import CheckpointingSink
from stream_sentiment.sinks.redis_sink import RedisSink
from stream_sentiment.source.messages import Post

REPO = Path(__file__).resolve().parents[2]


def _args(**overrides: object) -> argparse.Namespace:
    values = {"max_rows": 256, "max_tokens": 32768, "window_ms": 8.0, "timeout_ms": 2.0, "max_in_flight": 10000,
              "no_merge": False, "buckets": [16, 32, 256], "workers": 8, "baseline_workers": 9, "b1_workers": 1,
              "posts": 1000, "setups": ["ours", "hf-b64", "dynamic-pad", "kafka-only"], "setup_batching": {},
              "server_streams": 1, "formation": "least-cost"}
    return argparse.Namespace(**(values | overrides))


def test_post_times_split_each_post_into_fetch_pipeline_and_apply_wait_parts() -> None:
    """The bench records the worker's own two latency histograms as the checkpointing sink fills them."""
    metrics = PipelineMetrics()
    times = PostTimes(metrics)
    post = Post(id="p", text="hello")
    scored = [ScoredPost(post, t, (0.1, 0.2, 0.7), appended_at=t, fetched_at=101.0, scored_at=101.2)
              for t in (100.0, 100.5)]
    never_connected = redis.asyncio.Redis(port=1)  # the counting step makes no Redis call
    sink = CheckpointingSink(RedisSink(never_connected, "p", "t", 60), BucketRules(60, 0), RedisKeys("p"), metrics,
                             commit=_no_commit, wall_clock=lambda: 101.25)
    sink._count_applied(list(scored))  # what the sink does once the fence applied a range
    parts = times.arrays()
    assert np.allclose(parts["latencies"], [1.25, 0.75])
    assert np.allclose(parts["internal"], [0.25, 0.25])
    assert np.allclose(parts["kafka"], [1.0, 0.5])
    assert np.allclose(parts["apply_wait"], [0.05, 0.05])  # answer -> counted
    assert metrics.value("stream_sentiment_pipeline_seconds_count") == 2  # the real histogram still counts


async def _no_commit(marks: dict[int, int]) -> None:
    return None


def test_summary_reports_per_post_figures_and_process_counts() -> None:
    setups = build_setups(_args(), [32, 64, 128, 256])
    assert (setups["ours"].processes, setups["hf-b64"].processes, setups["kafka-only"].processes) == (9, 9, 8)
    assert setups["dynamic-pad"].batching["buckets"][:3] == [8, 16, 24]
    # (e) and ours differ in how batches form, not in anything else: same window, timeout, rows and tokens.
    assert (setups["dynamic-pad"].batching["formation"], setups["ours"].batching["formation"]) == (
        "arrival", "least-cost")
    assert all(setups["dynamic-pad"].batching[k] == setups["ours"].batching[k]
               for k in ("window_ms", "timeout_ms", "max_rows", "max_tokens"))
    counted = 4000
    rng = np.random.default_rng(0)
    results = [{"latencies": rng.random(counted // 2).astype(np.float32),
                "internal": np.full(counted // 2, 0.01, dtype=np.float32),
                "stages": {"decode": 0.02, "tokenize": 0.06}, "cpu_seconds": 0.2, "rebalances": 0}
               for _ in range(2)]
    produced = {"sent": counted, "rate": 1000.0, "behind_s": 0.0, "cpu_seconds": 0.1}
    run = summarize("tweets", setups["ours"], "rate", 1000.0, produced, counted, True, [(0.0, 0), (4.0, counted)],
                    results, {"broker": 0.4}, None, 1.0, 5.0)
    assert run.processes == 9
    assert run.stage_us_per_post == {"decode": 2 * 0.02 * 1e6 / counted, "tokenize": 2 * 0.06 * 1e6 / counted}
    assert run.cpu_us_per_post["workers"] == 2 * 0.2 * 1e6 / counted
    assert run.internal_p99_ms == 10.0
    latencies = np.concatenate([r["latencies"] for r in results]) * 1000
    assert run.p99_ms == round(float(np.percentile(latencies, 99)), 1)


def test_plot_reads_a_committed_run() -> None:
    report = json.loads((REPO / "docs" / "gpu-e2e-h200-gc-full.json").read_text())
    found = curves(report, "tweets")
    runs = [r for r in report["workloads"]["tweets"]["runs"] if r["setup"] == "ours"]
    ours = found["ours"]
    assert ours.backlog_posts_per_s == next(r["posts_per_s"] for r in runs if r["mode"] == "backlog")
    assert ours.offered == sorted(r["offered"] for r in runs if r["mode"] != "backlog" and not r["saturated"])
    baseline = [r for r in report["workloads"]["tweets"]["runs"] if r["setup"] == "hf-b64" and r["mode"] != "backlog"]
    assert found["hf-b64"].behind == [r["offered"] for r in baseline if r["saturated"]]
    assert found["hf-b64"].behind  # this run's (b) fell behind at the offered rates: they must not be drawn


def test_engine_only_counts_a_packed_engines_budgets_not_its_padding(engine_version) -> None:
    from bench.gpu_e2e.children import computed_tokens
    from bench.gpu_e2e.cli import parse_args
    from stream_sentiment.batching.tokenizer import pad_to_bucket
    from stream_sentiment.engines.torch_backend import TorchCudaEngine

    batch = pad_to_bucket([[101, 7, 102]] * 300, 32)  # 900 real tokens in 9600 cells
    padded = TorchCudaEngine(engine_version, max_rows=256)  # never activated: no torch needed
    packed = TorchCudaEngine(engine_version, max_rows=256, forward="packed", max_tokens=8192)
    assert computed_tokens(padded, batch) == (9600.0, 300 * 32.0**2)
    # Rows 0-255 (768 tokens) and 256-299 (132): two calls, budgets 1024 and 512; attention on real posts only.
    assert computed_tokens(packed, batch) == (1536.0, 300 * 9.0)
    args = parse_args(["--torch-forward", "packed", "--engine-only-forwards", "packed"])
    assert (args.torch_forward, args.engine_only_forwards) == ("packed", ["packed"])
    assert parse_args([]).engine_only_forwards == ["padded", "packed"]


def test_zh_workload_is_the_chinese_samples_tokenized_by_the_multilingual_engine(tmp_path: Path) -> None:
    from tokenizers import Tokenizer

    from bench.gpu_e2e.common import MULTILINGUAL_MODEL, bench_version
    from bench.gpu_e2e.workloads import build_workloads
    from stream_sentiment.batching.tokenizer import PostTokenizer
    from stream_sentiment.source.replay import SAMPLE_REGIONS, SAMPLE_TOPICS, chinese_sample_rows

    version = bench_version(None, MULTILINGUAL_MODEL)
    (zh,) = build_workloads(["zh"], {MULTILINGUAL_MODEL: PostTokenizer(version)}, tmp_path, 4).values()
    samples = chinese_sample_rows()
    assert zh.model == MULTILINGUAL_MODEL and sorted(zh.texts) == sorted(row["text"] for row in samples)
    raw = zh.path.read_text(encoding="utf-8")
    assert "航班" in raw  # UTF-8 as a producer sends it, not \u escapes
    topics = {row["text"]: row["topic"] for row in samples}
    for body in json.loads(raw)["bodies"]:
        # What a producer process sends: its id spliced in front of the body's own fields.
        post = json.loads('{"id": "r0p0-1", ' + body[1:])
        assert post["topic"] == topics[post["text"]] in SAMPLE_TOPICS and post["region"] in SAMPLE_REGIONS
    # Its own SentencePiece tokenizer: the Chinese posts are words to it, [UNK]s to the English engine's.
    multilingual, english = PostTokenizer(version), PostTokenizer(bench_version(None))

    def unknown_share(tokenizer: PostTokenizer, unknown: str) -> float:
        unk = Tokenizer.from_file(str(tokenizer.version.tokenizer_path)).token_to_id(unknown)
        ids = [i for row in tokenizer.encode(zh.texts) for i in row]
        return sum(i == unk for i in ids) / len(ids)

    assert unknown_share(multilingual, "<unk>") < 0.01 < 0.2 < unknown_share(english, "[UNK]")
    assert zh.lengths.tolist() == [len(ids) for ids in multilingual.encode(zh.texts)]


def test_workload_setups_narrow_zh_and_keep_the_baselines_on_minilm() -> None:
    import pytest

    from bench.gpu_e2e.cli import parse_args
    from bench.gpu_e2e.setups import workload_plan

    args = parse_args(["--workloads", "tweets,zh", "--setups", "ours,hf-b64,kafka-only,engine-only"])
    assert workload_plan(args.workloads, args.setups, args.workload_setups) == {
        "tweets": ["ours", "hf-b64", "kafka-only", "engine-only"], "zh": ["ours", "engine-only"]}
    args = parse_args(["--workloads", "zh", "--setups", "ours,kafka-only", "--workload-setups", "zh=ours,kafka-only"])
    assert workload_plan(args.workloads, args.setups, args.workload_setups) == {"zh": ["ours", "kafka-only"]}
    assert parse_args([]).workloads == ["tweets", "long"]  # a call without the multilingual engine still runs
    with pytest.raises(SystemExit):  # the transformers baselines load minilm-sentiment only
        parse_args(["--workloads", "zh", "--setups", "ours,hf-b64", "--workload-setups", "zh=ours,hf-b64"])


def test_engine_only_flops_follow_the_served_encoder() -> None:
    from bench.gpu_e2e.common import MODEL, MULTILINGUAL_MODEL, EncoderShape, encoder_flops, encoder_shape
    from stream_sentiment.engines.manifest import load_engine_version

    minilm, multilingual = (encoder_shape(load_engine_version(REPO / "engines" / model / "v1", verify=False))
                            for model in (MODEL, MULTILINGUAL_MODEL))
    assert minilm == EncoderShape() == EncoderShape(layers=6, hidden=384, ffn=1536)  # the probe's constants
    assert multilingual == EncoderShape(layers=12, hidden=384, ffn=1536)
    assert encoder_flops(2600.0, 70000.0, multilingual) == 2 * encoder_flops(2600.0, 70000.0)


def _run(setup: str, offered: float, p99: float, repeat: int = 0, saturated: bool = False) -> RunResult:
    return RunResult("long", setup, "rate", offered, 9, 100, 100, offered, p50_ms=p99 / 2, p99_ms=p99,
                     saturated=saturated, repeat=repeat)


def test_repeated_cells_are_judged_by_their_median_p99_and_first_runs_keep_the_ratio_table() -> None:
    """--repeats: one noisy first run does not decide a cell; the median of its runs does."""
    runs = [RunResult("long", "ours", "backlog", None, 9, 100, 100, 60000.0),
            RunResult("long", "dynamic-pad", "backlog", None, 9, 100, 100, 40000.0),
            _run("dynamic-pad", 8000.0, 14.0), _run("ours", 8000.0, 19.0),  # the first runs: ours loses
            _run("ours", 8000.0, 13.0, 1), _run("dynamic-pad", 8000.0, 15.0, 1),
            _run("dynamic-pad", 8000.0, 16.0, 2), _run("ours", 8000.0, 12.0, 2),
            _run("dynamic-pad", 32000.0, 30.0), _run("ours", 32000.0, 40.0, saturated=True),
            _run("ours", 32000.0, 35.0, 1), _run("dynamic-pad", 32000.0, 31.0, 1)]
    spread = p99_spread(runs)
    assert spread[("ours", 8000.0)] == (13.0, 12.0, 19.0, 3)
    assert spread[("dynamic-pad", 8000.0)] == (15.0, 14.0, 16.0, 3)
    assert spread[("ours", 32000.0)][0] == float("inf")  # of a saturated run and a 35 ms one, the median is inf
    table = repeat_table(runs, {"ours": "ours", "dynamic-pad": "(e)"})
    assert table is not None and "| 8,000 | 13.0 (12.0-19.0), 3 runs | 15.0 (14.0-16.0), 3 runs | yes |" in table
    verdict = next(v for v in acceptance(runs, {}) if v["target"].startswith("lower median P99"))
    assert (verdict["met"], verdict["measured"]) == (False, "1 of 2 cells; not at 32,000/s")
    # The ratio table compares the first runs only, as before repeats existed.
    assert "| 8,000 | 19.0 / 14.0 | no |" in ratio_table(runs, {})
    assert repeat_table(runs[:4], {}) is None
    # The pipeline's own part gets its own table, from the runs' fetch -> counted P99.
    for run in runs:
        run.internal_p99_ms = None if run.p99_ms is None else run.p99_ms / 2
    assert p99_spread(runs, "internal_p99_ms")[("ours", 8000.0)] == (6.5, 6.0, 9.5, 3)
    internal = repeat_table(runs, {"ours": "ours", "dynamic-pad": "(e)"}, "internal_p99_ms")
    assert internal is not None and "pipeline-internal" in internal and "| 8,000 | 6.5 (6.0-9.5), 3 runs |" in internal


def test_plot_draws_a_repeated_cell_at_its_medians() -> None:
    report = {"setups": {}, "workloads": {"long": {"runs": [
        {"setup": "ours", "mode": "rate", "offered": 8000.0, "saturated": False, "skipped": "", "p50_ms": p50,
         "p99_ms": p99, "posts_per_s": 8000.0} for p50, p99 in ((9.0, 19.0), (8.0, 13.0), (7.0, 12.0))]}}}
    ours = curves(report, "long")["ours"]
    assert (ours.offered, ours.p50_ms, ours.p99_ms) == ([8000.0], [8.0], [13.0])
