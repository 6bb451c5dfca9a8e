"""``evaluate`` and ``build-engine``: commands on an engine version's files, no running service needed."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from stream_sentiment.cli.common import EXIT_USAGE, Commands, int_list

VADER_SHORTCUT = "vader"


def _evaluate(args: argparse.Namespace) -> int:
    # Training code (modeling/), imported only when a labelled corpus is scored.
    from stream_sentiment.modeling.evaluate import evaluate

    data = args.data
    if str(data) == VADER_SHORTCUT and not data.exists():
        from stream_sentiment.modeling.corpora import write_vader_tweets

        cache = args.corpora_dir
        data = write_vader_tweets(cache, cache / "tweets_GroundTruth.txt")
    report = evaluate(args.engine, data, show_progress=not args.no_progress)
    print(json.dumps(report))
    return 0


def _build_engine(args: argparse.Namespace) -> int:
    from stream_sentiment.batching.batcher import BatchingPolicy
    from stream_sentiment.config import Settings
    from stream_sentiment.engine_build.tensorrt_build import build_plan, import_tensorrt, refuse_dynamic_quantization
    from stream_sentiment.engines.manifest import load_engine_version

    if args.streams < 1:
        print(f"stream-sentiment build-engine: --streams must be at least 1, not {args.streams}", file=sys.stderr)
        return EXIT_USAGE
    version = load_engine_version(args.engine)
    if args.buckets:
        version = version.serving(args.buckets)
    # The profiles' rows follow the batching settings the workers run with (file, environment, flags).
    flags = {"max_rows": args.max_rows, "max_tokens": args.max_tokens}
    batching = Settings.load(args.config, batching={k: v for k, v in flags.items() if v is not None}).batching
    policy = BatchingPolicy(buckets=tuple(version.manifest.buckets), max_rows=batching.max_rows,
                            max_tokens=batching.max_tokens)
    refuse_dynamic_quantization(version)  # the real reason first, with or without TensorRT here
    trt = import_tensorrt()  # fails fast, before any work, when TensorRT is missing
    print(f"building a TensorRT plan for {version.label}: buckets {list(version.manifest.buckets)}, "
          f"{args.streams} profile set(s), rows up to batching.max_rows {policy.max_rows} and "
          f"batching.max_tokens {policy.max_tokens}", file=sys.stderr)
    info = build_plan(version, streams=args.streams, trt=trt, policy=policy, opt_rows=args.opt_rows,
                      show_progress=not args.no_progress)
    print(json.dumps(info.__dict__))
    return 0


def add_commands(commands: Commands) -> None:
    evaluate = commands.add_parser("evaluate", help="score a labelled file and print a JSON report")
    evaluate.add_argument("--engine", type=Path, required=True, help="engine version folder")
    evaluate.add_argument("--data", type=Path, required=True,
                          help="JSONL {text, label} lines, the VADER tweets_GroundTruth.txt file, or "
                               f"'{VADER_SHORTCUT}' to fetch the pinned VADER test tweets from PyPI")
    evaluate.add_argument("--corpora-dir", type=Path, default=Path(".cache/corpora"),
                          help="where fetched corpus archives are cached")
    evaluate.add_argument("--no-progress", action="store_true", help="no progress bars on stderr")
    evaluate.set_defaults(handler=_evaluate)

    build = commands.add_parser("build-engine", help="build a TensorRT plan for this GPU")
    build.add_argument("--engine", type=Path, required=True, help="engine version folder")
    build.add_argument("--buckets", type=int_list, default=None,
                       help="comma-separated length buckets to build profiles for (default: the manifest's); "
                            "use the same as batching.buckets")
    build.add_argument("--config", type=Path, default=None,
                       help="TOML or JSON settings file: its batching.max_rows / max_tokens size the profiles")
    build.add_argument("--max-rows", type=int, default=None,
                       help="batching.max_rows the workers run with (default: the settings'); each bucket's "
                            "profile takes up to min(max_rows, max_tokens // bucket) rows, as the batcher forms")
    build.add_argument("--max-tokens", type=int, default=None,
                       help="batching.max_tokens the workers run with (default: the settings')")
    build.add_argument("--opt-rows", type=int, default=None,
                       help="batch rows the kernels are tuned for (default: a full batch of each bucket)")
    build.add_argument("--streams", type=int, default=1,
                       help="execution contexts the plan serves at once (set it to engine.streams): one set of "
                            "bucket profiles per stream, since TensorRT lets a profile serve one context at a time; "
                            "the plan replaces the previous one for this GPU and TensorRT version")
    build.add_argument("--no-progress", action="store_true", help="no progress bars on stderr")
    build.set_defaults(handler=_build_engine)
