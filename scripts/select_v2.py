"""Choose the v2 run and the fast-student run on dev figures, check FP16 storage, split them for the trip back.

Candidates: every finished MiniLM run under RUNS (MPNet teachers only teach: their dev figures go into the
report). Six-layer full-width runs (teachers and distilled students alike) compete for ``minilm-sentiment``
v2; each student shape (``fast-l2``, ``fast-l2-ffn768``, ...) is a group of its own, since a deeper student
would always win on dev figures and the shape is chosen on speed afterwards (docs/model.md). Each group's run with
the best ``selection_score`` (:func:`mixture.selection_score_v2`, dev sets only) is chosen; the
VADER test figures are copied into the report for the chosen runs only, after choosing.

For each chosen run: its dev figures with FP16-rounded weights (the form it travels in) next to
FP32, then ``OUT/<group>/checkpoint.fp16.partN`` (<16 MiB each; the device tool returns at most 8
files, 64 MiB together, so a frozen word-embedding table equal to the carried base's is left out and
the encoder config and training record go into the report). ``OUT/train_v2_report.json`` holds
every run's dev figures; ``scripts/assemble_v2_checkpoint.py`` rebuilds a checkpoint folder.

Usage: python scripts/select_v2.py RUNS_DIR OUT_DIR [--corpora-dir DIR]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from stream_sentiment.batching.normalization import get_normalizer
from stream_sentiment.modeling.metrics import classification_report
from stream_sentiment.modeling.minilm import EncoderConfig, SentimentClassifier
from stream_sentiment.modeling.mixture import DEV_SETS, load_mixture, selection_score_v2
from stream_sentiment.modeling.train import load_tokenizer, predict

CHUNK = 15 * 1024 * 1024
WORDS = "embeddings.word_embeddings.weight"
HEADLINE = ("accuracy", "macro_f1", "polar_accuracy")


def _dev_figures(run: Path, record: dict[str, Any], weights: dict[str, torch.Tensor], device: torch.device,
                 dev: dict[str, tuple[list[str], list[str]]]) -> dict[str, Any]:
    config = EncoderConfig.from_json(run / "encoder_config.json")
    model = SentimentClassifier(config, fused_attention=device.type == "cuda").to(device)
    model.load_state_dict(weights)
    tokenizer = load_tokenizer(run, record["config"]["max_length"])
    reports = {name: classification_report(gold, predict(model, tokenizer, texts, device, show_progress=False))
               for name, (texts, gold) in dev.items()}
    return {"selection_score": selection_score_v2(reports),
            **{name: {k: reports[name][k] for k in HEADLINE} for name in DEV_SETS}}


def _ship(run: Path, record: dict[str, Any], destination: Path, device: torch.device,
          dev: dict[str, tuple[list[str], list[str]]], base_words: torch.Tensor) -> dict[str, Any]:
    state = load_file(str(run / "checkpoint.safetensors"))
    rounded = {k: v.half().float() if v.is_floating_point() else v for k, v in state.items()}
    storage_check = {"fp32": _dev_figures(run, record, state, device, dev),
                     "fp16_rounded": _dev_figures(run, record, rounded, device, dev)}
    # A frozen word-embedding table is the carried base's (FP16 values): left out of the trip back,
    # put back by scripts/assemble_v2_checkpoint.py from the same carried file.
    left_out = []
    if record["config"].get("freeze_word_embeddings") and torch.equal(state[WORDS], base_words.float()):
        left_out.append(WORDS)
    destination.mkdir(parents=True, exist_ok=True)
    fp16 = destination.parent / f".{destination.name}.fp16.safetensors"
    save_file({k: (v.half() if v.is_floating_point() else v).contiguous() for k, v in state.items()
               if k not in left_out}, str(fp16))
    blob = fp16.read_bytes()
    fp16.unlink()
    for i in range(0, len(blob), CHUNK):
        (destination / f"checkpoint.fp16.part{i // CHUNK}").write_bytes(blob[i : i + CHUNK])
    return {"run": run.name, "parts": -(-len(blob) // CHUNK), "bytes": len(blob), "left_out_equal_to_base": left_out,
            "encoder_config": json.loads((run / "encoder_config.json").read_text()),
            "storage_check_dev": storage_check, "training": record}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("runs", type=Path)
    parser.add_argument("out", type=Path)
    parser.add_argument("--corpora-dir", type=Path, default=Path(".carry/train16/corpora"))
    parser.add_argument("--base-model", type=Path, default=Path(".carry/train16/base"))
    args = parser.parse_args(argv)
    finished = {run.name: json.loads((run / "training.json").read_text()) for run in sorted(args.runs.iterdir())
                if (run / "training.json").exists()}
    # Teachers of another architecture (the MPNet ones) only teach: they never compete for a shipped engine.
    records = {n: r for n, r in finished.items() if r["config"].get("encoder", "minilm") == "minilm"}
    other_teachers = {n: r for n, r in finished.items() if n not in records}
    if not records:
        raise SystemExit(f"no finished MiniLM run under {args.runs}")
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    some = next(iter(records.values()))["config"]
    mixture = load_mixture(args.corpora_dir, review_dev_fraction=some["review_dev_fraction"])
    normalize = get_normalizer(some["normalization"])
    cap = some["max_eval_rows"] or None
    dev = {name: ([normalize(r.text) for r in rows[:cap]], [r.label for r in rows[:cap]])
           for name, rows in mixture.dev.items()}

    groups: dict[str, list[str]] = {}
    for name, record in records.items():
        layers, ffn = record["config"]["layers"], record["config"].get("intermediate_size", 0)
        group = "v2" if layers == 6 and not ffn else f"fast-l{layers}" + (f"-ffn{ffn}" if ffn else "")
        groups.setdefault(group, []).append(name)
    chosen = {group: max(names, key=lambda n: records[n]["selection_score"]) for group, names in groups.items()}
    base_words = load_file(str(args.base_model / "model.safetensors"))[WORDS]
    shipped = {group: _ship(args.runs / name, records[name], args.out / group, device, dev, base_words)
               for group, name in chosen.items()}
    report = {
        "chosen_by": "selection_score_v2 on dev sets (tweet_validation macro-F1, review_dev macro-F1, nyt_dev polar "
                     "accuracy); the VADER test tweets took no part",
        "chosen": chosen,
        "shipped": shipped,
        "runs": {name: {"config": r["config"], "best_epoch": r["best_epoch"],
                        "stopped_by_deadline": r["stopped_by_deadline"], "seconds": r["seconds"],
                        "selection_score": r["selection_score"], "history": r["history"],
                        "dev": {s: {k: r["dev"][s][k] for k in (*HEADLINE, "per_class")} for s in DEV_SETS}}
                 for name, r in records.items()},
        "vader_test_of_chosen_runs_record_only": {group: records[name]["vader_test_fp32"]
                                                  for group, name in chosen.items()},
        "mixture_stats": next(iter(records.values()))["mixture_stats"],
    }
    report["other_teachers"] = {
        name: {"encoder": r["config"]["encoder"], "config": r["config"], "best_epoch": r["best_epoch"],
               "selection_score": r["selection_score"], "seconds": r["seconds"],
               "stopped_by_deadline": r["stopped_by_deadline"],
               "dev": {s: {k: r["dev"][s][k] for k in HEADLINE} for s in DEV_SETS},
               "vader_test_record_only": {k: r["vader_test_fp32"][k] for k in HEADLINE}}
        for name, r in other_teachers.items()}
    soft = args.runs / "soft.json"
    if soft.exists():
        report["teacher_ensemble"] = json.loads(soft.read_text())
    (args.out / "train_v2_report.json").write_text(json.dumps(report, indent=2))
    print(json.dumps({"chosen": chosen,
                      "scores": {n: r["selection_score"] for n, r in records.items()},
                      "storage_check": {g: s["storage_check_dev"] for g, s in shipped.items()},
                      "vader_chosen": {g: {k: v[k] for k in HEADLINE}
                                       for g, v in report["vader_test_of_chosen_runs_record_only"].items()}}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
