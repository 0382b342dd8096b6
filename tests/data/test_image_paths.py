"""Image-path confinement: every image a stage reads (train, predict, diagnose, the report) resolves inside the
run's prepared folder or the dataset's image root; anything else is that row's error, naming row and path."""

import json
from pathlib import Path

import pytest
from PIL import Image

from surgvqa.core.config import load_config
from surgvqa.data.images import resolve_within
from surgvqa.data.records import Record, read_records
from surgvqa.data.sources import allowed_image_roots
from surgvqa.prompting.encoding import load_image
from surgvqa.report.run_files import report_image_roots, thumbnail_data_uri
from surgvqa.stages.prepare import prepare

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _record(image: str, record_id: str = "row-7") -> Record:
    return Record(id=record_id, img_id="img", image=image, question="Is there text?", answer="no")


@pytest.fixture()
def folders(tmp_path) -> tuple[Path, Path]:
    """(prepared folder holding images/inside.png, a folder outside it holding secret.png)."""
    prepared, outside = tmp_path / "run" / "prepared", tmp_path / "elsewhere"
    (prepared / "images").mkdir(parents=True)
    outside.mkdir()
    Image.new("RGB", (16, 16), (0, 200, 0)).save(prepared / "images" / "inside.png")
    Image.new("RGB", (16, 16), (200, 0, 0)).save(outside / "secret.png")
    return prepared, outside


def test_a_relative_path_inside_the_folder_loads(folders):
    prepared, _ = folders
    assert load_image(_record("images/inside.png"), prepared).getpixel((0, 0)) == (0, 200, 0)


@pytest.mark.parametrize("reference", ["absolute", "../../elsewhere/secret.png", "images/link.png"])
def test_a_path_escaping_the_allowed_folders_is_the_rows_error(folders, reference):
    prepared, outside = folders
    (prepared / "images" / "link.png").symlink_to(outside / "secret.png")
    image = str(outside / "secret.png") if reference == "absolute" else reference
    with pytest.raises(ValueError, match=r"row-7: image path .* resolves outside the allowed image folders") as caught:
        load_image(_record(image), prepared)
    assert image in str(caught.value)


def test_an_absolute_path_under_an_allowed_root_loads(folders):
    prepared, outside = folders
    image = load_image(_record(str(outside / "secret.png")), prepared, roots=[prepared, outside])
    assert image.getpixel((0, 0)) == (200, 0, 0)


def test_a_nul_byte_in_the_path_is_refused_not_a_crash(folders):
    prepared, _ = folders
    assert resolve_within("images/in\x00side.png", [prepared]) is None
    with pytest.raises(ValueError, match="row-7"):
        load_image(_record("images/in\x00side.png"), prepared)


@pytest.fixture(scope="module")
def jsonl_run(tmp_path_factory, tiny_model_dir):
    """A JSONL source whose images live under data.image_root, prepared: its records hold absolute paths."""
    root = tmp_path_factory.mktemp("paths")
    images, lists = root / "scans", root / "lists"
    images.mkdir()
    lists.mkdir()
    Image.new("RGB", (16, 16), (1, 2, 3)).save(root / "outside.png")
    rows = []
    for i in range(12):
        Image.new("RGB", (32, 32), (20 * i, 50, 50)).save(images / f"{i}.png")
        rows.append({"image": f"{i}.png", "question": "Is there text?", "answer": "no"})
    rows.append({"image": str(root / "outside.png"), "question": "Is there text?", "answer": "no", "img_id": "abs"})
    source = lists / "data.jsonl"
    source.write_text("".join(json.dumps(row) + "\n" for row in rows))
    config = load_config(None, [f"output_dir={root / 'runs'}", f"data.source={source}", f"data.image_root={images}",
                                f"cache_dir={root / 'cache'}", f"model.name_or_path={tiny_model_dir}"])
    return config, prepare(config, quiet=True)


def test_prepare_rejects_an_absolute_image_path_outside_the_image_root(jsonl_run):
    _, result = jsonl_run
    rejects = [json.loads(line) for line in (result.prepared_dir / "rejects.jsonl").read_text().splitlines()]
    assert [item["reason"] for item in rejects] == ["image_outside_root"]
    assert "outside.png" in rejects[0]["detail"] and rejects[0]["origin"] == "data.jsonl line 13"


def test_records_under_the_image_root_load_with_the_runs_allowed_roots(jsonl_run):
    config, result = jsonl_run
    record = read_records(result.prepared_dir / "train.jsonl")[0]
    assert Path(record.image).is_absolute()
    roots = allowed_image_roots(config, result.prepared_dir)
    assert Path(config.data.image_root) in roots and config.run_dir / "prepared" in roots
    assert load_image(record, result.prepared_dir, roots=roots).size == (32, 32)
    with pytest.raises(ValueError, match="resolves outside the allowed image folders"):
        load_image(record, result.prepared_dir)  # a stage that forgets the image root refuses, never reads blindly


def test_diagnose_reports_an_escaping_image_as_that_rows_problem(jsonl_run, tiny_model_dir, tmp_path):
    from surgvqa.models.loading import load_processor
    from surgvqa.stages.diagnose import diagnose_record

    config, result = jsonl_run
    processor = load_processor(str(tiny_model_dir), config.model, "span")
    escaping = _record(str(tmp_path.parent / "outside.png"), "row-9")
    diagnosis = diagnose_record(processor, escaping, result.prepared_dir, config)
    assert not diagnosis.ok and "row-9: image path" in diagnosis.problems[0]
    inside = read_records(result.prepared_dir / "train.jsonl")[0]
    assert diagnose_record(processor, inside, result.prepared_dir, config).ok


def test_the_report_embeds_only_images_inside_the_runs_folders(folders, tmp_path):
    prepared, outside = folders
    run_dir = prepared.parent
    inside, secret = str(prepared / "images" / "inside.png"), str(outside / "secret.png")
    assert thumbnail_data_uri(inside, roots=[run_dir]).startswith("data:image/jpeg;base64,")
    assert thumbnail_data_uri(secret, roots=[run_dir]) is None
    assert thumbnail_data_uri(str(prepared / "images" / ".." / ".." / ".." / "elsewhere" / "secret.png"),
                              roots=[run_dir]) is None
    assert thumbnail_data_uri(inside, roots=[]) is None
    (run_dir / "config.resolved.yaml").write_text(f"data:\n  source: {tmp_path / 'x.jsonl'}\n"
                                                  f"  image_root: {outside}\n")
    roots = report_image_roots(run_dir)
    assert run_dir in roots and outside in roots
    assert thumbnail_data_uri(secret, roots=roots).startswith("data:image/jpeg;base64,")


def _rows_read(tmp_path: Path, images: list[str]) -> list:
    from surgvqa.data.sources import iter_raw_rows

    source = tmp_path / "data.jsonl"
    source.write_text("".join(json.dumps({"image": image, "question": "Is there text?", "answer": "no"}) + "\n"
                              for image in images))
    return list(iter_raw_rows(str(source), image_root=str(tmp_path)))


def test_a_symbolic_link_loop_is_named_as_one_not_as_escaping_the_root(tmp_path, folders):
    (tmp_path / "loop.png").symlink_to(tmp_path / "loop.png")
    (tmp_path / "a.png").symlink_to(tmp_path / "b.png")
    (tmp_path / "b.png").symlink_to(tmp_path / "a.png")
    rows = _rows_read(tmp_path, ["loop.png", "a.png"])
    assert [row.problem for row in rows] == ["image_link_loop", "image_link_loop"]
    assert rows[0].detail == ("image path 'loop.png' is a symbolic link loop (it leads back to itself); point the "
                              "link at the image file")

    prepared, _ = folders
    (prepared / "images" / "loop.png").symlink_to(prepared / "images" / "loop.png")
    with pytest.raises(ValueError, match=r"^row-7: image path 'images/loop.png' is a symbolic link loop"):
        load_image(_record("images/loop.png"), prepared)


def test_a_file_name_ending_in_a_space_is_found_as_written_and_padding_around_a_name_still_reads(tmp_path):
    Image.new("RGB", (16, 16), (0, 0, 200)).save(tmp_path / "scan.png ", format="PNG")  # the space ends the name
    Image.new("RGB", (16, 16), (0, 200, 0)).save(tmp_path / "plain.png")
    rows = _rows_read(tmp_path, ["scan.png ", " plain.png "])
    assert [row.problem for row in rows] == [None, None]
    assert [row.image_file for row in rows] == [tmp_path / "scan.png ", tmp_path / "plain.png"]
