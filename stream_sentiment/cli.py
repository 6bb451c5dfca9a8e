"""``stream-sentiment``: the command line.

Sub-commands import their modules lazily, so ``evaluate`` on the CPU path
never imports torch, and ``--help`` is instant.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

EXIT_USAGE = 2
EXIT_UNAVAILABLE = 3


VADER_SHORTCUT = "vader"


def _evaluate(args: argparse.Namespace) -> int:
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
    from stream_sentiment.engines.manifest import load_engine_version
    from stream_sentiment.engines.tensorrt_build import build_plan, import_tensorrt

    version = load_engine_version(args.engine)
    trt = import_tensorrt()  # fails fast, before any work, when TensorRT is missing
    print(f"building a TensorRT plan for {version.label}: buckets {list(version.manifest.buckets)}",
          file=sys.stderr)
    info = build_plan(version, trt=trt, opt_rows=args.opt_rows, max_rows=args.max_rows)
    print(json.dumps(info.__dict__))
    return 0


def _delegate(module: str, argv: list[str]) -> int:
    import importlib

    return int(importlib.import_module(module).main(argv))


DELEGATED = {
    "train": ("stream_sentiment.modeling.train", "fine-tune the classifier (needs the train extra: torch)"),
    "calibrate": ("stream_sentiment.modeling.build", "export, INT8-calibrate and package an engine version"),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="stream-sentiment", description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)

    evaluate = commands.add_parser("evaluate", help="score a labelled file and print a JSON report")
    evaluate.add_argument("--engine", type=Path, required=True, help="engine version folder")
    evaluate.add_argument("--data", type=Path, required=True,
                          help="JSONL {text, label} lines, the VADER tweets_GroundTruth.txt file, or "
                               f"'{VADER_SHORTCUT}' to fetch the pinned VADER test tweets from PyPI")
    evaluate.add_argument("--corpora-dir", type=Path, default=Path(".cache/corpora"),
                          help="where fetched corpus archives are cached")
    evaluate.add_argument("--no-progress", action="store_true", help="no progress bar")
    evaluate.set_defaults(handler=_evaluate)

    build = commands.add_parser("build-engine", help="build a TensorRT plan for this GPU")
    build.add_argument("--engine", type=Path, required=True, help="engine version folder")
    build.add_argument("--opt-rows", type=int, default=64, help="batch rows the kernels are tuned for")
    build.add_argument("--max-rows", type=int, default=256, help="largest batch a profile accepts")
    build.set_defaults(handler=_build_engine)

    for name, (_, help_text) in DELEGATED.items():
        commands.add_parser(name, help=help_text, add_help=False)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] in DELEGATED:
        return _delegate(DELEGATED[argv[0]][0], argv[1:])
    args = build_parser().parse_args(argv)
    from stream_sentiment.engines.base import BackendUnavailableError
    from stream_sentiment.engines.manifest import EngineRepositoryError
    from stream_sentiment.modeling.evaluate import DataFormatError

    try:
        return int(args.handler(args))
    except BackendUnavailableError as error:
        print(f"stream-sentiment {args.command}: {error}", file=sys.stderr)
        return EXIT_UNAVAILABLE
    except (EngineRepositoryError, DataFormatError, FileNotFoundError) as error:
        print(f"stream-sentiment {args.command}: {error}", file=sys.stderr)
        return EXIT_USAGE


if __name__ == "__main__":
    raise SystemExit(main())
