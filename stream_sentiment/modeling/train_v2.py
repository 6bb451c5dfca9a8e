"""Train a v2 run: a teacher on the mixture's hard labels, or a student distilled from teacher soft labels.

The data is :mod:`stream_sentiment.modeling.mixture` (tweets + movie/Amazon review sentences;
NYT editorials wholly held out). The encoder starts from all-MiniLM-L6-v2: all six layers
(``--layers 6``: ``minilm-sentiment`` v2, the same architecture as v1) or fewer, spread evenly
over the base (``--layers 2``: the fast CPU student, see :mod:`stream_sentiment.modeling.student`).

Loss, per example with weight w (annotator confidence for tweets, 1.0 for sentences, times the
inverse class frequency): ``w * ((1 - a) * CE(hard label) + a * CE(teacher probabilities))``
where ``a`` is ``--soft-weight`` (0 = a teacher run, no soft labels needed). With
``--augment-copies K`` (:mod:`stream_sentiment.modeling.augment`) a teacher also saves its probabilities
on K perturbed copies of every training row, and a student adds those copies to its epoch with the
teacher's probabilities as their only target: ``w * CE(teacher probabilities)``, w the class weight of
the teacher's argmax.

The epoch kept is the one with the best :func:`mixture.selection_score_v2` (dev sets only). The
VADER test tweets are scored once at the end, for the record. ``--write-train-probabilities``
also saves the kept model's probabilities on every training row (``train_probabilities.npy``,
in mixture order, with the keys' digest in ``training.json``): a teacher's soft labels.

``--init-checkpoint DIR --quantization-aware true`` fine-tunes a trained checkpoint through ONNX Runtime's int8
rounding (:mod:`stream_sentiment.modeling.qat`; activation ranges re-measured on the calibration tweets at every
epoch's start and before it is scored), so that ``calibrate`` loses less of it; ``--epoch-rows`` makes short,
separately scored epochs for such a run.

``--deadline`` (unix seconds) is a guard for a time-limited GPU call, not a hyper-parameter: past
it, training stops at the next step, that partial epoch is scored like a whole one, and
``training.json`` says ``stopped_by_deadline``. Nothing stops by it when the time is enough.

Usage::

    python -m stream_sentiment.modeling.train_v2 --output build/train/teacher13 --write-train-probabilities
    python -m stream_sentiment.modeling.train_v2 --output build/train/fast --layers 2 \
        --soft-labels build/train/soft.npy --soft-weight 0.7
    python -m stream_sentiment.modeling.train_v2 --output build/train/v2-qat --init-checkpoint build/train/v2 \
        --quantization-aware true --epochs 4 --epoch-rows 6400 --learning-rate 2e-5 \
        --soft-labels build/soft/soft.npy --soft-weight 0.8 --augment-copies 5
"""

from __future__ import annotations

import argparse
import json
import math
import random
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from stream_sentiment.batching.normalization import get_normalizer
from stream_sentiment.batching.tokenizer import pad_to_bucket
from stream_sentiment.modeling.augment import augmented_texts, texts_digest
from stream_sentiment.modeling.checkpoint_files import write_checkpoint
from stream_sentiment.modeling.config_args import add_config_arguments, config_from_arguments
from stream_sentiment.modeling.corpora import LABELS, read_vader_tweets
from stream_sentiment.modeling.export import load_classifier
from stream_sentiment.modeling.metrics import classification_report
from stream_sentiment.modeling.minilm import EncoderConfig, SentimentClassifier
from stream_sentiment.modeling.mixture import (
    DEV_SETS,
    Example,
    keys_digest,
    load_mixture,
    selection_score_v2,
)
from stream_sentiment.modeling.quantize import calibration_texts
from stream_sentiment.modeling.student import prune_ffn, student_state
from stream_sentiment.modeling.train import (
    add_run_arguments,
    default_base_model_dir,
    load_tokenizer,
    predict,
    seeded_device,
)

HEADLINE = ("accuracy", "macro_f1", "polar_accuracy")


@dataclass(frozen=True)
class V2Config:
    # "minilm": the serving architecture (v2, students); "mpnet": a 12-layer teacher only
    # (stream_sentiment.modeling.mpnet_teacher; --base-model is its folder, and no checkpoint is written).
    encoder: str = "minilm"
    layers: int = 6
    # FFN width of a student (0 = the base's 1536): its most important neurons are kept (student.prune_ffn).
    intermediate_size: int = 0
    epochs: int = 3
    learning_rate: float = 5e-5
    batch_size: int = 32
    max_length: int = 128
    weight_decay: float = 0.01
    warmup_fraction: float = 0.06
    # Initialisation, dropout and batch order; the data split is fixed (mixture seed 13, v1's tweet split).
    seed: int = 13
    class_balance: bool = True
    # The word-embedding table (11.7M of v2's 22.7M parameters) stays the base's: v1's sweep found freezing it
    # costs nothing measurable (docs/model.md), and the checkpoints then come back without it, which is
    # what fits v2 and two students in the device tool's 64 MiB of returned files.
    freeze_word_embeddings: bool = True
    normalization: str = "twitter-v1"
    review_dev_fraction: float = 0.1
    # Teacher probabilities on the training rows (a .npy from scripts/ensemble_v2.py); "" = none.
    soft_labels: str = ""
    soft_weight: float = 0.0
    # Perturbed copies of each training row (stream_sentiment.modeling.augment): a teacher scores them, a
    # student trains on them with the teacher's probabilities (SOFT_augmented.npy beside --soft-labels).
    augment_copies: int = 0
    # Start from a trained checkpoint folder (e.g. v2's) instead of the base encoder: a fine-tuning run.
    init_checkpoint: str = ""
    # Train through ORT's int8 rounding (stream_sentiment.modeling.qat): quantization-aware fine-tuning, whose
    # checkpoint then loses less to `calibrate`. Dev scores (and so the kept epoch) are those of the simulated INT8.
    quantization_aware: bool = False
    # Weight of the init checkpoint's own float probabilities as a target (0-1; needs --init-checkpoint):
    # ``(1 - d) * the loss above + d * CE(init's probabilities)``. With quantization-aware training, d = 1 teaches
    # the rounded network to answer as the float one did (self-distillation), rather than to learn anew.
    self_distillation: float = 0.0
    # Temperature of those probabilities: below 1 sharpens them towards the init's own decisions, so training
    # widens its margins (a decision near a tie is what int8 rounding flips) rather than copying its near-ties.
    self_distillation_temperature: float = 1.0
    # Rows drawn per epoch from the shuffled training + transfer rows (0 = all of them): short epochs, each scored,
    # for a fine-tuning run that needs a fraction of an epoch.
    epoch_rows: int = 0
    # Smoke tests only: the first N training rows / dev and test rows (0 = all).
    max_train_rows: int = 0
    max_eval_rows: int = 0


def _init_from_base(model: SentimentClassifier, base_model_dir: Path) -> list[str]:
    """Base weights into ``model`` (a shallower student keeps evenly spaced base layers, a narrower FFN its
    most important neurons); returns the parameter names left at their init (the head)."""
    from safetensors.torch import load_file

    base_config = EncoderConfig.from_json(base_model_dir / "config.json")
    layers = model.config.num_hidden_layers
    state = student_state(load_file(str(base_model_dir / "model.safetensors")), base_config.num_hidden_layers, layers)
    if model.config.intermediate_size != base_config.intermediate_size:
        state = prune_ffn({k: v.float() for k, v in state.items()}, layers, model.config.intermediate_size)
    own = model.state_dict()
    loadable = {k: v.to(own[k].dtype) for k, v in state.items() if k in own}
    model.load_state_dict(loadable, strict=False)
    return sorted(set(own) - set(loadable))


def _parameter_groups(model: torch.nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    # Two groups, not one per parameter: the fused optimizer then runs a handful of kernels a step.
    decay: list[torch.nn.Parameter] = []
    no_decay: list[torch.nn.Parameter] = []
    for name, parameter in model.named_parameters():
        if not parameter.requires_grad:
            continue
        (no_decay if name.endswith(("bias", "LayerNorm.weight")) else decay).append(parameter)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def _read_soft_labels(path: Path, mixture_train: list[Example], rows: int) -> np.ndarray:
    """Teacher probabilities for the first ``rows`` training rows; refuses a file written for other rows.

    The file's sidecar (``.json``) names how many rows of the mixture it covers and their keys' digest.
    """
    record = json.loads(path.with_suffix(".json").read_text())
    soft = np.load(path)
    count = int(record["rows"])
    if soft.shape != (count, len(LABELS)):
        raise ValueError(f"{path}: shape {soft.shape}, expected ({count}, {len(LABELS)})")
    if count < rows or keys_digest(mixture_train[:count]) != record["keys_digest"]:
        raise ValueError(f"{path} was written for other training rows (count or keys digest differs)")
    return soft[:rows].astype(np.float32)


def _augmented_soft_path(soft_labels: Path) -> Path:
    return soft_labels.with_name(soft_labels.stem + "_augmented.npy")


def _read_augmented_soft_labels(soft_labels: Path, texts: list[str]) -> np.ndarray:
    """Teacher probabilities on the transfer set ``texts``; refuses a file written for other texts."""
    path = _augmented_soft_path(soft_labels)
    record = json.loads(soft_labels.with_suffix(".json").read_text())
    if not record.get("augmented_digest"):
        raise ValueError(f"{soft_labels} has no transfer set: run the teachers with --augment-copies too")
    soft = np.load(path)
    if soft.shape != (len(texts), len(LABELS)) or record.get("augmented_digest") != texts_digest(texts):
        raise ValueError(f"{path} was written for another transfer set (shape {soft.shape} or digest differs)")
    return soft.astype(np.float32)


def _score_sets(model: torch.nn.Module, tokenizer: Any, sets: dict[str, list[Example]], device: torch.device,
                show_progress: bool) -> tuple[dict[str, dict[str, Any]], dict[str, np.ndarray]]:
    reports, probabilities = {}, {}
    for name, rows in sets.items():
        probabilities[name] = predict(model, tokenizer, [r.text for r in rows], device, desc=f"score {name}",
                                      show_progress=show_progress)
        reports[name] = classification_report([r.label for r in rows], probabilities[name])
    return reports, probabilities


def train_v2(
    config: V2Config,
    *,
    base_model_dir: Path,
    corpora_dir: Path,
    output_dir: Path,
    device_name: str = "auto",
    write_train_probabilities: bool = False,
    deadline: float = 0.0,
    show_progress: bool = True,
) -> dict[str, Any]:
    """Train one run and write ``checkpoint.safetensors`` (FP32), the tokenizer and ``training.json``."""
    started = time.time()
    device = seeded_device(config.seed, device_name)
    normalize = get_normalizer(config.normalization)

    def normalized(rows: list[Example]) -> list[Example]:
        return [Example(r.source, r.row_id, normalize(r.text), r.label, r.weight) for r in rows]

    mixture = load_mixture(corpora_dir, review_dev_fraction=config.review_dev_fraction)
    train_rows = normalized(mixture.train[: config.max_train_rows or None])
    cap = config.max_eval_rows or None
    dev = {name: normalized(mixture.dev[name][:cap]) for name in DEV_SETS}
    test = {"vader_test": [Example("vader", t.row_id, normalize(t.text), t.label)
                           for t in read_vader_tweets(corpora_dir)[:cap]]}
    soft = (torch.from_numpy(_read_soft_labels(Path(config.soft_labels), mixture.train, len(train_rows)))
            if config.soft_labels else None)
    if config.soft_weight and soft is None:
        raise ValueError("--soft-weight needs --soft-labels")
    if config.augment_copies and soft is None and not write_train_probabilities:
        raise ValueError("--augment-copies: a teacher scores the copies (--write-train-probabilities), a student "
                         "learns them (--soft-labels); this run does neither")
    # The transfer set is built from the normalized training texts, so teacher and student see the same words
    # (and the same rows: its replacement words come from all of them, so --max-train-rows must match too).
    transfer = augmented_texts([r.text for r in train_rows], config.augment_copies, seed=13)
    transfer_soft = (torch.from_numpy(_read_augmented_soft_labels(Path(config.soft_labels), transfer))
                     if transfer and soft is not None else None)

    if (config.init_checkpoint or config.quantization_aware) and config.encoder != "minilm":
        raise ValueError("--init-checkpoint, --quantization-aware: the MiniLM encoders only (what calibrate quantizes)")
    if config.self_distillation and (not config.init_checkpoint or not 0 < config.self_distillation <= 1):
        raise ValueError("--self-distillation: a weight in (0, 1], with --init-checkpoint")
    if config.self_distillation_temperature != 1.0 and not config.self_distillation:
        raise ValueError("--self-distillation-temperature needs --self-distillation")
    if config.self_distillation_temperature <= 0:
        raise ValueError("--self-distillation-temperature: above 0")
    tokenizer = load_tokenizer(base_model_dir, config.max_length)
    model: torch.nn.Module
    trained: SentimentClassifier | None = None  # the --init-checkpoint as loaded
    if config.encoder == "mpnet":
        from stream_sentiment.modeling.mpnet_teacher import MPNetClassifier

        teacher = MPNetClassifier(base_model_dir, num_labels=len(LABELS))
        left_at_init = teacher.load_base(base_model_dir)
        if config.freeze_word_embeddings:
            teacher.word_embeddings.weight.requires_grad_(False)
        model, encoder_config_dict = teacher, teacher.config.to_dict()
    elif config.encoder == "minilm":
        base_config = EncoderConfig.from_json(base_model_dir / "config.json")
        encoder_config = replace(base_config, num_hidden_layers=config.layers,
                                 intermediate_size=config.intermediate_size or base_config.intermediate_size)
        minilm = SentimentClassifier(encoder_config, num_labels=len(LABELS), fused_attention=True)
        if config.init_checkpoint:
            trained = load_classifier(Path(config.init_checkpoint))
            if trained.config != encoder_config:
                raise ValueError(f"--init-checkpoint {config.init_checkpoint}: encoder {trained.config}, this run's "
                                 f"{encoder_config}")
            minilm.load_state_dict(trained.state_dict())
            left_at_init = []
        else:
            left_at_init = _init_from_base(minilm, base_model_dir)
        if config.freeze_word_embeddings:
            minilm.embeddings.word_embeddings.weight.requires_grad_(False)
        model, encoder_config_dict = minilm, encoder_config.to_dict()
    else:
        raise ValueError(f"unknown encoder {config.encoder!r}: minilm or mpnet")
    # Self-distillation's target: the init checkpoint as loaded, kept apart (the trained copy was made by value).
    reference = (trained.to(device).eval().requires_grad_(False)
                 if config.self_distillation and trained is not None else None)
    # What the checkpoint is written from: the classifier, not its quantization-aware wrapper.
    weights_of = model
    recalibrate: Callable[[], object] = lambda: None  # noqa: E731
    if config.quantization_aware:
        from stream_sentiment.modeling.qat import QuantAwareClassifier, calibration_tensors

        model = QuantAwareClassifier(minilm)
        calibration = [
            (ids.to(device), mask.to(device))
            for ids, mask in calibration_tensors([e.ids for e in tokenizer.encode_batch(
                [normalize(text) for text in calibration_texts(corpora_dir)])])
        ]
        recalibrate = partial(model.calibrate, calibration)
    model.to(device)

    # Tokenized once: the step loop only pads.
    token_ids = [e.ids for e in tokenizer.encode_batch([r.text for r in train_rows])]
    label_index = {label: i for i, label in enumerate(LABELS)}
    labels = torch.tensor([label_index[r.label] for r in train_rows])
    counts = np.bincount(labels.numpy(), minlength=len(LABELS))
    class_weights = (torch.tensor(counts.sum() / (len(LABELS) * np.maximum(counts, 1)), dtype=torch.float32)
                     if config.class_balance else torch.ones(len(LABELS)))
    weights = torch.tensor([r.weight for r in train_rows], dtype=torch.float32) * class_weights[labels]
    # Per-row loss mix: gold rows (1 - a) * CE(gold) + a * CE(teacher); transfer rows the teacher's alone.
    hard_mix = torch.full((len(train_rows),), 1 - config.soft_weight if soft is not None else 1.0)
    soft_mix = torch.full((len(train_rows),), config.soft_weight if soft is not None else 0.0)
    if transfer_soft is not None and soft is not None:
        token_ids += [e.ids for e in tokenizer.encode_batch(transfer)]
        teacher_labels = transfer_soft.argmax(dim=1)
        labels = torch.cat([labels, teacher_labels])
        weights = torch.cat([weights, class_weights[teacher_labels]])
        soft = torch.cat([soft, transfer_soft])
        hard_mix = torch.cat([hard_mix, torch.zeros(len(transfer))])
        soft_mix = torch.cat([soft_mix, torch.ones(len(transfer))])

    cuda = device.type == "cuda"
    # bf16 on a GPU, except through the int8 simulation: its rounding to the int8 grid needs float32's precision.
    bf16 = cuda and not config.quantization_aware
    optimizer = torch.optim.AdamW(_parameter_groups(model, config.weight_decay), lr=config.learning_rate,
                                  fused=cuda)
    steps_per_epoch = math.ceil(len(token_ids) / config.batch_size)
    if config.epoch_rows:
        steps_per_epoch = min(steps_per_epoch, math.ceil(config.epoch_rows / config.batch_size))
    total_steps = steps_per_epoch * config.epochs
    warmup = max(1, int(total_steps * config.warmup_fraction))
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer,
        lambda step: min((step + 1) / warmup, max(0.0, (total_steps - step) / max(1, total_steps - warmup))),
    )
    rng = random.Random(config.seed)

    history: list[dict[str, Any]] = []
    best_score, best_state, stopped = -1.0, None, False
    recalibrate()  # the activation ranges of the starting weights; each epoch's end re-measures them
    for epoch in range(1, config.epochs + 1):
        model.train()
        order = list(range(len(token_ids)))
        rng.shuffle(order)
        order = order[: steps_per_epoch * config.batch_size]
        running = torch.zeros((), device=device)
        steps = 0
        epoch_started = time.time()
        bar = tqdm(range(0, len(order), config.batch_size), desc=f"epoch {epoch}/{config.epochs}", unit="batch",
                   file=sys.stderr, disable=not show_progress)
        for start in bar:
            if deadline and time.time() > deadline:
                stopped = True
                break
            rows = order[start : start + config.batch_size]
            batch = pad_to_bucket([token_ids[i] for i in rows], max(len(token_ids[i]) for i in rows))
            ids = torch.from_numpy(batch.input_ids).to(device, non_blocking=True)
            mask = torch.from_numpy(batch.attention_mask).to(device, non_blocking=True)
            index = torch.tensor(rows)
            gold, weight = labels[index].to(device), weights[index].to(device)
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
                logits = model(ids, mask)
            log_probs = torch.log_softmax(logits.float(), dim=-1)
            losses = torch.nn.functional.nll_loss(log_probs, gold, reduction="none")
            if soft is not None:
                soft_losses = -(soft[index].to(device) * log_probs).sum(dim=-1)
                losses = hard_mix[index].to(device) * losses + soft_mix[index].to(device) * soft_losses
            if reference is not None:
                with torch.no_grad(), torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
                    target = torch.softmax(reference(ids, mask).float() / config.self_distillation_temperature,
                                           dim=-1)
                losses = ((1 - config.self_distillation) * losses
                          - config.self_distillation * (target * log_probs).sum(dim=-1))
            loss = (losses * weight).sum() / weight.sum()
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad], 1.0)
            optimizer.step()
            scheduler.step()
            running += loss.detach()  # summed on the device: no host sync per step
            steps += 1
            if steps % 100 == 0:
                bar.set_postfix(loss=f"{running.item() / steps:.4f}")
        train_seconds = time.time() - epoch_started
        recalibrate()  # scored as calibrate would quantize these weights
        reports, _ = _score_sets(model, tokenizer, dev, device, show_progress)
        score = selection_score_v2(reports)
        history.append({"epoch": epoch, "steps": steps, "train_loss": round(running.item() / max(1, steps), 4),
                        "train_seconds": round(train_seconds, 1), "selection_score": score,
                        **{name: {k: reports[name][k] for k in HEADLINE} for name in DEV_SETS}})
        print(json.dumps(history[-1]), flush=True)
        if score > best_score:
            best_score = score
            best_state = {k: v.detach().to("cpu", copy=True) for k, v in weights_of.state_dict().items()}
        if stopped:
            break

    assert best_state is not None
    weights_of.load_state_dict(best_state)
    recalibrate()
    best_epoch = max(history, key=lambda h: h["selection_score"])["epoch"]
    dev_reports, dev_probabilities = _score_sets(model, tokenizer, dev, device, show_progress)
    test_reports, test_probabilities = _score_sets(model, tokenizer, test, device, show_progress)

    if config.encoder == "minilm":  # an MPNet teacher's worth is its probabilities; its 438 MB are not kept
        write_checkpoint(output_dir, best_state, encoder_config_dict, base_model_dir)
    else:
        output_dir.mkdir(parents=True, exist_ok=True)
    # Dev and test probabilities let the ensemble be scored without a GPU (scripts/ensemble_v2.py).
    np.savez(output_dir / "probabilities.npz", **{**dev_probabilities, **test_probabilities})  # type: ignore[arg-type]
    record: dict[str, Any] = {
        "config": asdict(config),
        "device": torch.cuda.get_device_name(device) if cuda else "cpu",
        "torch": torch.__version__,
        "mixture_stats": mixture.stats,
        "train_rows": len(train_rows),
        "train_keys_digest": keys_digest(mixture.train[: len(train_rows)]),
        "parameters_left_at_init": left_at_init,
        "history": history,
        "best_epoch": best_epoch,
        "stopped_by_deadline": stopped,
        "dev": dev_reports,
        "selection_score": selection_score_v2(dev_reports),
        "vader_test_fp32": test_reports["vader_test"],
        # With --quantization-aware the dev and test scores above (and any written probabilities) are those of
        # the simulated INT8 network, not of its float weights.
        "scored_as": "simulated-int8" if config.quantization_aware else "fp32",
    }
    if write_train_probabilities:
        probabilities = predict(model, tokenizer, [r.text for r in train_rows], device, desc="score train",
                                show_progress=show_progress)
        np.save(output_dir / "train_probabilities.npy", probabilities.astype(np.float16))
        if transfer:
            transfer_probabilities = predict(model, tokenizer, transfer, device, desc="score transfer set",
                                             show_progress=show_progress)
            np.save(output_dir / "augmented_probabilities.npy", transfer_probabilities.astype(np.float16))
            record["augmented_rows"] = len(transfer)
            record["augmented_digest"] = texts_digest(transfer)
    record["seconds"] = round(time.time() - started, 1)
    (output_dir / "training.json").write_text(json.dumps(record, indent=2))
    return record


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    defaults = V2Config()
    add_run_arguments(parser)
    parser.add_argument("--write-train-probabilities", action="store_true",
                        help="also save the kept model's probabilities on the training rows (a teacher)")
    parser.add_argument("--deadline", type=float, default=0.0,
                        help="unix time after which training stops at the next step (a GPU-call guard)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars on stderr")
    add_config_arguments(parser, defaults)
    args = parser.parse_args(argv)
    config = config_from_arguments(V2Config, args)
    record = train_v2(
        config,
        base_model_dir=args.base_model or default_base_model_dir(),
        corpora_dir=args.corpora_dir,
        output_dir=args.output,
        device_name=args.device,
        write_train_probabilities=args.write_train_probabilities,
        deadline=args.deadline,
        show_progress=not args.no_progress,
    )
    print(json.dumps({"best_epoch": record["best_epoch"], "selection_score": record["selection_score"],
                      "stopped_by_deadline": record["stopped_by_deadline"], "seconds": record["seconds"],
                      **{name: record["dev"][name]["macro_f1"] for name in DEV_SETS}}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
