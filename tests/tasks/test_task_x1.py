"""The kvasir-vqa-x1 task on synthetic data: both layouts with the image join, rejects, splits, leaks, atomic facts,
metrics and the synthetic generator."""

import json
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from surgvqa.cli import app
from surgvqa.core.config import EvaluateConfig, load_config
from surgvqa.data.records import Record, read_records
from surgvqa.data.synthetic_x1 import make_synthetic_x1
from surgvqa.evaluation.scoring import PredictionRow
from surgvqa.stages.evaluate import evaluate_predictions
from surgvqa.stages.prepare import prepare
from surgvqa.tasks import get_task
from surgvqa.tasks.base import official_split_outcome
from surgvqa.tasks.kvasir_vqa_x1.atomic_facts import check_facts, facts_of
from surgvqa.tasks.kvasir_vqa_x1.metrics import x1_metrics
from surgvqa.tasks.kvasir_vqa_x1.text import normalise_text

IMAGES = 16


@pytest.fixture(scope="module")
def x1_dir(tmp_path_factory) -> Path:
    return make_synthetic_x1(tmp_path_factory.mktemp("x1"), images=IMAGES, seed=1, image_size=56)


def _config(tmp_path: Path, source, *extra: str):
    return load_config(None, ["task=kvasir-vqa-x1", f"output_dir={tmp_path / 'runs'}", f"data.source={source}",
                              f"cache_dir={tmp_path / 'cache'}", *extra])


def _read(config) -> list:
    task = get_task(config.task)
    return list(task.read_rows(config, task.resolve_source(config)))


# ------------------------------------------------------------------------------------------- loading and join


@pytest.mark.parametrize("layout", ["parquet", "save_to_disk"])
def test_both_layouts_load_with_the_image_join(tmp_path, x1_dir, layout):
    rows = _read(_config(tmp_path, x1_dir / layout, f"data.images={x1_dir / 'kvasir-vqa'}"))
    assert rows and all(raw.problem is None and raw.image_bytes for raw in rows)
    assert {raw.split for raw in rows} == {"train", "test"}
    assert all({"complexity", "original", "question_class"} <= raw.extra.keys() for raw in rows)
    # The joined image is the Kvasir-VQA row's image for the same img_id, and Kvasir's source comes with it.
    assert all(raw.source for raw in rows)


def test_layouts_hold_the_same_rows(tmp_path, x1_dir):
    images = f"data.images={x1_dir / 'kvasir-vqa'}"
    parquet = _read(_config(tmp_path, x1_dir / "parquet", images))
    on_disk = _read(_config(tmp_path, x1_dir / "save_to_disk", images))
    key = lambda raw: (raw.split, raw.img_id, raw.question, raw.answer)
    assert sorted(map(key, parquet)) == sorted(map(key, on_disk))


def test_folder_of_img_id_jpgs_is_joined(tmp_path, x1_dir):
    from PIL import Image

    folder = tmp_path / "images"
    folder.mkdir()
    rows = _read(_config(tmp_path, x1_dir / "parquet", f"data.images={x1_dir / 'kvasir-vqa'}"))
    for img_id in {raw.img_id for raw in rows}:
        Image.new("RGB", (28, 28), (200, 100, 100)).save(folder / f"{img_id}.jpg")
    joined = _read(_config(tmp_path, x1_dir / "parquet", f"data.images={folder}"))
    assert all(raw.problem is None and raw.image_file.parent == folder for raw in joined)


def test_rows_whose_image_is_missing_are_rejected_with_their_reason(tmp_path, x1_dir):
    folder = tmp_path / "images"
    folder.mkdir()
    rows = _read(_config(tmp_path, x1_dir / "parquet", f"data.images={folder}"))
    assert rows and all(raw.problem == "missing_image" for raw in rows)
    assert f"img_id {rows[0].img_id!r} has no image in data.images" in rows[0].detail
    unset = _read(_config(tmp_path, x1_dir / "parquet"))
    assert "data.images" in unset[0].detail and "is not set" in unset[0].detail


def test_an_image_in_the_row_is_used_without_a_join(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq
    from PIL import Image

    Image.new("RGB", (28, 28), (10, 200, 10)).save(tmp_path / "a.png")
    rows = [{"img_id": "a", "image": "a.png", "question": "Is there text?", "answer": "No text is visible.",
             "complexity": 1, "original": json.dumps([{"q": "Is there text?", "a": "no"}]),
             "question_class": ["text"]}]
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "train-00000-of-00001.parquet")
    (raw,) = _read(_config(tmp_path, tmp_path / "train-00000-of-00001.parquet"))
    assert raw.problem is None and raw.image_file == (tmp_path / "a.png").resolve() and raw.split == "train"


# ------------------------------------------------------------------------------------------------------ splits


def _records(spec: list[tuple[str, str | None]]) -> list[Record]:
    return [Record(id=f"r{i}", img_id=img, image="", question="q", answer="a", split=split)
            for i, (img, split) in enumerate(spec)]


def test_official_test_kept_validation_by_image_and_leaks_counted(tmp_path):
    config = _config(tmp_path, "synthetic", "data.split={train: 0.5, val: 0.5, test: 0.0, seed: 1}")
    spec = [(f"tr{i}", "train") for i in range(10) for _ in range(3)] + \
        [(f"te{i}", "test") for i in range(4)] + [("tr0", "test"), ("tr1", "test"), ("tr1", "test")]
    records = _records(spec)
    outcome = official_split_outcome(records, {}, config, drop_leaking_test_rows=False)
    test_rows = [r for r in outcome.records if r.split == "test"]
    assert [r.img_id for r in test_rows] == ["te0", "te1", "te2", "te3", "tr0", "tr1", "tr1"]
    carved = {r.img_id: r.split for r in outcome.records if r.img_id.startswith("tr") and r.split != "test"}
    assert set(carved.values()) == {"train", "val"}
    for img_id in carved:  # every image's training rows stay together
        assert len({r.split for r in outcome.records if r.img_id == img_id and r.split != "test"}) == 1
    assert outcome.summary["leak"]["images_in_train_and_test"] == 2
    assert outcome.summary["leak"]["test_rows_on_train_images"] == 3
    dropped = official_split_outcome(_records(spec), {}, config, drop_leaking_test_rows=True)
    assert [r.img_id for r in dropped.records if r.split == "test"] == ["te0", "te1", "te2", "te3"]
    assert dropped.summary["leak"]["test_rows_dropped"] == 3


def test_prepare_keeps_the_official_test_and_reports_the_leak(tmp_path, x1_dir, tiny_model_dir):
    config = _config(tmp_path, x1_dir / "parquet", f"data.images={x1_dir / 'kvasir-vqa'}",
                     f"model.name_or_path={tiny_model_dir}")
    result = prepare(config, quiet=True)
    summary = json.loads((result.prepared_dir / "summary.json").read_text())
    shipped_test = {(raw.img_id, raw.question) for raw in _read(config) if raw.split == "test"}
    prepared_test = {(r.img_id, r.question) for r in read_records(result.prepared_dir / "test.jsonl")}
    assert prepared_test == shipped_test
    assert summary["leak"]["images_in_train_and_test"] == 2  # the generator's deliberate overlap
    train_images = {r.img_id for r in read_records(result.prepared_dir / "train.jsonl")}
    val_images = {r.img_id for r in read_records(result.prepared_dir / "val.jsonl")}
    assert val_images and not train_images & val_images
    record = read_records(result.prepared_dir / "test.jsonl")[0]
    assert record.task == "kvasir-vqa-x1" and record.question_type == "open_ended" and not record.candidates
    assert {"complexity", "question_class", "original"} <= record.meta.keys()


# ----------------------------------------------------------------------------------------------- atomic facts


def _facts(*items):
    return facts_of(json.dumps([{"q": q, "a": a} for q, a in items]))


Q_POLYPS = "How many polyps are in the image?"
Q_ABNORMALITIES = "Are there any abnormalities in the image? Check all that are present."
Q_SIZE = "What is the size of the polyp?"
Q_INSTRUMENTS = "Are there any instruments in the image? Check all that are present."
Q_COLOUR = "What color is the abnormality? If more than one separate with ;"
Q_WHERE = "Where in the image is the abnormality?"


@pytest.mark.parametrize(("sentence", "items", "expected"), [
    # negations respected: "no polyps" states a count of 0, never the finding "polyp"
    ("There are no polyps in the image.", [(Q_POLYPS, "0"), (Q_ABNORMALITIES, "polyp")], [True, False]),
    ("A polyp is not visible.", [(Q_ABNORMALITIES, "polyp")], [False]),
    ("The image shows a polyp.", [(Q_ABNORMALITIES, "polyp")], [True]),
    ("No instruments are present.", [(Q_INSTRUMENTS, "none")], [True]),
    ("A tube is present.", [(Q_INSTRUMENTS, "none")], [False]),
    ("There is no text, but a box artefact is present.",
     [("Is there text?", "no"), ("Is there a green/black box artefact?", "yes")], [True, True]),
    ("There is text on the image.", [("Is there text?", "no")], [False]),
    # numbers as digits or words
    ("Two polyps are visible.", [(Q_POLYPS, "2")], [True]),
    ("2 polyps are visible.", [(Q_POLYPS, "2")], [True]),
    ("Three polyps are visible.", [(Q_POLYPS, "2")], [False]),
    ("A single polyp is seen.", [(Q_POLYPS, "1")], [True]),
    # size intervals in their written variants
    ("The polyp measures between 5 and 10 millimetres.", [(Q_SIZE, "5-10mm")], [True]),
    ("The polyp measures 5-10mm.", [(Q_SIZE, "5-10mm")], [True]),
    ("It is about 8 mm across.", [(Q_SIZE, "5-10mm")], [True]),
    ("The polyp is larger than 2 cm.", [(Q_SIZE, ">20mm")], [True]),
    ("The polyp is over 20 mm.", [(Q_SIZE, ">20")], [True]),
    ("The polyp is smaller than 5 mm.", [(Q_SIZE, "<5mm")], [True]),
    ("The polyp is smaller than 5 mm.", [(Q_SIZE, "11-20mm")], [False]),
    ("More than 2 polyps are seen.", [(Q_SIZE, ">20mm")], [False]),
    # multi-label answers label by label, grid cells in their variants
    ("The abnormality is pink and red.", [(Q_COLOUR, "red; pink; white")], [True, True, False]),
    ("It lies in the top left and the centre.", [(Q_WHERE, "upper-left; center; lower-right")],
     [True, True, False]),
    ("Short-segment Barrett's is visible, no ulcerative colitis.",
     [(Q_ABNORMALITIES, "barretts; short-segment barretts; ulcerative colitis")], [False, True, False]),
    # a bare yes answers a one-question row only
    ("Yes.", [("Is there text?", "yes")], [True]),
    ("Yes.", [("Is there text?", "yes"), (Q_POLYPS, "1")], [False, False]),
])
def test_atomic_fact_checks(sentence, items, expected):
    facts = _facts(*items)
    labels = [label for _, answer in items for label in sorted(answer.split("; "))]
    by_label = dict(zip([fact.label for fact in facts], check_facts(sentence, facts)))
    assert len(facts) == len(labels)
    assert [by_label[label] for label in [label for _, a in items for label in a.split("; ")]] == expected


def test_original_in_other_spellings_and_open_items():
    assert [f.label for f in facts_of([{"question": Q_POLYPS, "answer": 3}])] == ["3"]
    assert facts_of("not json") == [] and facts_of(None) == []
    assert facts_of(json.dumps([{"q": "Describe the image.", "a": "a polyp"}])) == []


# ---------------------------------------------------------------------------------------------------- metrics


def _row(i, answer, prediction, complexity, classes, items, *, error=None):
    return PredictionRow(id=f"r{i}", question_type="open_ended", reference=answer, prediction=prediction,
                         question="q", text=prediction, error=error, task="kvasir-vqa-x1",
                         meta={"complexity": complexity, "question_class": classes,
                               "original": json.dumps([{"q": q, "a": a} for q, a in items])})


def test_x1_metrics_group_by_complexity_and_class_and_compare_paired():
    settings = EvaluateConfig(bootstrap_samples=200)
    good = [_row(i, "Two polyps are visible. No text is visible.", "two polyps are visible, no text is visible",
                 2, ["polyp count", "text"], [(Q_POLYPS, "2"), ("Is there text?", "no")]) for i in range(30)]
    bad = [_row(i, "Two polyps are visible. No text is visible.", "", 2, ["polyp count", "text"],
                [(Q_POLYPS, "2"), ("Is there text?", "no")]) for i in range(30)]
    one = [_row(100, "A tube can be seen.", "A tube can be seen.", 1, ["instrument"], [(Q_INSTRUMENTS, "tube")])]
    metrics = x1_metrics(good + one, settings, baseline=bad + one)
    assert metrics["exact_match"] == pytest.approx(1.0)  # case and punctuation do not count
    assert metrics["atomic_recall"]["value"] == 1.0 and metrics["atomic_recall"]["n"] == 61
    assert metrics["atomic_recall_per_type"]["count"]["n"] == 30
    assert set(metrics["per_complexity"]) == {"1", "2"}
    assert set(metrics["per_question_class"]) == {"polyp count", "text", "instrument"}
    paired = metrics["baseline"]
    assert paired["n_paired"] == 31
    assert paired["atomic_recall"]["delta"] == pytest.approx(60 / 61)
    assert paired["atomic_recall"]["delta_ci"][0] > 0 and paired["rougeL"]["delta_ci"][0] > 0
    # the same comparison per atom type and per complexity: the one row both answered alike moves nothing
    assert paired["atomic_recall_per_type"]["count"]["delta"] == pytest.approx(1.0)
    assert paired["atomic_recall_per_type"]["count"]["delta_ci"][0] > 0
    assert paired["atomic_recall_per_type"]["name"]["delta"] == 0.0
    assert paired["atomic_recall_per_complexity"]["1"]["delta"] == 0.0
    assert paired["atomic_recall_per_complexity"]["2"]["delta"] == pytest.approx(1.0)
    assert paired["atomic_recall_per_complexity"]["2"]["n_facts"] == 60
    assert normalise_text("The polyp, is RED.") == "polyp is red"


def test_evaluate_dispatches_to_the_rows_task():
    rows = [_row(i, "No text is visible.", "No text is visible.", 1, ["text"], [("Is there text?", "no")])
            for i in range(5)]
    metrics = evaluate_predictions(rows, EvaluateConfig(bootstrap_samples=50), with_meteor=False)
    assert metrics["task"] == "kvasir-vqa-x1" and metrics["x1"]["atomic_recall"]["value"] == 1.0
    assert any(table["title"].startswith("Per complexity") for table in metrics["task_tables"])
    with pytest.raises(ValueError, match="mix tasks"):
        evaluate_predictions([*rows, PredictionRow(id="k", question_type="yes_no", reference="yes",
                                                   prediction="yes")], with_text_metrics=False)


# --------------------------------------------------------------------------------------------------- generator


def test_synthetic_x1_rows(x1_dir):
    import pyarrow.parquet as pq

    train = pq.read_table(x1_dir / "parquet" / "train-00000-of-00001.parquet").to_pylist()
    assert {"img_id", "complexity", "question", "answer", "original", "question_class"} == set(train[0])
    assert {row["complexity"] for row in train} <= {1, 2, 3} and len({row["complexity"] for row in train}) > 1
    for row in train:
        facts = facts_of(row["original"])
        assert len(json.loads(row["original"])) == row["complexity"] == len(row["question_class"])
        # the synthetic answers state every fact they were built from
        assert all(check_facts(row["answer"], facts)), row
    assert len({row["question"] for row in train}) > len(train) // 3


def test_make_synthetic_cli_writes_x1(tmp_path):
    result = CliRunner().invoke(app, ["make-synthetic", str(tmp_path / "out"), "--images", "3", "--task",
                                      "kvasir-vqa-x1", "--image-size", "56"])
    assert result.exit_code == 0, result.output
    assert (tmp_path / "out" / "parquet" / "test-00000-of-00001.parquet").is_file()
    assert (tmp_path / "out" / "save_to_disk" / "dataset_dict.json").is_file()
    assert np.all([p.suffix == ".parquet" for p in (tmp_path / "out" / "kvasir-vqa").glob("*.parquet")])


def test_x1_configs_load():
    for name in ("x1.yaml", "x1-demo.yaml"):
        config = load_config(Path(__file__).resolve().parents[2] / "configs" / name)
        assert config.task == "kvasir-vqa-x1" and config.predict.mode == "generate"
