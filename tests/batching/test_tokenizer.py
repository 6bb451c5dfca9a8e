"""The ASCII fast path of PostTokenizer must give exactly the Rust tokenizer's ids."""

from __future__ import annotations

import gc
import json
import os
import random
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from tokenizers import Tokenizer

from stream_sentiment.batching import tokenizer as tokenizer_module
from stream_sentiment.batching.tokenizer import AsciiWordPieces, PostTokenizer
from stream_sentiment.engines.manifest import load_engine_version
from stream_sentiment.source.replay import sample_rows

VERSION = Path(__file__).resolve().parents[2] / "engines" / "minilm-sentiment" / "v1"


NATIVE_BUILT = tokenizer_module._native_wordpieces is not None


# Every test runs on both inner loops of the fast path: the C one (where the install built it: CI must)
# and the pure-Python fallback.
@pytest.fixture(scope="module", params=["native", "python"])
def tokenizer(request) -> PostTokenizer:
    if request.param == "native" and not NATIVE_BUILT:
        if os.environ.get("CI"):
            pytest.fail("the C fast path (stream_sentiment/batching/_wordpieces.c) was not built by the install")
        pytest.skip("the C fast path was not built here (no C compiler at install time)")
    posts = PostTokenizer(load_engine_version(VERSION, verify=False))
    assert posts._ascii is not None
    posts._ascii.native = request.param == "native"
    return posts


def memo_size(fast: AsciiWordPieces) -> int:
    """Words memoized by the loop ``fast`` runs (each loop keeps its own memo)."""
    return len(fast._native_memo) if fast.native and fast._native_memo is not None else len(fast._pieces)


def fast_path(tokenizer: PostTokenizer) -> AsciiWordPieces:
    """A fresh fast path (empty memo) with the same inner loop as ``tokenizer``'s."""
    fast = AsciiWordPieces.for_tokenizer(tokenizer._tokenizer, tokenizer.max_length)
    assert fast is not None and tokenizer._ascii is not None
    fast.native = tokenizer._ascii.native
    return fast


def rust_ids(tokenizer: PostTokenizer, texts: list[str]) -> list[tuple[int, ...]]:
    """The definition: the Rust tokenizer alone, as PostTokenizer used it before the fast path."""
    normalized = [tokenizer._normalize(text) for text in texts]
    return [tuple(e.ids) for e in tokenizer._tokenizer.encode_batch(normalized)]


def test_the_committed_tokenizer_gets_the_fast_path(tokenizer):
    assert tokenizer.has_fast_path


def test_equals_the_tokenizer_on_every_sample_tweet_and_on_long_and_truncated_posts(tokenizer):
    tweets = [row["text"] for row in sample_rows()]
    rng = random.Random(7)
    long_posts = [" ".join(rng.sample(tweets, 4)) for _ in range(500)]
    truncated = [" ".join(rng.sample(tweets, 25)) for _ in range(50)]  # past max_length: cut before [SEP]
    texts = tweets + long_posts + truncated
    assert max(len(ids) for ids in tokenizer.encode(truncated)) == tokenizer.max_length
    fast_share = sum(tokenizer._ascii.accepts(tokenizer._normalize(t)) for t in texts) / len(texts)
    assert fast_share > 0.9  # the path is actually taken for most posts, not only for the fallback
    for start in range(0, len(texts), 512):  # batches as the worker forms them, mixed fast and slow
        batch = texts[start:start + 512]
        assert tokenizer.encode(batch) == rust_ids(tokenizer, batch)


TRICKY = ["[MASK] it", "a [SEP] b", "x" * 100, "x" * 101, "##ab", "naïve café", "tab\there", "\x7f", "_", "a_b",
          "@user's #1 fan!!!", "", " ", "1,000.50$", "UPPER lower MiXeD", "can't won't", "🙂 ok"]


def test_equals_the_tokenizer_on_tricky_text_in_one_mixed_batch(tokenizer):
    assert tokenizer.encode(TRICKY) == rust_ids(tokenizer, TRICKY)


PRINTABLE_ASCII = st.characters(min_codepoint=32, max_codepoint=126)


# No lone surrogates: decoding rejects them (invalid_unicode) before a post reaches the tokenizer.
@settings(max_examples=400, deadline=None)
@given(st.lists(st.text(alphabet=PRINTABLE_ASCII | st.sampled_from(list("aeiou sth'!_[]"))
                        | st.characters(exclude_categories=("Cs",)),
                        max_size=120), min_size=1, max_size=8))
def test_equals_the_tokenizer_on_generated_text(tokenizer, texts):
    assert tokenizer.encode(texts) == rust_ids(tokenizer, texts)


# Pieces of text the twitter-v1 normalization acts on, which random characters seldom spell out.
NORMALIZED_PARTS = ["http://", "https://", "HTTPS://", "hTtP://", "https//", "http:// ", "www.", "WwW.", "www. ",
                    "ftp://", "@", "@user", "@Jet_Blue", "a@b", "__@x", "@@", "&amp;", "&lt;3", "&", "\x1c", "\x1f",
                    "\t", "\n", "\r\n", " ", "  ", "x", "_", "é", "[MASK]", "'", "!", ".", "t.co/x", "9"]


@settings(max_examples=300, deadline=None)
@given(st.lists(st.lists(st.sampled_from(NORMALIZED_PARTS), max_size=14).map("".join), min_size=1, max_size=6))
def test_links_mentions_and_spaces_normalize_as_the_python_normalizer_does(tokenizer, texts):
    assert tokenizer.encode(texts) == rust_ids(tokenizer, texts)


def test_a_full_memo_starts_over_and_stays_exact(tokenizer, monkeypatch):
    fast = fast_path(tokenizer)
    monkeypatch.setattr(AsciiWordPieces, "MAX_WORDS", 20)
    texts = [f"word{n} and more words {n * 7}" for n in range(30)]
    for text in texts:
        assert fast.encode([text]) == rust_ids(tokenizer, [text])
        assert memo_size(fast) <= 20 + len(set(text.split()))  # the bound, and one batch's new words


def test_a_batch_with_more_new_words_than_the_memo_holds_is_exact_and_leaves_it_bounded(tokenizer, monkeypatch):
    fast = fast_path(tokenizer)
    monkeypatch.setattr(AsciiWordPieces, "MAX_WORDS", 20)
    fast.encode(["one two three four five six seven eight nine ten"] * 2)  # a memo half full of old words
    texts = [f"old {n} new{n} words word{n * 3} and four five six" for n in range(40)]  # ~90 distinct words
    assert fast.encode(texts) == rust_ids(tokenizer, texts)
    # The bound plus one batch's words at most (as many as the batch needs; the next batch clears it again).
    assert memo_size(fast) <= 20 + len({w for t in texts for w in t.split()})


def test_a_caller_that_finds_the_memo_locked_does_not_wait_and_gets_the_same_ids(tokenizer):
    fast = fast_path(tokenizer)
    texts = ["good morning everyone", "an unmemoized zygomorphic word", "x" * 150 + " spam"]
    fast.encode(texts[:1])
    memo = dict(fast._pieces)
    with fast._lock:  # another thread mid-encode: this thread would deadlock were encode to wait
        assert fast.encode(texts) == rust_ids(tokenizer, texts)
    if not fast.native:  # the C loop memoizes anyway: it holds the GIL throughout, so nobody is mid-read
        assert fast._pieces == memo  # the unlocked caller's misses are not memoized


def test_words_longer_than_wordpiece_takes_are_unknown_and_not_memoized(tokenizer):
    fast = fast_path(tokenizer)
    blobs = [f"spam {n:03d}" + "x" * 150 + " end" for n in range(50)]
    before = memo_size(fast)  # the start-up probes' words
    assert fast.encode(blobs) == rust_ids(tokenizer, blobs)
    assert not [word for word in fast._pieces if len(word) > 100]
    assert memo_size(fast) <= before + 2  # "spam" and "end" at most, in the C loop's memo too


def test_each_word_shape_gets_the_pieces_the_whole_tokenizer_gives_it(tokenizer):
    """The memo asks WordPiece alone (no normalizer, no pre-tokenizer) for each word the regex yields: a run
    of [a-z0-9] up to the longest WordPiece takes, or one punctuation character."""
    fast = fast_path(tokenizer)
    rng = random.Random(7)
    alphabet = "abcdefghijklmnopqrstuvwxyz0123456789"
    words = [c for c in map(chr, range(33, 127)) if not c.isalnum()] + list(alphabet) + [
        "".join(rng.choice(alphabet) for _ in range(rng.randint(2, 100))) for _ in range(300)]
    words += ["x" * 100, "unaffable", "running", "2026", "lol", "sooooo"]
    whole = [tuple(e.ids) for e in tokenizer._tokenizer.encode_batch(words, add_special_tokens=False)]
    assert fast._word_pieces(words) == dict(zip(words, whole, strict=True))
    assert fast.encode(words) == rust_ids(tokenizer, words)  # the C loop's own WordPiece, from an empty memo


def test_a_tokenizer_that_truncates_on_the_left_gets_no_fast_path(tokenizer):
    left = Tokenizer.from_str(tokenizer._tokenizer.to_str())
    left.enable_truncation(tokenizer.max_length, direction="left")
    assert AsciiWordPieces.for_tokenizer(left, tokenizer.max_length) is None


def without(config: dict, path: tuple[str, ...], value: object) -> Tokenizer:
    changed = json.loads(json.dumps(config))
    node = changed
    for key in path[:-1]:
        node = node[key]
    node[path[-1]] = value
    return Tokenizer.from_str(json.dumps(changed))


def test_tokenizers_it_cannot_mirror_get_no_fast_path(tokenizer):
    config = json.loads(tokenizer._tokenizer.to_str())
    for path, value in ((("normalizer", "lowercase"), False), (("pre_tokenizer", "type"), "Whitespace"),
                        (("post_processor",), None)):
        assert AsciiWordPieces.for_tokenizer(without(config, path, value), tokenizer.max_length) is None, path


def test_token_ids_are_tuples_the_garbage_collector_stops_tracking(tokenizer):
    # Posts in flight hold their ids until scored: as lists of ints, every collection walked them.
    ids = tokenizer.encode(["an ordinary ascii tweet!", "naïve café"])  # the fast path and the Rust one
    assert [type(x) for x in ids] == [tuple, tuple]
    gc.collect()
    assert not any(gc.is_tracked(x) for x in ids)


def test_the_scheduler_tokenizes_chunk_by_chunk_on_the_loop_the_rest_in_its_thread_in_fetch_order(
        tokenizer, monkeypatch):
    """What the worker queues: the tokenizer's ids for every post, fast-path chunks and Rust-encoded rest merged
    back in place, the fetches in fetch order, and no post of a partition ``keep`` gave up."""
    import asyncio

    from stream_sentiment.batching import scheduler as scheduler_module
    from stream_sentiment.batching.scheduler import Scheduler
    from stream_sentiment.config import Settings
    from stream_sentiment.engines.onnxruntime_backend import OnnxRuntimeEngine
    from stream_sentiment.metrics import PipelineMetrics
    from stream_sentiment.source.kafka_source import Admitted
    from stream_sentiment.source.messages import Post

    monkeypatch.setattr(scheduler_module, "TOKENIZE_CHUNK_CHARS", 64)  # many chunks, some mixed fast and slow
    texts = [text or "." for text in TRICKY] + [row["text"] for row in sample_rows()[:40]]
    posts = [Admitted(index % 2, index, Post(f"p{index}", text), 0.0, 0.0) for index, text in enumerate(texts)]
    half = len(posts) // 2

    async def queued() -> list[Admitted]:
        failures: list[BaseException] = []
        scheduler = Scheduler(Settings.load(), OnnxRuntimeEngine(tokenizer.version), tokenizer, PipelineMetrics(),
                              on_scored=None, on_poison=None, fail=failures.append)  # type: ignore[arg-type]
        scheduler.pool.take()  # its one stream busy: nothing is dispatched, everything stays queued
        await scheduler.submit(posts[:half], lambda partition: True)
        await scheduler.submit(posts[half:], lambda partition: partition == 0)  # partition 1 revoked meanwhile
        while scheduler.busy["tokenizing"]:
            await asyncio.sleep(0.01)
        batches = scheduler.batcher.drain(0.0)
        scheduler.close()
        assert not failures
        return [(entry.item, tuple(entry.token_ids)) for batch in batches for entry in batch.entries]

    got = asyncio.run(queued())
    kept = [post for post in posts[:half]] + [post for post in posts[half:] if post.partition == 0]
    assert sorted(item.offset for item, _ in got) == [post.offset for post in kept]
    expected = dict(zip((post.offset for post in kept), rust_ids(tokenizer, [p.post.text for p in kept]), strict=True))
    assert all(ids == expected[item.offset] for item, ids in got)
    for bucket in {tokenizer.bucket_for(len(ids)) for _, ids in got}:  # in each bucket, fetch order
        offsets = [item.offset for item, ids in got if tokenizer.bucket_for(len(ids)) == bucket]
        assert offsets == sorted(offsets)


def test_padding_in_c_equals_the_python_padding_and_refuses_the_same_rows():
    if not NATIVE_BUILT:
        if os.environ.get("CI"):
            pytest.fail("the C fast path (stream_sentiment/batching/_wordpieces.c) was not built by the install")
        pytest.skip("the C fast path was not built here (no C compiler at install time)")
    import numpy as np

    from stream_sentiment.batching.tokenizer import _pad_to_bucket_python, pad_to_bucket

    rng = random.Random(3)
    rows = [tuple(rng.randrange(30522) for _ in range(rng.randint(0, 48))) for _ in range(200)]
    for batch, bucket in ((rows, 48), ([list(r) for r in rows[:7]], 64), ([], 16), ([(np.int64(5), 7)], 2)):
        native, python = pad_to_bucket(batch, bucket), _pad_to_bucket_python(batch, bucket)
        assert native.input_ids.dtype == python.input_ids.dtype == np.int64
        assert native.input_ids.shape == python.input_ids.shape == (len(batch), bucket)
        assert (native.input_ids == python.input_ids).all() and (native.attention_mask == python.attention_mask).all()
        native.input_ids[:1] = 0  # writable, as engines may assume
    with pytest.raises(ValueError, match="row 1 has 3 tokens, more than bucket 2"):
        pad_to_bucket([(1,), (1, 2, 3)], 2)
    with pytest.raises(ValueError, match="row 1 has 3 tokens, more than bucket 2"):
        _pad_to_bucket_python([(1,), (1, 2, 3)], 2)


def test_a_c_normalization_that_disagrees_on_its_probes_is_not_used(monkeypatch):
    if not NATIVE_BUILT:
        pytest.skip("the C fast path was not built here")
    agrees = PostTokenizer(load_engine_version(VERSION, verify=False))
    assert agrees._native_normalization == 1
    real = AsciiWordPieces.normalize_encode

    def off_by_one(self, texts, normalization):
        return [None if ids is None else ids[:-1] for ids in real(self, texts, normalization)]

    monkeypatch.setattr(AsciiWordPieces, "normalize_encode", off_by_one)
    disagrees = PostTokenizer(load_engine_version(VERSION, verify=False))
    assert disagrees._native_normalization is None  # Python normalizes; the C loop still encodes
    texts = ["@united http://t.co/x thanks!!", "plain words"]
    assert disagrees.encode(texts) == rust_ids(disagrees, texts)


def test_the_c_memo_hashes_under_a_random_key():
    if not NATIVE_BUILT:
        pytest.skip("the C fast path was not built here")
    from stream_sentiment.batching import _wordpieces

    with pytest.raises(ValueError, match="16 random bytes"):
        _wordpieces.WordMemo(b"short")
    with pytest.raises(TypeError):
        _wordpieces.WordMemo()
    assert len(_wordpieces.WordMemo(os.urandom(16))) == 0
