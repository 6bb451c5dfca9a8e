"""Average teacher runs' training-row probabilities into the students' soft labels; score the ensemble on dev.

Each teacher (``train_v2 --write-train-probabilities``) saved its probabilities on the training rows
and its dev probabilities. Teachers must cover the same rows (the keys' digest in their
``training.json``); a run without ``training.json`` (failed) is skipped and named in the output.
The ensemble is scored on the dev sets only (never on the test tweets). Torch-free (numpy).

Usage: python scripts/ensemble_v2.py --corpora-dir DIR --output RUNS/soft.npy RUNS/teacher-*
Writes ``soft.npy`` (float32, [rows, 3]) and ``soft.json`` (rows, keys digest, teachers, dev figures).
Teachers run with ``--augment-copies`` also scored a transfer set (perturbed training rows): their mean
goes to ``soft_augmented.npy``, its texts' digest into ``soft.json`` (the students check it).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from stream_sentiment.labels import LABELS
from stream_sentiment.modeling.metrics import classification_report
from stream_sentiment.modeling.mixture import DEV_SETS, load_mixture, selection_score_v2


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("runs", type=Path, nargs="+", help="teacher run folders")
    parser.add_argument("--corpora-dir", type=Path, required=True)
    parser.add_argument("--output", type=Path, required=True, help="soft.npy to write (soft.json beside it)")
    args = parser.parse_args(argv)
    teachers = [run for run in args.runs if (run / "training.json").exists()]
    skipped = [run.name for run in args.runs if run not in teachers]
    if not teachers:
        raise SystemExit(f"no finished teacher among {[str(r) for r in args.runs]}")
    records = {run.name: json.loads((run / "training.json").read_text()) for run in teachers}
    digests = {(r["train_rows"], r["train_keys_digest"]) for r in records.values()}
    if len(digests) != 1:
        raise SystemExit(f"teachers were trained on different rows: {digests}")
    (rows, digest), = digests
    soft = np.mean([np.load(run / "train_probabilities.npy").astype(np.float32) for run in teachers], axis=0)
    args.output.parent.mkdir(parents=True, exist_ok=True)
    np.save(args.output, soft.astype(np.float32))
    transfer_digests = {r.get("augmented_digest") for r in records.values()}
    if len(transfer_digests) != 1:
        raise SystemExit(f"teachers scored different transfer sets: {transfer_digests}")
    (transfer_digest,) = transfer_digests
    if transfer_digest:
        transfer = np.mean([np.load(run / "augmented_probabilities.npy").astype(np.float32) for run in teachers],
                           axis=0)
        np.save(args.output.with_name(args.output.stem + "_augmented.npy"), transfer.astype(np.float32))

    config = next(iter(records.values()))["config"]
    mixture = load_mixture(args.corpora_dir, review_dev_fraction=config["review_dev_fraction"])
    cap = config["max_eval_rows"] or None
    reports = {}
    for name in DEV_SETS:
        probabilities = np.mean([np.load(run / "probabilities.npz")[name] for run in teachers], axis=0)
        reports[name] = classification_report([r.label for r in mixture.dev[name][:cap]], probabilities)
    summary = {
        "rows": rows,
        "keys_digest": digest,
        "augmented_digest": transfer_digest,
        "augmented_rows": next(iter(records.values())).get("augmented_rows", 0),
        "teachers": [run.name for run in teachers],
        "skipped_unfinished": skipped,
        "teacher_selection_scores": {name: r["selection_score"] for name, r in records.items()},
        "ensemble_dev": {name: {k: reports[name][k] for k in ("accuracy", "macro_f1", "polar_accuracy")}
                         for name in DEV_SETS},
        "ensemble_selection_score": selection_score_v2(reports),
        # How far the soft labels move from the hard ones: the share of rows whose argmax is the gold label.
        "train_agreement_with_gold": round(float(
            (soft.argmax(1) == np.array([LABELS.index(r.label) for r in mixture.train[:rows]])).mean()), 4),
    }
    args.output.with_suffix(".json").write_text(json.dumps(summary, indent=2))
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
