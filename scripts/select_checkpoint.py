"""Pick the run with the best selection score, check FP16 storage changes nothing, split it.

The selection score combines validation and out-of-domain dev metrics (see train.selection_score).

Usage: python scripts/select_checkpoint.py RUNS_DIR OUT_DIR
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from stream_sentiment.batching.normalization import get_normalizer
from stream_sentiment.modeling.corpora import read_vader_tweets
from stream_sentiment.modeling.metrics import classification_report
from stream_sentiment.modeling.minilm import EncoderConfig, SentimentClassifier
from stream_sentiment.modeling.train import load_tokenizer, predict

CHUNK = 15 * 1024 * 1024


def main(runs: Path, out: Path) -> None:
    records = {run.name: json.loads((run / "training.json").read_text()) for run in sorted(runs.iterdir())
               if (run / "training.json").exists()}
    chosen = max(records, key=lambda name: records[name]["selection_score"])
    run = runs / chosen
    state = load_file(str(run / "checkpoint.safetensors"))
    config = EncoderConfig.from_json(run / "encoder_config.json")
    tokenizer = load_tokenizer(run, records[chosen]["config"]["max_length"])
    tweets = read_vader_tweets(Path(".carry/corpora"))
    normalize = get_normalizer(records[chosen]["config"]["normalization"])
    texts, gold = [normalize(t.text) for t in tweets], [t.label for t in tweets]
    checks = {}
    for name, weights in (("fp32", state), ("fp16_rounded", {k: v.half().float() for k, v in state.items()})):
        model = SentimentClassifier(config, fused_attention=False).cuda()
        model.load_state_dict(weights)
        report = classification_report(gold, predict(model, tokenizer, texts, torch.device("cuda")))
        checks[name] = {k: report[k] for k in ("accuracy", "macro_f1", "polar_accuracy")}
    fp16_path = Path("/tmp/checkpoint.fp16.safetensors")
    save_file({k: v.half().contiguous() for k, v in state.items()}, str(fp16_path))
    blob = fp16_path.read_bytes()
    for i in range(0, len(blob), CHUNK):
        (out / f"checkpoint.fp16.part{i // CHUNK}").write_bytes(blob[i : i + CHUNK])
    summary = {"chosen": chosen, "storage_check_on_vader": checks, "runs": records}
    (out / "train_runs.json").write_text(json.dumps(summary, indent=2))
    print(json.dumps({"chosen": chosen, "checks": checks,
                      "score": {n: r["selection_score"] for n, r in records.items()},
                      "validation": {n: r["validation"]["macro_f1"] for n, r in records.items()},
                      "ood_polar": {n: r["out_of_domain_dev"]["polar_accuracy"] for n, r in records.items()},
                      "vader": {n: r["vader_test_fp32"]["polar_accuracy"] for n, r in records.items()}}))


if __name__ == "__main__":
    main(Path(sys.argv[1]), Path(sys.argv[2]))
