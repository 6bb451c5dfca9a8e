"""Tokenization of posts for an engine version: normalize, WordPiece, truncate, pad to a bucket.

Uses the Rust ``tokenizers`` library with ``encode_batch``, which releases the
GIL and fans out over cores: the pipeline calls it from an executor so the
event loop never tokenizes.
"""

from __future__ import annotations

import bisect
import itertools
from collections.abc import Sequence

import numpy as np
from tokenizers import Tokenizer

from stream_sentiment.batching.normalization import get_normalizer
from stream_sentiment.engines.base import TokenBatch
from stream_sentiment.engines.manifest import EngineVersion


class PostTokenizer:
    """Turns post texts into token-id lists no longer than the engine's ``max_length``.

    Truncation happens here, at admission: a post can never produce a batch
    wider than the largest bucket.
    """

    def __init__(self, version: EngineVersion) -> None:
        manifest = version.manifest
        self.version = version
        self.max_length = manifest.max_length
        self.buckets = tuple(manifest.buckets)
        self._normalize = get_normalizer(manifest.text_normalization)
        self._tokenizer = Tokenizer.from_file(str(version.tokenizer_path))
        self._tokenizer.enable_truncation(max_length=self.max_length)
        self._tokenizer.no_padding()
        self._encode_batch = getattr(self._tokenizer, "encode_batch_fast", self._tokenizer.encode_batch)

    def encode(self, texts: Sequence[str]) -> list[list[int]]:
        # The fast variant skips character offsets, which nothing here reads: ~35% less per post.
        encodings = self._encode_batch([self._normalize(t) for t in texts])
        return [e.ids for e in encodings]

    def bucket_for(self, length: int) -> int:
        """The smallest bucket that holds ``length`` tokens."""
        index = bisect.bisect_left(self.buckets, length)
        if index == len(self.buckets):
            raise ValueError(f"{length} tokens exceed the largest bucket {self.buckets[-1]}")
        return self.buckets[index]


def pad_to_bucket(token_ids: Sequence[Sequence[int]], bucket: int) -> TokenBatch:
    """Stack token-id lists into a zero-padded ``[rows, bucket]`` batch."""
    lengths = np.fromiter((len(tokens) for tokens in token_ids), dtype=np.int64, count=len(token_ids))
    if len(lengths) and lengths.max() > bucket:
        row = int(np.argmax(lengths > bucket))
        raise ValueError(f"row {row} has {lengths[row]} tokens, more than bucket {bucket}")
    # One boolean mask and one flat copy, instead of two numpy slice assignments per row: rows are
    # left-aligned, so the mask's True cells in row-major order are exactly the tokens in sequence.
    mask = np.arange(bucket) < lengths[:, None]
    ids = np.zeros((len(lengths), bucket), dtype=np.int64)
    ids[mask] = np.fromiter(itertools.chain.from_iterable(token_ids), dtype=np.int64, count=int(lengths.sum()))
    return TokenBatch(ids, mask.astype(np.int64), bucket)
