"""Raw rows that were kept silently wrong (issue 29): each is now accepted as a user would expect or rejected into
``rejects.jsonl`` with a reason naming the row and the field. One JSONL source holds good rows beside every bad
kind and is prepared once; CSV, x1 and vqa-jsonl sources get a small run each."""

import io
import json
from pathlib import Path

import pytest
from PIL import Image
from support.raw_rows import GOOD_IMAGES, good_rows, rejects_of, rows_config

from surgvqa.core.config import EvaluateConfig
from surgvqa.data.images import open_rgb
from surgvqa.data.records import read_records
from surgvqa.data.sources import allowed_image_roots
from surgvqa.evaluation.scoring import PredictionRow, count_match
from surgvqa.prompting.encoding import load_image
from surgvqa.stages.prepare import prepare, print_prepare_summary

pytestmark = pytest.mark.usefixtures("one_torch_thread")

YES_NO_QUESTION = "Is there text?"
COUNT_QUESTION = "How many polyps are in the image?"
EXIF_ORIENTATION = 0x0112
ROTATE_90_CLOCKWISE = 6  # the stored pixels are turned 90° counter-clockwise; a viewer turns them back


def _sideways_jpeg() -> bytes:
    """56 x 28 pixels stored (red left half, blue right), tagged to be shown turned: 28 x 56, red on top."""
    image = Image.new("RGB", (56, 28), (0, 0, 255))
    image.paste((255, 0, 0), (0, 0, 28, 28))
    exif = Image.Exif()
    exif[EXIF_ORIENTATION] = ROTATE_90_CLOCKWISE
    buffer = io.BytesIO()
    image.save(buffer, "JPEG", exif=exif, quality=95)
    return buffer.getvalue()


def _row(folder: Path, img_id: str, question: str, answer, colour=(40, 80, 120)) -> dict:
    path = folder / f"{img_id}.png"
    if not path.exists():
        Image.new("RGB", (32, 32), colour).save(path)
    return {"img_id": img_id, "image": f"{folder.name}/{img_id}.png", "question": question, "answer": answer,
            "source": "Polyps"}


BAD_ANSWERS = {  # img_id: (answer, reason)
    "dot": (".", "punctuation_answer"),
    "bang": ("?!", "punctuation_answer"),
    "semicolon": (";", "punctuation_answer"),
    "label_bang": ("yes; ?!", "punctuation_answer"),
    "zero_width_space": ("\u200b", "bad_answer"),
    "zero_width_joiner": ("\u200d\u200c", "bad_answer"),
}
BAD_COUNTS = {"thousands": "1,000", "exponent": "1e3", "negative": "-2"}


@pytest.fixture(scope="module")
def rows_run(tmp_path_factory, tiny_model_dir):
    root = tmp_path_factory.mktemp("rows")
    data = root / "data"
    folder = data / "images"
    rows = good_rows(folder)
    for img_id, (answer, _) in BAD_ANSWERS.items():
        rows.append(_row(folder, img_id, YES_NO_QUESTION, answer))
    for img_id, answer in BAD_COUNTS.items():
        rows.append(_row(folder, img_id, COUNT_QUESTION, answer))
    rows.append(_row(folder, "true", YES_NO_QUESTION, True, (1, 2, 3)))
    rows.append(_row(folder, "false", YES_NO_QUESTION, False, (3, 2, 1)))
    rows.append(_row(folder, "yes_zw", "Is there a green/black box artefact?", "yes\u200b", (9, 9, 9)))
    # The same question about good3 twice, with two answers (good3's own row says "yes").
    rows.append({**rows[3], "answer": "no"})
    (folder / "sideways.jpg").write_bytes(_sideways_jpeg())
    rows.append({"img_id": "sideways", "image": "images/sideways.jpg", "question": YES_NO_QUESTION,
                 "answer": "no"})
    lines = [json.dumps(row) for row in rows]
    # "answer" given twice: json keeps the last value without a word.
    lines.append('{"img_id": "good5", "image": "images/good5.png", "question": "Is there a green/black box '
                 'artefact?", "answer": "yes", "answer": "no"}')
    path = data / "rows.jsonl"
    path.write_text("".join(line + "\n" for line in lines))
    config = rows_config(root, path, tiny_model_dir)
    result = prepare(config, quiet=True)
    records = [r for name in ("train", "val", "test") for r in read_records(result.prepared_dir / f"{name}.jsonl")]
    return config, result, rejects_of(result.prepared_dir), records


def _vocabulary(result) -> dict:
    return json.loads((result.prepared_dir / "vocabulary.json").read_text())


# -- images -----------------------------------------------------------------------------------------------------


def test_an_exif_rotated_jpeg_is_decoded_upright_once():
    image = open_rgb(_sideways_jpeg())
    assert image.size == (28, 56)  # as every viewer shows it (was 56 x 28)
    top, bottom = image.getpixel((14, 5)), image.getpixel((14, 50))
    assert top[0] > 200 > top[2] and bottom[2] > 200 > bottom[0]  # the red half on top: turned once, the right way


def test_an_exif_rotated_jpeg_is_prepared_and_loaded_upright(rows_run):
    config, result, _, records = rows_run
    record = next(r for r in records if r.img_id == "sideways")
    assert load_image(record, result.prepared_dir, roots=allowed_image_roots(config)).size == (28, 56)


# -- answers ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("img_id", sorted(BAD_ANSWERS))
def test_punctuation_only_and_zero_width_answers_are_rejected_with_their_reason(rows_run, img_id):
    _, _, rejects, records = rows_run
    reject = next(item for item in rejects if item["img_id"] == img_id)
    assert reject["reason"] == BAD_ANSWERS[img_id][1]
    assert "answer" in reject["detail"] and "line" in reject["origin"]
    assert img_id not in {r.img_id for r in records}


def test_no_punctuation_becomes_a_candidate_and_no_kept_answer_normalises_to_nothing(rows_run):
    from surgvqa.data.answers import normalize_answer

    _, result, _, records = rows_run
    assert _vocabulary(result)["1"] == ["yes", "no"]  # "?!" was a yes/no candidate
    assert all(normalize_answer(r.answer) for r in records)
    assert next(r for r in records if r.img_id == "yes_zw").answer == "yes"  # the zero-width space removed


def test_the_masking_diagnostic_calls_an_empty_training_target_a_problem(rows_run, tiny_model_dir):
    from surgvqa.models.loading import load_processor
    from surgvqa.stages.diagnose import diagnose_record

    config, result, _, records = rows_run
    processor = load_processor(str(tiny_model_dir), config.model, config.masking.strategy)
    record = next(r for r in records if r.img_id == "good1")
    assert diagnose_record(processor, record, result.prepared_dir, config).ok
    record.answer = ";"  # a record prepared before prepare rejected such answers
    diagnosis = diagnose_record(processor, record, result.prepared_dir, config)
    assert not diagnosis.ok and "empty training target" in "; ".join(diagnosis.problems)


@pytest.mark.parametrize("img_id", sorted(BAD_COUNTS))
def test_counts_that_are_not_non_negative_whole_numbers_are_rejected(rows_run, img_id):
    _, result, rejects, _ = rows_run
    reject = next(item for item in rejects if item["img_id"] == img_id)
    assert reject["reason"] == "bad_count"
    assert BAD_COUNTS[img_id] in reject["detail"] and "non-negative whole number" in reject["detail"]
    assert BAD_COUNTS[img_id] not in _vocabulary(result)["11"]


@pytest.mark.parametrize(("reference", "prediction"), [("1,000", "1"), ("1e3", "1"), ("-2", "2")])
def test_a_malformed_count_is_no_strict_match(reference, prediction):
    assert count_match(reference, prediction, 1) == (False, False)
    assert count_match(prediction, reference, 1) == (False, False)


def test_json_booleans_are_yes_and_no(rows_run):
    _, result, _, records = rows_run
    by_id = {r.img_id: r.answer for r in records}
    assert (by_id["true"], by_id["false"]) == ("yes", "no")
    assert not {"true", "false"} & set(_vocabulary(result)["1"])


def test_a_json_object_with_a_key_given_twice_is_rejected_naming_the_key(rows_run):
    _, _, rejects, records = rows_run
    reject = next(item for item in rejects if item["reason"] == "duplicate_key")
    assert "'answer' is given twice" in reject["detail"] and reject["origin"] == "rows.jsonl line 27"
    assert not any(r.img_id == "good5" and r.question.startswith("Is there a green") for r in records)


def test_a_json_array_element_with_a_key_given_twice_is_rejected(tmp_path):
    from surgvqa.data.sources import iter_raw_rows

    (tmp_path / "a.png").write_bytes(b"")
    path = tmp_path / "rows.json"
    path.write_text('[{"image": "a.png", "question": "q", "answer": "yes"},\n'
                    ' {"image": "a.png", "question": "q", "image": "b.png", "answer": "no"}]')
    rows = list(iter_raw_rows(str(path)))
    assert rows[0].problem is None
    assert (rows[1].problem, rows[1].origin) == ("duplicate_key", "rows.json element 1")
    assert "'image'" in rows[1].detail


# -- contradictory duplicates -------------------------------------------------------------------------------------


def test_one_question_with_two_answers_is_reported_in_the_summary_and_kept(rows_run, capsys):
    _, result, _, records = rows_run
    summary = json.loads((result.prepared_dir / "summary.json").read_text())["contradictory_duplicates"]
    assert (summary["questions"], summary["rows"], summary["action"]) == (1, 2, "kept")
    assert summary["listed"][0] | {"rows": None} == {"img_id": "good3", "question": YES_NO_QUESTION,
                                                     "answers": ["no", "yes"], "rows": None}
    assert sorted(r.answer for r in records if r.img_id == "good3") == ["no", "yes"]
    print_prepare_summary(result)
    out = capsys.readouterr().out
    assert "warning: 1 question(s) asked of the same image with different answers" in out
    assert "'good3'" in out and "contradictory_duplicates=drop" in out


def test_contradictory_duplicates_drop_rejects_every_row_of_the_question(tmp_path, tiny_model_dir):
    folder = tmp_path / "data" / "images"
    rows = good_rows(folder)
    rows.append({**rows[3], "answer": "no"})
    path = tmp_path / "data" / "rows.jsonl"
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    result = prepare(rows_config(tmp_path, path, tiny_model_dir, "data.contradictory_duplicates=drop"), quiet=True)
    rejects = [item for item in rejects_of(result.prepared_dir) if item["reason"] == "contradictory_duplicate"]
    assert sorted(item["origin"] for item in rejects) == ["rows.jsonl line 13", "rows.jsonl line 4"]
    assert "'good3'" in rejects[0]["detail"] and "'no', 'yes'" in rejects[0]["detail"]
    assert sum(result.counts.values()) == GOOD_IMAGES - 1


# -- sources --------------------------------------------------------------------------------------------------------


def test_a_csv_row_with_the_wrong_number_of_fields_is_rejected_naming_its_line(tmp_path, tiny_model_dir):
    rows = good_rows(tmp_path / "data" / "images")
    lines = ["image,question,answer,img_id,source"]
    lines += [f"{r['image']},{r['question']},{r['answer']},{r['img_id']},{r['source']}" for r in rows]
    Image.new("RGB", (32, 32), (7, 7, 7)).save(tmp_path / "data" / "images" / "comma.png")
    lines.append("images/comma.png,Is there text, or not?,no,comma,Polyps")  # an unquoted comma: 6 fields
    lines.append("images/comma.png,Is there text?,no")  # 3 fields
    path = tmp_path / "data" / "rows.csv"
    path.write_text("\n".join(lines) + "\n")
    result = prepare(rows_config(tmp_path, path, tiny_model_dir), quiet=True)
    rejects = {item["origin"]: item for item in rejects_of(result.prepared_dir)}
    assert rejects["rows.csv line 14"]["reason"] == "bad_csv"
    assert "line 14 has 6 fields but the header has 5" in rejects["rows.csv line 14"]["detail"]
    assert "line 15 has 3 fields" in rejects["rows.csv line 15"]["detail"]
    assert sum(result.counts.values()) == GOOD_IMAGES  # the shifted row was kept ("or not?" as its answer)


def _x1_or_vqa_rows(folder: Path, **fields) -> list[dict]:
    rows = good_rows(folder)
    for row in rows:
        row.update(fields)
    return rows


def test_an_x1_original_that_is_not_json_is_rejected_with_its_reason(tmp_path, tiny_model_dir):
    folder = tmp_path / "data" / "images"
    rows = _x1_or_vqa_rows(folder, original=json.dumps([{"q": YES_NO_QUESTION, "a": "yes"}]), complexity=1)
    rows.append({**_row(folder, "bad_original", "Is there text?", "No, there is none."),
                 "original": "[{'q': 'Is there text?', 'a': 'no'}]"})  # a Python repr, not JSON
    path = tmp_path / "data" / "x1.jsonl"
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    result = prepare(rows_config(tmp_path, path, tiny_model_dir, "task=kvasir-vqa-x1"), quiet=True)
    reject = next(item for item in rejects_of(result.prepared_dir) if item["img_id"] == "bad_original")
    assert reject["reason"] == "bad_original" and "'original' is not valid JSON" in reject["detail"]
    assert sum(result.counts.values()) == GOOD_IMAGES


def test_x1_metrics_count_rows_whose_original_is_not_json():
    from surgvqa.tasks.kvasir_vqa_x1.metrics import x1_metrics, x1_tables

    def row(index: int, original: str) -> PredictionRow:
        return PredictionRow(id=f"r{index}", question_type="open_ended", reference="No text.", prediction="No text.",
                             task="kvasir-vqa-x1", meta={"original": original})

    good = json.dumps([{"q": YES_NO_QUESTION, "a": "no"}])
    metrics = x1_metrics([row(0, good), row(1, "[{'q': 'x'}"), row(2, good)], EvaluateConfig(bootstrap_samples=50))
    assert metrics["rows_original_unreadable"] == 1
    assert any("not JSON" in line[0] for line in x1_tables(metrics)[0]["rows"])


def test_a_vqa_jsonl_split_outside_the_known_names_is_rejected(tmp_path, tiny_model_dir):
    folder = tmp_path / "data" / "images"
    rows = _x1_or_vqa_rows(folder, split="train")
    for row in rows[-4:]:
        row["split"] = "test"
    rows.append({**_row(folder, "eval_row", "Is there text?", "no"), "split": "eval"})
    rows.append({**_row(folder, "foo_row", "Is there text?", "yes"), "split": "foo"})
    path = tmp_path / "data" / "vqa.jsonl"
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    result = prepare(rows_config(tmp_path, path, tiny_model_dir, "task=vqa-jsonl"), quiet=True)
    rejects = {item["img_id"]: item for item in rejects_of(result.prepared_dir)}
    assert rejects["eval_row"]["reason"] == rejects["foo_row"]["reason"] == "unknown_split"
    assert "split 'foo' is none of train" in rejects["foo_row"]["detail"]
    train = read_records(result.prepared_dir / "train.jsonl")
    assert not {"eval_row", "foo_row"} & {r.img_id for r in train}


def test_known_split_names_still_read(tmp_path):
    from surgvqa.data.sources import RawRow
    from surgvqa.tasks.base import reject_unknown_split

    for name in ("train", "Validation", "dev", "test", "val", None):
        assert reject_unknown_split(RawRow("r", "i", "q", "a", None, split=name)).problem is None


# -- the app --------------------------------------------------------------------------------------------------------


def _rendered(markdown: str) -> str:
    from markdown_it import MarkdownIt

    return MarkdownIt("commonmark").render(markdown)  # HTML allowed, as gradio's renderer allows it


def test_the_app_renders_answers_and_references_as_text_not_markup():
    from surgvqa.serve.answer_service import Answer
    from surgvqa.serve.app import _verdict

    answer = Answer(question="<u>q</u>", question_type="yes_no", answer="**bold** <b>x</b>", mode="generate",
                    confidence=0.5, reference='<img src=x onerror="alert(1)">', base_answer="_it_ [a](javascript:x)",
                    answer_set=["<i>a</i>"])
    html = _rendered(_verdict(answer, "your typed question"))
    assert "<u>" not in html and "&lt;u&gt;q&lt;/u&gt;" in html
    assert "<img" not in html and "<b>" not in html and "<i>" not in html and "<em>" not in html
    assert "<strong>bold</strong>" not in html and "<a " not in html
    assert "&lt;img src=x onerror=&quot;alert(1)&quot;&gt;" in html and "**bold** &lt;b&gt;x&lt;/b&gt;" in html
    error = _rendered(_verdict(Answer(question="q", question_type="yes_no", answer="", mode="generate",
                                      confidence=None, error="<script>x</script>"), "the menu's question"))
    assert "<script>" not in error and "&lt;script&gt;" in error


def test_the_apps_tables_show_cells_as_text(tmp_path):
    from types import SimpleNamespace

    from surgvqa.serve.app import build_interface

    service = SimpleNamespace(config=SimpleNamespace(run_name="r"), model_path="m", task=SimpleNamespace(name="t"),
                              mode="generate", questions=["q"], gallery=list)
    page = build_interface(service)
    tables = {block.elem_id: block for block in page.blocks.values() if getattr(block, "elem_id", None)
              in ("references", "all-answers")}
    assert set(tables) == {"references", "all-answers"}
    assert all(table.datatype == "str" for table in tables.values())
    answer_box = next(block for block in page.blocks.values() if getattr(block, "elem_id", None) == "answer")
    assert answer_box.latex_delimiters == []


def test_test_rows_dropped_as_leaking_are_listed_in_rejects(tmp_path, tiny_model_dir):
    folder = tmp_path / "data" / "images"
    rows = _x1_or_vqa_rows(folder, split="train")
    for row in rows[-4:]:
        row["split"] = "test"
    rows.append({**rows[0], "question": "Is there a fracture?", "split": "test"})  # a test row on a training image
    path = tmp_path / "data" / "vqa.jsonl"
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    result = prepare(rows_config(tmp_path, path, tiny_model_dir, "task=vqa-jsonl", "data.drop_leaking_test_rows=true"),
                     quiet=True)
    reject = next(item for item in rejects_of(result.prepared_dir) if item["reason"] == "test_row_on_train_image")
    assert reject["origin"] == f"vqa.jsonl line {len(rows)}" and "'good0'" in reject["detail"]
    assert sum(result.counts.values()) == GOOD_IMAGES  # was: dropped, in no split and no reject
