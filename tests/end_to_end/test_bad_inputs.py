"""Bad inputs to ``prepare``: each is rejected with its reason (or fails the source with one clear line), the
good rows beside it are prepared, and every row that prepare keeps encodes in training."""

import io
import json
import re
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from support.raw_rows import (
    GOOD_IMAGES,
    QUESTION,
    good_rows,
    read_records_of,
    rejects_of,
    rows_config,
    write_jsonl_rows,
)

from surgvqa.core.config import load_config
from surgvqa.data.images import open_rgb, to_rgb
from surgvqa.data.records import read_records
from surgvqa.data.sources import SourceError, allowed_image_roots
from surgvqa.data.split import split_images
from surgvqa.prompting.encoding import encode_example, load_image
from surgvqa.prompting.sample_length import SampleLengths
from surgvqa.stages.prepare import prepare

pytestmark = pytest.mark.usefixtures("one_torch_thread")

COLOR_QUESTION = "What color is the abnormality? If more than one separate with ;"


def _encoded(image: Image.Image, image_format: str, **options) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, image_format, **options)
    return buffer.getvalue()


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def _png_header_only(width: int, height: int) -> bytes:
    """A PNG that declares a huge size: PIL reads the size from the header, so no huge buffer is ever made."""
    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", header) + _png_chunk(b"IDAT", zlib.compress(b"\0" * 16))
            + _png_chunk(b"IEND", b""))


def _sixteen_bit_gradient() -> Image.Image:
    return Image.fromarray((np.arange(64 * 64).reshape(64, 64) * 16).astype(np.uint16))  # 0 .. 65,520


def _truncated_jpeg() -> bytes:
    noise = np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8)
    data = _encoded(Image.fromarray(noise), "JPEG")
    return data[: len(data) * 6 // 10]


def _palette_with_transparency() -> bytes:
    image = Image.new("P", (24, 24), 0)
    image.putpalette([10, 20, 30, 200, 0, 0])
    return _encoded(image, "PNG", transparency=0)


def _animated_gif() -> bytes:
    first, second = Image.new("RGB", (24, 24), (255, 0, 0)), Image.new("RGB", (24, 24), (0, 0, 255))
    return _encoded(first, "GIF", save_all=True, append_images=[second])


ODD_IMAGES = {  # kept: every one of these must convert correctly and encode
    "sixteen_bit.png": lambda: _encoded(_sixteen_bit_gradient(), "PNG"),
    "cmyk.jpg": lambda: _encoded(Image.new("CMYK", (24, 24), (0, 255, 255, 0)), "JPEG"),
    "rgba.png": lambda: _encoded(Image.new("RGBA", (24, 24), (255, 0, 0, 0)), "PNG"),
    "grey_alpha.png": lambda: _encoded(Image.new("LA", (24, 24), (0, 128)), "PNG"),
    "palette.png": lambda: _encoded(Image.new("RGB", (24, 24), (0, 0, 255)).convert("P"), "PNG"),
    "palette_transparent.png": _palette_with_transparency,
    "one_bit.png": lambda: _encoded(Image.new("1", (24, 24), 1), "PNG"),
    "grey.png": lambda: _encoded(Image.new("L", (24, 24), 90), "PNG"),
    "one_pixel.png": lambda: _encoded(Image.new("RGB", (1, 1), (1, 2, 3)), "PNG"),
    "thin.png": lambda: _encoded(Image.new("RGB", (200, 1), (9, 9, 9)), "PNG"),
    "animated.gif": _animated_gif,
}
BAD_IMAGES = {  # rejected, with the reason code
    "bomb_warning.png": (lambda: _png_header_only(14_000, 14_000), "image_too_large"),  # 196 M pixels
    "bomb_error.png": (lambda: _png_header_only(20_000, 20_000), "image_too_large"),  # 400 M pixels
    "truncated.jpg": (_truncated_jpeg, "truncated_image"),
    "not_really.jpg": (lambda: b"<html>a web page saved with an image name</html>", "not_an_image"),
    "too_wide.png": (lambda: _encoded(Image.new("RGB", (402, 2), (5, 5, 5)), "PNG"), "bad_aspect_ratio"),
}


def _write_parquet(path: Path, rows: list[dict]) -> Path:
    import pyarrow as pa
    import pyarrow.parquet as pq

    columns = {key: [row[key] for row in rows] for key in rows[0]}
    pq.write_table(pa.table(columns), path)
    return path


@pytest.fixture(scope="module")
def processor(tiny_model_dir):
    from surgvqa.models.loading import load_processor

    return load_processor(str(tiny_model_dir), load_config(None, []).model, "span")


@pytest.fixture(scope="module")
def odd_run(tmp_path_factory, tiny_model_dir):
    """One JSONL source: twelve good rows beside every odd or bad input; prepared once for the module."""
    root = tmp_path_factory.mktemp("odd")
    data = root / "data"
    rows = good_rows(data / "images")
    for name, make in ODD_IMAGES.items():
        (data / "images" / name).write_bytes(make())
        rows.append({"img_id": name, "image": f"images/{name}", "question": QUESTION, "answer": "no"})
    for name, (make, _) in BAD_IMAGES.items():
        (data / "images" / name).write_bytes(make())
        rows.append({"img_id": name, "image": f"images/{name}", "question": QUESTION, "answer": "no"})
    Image.new("RGB", (32, 32), (1, 1, 1)).save(data / "images" / "other.png")
    text_rows = {
        "long_question": {"question": QUESTION + " x" * 50_000, "answer": "no"},
        "special_token": {"question": QUESTION + "<|im_end|>", "answer": "no"},
        "question_list": {"question": ["Is there", "text?"], "answer": "no"},
        "answer_object": {"question": QUESTION, "answer": {"label": "no"}},
        "control_chars": {"question": "Is there\x00 text?\x07", "answer": "y\x00es\ud800"},
        "answer_list": {"question": COLOR_QUESTION, "answer": ["red", "pink"]},
    }
    for img_id, fields in text_rows.items():
        image = data / "images" / f"{img_id}.png"
        Image.new("RGB", (32, 32), (len(img_id) * 9, 30, 60)).save(image)
        rows.append({"img_id": img_id, "image": f"images/{img_id}.png", **fields})
    rows.append({"img_id": "good1", "image": "images/other.png", "question": "How many polyps are in the image?",
                 "answer": "1"})  # same img_id, other bytes
    rows.append({"img_id": "good2", "image": "images/good2.png", "question": "How many polyps are in the image?",
                 "answer": "2"})  # same img_id, same bytes
    path = data / "mixed.jsonl"
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))  # json.dumps escapes the lone surrogate
    config = rows_config(root, path, tiny_model_dir)
    result = prepare(config, quiet=True)
    records = {r.img_id: r for name in ("train", "val", "test")
               for r in read_records(result.prepared_dir / f"{name}.jsonl")}
    return config, result, {item["img_id"]: item for item in rejects_of(result.prepared_dir)}, records


@pytest.mark.parametrize("name", sorted(BAD_IMAGES))
def test_bad_image_is_rejected_with_its_reason_and_the_rest_prepared(odd_run, name):
    _, _, rejects, records = odd_run
    assert rejects[name]["reason"] == BAD_IMAGES[name][1]
    assert name not in records
    assert all(f"good{i}" in records for i in range(GOOD_IMAGES))


def test_reject_messages_say_what_is_wrong(odd_run):
    _, _, rejects, _ = odd_run
    assert "decompression bomb" in rejects["bomb_error.png"]["detail"]
    assert "decompression bomb" in rejects["bomb_warning.png"]["detail"]
    assert "truncated" in rejects["truncated.jpg"]["detail"]
    assert "not an image" in rejects["not_really.jpg"]["detail"]
    assert "402x2" in rejects["too_wide.png"]["detail"] and "aspect ratio" in rejects["too_wide.png"]["detail"]


def test_truncated_jpeg_passes_verify_but_not_a_full_decode():
    data = _truncated_jpeg()
    with Image.open(io.BytesIO(data)) as image:
        image.verify()  # the old check: it does not decode pixels
    with pytest.raises(ValueError, match="truncated"):
        open_rgb(data)


def test_overlong_question_is_rejected_naming_tokens_and_the_text(odd_run):
    _, _, rejects, records = odd_run
    reject = rejects["long_question"]
    assert reject["reason"] == "too_long"
    assert re.search(r"\d+ tokens \(\d+ text \+ \d+ image\) exceed masking.max_length=\d+: ", reject["detail"])
    assert "question/answer text" in reject["detail"] and "max_pixels" not in reject["detail"]
    assert len(reject["question"]) <= 500
    assert "long_question" not in records


def test_special_token_in_text_is_rejected(odd_run):
    _, _, rejects, _ = odd_run
    assert rejects["special_token"]["reason"] == "special_token_text"
    assert "<|im_end|>" in rejects["special_token"]["detail"]


def test_question_or_answer_that_is_not_text_is_rejected(odd_run):
    _, _, rejects, _ = odd_run
    assert rejects["question_list"]["reason"] == "bad_question"
    assert rejects["answer_object"]["reason"] == "bad_answer"
    assert "'label'" in rejects["answer_object"]["detail"]


def test_control_characters_and_lone_surrogates_are_stripped(odd_run):
    _, result, _, records = odd_run
    record = records["control_chars"]
    assert record.question == QUESTION and record.question_type == "yes_no"
    assert record.answer == "yes"
    text = (result.prepared_dir / f"{record.split}.jsonl").read_bytes()
    assert b"\\u0000" not in text and b"\x00" not in text


def test_list_answer_becomes_a_multi_label_answer(odd_run):
    _, _, _, records = odd_run
    assert records["answer_list"].answer == "red; pink"
    assert records["answer_list"].multi_label


def test_same_img_id_with_other_bytes_is_rejected_same_bytes_kept(odd_run):
    _, result, _, _ = odd_run
    rejects = rejects_of(result.prepared_dir)
    conflicts = [item for item in rejects if item["reason"] == "img_id_conflict"]
    assert len(conflicts) == 1 and conflicts[0]["img_id"] == "good1"
    assert "mixed.jsonl line 2" in conflicts[0]["detail"]  # names where the img_id was first read
    kept = [r for name in ("train", "val", "test") for r in read_records(result.prepared_dir / f"{name}.jsonl")]
    assert sum(r.img_id == "good2" for r in kept) == 2
    assert sum(r.img_id == "good1" for r in kept) == 1


def test_every_image_mode_converts_to_rgb_correctly():
    sixteen = to_rgb(_sixteen_bit_gradient())
    assert sixteen.mode == "RGB" and np.asarray(sixteen).mean() == pytest.approx(127, abs=2)  # not 99 % white
    assert sixteen.getpixel((63, 63))[0] >= 250 and sixteen.getpixel((0, 0)) == (0, 0, 0)
    assert to_rgb(Image.new("RGBA", (4, 4), (255, 0, 0, 0))).getpixel((0, 0)) == (255, 255, 255)
    assert to_rgb(Image.new("LA", (4, 4), (0, 128))).getpixel((0, 0)) == (127, 127, 127)
    assert open_rgb(_palette_with_transparency()).getpixel((0, 0)) == (255, 255, 255)
    assert to_rgb(Image.new("CMYK", (4, 4), (0, 255, 255, 0))).getpixel((0, 0)) == (255, 0, 0)
    assert to_rgb(Image.new("1", (4, 4), 1)).getpixel((0, 0)) == (255, 255, 255)
    assert open_rgb(_animated_gif()).getpixel((0, 0)) == (255, 0, 0)  # the first frame
    wide = Image.new("I", (4, 4), 70_000)  # beyond 16 bit: the image's own maximum maps to 255
    assert to_rgb(wide).getpixel((0, 0)) == (255, 255, 255)


def test_every_kept_odd_image_loads_as_prepared_and_encodes_at_the_measured_length(odd_run, processor):
    config, result, rejects, records = odd_run
    lengths = SampleLengths(config, processor)
    roots = allowed_image_roots(config, result.prepared_dir)
    for name in [*ODD_IMAGES, "control_chars", "answer_list", "good0", "good2"]:
        assert name not in rejects, rejects.get(name)
        record = records[name]
        image = load_image(record, result.prepared_dir, roots=roots)
        assert image.mode == "RGB"
        example = encode_example(processor, record, image, config.prompt, config.masking)
        measured = lengths.total(record, lengths.image_tokens(image.width, image.height))
        assert len(example.features["input_ids"]) == measured, name
    sixteen = load_image(records["sixteen_bit.png"], result.prepared_dir, roots=roots)
    assert np.asarray(sixteen).mean() == pytest.approx(127, abs=2)


# ---------------------------------------------------------------------------------------------------------------
# Source-level errors: one line naming the file or column, and the previous prepared folder survives.
# ---------------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def previous_run(tmp_path_factory, tiny_model_dir):
    """A run folder with a prepared/ from a good source; returns (root, prepared train.jsonl bytes). Shared by
    the failing runs below: none of them may change it."""
    root = tmp_path_factory.mktemp("previous")
    source = write_jsonl_rows(root / "good.jsonl", good_rows(root / "images"))
    prepared = prepare(rows_config(root, source, tiny_model_dir), quiet=True).prepared_dir
    return root, (prepared / "train.jsonl").read_bytes()


def _assert_previous_survives(root: Path, before: bytes) -> None:
    run = root / "runs" / "demo"
    assert (run / "prepared" / "train.jsonl").read_bytes() == before
    assert not (run / "prepared.partial").exists()


def test_truncated_parquet_names_the_file(previous_run, tiny_model_dir):
    root, before = previous_run
    rows = [{"image": (root / "images" / f"good{i}.png").read_bytes(), "question": QUESTION, "answer": "no",
             "img_id": f"p{i}"} for i in range(GOOD_IMAGES)]
    path = _write_parquet(root / "kvasir.parquet", rows)
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with pytest.raises(SourceError, match=r"kvasir\.parquet: cannot read parquet file .*truncated or damaged"):
        prepare(rows_config(root, path, tiny_model_dir), quiet=True)
    _assert_previous_survives(root, before)


@pytest.mark.parametrize("fmt", ["parquet", "jsonl", "csv"])
def test_missing_answer_column_is_named(previous_run, tiny_model_dir, fmt):
    root, before = previous_run
    rows = [{"image": f"images/good{i}.png", "question": QUESTION, "img_id": f"g{i}"} for i in range(GOOD_IMAGES)]
    if fmt == "parquet":
        path = _write_parquet(root / "no_answer.parquet", rows)
    elif fmt == "jsonl":
        path = write_jsonl_rows(root / "no_answer.jsonl", rows)
    else:
        path = root / "no_answer.csv"
        path.write_text("image,question,img_id\n" + "".join(f"{r['image']},{QUESTION},{r['img_id']}\n" for r in rows))
    with pytest.raises(SourceError) as caught:
        prepare(rows_config(root, path, tiny_model_dir), quiet=True)
    message = str(caught.value)
    expected = "no line has the required field(s) 'answer'" if fmt == "jsonl" else \
        "missing required column(s) 'answer'"
    assert expected in message and path.name in message
    assert "rejects.jsonl" not in message and "\n" not in message
    _assert_previous_survives(root, before)


def test_cli_prints_one_line_error_for_a_missing_column(tmp_path, tiny_model_dir):
    from typer.testing import CliRunner

    from surgvqa.cli import app

    path = tmp_path / "no_answer.csv"
    path.write_text("image,question\nimages/a.png,Is there text?\n")
    result = CliRunner().invoke(app, ["prepare", "--set", f"output_dir={tmp_path / 'runs'}", "--set",
                                      f"data.source={path}", "--set", f"model.name_or_path={tiny_model_dir}"])
    assert result.exit_code == 2
    errors = [line for line in result.output.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and "'answer'" in errors[0] and "Traceback" not in result.output


@pytest.mark.parametrize("kind", ["jsonl", "csv_header_only", "parquet"])
def test_empty_source_is_a_source_error(previous_run, tiny_model_dir, kind):
    root, before = previous_run
    if kind == "jsonl":
        path = root / "empty.jsonl"
        path.write_text("")
    elif kind == "csv_header_only":
        path = root / "empty.csv"
        path.write_text("image,question,answer\n")
    else:
        import pyarrow as pa
        import pyarrow.parquet as pq

        path = root / "empty.parquet"
        pq.write_table(pa.table({"image": pa.array([], pa.binary()), "question": pa.array([], pa.string()),
                                 "answer": pa.array([], pa.string())}), path)
    with pytest.raises(SourceError, match="holds no rows"):
        prepare(rows_config(root, path, tiny_model_dir), quiet=True)
    _assert_previous_survives(root, before)


def test_every_row_rejected_names_counts_reasons_and_an_existing_rejects_file(previous_run, tiny_model_dir):
    root, before = previous_run
    rows = [{**row, "answer": "nan"} for row in good_rows(root / "images")]
    rows.append({"image": "images/good0.png", "question": "", "answer": "no"})
    path = write_jsonl_rows(root / "all_bad.jsonl", rows)
    with pytest.raises(ValueError, match=r"no usable rows: all 13 row\(s\) rejected \(12 bad_answer") as caught:
        prepare(rows_config(root, path, tiny_model_dir), quiet=True)
    listed = re.search(r"listed in (\S+)$", str(caught.value)).group(1)
    assert len(Path(listed).read_text().splitlines()) == 13
    _assert_previous_survives(root, before)
    prepare(rows_config(root, root / "good.jsonl", tiny_model_dir), quiet=True)
    assert not Path(listed).exists()  # a later good run removes the failed run's list


def test_too_few_images_for_three_splits_is_an_error_naming_the_counts(previous_run, tiny_model_dir):
    root, before = previous_run
    rows = [{"img_id": f"good{i % 2}", "image": f"images/good{i % 2}.png", "question": f"Is there text {i}?",
             "answer": "no"} for i in range(12)]
    path = write_jsonl_rows(root / "two_images.jsonl", rows)
    with pytest.raises(ValueError, match=r"2 usable image\(s\) after rejects, .*needs at least 3"):
        prepare(rows_config(root, path, tiny_model_dir), quiet=True)
    _assert_previous_survives(root, before)


def test_twelve_images_from_twelve_sources_fill_every_split(tmp_path, tiny_model_dir):
    sources = [f"source {i}" for i in range(GOOD_IMAGES)]
    path = write_jsonl_rows(tmp_path / "spread.jsonl", good_rows(tmp_path / "images", sources=sources))
    result = prepare(rows_config(tmp_path, path, tiny_model_dir), quiet=True)
    assert all(result.counts[name] > 0 for name in ("train", "val", "test")), result.counts
    assignment = split_images({f"i{i}": f"s{i}" for i in range(3)})
    assert sorted(assignment.values()) == ["test", "train", "val"]


def test_parquet_list_answer_becomes_a_multi_label_answer(tmp_path, tiny_model_dir):
    import pyarrow as pa
    import pyarrow.parquet as pq

    images = [_encoded(Image.new("RGB", (32, 32), (12 * i, 60, 90)), "PNG") for i in range(GOOD_IMAGES)]
    path = tmp_path / "lists.parquet"
    pq.write_table(pa.table({"image": images, "question": [COLOR_QUESTION] * GOOD_IMAGES,
                             "answer": [["red", "pink"]] * GOOD_IMAGES,
                             "img_id": [f"p{i}" for i in range(GOOD_IMAGES)]}), path)
    result = prepare(rows_config(tmp_path, path, tiny_model_dir), quiet=True)
    records = [r for name in ("train", "val", "test") for r in read_records(result.prepared_dir / f"{name}.jsonl")]
    assert len(records) == GOOD_IMAGES and {r.answer for r in records} == {"red; pink"}


def test_embedded_images_with_a_reused_img_id_are_conflicts_every_time(tmp_path, tiny_model_dir):
    images = [_encoded(Image.new("RGB", (32, 32), (12 * i, 60, 90)), "PNG") for i in range(GOOD_IMAGES)]
    other = _encoded(Image.new("RGB", (32, 32), (255, 255, 0)), "PNG")
    rows = [{"image": data, "question": QUESTION, "answer": "no", "img_id": f"p{i}"} for i, data in enumerate(images)]
    rows += [{"image": other, "question": f"How many polyps are in the image? {n}", "answer": "1", "img_id": "p0"}
             for n in range(2)]  # consecutive rows with the same other bytes: both conflict
    rows.append({"image": images[1], "question": "How many polyps are in the image?", "answer": "1", "img_id": "p1"})
    result = prepare(rows_config(tmp_path, _write_parquet(tmp_path / "reused.parquet", rows), tiny_model_dir), quiet=True)
    conflicts = [item for item in rejects_of(result.prepared_dir) if item["reason"] == "img_id_conflict"]
    assert [item["origin"] for item in conflicts] == ["reused.parquet row 12", "reused.parquet row 13"]
    assert "first read at reused.parquet row 0" in conflicts[0]["detail"]
    assert sum(result.counts.values()) == GOOD_IMAGES + 1
    # The rejected rows' bytes never replace the kept image's file.
    kept = next(r for r in read_records_of(result.prepared_dir) if r.img_id == "p0")
    assert (result.prepared_dir / kept.image).read_bytes() == images[0]


@pytest.mark.parametrize("strategy", ["span", "sentinel"])
def test_measured_length_equals_the_encoding_with_listed_candidates(tiny_model_dir, strategy):
    from surgvqa.data.records import Record
    from surgvqa.models.loading import load_processor

    config = load_config(None, [f"masking.strategy={strategy}", "prompt.list_candidates=true",
                                f"model.name_or_path={tiny_model_dir}"])
    processor = load_processor(str(tiny_model_dir), config.model, strategy)
    lengths = SampleLengths(config, processor)
    cases = [(COLOR_QUESTION, "red; pink", ["pink", "red", "none"], (300, 17)),
             (QUESTION, "No", ["yes", "no"], (1, 1)),
             ("What is the size of the polyp?", "<5mm", ["<5mm", "5-10mm", ">20mm"], (640, 480))]
    for question, answer, candidates, size in cases:
        record = Record(id="r", img_id="r", image="", question=question, answer=answer, question_type="mcq",
                        candidates=candidates)
        encoded = encode_example(processor, record, Image.new("RGB", size), config.prompt, config.masking)
        assert len(encoded.features["input_ids"]) == lengths.total(record, lengths.image_tokens(*size))
