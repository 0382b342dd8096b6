"""The vqa-jsonl task (VQA-RAD / SLAKE / PathVQA layout): reading, typing, candidates from training only, splits and
metrics; and the task registry."""

import json
from pathlib import Path

import pytest
from PIL import Image

from surgvqa.core.config import EvaluateConfig, load_config
from surgvqa.data.records import Record
from surgvqa.evaluation.scoring import PredictionRow
from surgvqa.stages.evaluate import evaluate_predictions
from surgvqa.tasks import TASK_NAMES, get_task
from surgvqa.tasks.vqa_jsonl import answer_type_of, open_recall, vqa_metrics

ROWS = [
    {"image": "a.png", "question": "Is there a fracture?", "answer": "Yes", "answer_type": "CLOSED", "split": "train"},
    {"image": "a.png", "question": "Which organ is shown?", "answer": "liver", "answer_type": "CLOSED",
     "split": "train"},
    {"image": "b.png", "question": "Where is the lesion?", "answer": "left lower lobe", "answer_type": "OPEN",
     "split": "train"},
    {"image": "c.png", "question": "Which organ is abnormal?", "answer": "kidney", "answer_type": "CLOSED",
     "split": "test"},
    {"image": "c.png", "question": "Is the lesion in the left or the right lung?", "answer": "left",
     "answer_type": "CLOSED", "split": "test"},
    {"image": "c.png", "question": "What modality is used?", "answer": "ct scan", "answer_type": "OPEN",
     "split": "test"},
]


@pytest.fixture()
def jsonl_source(tmp_path) -> Path:
    for name, colour in (("a", (200, 0, 0)), ("b", (0, 200, 0)), ("c", (0, 0, 200))):
        Image.new("RGB", (28, 28), colour).save(tmp_path / f"{name}.png")
    path = tmp_path / "vqa.jsonl"
    path.write_text("".join(json.dumps(row) + "\n" for row in ROWS))
    return path


def _records(config, source) -> list[Record]:
    task = get_task("vqa-jsonl")
    records = []
    for index, raw in enumerate(task.read_rows(config, str(source))):
        assert raw.problem is None
        records.append(Record(id=f"r{index}", img_id=raw.img_id, image=str(raw.image_file), question=raw.question,
                              answer=raw.answer, split=raw.split, task=task.name, meta=task.record_meta(raw)))
    return records


def test_reading_typing_and_candidates_from_training_only(tmp_path, jsonl_source):
    config = load_config(None, ["task=vqa-jsonl", f"data.source={jsonl_source}", f"output_dir={tmp_path}"])
    task = get_task("vqa-jsonl")
    records = _records(config, jsonl_source)
    assert [r.meta["answer_type"] for r in records] == ["closed", "closed", "open", "closed", "closed", "open"]
    outcome = task.assign_splits(records, {r.img_id: "" for r in records}, config)
    assert [r.split for r in outcome.records if r.img_id == "c"] == ["test"] * 3  # the shipped test split
    vocabulary = task.build_vocabulary([r for r in outcome.records if r.split == "train"])
    assert vocabulary == {"closed": ["liver", "yes"]}  # "kidney" is a test answer: never a candidate
    for record in outcome.records:
        task.type_record(record, vocabulary)
    typed = {r.question: (r.question_type, r.candidates) for r in outcome.records}
    assert typed["Is there a fracture?"] == ("yes_no", ["yes", "no"])
    assert typed["Which organ is abnormal?"] == ("mcq", ["liver", "yes"])
    assert typed["Is the lesion in the left or the right lung?"] == ("mcq", ["left", "right lung"])
    assert typed["What modality is used?"] == ("open_ended", [])
    assert task.prediction_method(outcome.records[3], "constrained", "constrained") == "constrained"
    assert task.prediction_method(outcome.records[5], "constrained", "constrained") == "generate"


def test_without_split_column_rows_are_split_by_image(tmp_path, jsonl_source):
    rows = [{k: v for k, v in row.items() if k != "split"} for row in ROWS]
    jsonl_source.write_text("".join(json.dumps(row) + "\n" for row in rows))
    config = load_config(None, ["task=vqa-jsonl", f"data.source={jsonl_source}", f"output_dir={tmp_path}"])
    records = _records(config, jsonl_source)
    outcome = get_task("vqa-jsonl").assign_splits(records, {r.img_id: "" for r in records}, config)
    by_image = {}
    for record in outcome.records:
        by_image.setdefault(record.img_id, set()).add(record.split)
    assert all(len(splits) == 1 for splits in by_image.values()) and "official_splits" not in outcome.summary


def test_answer_type_and_open_recall():
    assert [answer_type_of(v) for v in ("CLOSED", "Open", "closed-ended", None, "other")] == \
        ["closed", "open", "closed", None, None]
    assert open_recall("left lower lobe", "the lesion is in the left lobe") == pytest.approx(2 / 3)
    assert open_recall("ct", "") == 0.0


def _row(i, question_type, reference, prediction, answer_type):
    return PredictionRow(id=f"r{i}", question_type=question_type, reference=reference, prediction=prediction,
                         text=prediction, task="vqa-jsonl", meta={"answer_type": answer_type})


def test_vqa_metrics_closed_accuracy_and_open_recall():
    rows = [_row(0, "yes_no", "yes", "yes", "closed"), _row(1, "mcq", "liver", "kidney", "closed"),
            _row(2, "open_ended", "left lower lobe", "left lobe", "open"), _row(3, "open_ended", "ct", "ct", None)]
    result = vqa_metrics(rows, EvaluateConfig(bootstrap_samples=100))
    assert result["closed"]["value"] == 0.5 and result["closed"]["n"] == 2
    assert result["open"]["value"] == pytest.approx((2 / 3 + 1) / 2) and result["open"]["n"] == 2
    metrics = evaluate_predictions(rows, EvaluateConfig(bootstrap_samples=100), with_meteor=False)
    assert metrics["task"] == "vqa-jsonl" and metrics["task_tables"][0]["rows"][0][0] == "closed"


def test_registry_and_default_task():
    assert TASK_NAMES == ("kvasir-vqa", "kvasir-vqa-x1", "vqa-jsonl")
    assert get_task().name == "kvasir-vqa" == load_config(None).task
    with pytest.raises(ValueError, match="unknown task"):
        get_task("vqa-rad")
    record = Record(id="r", img_id="i", image="i.png", question="Is there text?", answer="No")
    assert record.task == "kvasir-vqa" and get_task(record.task).training_target(record, load_config(None).prompt) \
        == "no"
