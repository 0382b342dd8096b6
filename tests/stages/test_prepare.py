import json
from collections import Counter
from pathlib import Path

import pytest
from PIL import Image

from surgvqa.core.config import load_config
from surgvqa.data.records import read_records
from surgvqa.data.sources import SourceError, iter_raw_rows
from surgvqa.data.synthetic import make_synthetic
from surgvqa.stages.prepare import prepare

QUESTION = "Is there text?"
TINY_MODEL: Path | None = None


@pytest.fixture(scope="module")
def synthetic_parquet(tmp_path_factory) -> Path:
    return make_synthetic(tmp_path_factory.mktemp("synthetic"), images=60, seed=3)


@pytest.fixture(scope="module", autouse=True)
def _tiny_model(tiny_model_dir):
    """prepare loads the model's processor to measure samples; the session's tiny model spares building one."""
    global TINY_MODEL
    TINY_MODEL = tiny_model_dir


def _config(tmp_path: Path, source: str, *extra: str):
    return load_config(None, [f"output_dir={tmp_path / 'runs'}", f"data.source={source}",
                              f"cache_dir={tmp_path / 'cache'}", f"model.name_or_path={TINY_MODEL}", *extra])


def _png(path: Path, colour=(200, 90, 90)) -> None:
    Image.new("RGB", (32, 32), colour).save(path)


def test_synthetic_parquet_reads_through_the_kvasir_loader(synthetic_parquet):
    rows = list(iter_raw_rows(str(synthetic_parquet)))
    assert rows and all(row.problem is None for row in rows)
    first = rows[0]
    assert first.image_bytes[:8] == b"\x89PNG\r\n\x1a\n"  # the image column's struct<bytes, path>
    assert first.img_id.startswith("synth_") and first.question and first.source
    # The folder form of the same export reads identically.
    assert len(list(iter_raw_rows(str(synthetic_parquet.parent)))) == len(rows)


def test_prepare_on_synthetic_writes_typed_splits(tmp_path, synthetic_parquet):
    result = prepare(_config(tmp_path, str(synthetic_parquet)), quiet=True)
    splits = {name: read_records(result.prepared_dir / f"{name}.jsonl") for name in ("train", "val", "test")}
    images = {name: {r.img_id for r in records} for name, records in splits.items()}
    assert not images["train"] & images["val"] and not images["train"] & images["test"]
    assert not images["val"] & images["test"]
    record = splits["train"][0]
    source_images = {row.img_id: row.image_bytes for row in iter_raw_rows(str(synthetic_parquet))}
    assert (result.prepared_dir / record.image).read_bytes() == source_images[record.img_id]
    assert record.question_type in {"yes_no", "color", "size_numeric", "count_numeric", "mcq"}
    closed = [r for records in splits.values() for r in records if r.question_type != "open_ended"]
    assert all(r.candidates for r in closed)
    rejects = [json.loads(line) for line in (result.prepared_dir / "rejects.jsonl").read_text().splitlines()]
    assert {item["reason"] for item in rejects} <= {"bad_answer"}
    summary = json.loads((result.prepared_dir / "summary.json").read_text())
    assert summary["rows_kept"] == sum(len(r) for r in splits.values())
    # Every templated record's candidates are its template's entry of the vocabulary (computed once, in prepare).
    vocabulary = json.loads((tmp_path / "runs" / "demo" / "prepared" / "vocabulary.json").read_text())
    templated = [r for records in splits.values() for r in records if r.template is not None]
    assert templated and all(r.candidates == vocabulary[str(r.template)] for r in templated)


def test_save_to_disk_copy_gives_the_same_rows(tmp_path, synthetic_parquet):
    import datasets

    folder = tmp_path / "kvasir_disk"
    datasets.Dataset.from_parquet(str(synthetic_parquet)).save_to_disk(str(folder))
    from_disk = prepare(_config(tmp_path / "a", str(folder)), quiet=True)
    from_parquet = prepare(_config(tmp_path / "b", str(synthetic_parquet)), quiet=True)
    assert from_disk.counts == from_parquet.counts


def _bad_jsonl_dataset(root: Path) -> tuple[Path, dict[str, str]]:
    """A JSONL source with one good image per row and one row for every reject reason."""
    images = root / "images"
    images.mkdir(parents=True)
    for i in range(12):
        _png(images / f"good{i}.png", (10 * i, 100, 100))
    (images / "corrupt.png").write_bytes(b"this is not an image at all")
    (images / "empty.png").write_bytes(b"")
    _png(root.parent / "outside.png")
    good = [{"image": f"images/good{i}.png", "question": QUESTION, "answer": "yes", "source": "Polyps"}
            for i in range(12)]
    bad = {
        "missing_image": {"image": "images/nowhere.png", "question": QUESTION, "answer": "no"},
        "not_an_image": {"image": "images/corrupt.png", "question": QUESTION, "answer": "no"},
        "empty_image": {"image": "images/empty.png", "question": QUESTION, "answer": "no"},
        "image_outside_root": {"image": "../outside.png", "question": QUESTION, "answer": "no"},
        "bad_answer": {"image": "images/good1.png", "question": "How many polyps are in the image?", "answer": "nan"},
        "empty_question": {"image": "images/good2.png", "question": "  ", "answer": "no"},
        "duplicate_row": good[0],
    }
    lines = [json.dumps(row).encode() for row in good]
    lines += [json.dumps(row).encode() for row in bad.values()]
    lines.append(b'{"image": "images/good3.png", "question": "Is there \xff text?", "answer": "no"}')  # not_utf8
    lines.append(b"{this is not json")  # bad_json
    lines.append(json.dumps({"image": "images/good4.png", "question": QUESTION, "answer": ""}).encode())
    path = root / "kvasir.jsonl"
    path.write_bytes(b"\n".join(lines) + b"\n")
    return path, bad


def test_every_bad_row_is_rejected_with_its_reason_and_the_run_completes(tmp_path):
    path, bad = _bad_jsonl_dataset(tmp_path / "data")
    result = prepare(_config(tmp_path, str(path)), quiet=True)
    rejects = [json.loads(line) for line in (result.prepared_dir / "rejects.jsonl").read_text().splitlines()]
    reasons = Counter(item["reason"] for item in rejects)
    for reason in bad:
        assert reasons[reason] >= 1, reason
    assert reasons["not_utf8"] == 1 and reasons["bad_json"] == 1
    assert reasons["bad_answer"] == 2  # "nan" and the empty answer
    assert all(item["origin"].startswith("kvasir.jsonl line ") for item in rejects)
    assert sum(result.counts.values()) == 12  # every good row kept, none of the bad ones


def test_csv_with_image_folder(tmp_path):
    root = tmp_path / "csvdata"
    (root / "imgs").mkdir(parents=True)
    for i in range(6):
        _png(root / "imgs" / f"{i}.png", (40 * i, 20, 20))
    rows = ["img_id,image,question,answer,source"]
    rows += [f"im{i},imgs/{i}.png,{QUESTION},{'yes' if i % 2 else 'no'},Polyps" for i in range(6)]
    rows.append("im9,imgs/0.png,,no,Polyps")
    (root / "data.csv").write_bytes("\n".join(rows).encode() + b"\nim7,imgs/1.png,Is there \xff?,no,Polyps\n")
    result = prepare(_config(tmp_path, str(root / "data.csv")), quiet=True)
    assert sum(result.counts.values()) == 6
    assert result.rejects == Counter({"empty_question": 1, "not_utf8": 1})


def test_a_failing_prepare_keeps_the_previous_output(tmp_path, synthetic_parquet):
    config = _config(tmp_path, str(synthetic_parquet))
    first = prepare(config, quiet=True)
    before = (first.prepared_dir / "train.jsonl").read_bytes()
    broken = _config(tmp_path, str(tmp_path / "no_such_file.parquet"))
    with pytest.raises(SourceError, match="not found"):
        prepare(broken, quiet=True)
    empty = tmp_path / "empty.jsonl"
    empty.write_text(json.dumps({"image": "x.png", "question": "q", "answer": "nan"}) + "\n")
    with pytest.raises(ValueError, match="no usable rows"):
        prepare(_config(tmp_path, str(empty)), quiet=True)
    assert (first.prepared_dir / "train.jsonl").read_bytes() == before


def test_prepare_cli_prints_reject_summary(tmp_path):
    from typer.testing import CliRunner

    from surgvqa.cli import app

    path, _ = _bad_jsonl_dataset(tmp_path / "data")
    result = CliRunner().invoke(app, ["prepare", "--set", f"output_dir={tmp_path / 'runs'}",
                                      "--set", f"data.source={path}", "--set", f"model.name_or_path={TINY_MODEL}"])
    assert result.exit_code == 0, result.output
    assert "rejected 1 row(s): file is not an image (PIL cannot identify its format) [not_an_image]" in result.output
    assert "rows per question type" in result.output
    resolved = load_config(tmp_path / "runs" / "demo" / "config.resolved.yaml")
    assert resolved.data.source == str(path) and resolved.model.name_or_path == str(TINY_MODEL)
