"""The text-only nearest-question baseline."""

import json

from surgvqa.data.records import Record, write_records
from surgvqa.inference.nearest_question import nearest_question_predictions, nearest_training_rows


def _record(i, question, answer, split, task="kvasir-vqa-x1"):
    return Record(id=f"{split}{i}", img_id=f"img{i}", image=f"images/img{i}.png", question=question, answer=answer,
                  split=split, task=task, meta={"complexity": 1})


def test_the_most_similar_training_question_answers():
    train = [_record(0, "How many polyps can be seen?", "Two polyps are visible.", "train"),
             _record(1, "Is there any text on the image?", "No text is visible.", "train"),
             _record(2, "How many instruments are in view?", "One instrument is visible.", "train")]
    questions = ["How many polyps are visible?", "Is there text?", "instruments in view, how many?", "zebra"]
    assert nearest_training_rows(train, questions) == [0, 1, 2, 0]  # no shared word: the first row


def test_predictions_file_is_scorable(tmp_path):
    write_records(tmp_path / "train.jsonl", [_record(0, "Is there text?", "No text is visible.", "train")])
    write_records(tmp_path / "test.jsonl", [_record(1, "Is there any text?", "There is text.", "test")])
    out = nearest_question_predictions(tmp_path, "test", tmp_path / "nearest.jsonl")
    (row,) = [json.loads(line) for line in out.read_text().splitlines()]
    assert row["prediction"] == "No text is visible." and row["mode"] == "nearest-question"
    assert row["task"] == "kvasir-vqa-x1" and row["meta"] == {"complexity": 1} and row["id"] == "test1"
