"""Tokenization of posts for an engine version: normalize, WordPiece, truncate, pad to a bucket.

Uses the Rust ``tokenizers`` library with ``encode_batch``, which releases the
GIL and fans out over cores: the pipeline calls it from an executor. The fast
path below (C or Python) holds the GIL wherever it runs, so the scheduler runs it
on the event loop in ~1 ms chunks instead (see ``batching.scheduler``).

For a BERT-style WordPiece tokenizer, posts of printable ASCII take a faster
path (:class:`AsciiWordPieces`): split into words and look each word's pieces up
in a memo, running WordPiece only for words not seen yet. Social-media
vocabulary repeats, so nearly every word is a hit. Where the install built the C
extension (``_wordpieces.c``) the whole path runs there -- the ``twitter-v1``
normalization of ASCII posts without "&" too -- at ~3.5x less CPU per post than
this module's Python loop (which stays as the fallback), itself ~3x less than
``encode_batch_fast`` (on a GPU host the CPU, not the GPU, limits long posts).
Results equal the Rust tokenizer's exactly, by construction (the path only takes
text whose normalization and splitting it mirrors, and checks itself on probes at
start-up) and by test, on both loops, on every sample tweet and on generated text.

Token ids come out as tuples of ints, not lists: the cyclic garbage collector stops
tracking such a tuple the first time it sees it, so the thousands of posts in
flight (and the memo's entries) cost a full collection nothing. Lists of ints are
traversed, int by int, by every collection that reaches them.
"""

from __future__ import annotations

import bisect
import itertools
import json
import logging
import os
import re
import threading
import types
from collections.abc import Callable, Iterable, Sequence

import numpy as np
from tokenizers import Tokenizer

from stream_sentiment.batching.normalization import get_normalizer
from stream_sentiment.engines.base import TokenBatch
from stream_sentiment.engines.manifest import EngineVersion

_native_wordpieces: types.ModuleType | None
try:  # the fast path's inner loop in C, where the install could compile it (pyproject.toml's ext-modules)
    from stream_sentiment.batching import _wordpieces as _native_wordpieces
except ImportError:  # pragma: no cover - depends on the install
    _native_wordpieces = None

log = logging.getLogger(__name__)


def fast_path_loop() -> str:
    """Which inner loop the ASCII fast path runs here: ``"C"`` (built at install) or ``"Python"``."""
    return "C" if _native_wordpieces is not None else "Python"

# What BertPreTokenizer does to lowercased printable ASCII: runs of letters and digits are words,
# every other character but the space is punctuation and a word of its own (Rust's
# is_ascii_punctuation is exactly the printable ASCII that is neither alphanumeric nor a space).
_ASCII_WORDS = re.compile(r"[a-z0-9]+|[^a-z0-9 ]")

# Texts the start-up self-check tokenizes both ways; any difference turns the fast path off.
_PROBES = (
    "", "a", "Hello, World!", "don't STOP me now!!! :-) #blessed @user http", "snake_case and kebab-case",
    "CamelCase123abc 3.14159 $5,000 ~tilde~ `tick` {brace} |pipe| \\back\\slash", "##ing un##affable",
    "x" * 101, "y" * 100, "supercalifragilisticexpialidocious antidisestablishmentarianism",
    "word " * 300, "a!" * 200, " ".join(map(str, range(400))),  # non-repeating: truncation keeps the right end
)


# And what the C normalization must treat as the Python normalizer does: links, mentions, every ASCII space.
_NORMALIZATION_PROBES = (
    "see https://t.co/x and HTTP://A.b/c?d=1, www.example.com or WwW. www.x http:// x https//y",
    "@united thanks!! a@b __@c @@d @_e (@f) &amp; &lt;3 @", "tab\there\nnew\x1cline\x1f  spaced  out ",
)


class AsciiWordPieces:
    """Tokenizes printable-ASCII texts word by word from a memo of each word's WordPiece ids.

    Only for a tokenizer this can mirror exactly -- BertNormalizer with lowercasing, BertPreTokenizer,
    WordPiece, ``[CLS] A [SEP]`` -- see :meth:`for_tokenizer`. Texts it cannot take (non-ASCII,
    control characters, anything that could hold an added token such as ``[MASK]``) are left to the
    caller. Thread-safe, and no caller waits for another (see :meth:`encode`); the memo is bounded and
    starts over when full.
    """

    MAX_WORDS = 1 << 16

    def __init__(self, tokenizer: Tokenizer, max_length: int, prefix: list[int], suffix: list[int],
                 refused_characters: str, unknown: list[int], max_word_chars: int,
                 vocab: dict[str, int], continuation: str) -> None:
        self._tokenizer = tokenizer
        self._model = tokenizer.model
        # WordPiece's own vocabulary and prefix of a word's later pieces, for the C loop's misses.
        self._vocab = vocab
        self._continuation = continuation
        self._prefix = prefix
        self._prefix_ids = tuple(prefix)
        self._suffix = tuple(suffix)
        self._keep = max_length - len(suffix)  # ids kept before the suffix, prefix included
        self._refused = refused_characters
        # WordPiece gives [UNK] to any longer word; such words are not memoized, so a flood of long
        # unique tokens (spam blobs up to the post size limit) cannot make the memo large.
        self._unknown = tuple(unknown)
        self._max_word_chars = max_word_chars
        self._pieces: dict[str, tuple[int, ...]] = {}
        self._lock = threading.Lock()
        # The C loop where it was built: the same ids for a fraction of the CPU (tests compare both paths). It
        # keeps its own memo (word bytes -> ids, bounded by MAX_WORDS as this one is).
        self.native = _native_wordpieces is not None
        self._native_memo = _native_wordpieces.WordMemo(os.urandom(16)) if _native_wordpieces is not None else None

    @classmethod
    def for_tokenizer(cls, tokenizer: Tokenizer, max_length: int) -> AsciiWordPieces | None:
        """The fast path for ``tokenizer`` (truncating to ``max_length``), or None where it cannot be exact."""
        config = json.loads(tokenizer.to_str())
        normalizer, pre_tokenizer = config.get("normalizer") or {}, config.get("pre_tokenizer") or {}
        model, post = config.get("model") or {}, config.get("post_processor") or {}
        if (normalizer.get("type") != "BertNormalizer" or not normalizer.get("lowercase")
                or pre_tokenizer.get("type") != "BertPreTokenizer" or model.get("type") != "WordPiece"):
            return None
        if post.get("type") == "BertProcessing":
            prefix, suffix = [post["cls"][1]], [post["sep"][1]]
        elif post.get("type") == "TemplateProcessing":
            single = post.get("single") or []
            if [next(iter(part)) for part in single] != ["SpecialToken", "Sequence", "SpecialToken"]:
                return None
            specials = post.get("special_tokens") or {}
            prefix, suffix = (specials[single[i]["SpecialToken"]["id"]]["ids"] for i in (0, 2))
        else:
            return None
        if max_length <= len(prefix) + len(suffix):
            return None
        truncation = tokenizer.truncation or {}
        if truncation and (truncation.get("direction", "right") != "right" or truncation.get("stride", 0)):
            return None  # what is kept of a long post is the start, and only once
        unknown_id = tokenizer.token_to_id(model.get("unk_token", ""))
        if unknown_id is None:
            return None
        # Added tokens are matched in the text before anything else (lowercased, for a normalized
        # one); texts with either case of their first characters go the slow way (for BERT: "[",
        # which ordinary posts rarely contain).
        firsts = {t["content"][0] for t in config.get("added_tokens") or [] if t["content"]}
        refused = "".join(sorted({c for first in firsts for c in (first, first.lower(), first.upper())}))
        vocab = model.get("vocab")
        if not isinstance(vocab, dict):
            return None
        fast = cls(tokenizer, max_length, list(prefix), list(suffix), refused, [unknown_id],
                   int(model.get("max_input_chars_per_word", 100)), vocab,
                   str(model.get("continuing_subword_prefix", "##")))
        probes = [text for text in _PROBES if fast.accepts(text)]
        expected = [e.ids for e in tokenizer.encode_batch(probes)]
        if [list(ids) for ids in fast.encode(probes)] != expected:
            log.warning("the ASCII tokenization fast path disagrees with the tokenizer on its probes; not used")
            return None
        return fast

    def accepts(self, text: str) -> bool:
        """Whether :meth:`encode` may be given ``text``."""
        return text.isascii() and text.isprintable() and not any(c in text for c in self._refused)

    def encode(self, texts: Sequence[str]) -> list[tuple[int, ...]]:
        """Token ids of ``texts``, every one of which :meth:`accepts`. Never waits for another caller.

        The C loop (where built) needs no lock: it holds the GIL for the whole call and keeps its own memo.
        The Python loop shares ``_pieces`` under ``_lock``: the serving loop calls it on the event loop
        (``Scheduler._tokenize_in_turn``), so it must not block on the lock. No other thread calls it on the
        worker's instance today (the executor runs only the Rust ``encode_normalized``; the hot-swap
        golden-set check runs on the loop; shadow checks reuse stored ids), so the lock is always free -- but
        a caller in a thread (a tool) could hold it while WordPiece runs. A caller that finds it taken reads
        the memo as it stands and splits its own misses without memoizing them: the same ids, a little more work.
        """
        if self.native:
            return self._encode_native(list(texts))
        words_of = [_ASCII_WORDS.findall(text.lower()) for text in texts]
        longest = self._max_word_chars
        if not self._lock.acquire(blocking=False):
            return self._assemble(words_of, self._unshared(words_of).get)
        try:
            pieces = self._pieces
            unseen = list({word for words in words_of for word in words if word not in pieces and len(word) <= longest})
            if unseen:
                if len(pieces) + len(unseen) > self.MAX_WORDS:
                    pieces.clear()  # rare: a stream of new words; the next batches refill it
                    unseen = list({word for words in words_of for word in words if len(word) <= longest})
                pieces.update(self._word_pieces(unseen))
            # Assembled under the lock: nobody else may clear the memo meanwhile.
            return self._assemble(words_of, pieces.get)
        finally:
            self._lock.release()

    def _encode_native(self, texts: list[str]) -> list[tuple[int, ...]]:
        """:meth:`encode` by the C loop, which also splits and memoizes (in its own memo) words it has not seen.

        The C call holds the GIL throughout, so nobody sees its memo mid-change; it starts the memo over
        when it holds ``MAX_WORDS``, as the Python path does with its own.
        """
        # The C normalizer's "none" is the same loop with nothing to normalize; with no characters refused it takes
        # all printable ASCII, as the Python loop does (the caller checked accepts()).
        encoded = self._native_normalize_encode(texts, 0, "")
        refused = [index for index, ids in enumerate(encoded) if ids is None]
        if refused:
            raise ValueError(f"texts the fast path does not accept, at {refused[:5]}: check accepts() first")
        return encoded  # type: ignore[return-value]  # no None left

    def normalize_encode(self, texts: list[str], normalization: int) -> list[tuple[int, ...] | None]:
        """Raw texts normalized (0: none, 1: twitter-v1) and encoded by the C loop: None for each text it
        cannot take whole (non-ASCII; "&" under twitter-v1; not :meth:`accepts` once normalized)."""
        return self._native_normalize_encode(texts, normalization, self._refused)

    def _native_normalize_encode(self, texts: list[str], normalization: int,
                                 refused: str) -> list[tuple[int, ...] | None]:
        assert _native_wordpieces is not None
        return _native_wordpieces.normalize_encode(
            texts, normalization, refused, self._native_memo, self.MAX_WORDS, self._vocab, self._continuation,
            self._prefix_ids, self._suffix, self._keep, self._unknown, self._max_word_chars)

    def _word_pieces(self, words: Iterable[str]) -> dict[str, tuple[int, ...]]:
        # WordPiece alone: a word here is a run of [a-z0-9] or one punctuation character, which the
        # normalizer and pre-tokenizer pass through unchanged, so the model's pieces are the tokenizer's.
        # ``encode_batch`` cost ~5x the CPU per word for the same ids, and fanned each fetch's few unseen
        # words (~25 per 50 tweets) out to its rayon threads, whose wake-ups and spinning cost more than
        # the words (~19 us per post of process CPU at a GPU worker's rate, where no stage timer sees it).
        tokenize = self._model.tokenize
        return {word: tuple([token.id for token in tokenize(word)]) for word in words}

    def _unshared(self, words_of: list[list[str]]) -> dict[str, tuple[int, ...]]:
        """Every word's pieces without the lock: the memo's entries as read now, the rest encoded here.

        Each ``dict.get`` is atomic under the GIL and an entry, once there, never changes (the holder
        only adds entries or clears them all), so the copy is consistent whatever the holder does next.
        """
        longest, get = self._max_word_chars, self._pieces.get
        found: dict[str, tuple[int, ...]] = {}
        missing: list[str] = []
        for word in {word for words in words_of for word in words if len(word) <= longest}:
            ids = get(word)
            if ids is None:
                missing.append(word)
            else:
                found[word] = ids
        if missing:
            found.update(self._word_pieces(missing))
        return found

    def _assemble(self, words_of: list[list[str]],
                  get: Callable[[str, tuple[int, ...]], tuple[int, ...]]) -> list[tuple[int, ...]]:
        encoded = []
        unknown = self._unknown
        for words in words_of:
            ids = list(self._prefix)
            for word in words:
                ids += get(word, unknown)  # only a word longer than WordPiece takes is not there
            if len(ids) > self._keep:
                del ids[self._keep:]
            ids += self._suffix
            encoded.append(tuple(ids))
        return encoded


class PostTokenizer:
    """Turns post texts into token-id tuples no longer than the engine's ``max_length``.

    Truncation happens here, at admission: a post can never produce a batch
    wider than the largest bucket.
    """

    def __init__(self, version: EngineVersion) -> None:
        manifest = version.manifest
        self.version = version
        self.max_length = manifest.max_length
        self.buckets = tuple(manifest.buckets)
        self._normalize = get_normalizer(manifest.text_normalization)
        # The normalizations the C loop also does (its code for each), else None: Python normalizes.
        self._native_normalization = {"none": 0, "twitter-v1": 1}.get(manifest.text_normalization)
        self._tokenizer = Tokenizer.from_file(str(version.tokenizer_path))
        self._tokenizer.enable_truncation(max_length=self.max_length)
        self._tokenizer.no_padding()
        self._encode_batch = getattr(self._tokenizer, "encode_batch_fast", self._tokenizer.encode_batch)
        self._ascii = AsciiWordPieces.for_tokenizer(self._tokenizer, self.max_length)
        if self._ascii is not None and self._ascii.native and self._native_normalization is not None:
            # The C normalization checks itself too: its ids on the probes must be the Python path's.
            probes = [*_PROBES, *_NORMALIZATION_PROBES]
            if self._encode_fast_native(probes) != self.encode_fast_python(probes):
                log.warning("the C normalization disagrees with %s on its probes; normalizing in Python",
                            manifest.text_normalization)
                self._native_normalization = None
        if self._ascii is not None and not self._ascii.native:
            log.info("the tokenizer's ASCII fast path runs in Python: its C loop was not built at install time "
                     "(no C compiler?); the same ids, ~3.5x its CPU per post")

    @property
    def has_fast_path(self) -> bool:
        return self._ascii is not None

    def encode(self, texts: Sequence[str]) -> list[tuple[int, ...]]:
        """Token ids of each text, truncated to ``max_length`` (tuples: see the module's docstring)."""
        encoded, slow, normalized = self.encode_fast(texts)
        if slow:
            for index, ids in zip(slow, self.encode_normalized(normalized), strict=True):
                encoded[index] = ids
        return encoded

    def encode_fast(self, texts: Sequence[str]) -> tuple[list[tuple[int, ...]], list[int], list[str]]:
        """Normalize ``texts`` and encode those the ASCII fast path takes (C or Python; either holds the GIL).

        Returns the ids (``()`` where not encoded yet), the positions of the texts left over and their
        normalized text, for :meth:`encode_normalized` (the Rust tokenizer, which releases the GIL).
        """
        if self._ascii is not None and self._ascii.native and self._native_normalization is not None:
            return self._encode_fast_native(texts)
        return self.encode_fast_python(texts)

    def _encode_fast_native(self, texts: Sequence[str]) -> tuple[list[tuple[int, ...]], list[int], list[str]]:
        """:meth:`encode_fast` with the normalization in C too, for the texts it can take (ASCII; for
        ``twitter-v1`` no "&", whose HTML unescaping stays in Python); the rest go the general way."""
        assert self._ascii is not None and self._native_normalization is not None
        # Non-ASCII texts never reach the C loop: it would only refuse them, after caching a UTF-8 copy in each.
        ascii_at = [index for index, text in enumerate(texts) if text.isascii()]
        encoded: list[tuple[int, ...] | None] = [None] * len(texts)
        for index, ids in zip(ascii_at, self._ascii.normalize_encode([texts[i] for i in ascii_at],
                                                                     self._native_normalization), strict=True):
            encoded[index] = ids
        left = [index for index, ids in enumerate(encoded) if ids is None]
        if not left:
            return encoded, [], []  # type: ignore[return-value]  # no None left
        rest, slow, normalized = self.encode_fast_python([texts[i] for i in left])
        result: list[tuple[int, ...]] = [() if ids is None else ids for ids in encoded]
        for index, ids in zip(left, rest, strict=True):
            result[index] = ids
        return result, [left[i] for i in slow], normalized

    def encode_fast_python(self, texts: Sequence[str]) -> tuple[list[tuple[int, ...]], list[int], list[str]]:
        """:meth:`encode_fast` with the normalization in Python: where the C loop was not built, for
        normalizations it does not know, and for the texts its own normalization does not take."""
        normalized = [self._normalize(t) for t in texts]
        if self._ascii is None:
            return [()] * len(normalized), list(range(len(normalized))), normalized
        accepts = self._ascii.accepts
        fast: list[int] = []
        slow: list[int] = []
        for index, text in enumerate(normalized):
            (fast if accepts(text) else slow).append(index)
        if not slow:
            return self._ascii.encode(normalized), [], []
        encoded: list[tuple[int, ...]] = [()] * len(normalized)
        for index, ids in zip(fast, self._ascii.encode([normalized[i] for i in fast]), strict=True):
            encoded[index] = ids
        return encoded, slow, [normalized[i] for i in slow]

    def encode_normalized(self, normalized: list[str]) -> list[tuple[int, ...]]:
        """Token ids of already normalized texts, by the Rust tokenizer (releases the GIL: run it in a thread)."""
        return self._encode_slow(normalized)

    def _encode_slow(self, normalized: list[str]) -> list[tuple[int, ...]]:
        # The fast variant skips character offsets, which nothing here reads: ~35% less per post.
        return [tuple(e.ids) for e in self._encode_batch(normalized)]

    def bucket_for(self, length: int) -> int:
        """The smallest bucket that holds ``length`` tokens."""
        index = bisect.bisect_left(self.buckets, length)
        if index == len(self.buckets):
            raise ValueError(f"{length} tokens exceed the largest bucket {self.buckets[-1]}")
        return self.buckets[index]


def pad_to_bucket(token_ids: Sequence[Sequence[int]], bucket: int) -> TokenBatch:
    """Stack token-id lists into a zero-padded ``[rows, bucket]`` batch."""
    if _native_wordpieces is not None:  # one pass in C: ~5% of a worker's CPU per batch was this function
        rows = token_ids if isinstance(token_ids, list) else list(token_ids)
        ids, mask = _native_wordpieces.pad(rows, bucket)
        shape = (len(rows), bucket)
        return TokenBatch(np.frombuffer(ids, dtype=np.int64).reshape(shape),
                          np.frombuffer(mask, dtype=np.int64).reshape(shape), bucket)
    return _pad_to_bucket_python(token_ids, bucket)


def _pad_to_bucket_python(token_ids: Sequence[Sequence[int]], bucket: int) -> TokenBatch:
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
