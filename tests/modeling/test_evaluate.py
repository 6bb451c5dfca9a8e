from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from stream_sentiment.cli import main
from stream_sentiment.modeling.evaluate import DataFormatError, read_labelled_file

POSTS = [
    ("I love my new phone, it is amazing!", "positive"),
    ("Best concert of my life, thank you all <3", "positive"),
    ("This airline lost my bag again. Never flying with them.", "negative"),
    ("I hate waiting on hold for two hours, terrible service", "negative"),
    ("The train leaves at 8:15 from platform 2.", "neutral"),
    ("Quarterly results will be published on Thursday.", "neutral"),
]


@pytest.fixture
def labelled_jsonl(tmp_path: Path) -> Path:
    path = tmp_path / "tiny.jsonl"
    path.write_text("".join(json.dumps({"text": t, "label": y}) + "\n" for t, y in POSTS))
    return path


def test_evaluate_prints_a_json_report_on_its_last_line(labelled_jsonl, engine_copy, capsys):
    assert main(["evaluate", "--engine", str(engine_copy), "--data", str(labelled_jsonl), "--no-progress"]) == 0
    report = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert report["n"] == len(POSTS)
    assert report["engine_version"] == "v1"
    assert report["precision"] == "int8"
    for key in ("accuracy", "macro_f1", "polar_accuracy"):
        assert 0.0 <= report[key] <= 1.0
    # Four unambiguous polar posts: the model must get their polarity right.
    assert report["polar_accuracy"] == 1.0
    assert report["accuracy"] >= 0.83  # at most one neutral/polar confusion
    assert set(report["per_class"]) == {"negative", "neutral", "positive"}
    assert {"precision", "recall"} <= set(report["per_class"]["negative"])
    assert sum(map(sum, report["confusion_matrix"]["matrix"])) == len(POSTS)


def test_evaluate_reads_the_vader_ground_truth_format(tmp_path: Path):
    path = tmp_path / "tweets_GroundTruth.txt"
    path.write_text("1\t2.7\tSo lucky to have you\r\n2\t-0.2\tmeh\r\n3\t-1.9\tDie die die\r\n")
    texts, labels = read_labelled_file(path)
    assert texts == ["So lucky to have you", "meh", "Die die die"]
    assert labels == ["positive", "neutral", "negative"]


@pytest.mark.parametrize(
    ("line", "reason"),
    [("{not json", "not JSON"), ('{"label": "negative"}', "'text'"), ('{"text": "x", "label": "angry"}', "'label'")],
)
def test_bad_lines_are_reported_with_their_line_number(tmp_path: Path, line: str, reason: str):
    path = tmp_path / "bad.jsonl"
    path.write_text(json.dumps({"text": "fine", "label": "neutral"}) + "\n" + line + "\n")
    with pytest.raises(DataFormatError, match=rf"bad.jsonl:2: .*{reason}"):
        read_labelled_file(path)


def test_evaluate_cli_refuses_a_tampered_engine(labelled_jsonl, engine_copy, capsys):
    (engine_copy / "model.int8.onnx").write_bytes(b"not a model")
    assert main(["evaluate", "--engine", str(engine_copy), "--data", str(labelled_jsonl)]) == 2
    assert "checksum mismatch for model.int8.onnx" in capsys.readouterr().err


def test_cpu_path_does_not_import_torch(labelled_jsonl, engine_copy):
    code = (
        "import sys; from stream_sentiment.cli import main; "
        f"main(['evaluate', '--engine', {str(engine_copy)!r}, '--data', {str(labelled_jsonl)!r}, '--no-progress']); "
        "assert 'torch' not in sys.modules, 'torch was imported'"
    )
    subprocess.run([sys.executable, "-c", code], check=True, capture_output=True)
