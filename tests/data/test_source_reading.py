"""Reading a raw source as a user writes it: a path under ``~``, CSV files with stray carriage returns, byte-order
marks and lines that are not UTF-8, a JSON array instead of JSON lines, and an img_id whose first row has no
readable image. Rejects must name the file's own line numbers (or array elements), and a file that cannot be read
at all is one ``error:`` line naming the file and the line, exit status 2."""

import json
from pathlib import Path

import pytest
from support.raw_rows import (
    GOOD_IMAGES,
    good_rows,
    read_records_of,
    rejects_of,
    rows_config,
    write_jsonl_rows,
)

from surgvqa.core.config import load_config
from surgvqa.data.sources import allowed_image_roots, dataset_root, detect_format
from surgvqa.prompting.encoding import load_image
from surgvqa.stages.prepare import prepare

pytestmark = pytest.mark.usefixtures("one_torch_thread")

CSV_HEADER = "image,question,answer,img_id,source"


def _csv_line(row: dict) -> str:
    return f"{row['image']},{row['question']},{row['answer']},{row['img_id']},{row['source']}"


def _origins(prepared: Path) -> dict[str, str]:
    return {item["origin"]: item["reason"] for item in rejects_of(prepared)}


def _prepare_cli(root: Path, source: Path | str, model_dir: Path):
    from typer.testing import CliRunner

    from surgvqa.cli import app

    return CliRunner().invoke(app, ["prepare", "--set", f"output_dir={root / 'runs'}", "--set", f"data.source={source}",
                                    "--set", f"cache_dir={root / 'cache'}", "--set", f"model.name_or_path={model_dir}"])


# -- the source path --------------------------------------------------------------------------------------------


def test_a_source_under_the_home_folder_is_expanded_for_rows_and_images(tmp_path, tiny_model_dir, monkeypatch):
    home = tmp_path / "home"
    monkeypatch.setenv("HOME", str(home))
    write_jsonl_rows(home / "kv" / "data.jsonl", good_rows(home / "kv" / "images"))
    source = "~/kv/data.jsonl"
    assert detect_format(source) == "jsonl"
    assert dataset_root(source, None) == home / "kv" and dataset_root("x.csv", "~/kv/images") == home / "kv/images"
    config = rows_config(tmp_path, source, tiny_model_dir)
    result = prepare(config, quiet=True)
    assert sum(result.counts.values()) == GOOD_IMAGES and not rejects_of(result.prepared_dir)
    # Training and prediction find the images through the same expanded root.
    record = read_records_of(result.prepared_dir)[0]
    assert load_image(record, result.prepared_dir, roots=allowed_image_roots(config)).size == (32, 32)
    # The x1 layout's image folder (data.images) too.
    joined = load_config(None, [f"output_dir={tmp_path}", "data.images=~/kv/images"])
    assert home / "kv" / "images" in allowed_image_roots(joined)


# -- CSV --------------------------------------------------------------------------------------------------------


def test_a_carriage_return_inside_an_unquoted_csv_field_rejects_that_row_naming_its_line(tmp_path, tiny_model_dir):
    rows = good_rows(tmp_path / "images")
    lines = [CSV_HEADER, *map(_csv_line, rows[:2])]
    lines.append(_csv_line(rows[2]).replace("Is there text?", "Is there\rtext?"))  # line 4
    lines.append(_csv_line({**rows[3], "question": ""}))  # line 5: a reject after the broken one keeps its number
    lines += map(_csv_line, rows[4:])
    path = tmp_path / "data.csv"
    path.write_bytes("\n".join(lines).encode() + b"\n")
    result = prepare(rows_config(tmp_path, path, tiny_model_dir), quiet=True)
    assert _origins(result.prepared_dir) == {"data.csv line 4": "bad_csv", "data.csv line 5": "empty_question"}
    broken = next(item for item in rejects_of(result.prepared_dir) if item["reason"] == "bad_csv")
    assert "carriage return" in broken["detail"] and "universal-newline" not in broken["detail"]
    assert sum(result.counts.values()) == GOOD_IMAGES - 2


def test_a_carriage_return_in_the_csv_header_is_one_error_line_naming_file_and_line(tmp_path, tiny_model_dir):
    rows = good_rows(tmp_path / "images")
    path = tmp_path / "data.csv"
    path.write_text("image,question\r,answer,img_id,source\n" + "".join(_csv_line(row) + "\n" for row in rows))
    result = _prepare_cli(tmp_path, path, tiny_model_dir)
    assert result.exit_code == 2, result.output
    errors = [line for line in result.output.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and f"{path} line 1:" in errors[0] and "carriage return" in errors[0]
    assert "Traceback" not in result.output


def test_a_csv_with_a_byte_order_mark_and_a_line_not_in_utf8_keeps_its_header(tmp_path, tiny_model_dir):
    rows = good_rows(tmp_path / "images")
    lines = [line.encode() for line in [CSV_HEADER, *map(_csv_line, rows)]]
    lines[3] = lines[3].replace(b"Is there", b"Is th\xffere")  # line 4
    path = tmp_path / "data.csv"
    path.write_bytes(b"\xef\xbb\xbf" + b"\n".join(lines) + b"\n")
    result = prepare(rows_config(tmp_path, path, tiny_model_dir), quiet=True)
    assert _origins(result.prepared_dir) == {"data.csv line 4": "not_utf8"}
    assert sum(result.counts.values()) == GOOD_IMAGES - 1


def test_csv_rejects_name_physical_lines_after_dropped_lines_and_multi_line_fields(tmp_path, tiny_model_dir):
    rows = good_rows(tmp_path / "images", count=GOOD_IMAGES + 1)
    lines = [line.encode() for line in [CSV_HEADER, *map(_csv_line, rows[:2])]]
    lines.append(_csv_line(rows[2]).encode().replace(b"Is there", b"Is th\xffere"))  # line 4: dropped
    lines.append(_csv_line(rows[3]).encode().replace(b"Is there", b"Is th\xfeere"))  # line 5: dropped
    lines.append(_csv_line({**rows[4], "question": ""}).encode())  # line 6
    # Lines 7-8: one record whose quoted question spans two lines; it starts on line 7.
    lines.append(_csv_line({**rows[5], "question": '"Is there\ntext?"', "answer": "nan"}).encode())
    lines.append(_csv_line({**rows[6], "question": ""}).encode())  # line 9
    # Lines 10-12: a quoted question whose middle line is not UTF-8: the record goes, not just that line.
    lines.append(_csv_line({**rows[7], "question": '"Is there\n\xff\ntext?"'}).encode().replace(b"\xc3\xbf", b"\xff"))
    lines += [_csv_line(row).encode() for row in rows[8:]]
    path = tmp_path / "data.csv"
    path.write_bytes(b"\r\n".join(lines) + b"\r\n")
    result = prepare(rows_config(tmp_path, path, tiny_model_dir), quiet=True)
    assert _origins(result.prepared_dir) == {"data.csv line 4": "not_utf8", "data.csv line 5": "not_utf8",
                                             "data.csv line 6": "empty_question", "data.csv line 7": "bad_answer",
                                             "data.csv line 9": "empty_question", "data.csv line 10": "not_utf8",
                                             "data.csv line 11": "not_utf8"}


# -- images -----------------------------------------------------------------------------------------------------


def test_an_unreadable_image_on_an_img_ids_first_row_does_not_claim_the_img_id(tmp_path, tiny_model_dir):
    rows = good_rows(tmp_path / "images")
    first = {**rows[0], "image": "images/no_such_file.png", "question": "How many polyps are in the image?"}
    (tmp_path / "images" / "empty.png").write_bytes(b"")
    second = {**rows[1], "image": "images/empty.png", "question": "How many polyps are in the image?"}
    path = write_jsonl_rows(tmp_path / "data.jsonl", [first, second, *rows])
    result = prepare(rows_config(tmp_path, path, tiny_model_dir), quiet=True)
    assert _origins(result.prepared_dir) == {"data.jsonl line 1": "missing_image", "data.jsonl line 2": "empty_image"}
    kept = {record.img_id for record in read_records_of(result.prepared_dir)}
    assert kept == {f"good{i}" for i in range(GOOD_IMAGES)}


# -- JSON arrays ------------------------------------------------------------------------------------------------


def test_a_pretty_printed_json_array_reads_each_element_as_a_row(tmp_path, tiny_model_dir):
    rows = good_rows(tmp_path / "images")
    elements = [*rows[:3], "not a row", {**rows[3], "question": ""}, *rows[4:]]
    path = tmp_path / "data.json"
    path.write_text(json.dumps(elements, indent=2))
    assert detect_format(str(path)) == "jsonl"  # one reader for both: it looks at the file's first character
    result = prepare(rows_config(tmp_path, path, tiny_model_dir), quiet=True)
    assert _origins(result.prepared_dir) == {"data.json element 3": "bad_json",
                                             "data.json element 4": "empty_question"}
    assert sum(result.counts.values()) == GOOD_IMAGES - 1


def test_a_json_file_holding_json_lines_reads_as_before(tmp_path, tiny_model_dir):
    rows = good_rows(tmp_path / "images")
    path = write_jsonl_rows(tmp_path / "data.json", [*rows[:2], {**rows[2], "question": ""}, *rows[3:]])
    result = prepare(rows_config(tmp_path, path, tiny_model_dir), quiet=True)
    assert _origins(result.prepared_dir) == {"data.json line 3": "empty_question"}


def test_a_damaged_json_array_is_one_error_naming_file_and_line(tmp_path, tiny_model_dir):
    rows = good_rows(tmp_path / "images")
    path = tmp_path / "data.json"
    path.write_text(json.dumps(rows, indent=2)[:-40])  # cut inside the last element
    result = _prepare_cli(tmp_path, path, tiny_model_dir)
    assert result.exit_code == 2, result.output
    errors = [line for line in result.output.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and f"{path}: not a valid JSON array" in errors[0], errors
    assert f"line {len(json.dumps(rows, indent=2)[:-40].splitlines())}" in errors[0]
