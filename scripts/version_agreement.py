"""How often two committed engine versions give the same label: what a hot swap's shadow check will see.

A hot swap is refused when the new version agrees with the active one on fewer than
``admin.min_shadow_agreement`` (default 90%) of recent posts (``stream_sentiment.admin.validation``). This
scores the demo's post stream (the replayed tweets, ``source.replay.sample_posts``) with both versions
on the CPU engine and prints their argmax agreement, overall and per label of the first version.

Usage: python scripts/version_agreement.py engines/minilm-sentiment/v1 engines/minilm-sentiment/v2 [--posts 4000]
"""

from __future__ import annotations

import argparse
import itertools
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from stream_sentiment.engines.manifest import load_engine_version
from stream_sentiment.labels import LABELS
from stream_sentiment.modeling.quantize import score
from stream_sentiment.source.replay import sample_posts


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("first", type=Path)
    parser.add_argument("second", type=Path)
    parser.add_argument("--posts", type=int, default=4000, help="how many replayed posts to score")
    args = parser.parse_args(argv)
    texts = [post["text"] for post in itertools.islice(sample_posts(seed=0), args.posts)]
    first, second = (score(load_engine_version(folder), texts, desc=str(folder)).argmax(1)
                     for folder in (args.first, args.second))
    same = first == second
    print(json.dumps({
        "first": str(args.first), "second": str(args.second), "posts": len(texts),
        "agreement": round(float(same.mean()), 4),
        "agreement_by_first_label": {label: round(float(same[first == i].mean()), 4)
                                     for i, label in enumerate(LABELS) if (first == i).any()},
    }))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
