"""Property (issue 29): whatever the raw rows hold, every row lands in exactly one split or in ``rejects.jsonl``,
never both, never neither, and ``prepare`` raises nothing but its documented one-line source errors.

Hypothesis writes a JSON-lines source of generated rows (questions, answers with punctuation, zero-width and other
unicode characters, numbers, booleans, lists and objects, image references good, empty, broken, missing or escaping,
damaged lines and keys given twice) beside six fixed good rows, and runs the real ``prepare`` on it. The tokenizer
is loaded once for the module, the images are a handful of tiny files: 500 examples take well under a minute.
"""

import json
from pathlib import Path

import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from PIL import Image

from surgvqa.core.config import load_config
from surgvqa.data.answers import normalize_answer
from surgvqa.data.records import SPLITS
from surgvqa.data.sources import SourceError

pytestmark = pytest.mark.usefixtures("one_torch_thread")

EXAMPLES = 500
FIXED_IMAGES = 6
QUESTIONS = ["Is there text?", "How many polyps are in the image?",
             "What color is the abnormality? If more than one separate with ;", "What is the size of the polyp?", "Where in the image is the instrument?",
             "Is the lesion red or pink?", "Describe the image."]
ODD_TEXT = [".", "?!", ";", "; ;", "\u200b", "\u200d", "yes\u200b", " yes ", "nan", "None", "null", "", "1,000",
            "1e3", "-2", "2.5", "3", "<5mm", ">20", "pink; red", "red;", "<b>x</b>", "**x**", "<|im_end|>",
            "\x00yes", "ja", "是", "🙂", "\ufeffno"]
GOOD_REFS = ["images/a.png", "images/b.png", "images/c.jpg", "images/fixed1.png"]
BAD_REFS = ["images/empty.png", "images/broken.png", "images/missing.png", "../outside.png", "/etc/hostname", "",
            None, 3]


def _text(alphabet_extra: list[str]) -> st.SearchStrategy:
    return st.one_of(st.sampled_from(alphabet_extra), st.text(max_size=12),
                     st.text(alphabet=st.sampled_from(list(".,;:?!-_ \u200b\u200c\u200d\ufeff\u00a0")), max_size=4))


ANSWERS = st.one_of(st.sampled_from(ODD_TEXT), _text(ODD_TEXT), st.booleans(), st.integers(-5, 2000), st.floats(allow_nan=True),
                    st.lists(st.one_of(_text(ODD_TEXT), st.booleans(), st.none()), max_size=3),
                    st.dictionaries(st.text(max_size=3), st.text(max_size=3), max_size=2), st.none())
QUESTIONS_ST = st.one_of(st.sampled_from(QUESTIONS), st.sampled_from(QUESTIONS), st.sampled_from(QUESTIONS),
                         _text(["", "\u200b", "Is there text?\u200b"]), st.lists(st.text(max_size=4), max_size=2),
                         st.integers(), st.none())
IMAGES = st.one_of(st.sampled_from(GOOD_REFS), st.sampled_from(GOOD_REFS), st.sampled_from(GOOD_REFS),
                   st.sampled_from(BAD_REFS))
IMG_IDS = st.one_of(st.sampled_from(["a", "b", "c", "fixed0", "x y", "../z", ""]), st.none(), st.integers(0, 3))
ROW = st.fixed_dictionaries({"question": QUESTIONS_ST, "answer": ANSWERS, "image": IMAGES},
                            optional={"img_id": IMG_IDS,
                                      "source": st.sampled_from(["Polyps", "Normal", "", None]),
                                      "split": st.sampled_from(["train", "test", "val", "foo", "eval", ""])})
KEY_TWICE = '{"question": "Is there text?", "answer": "yes", "answer": "no", "image": "images/a.png"}'
LINE = st.one_of(*[ROW.map(json.dumps)] * 6,
                 st.sampled_from([KEY_TWICE, "{not json", "[1, 2]", '"text"', "\udcff"]))


@pytest.fixture(scope="module")
def setup(tmp_path_factory, tiny_model_dir):
    """The image folder, one config per task and the processor, loaded once."""
    from surgvqa.prompting.sample_length import _load_processor

    root = tmp_path_factory.mktemp("property")
    images = root / "data" / "images"
    images.mkdir(parents=True)
    for index in range(FIXED_IMAGES):
        Image.new("RGB", (28, 28), (40 * index, 90, 150)).save(images / f"fixed{index}.png")
    Image.new("RGB", (30, 20), (200, 10, 10)).save(images / "a.png")
    Image.new("RGB", (20, 30), (10, 200, 10)).save(images / "b.png")
    Image.new("RGB", (24, 24), (10, 10, 200)).save(images / "c.jpg")
    (images / "empty.png").write_bytes(b"")
    (images / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\nnot really")
    source = root / "data" / "rows.jsonl"
    configs = {(task, duplicates): load_config(None, [
        f"output_dir={root / 'runs'}", f"run_name={task}-{duplicates}", f"data.source={source}",
        f"cache_dir={root / 'cache'}", f"model.name_or_path={tiny_model_dir}", f"task={task}",
        f"data.contradictory_duplicates={duplicates}"])
        for task in ("kvasir-vqa", "vqa-jsonl") for duplicates in ("report", "drop")}
    processor = _load_processor(configs["kvasir-vqa", "report"])
    return source, configs, processor


def _fixed_lines(task: str) -> list[str]:
    rows = []
    for index in range(FIXED_IMAGES):
        row = {"img_id": f"fixed{index}", "image": f"images/fixed{index}.png", "question": QUESTIONS[index % 3],
               "answer": "no" if index % 3 == 0 else str(index), "source": "Polyps"}
        if task == "vqa-jsonl":
            row["split"] = "test" if index >= FIXED_IMAGES - 2 else "train"
        rows.append(json.dumps(row))
    return rows


def _lines(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()] if path.is_file() else []


class _Runner:
    """prepare on one of the configs; a short repr, since Hypothesis prints it with a failing example."""

    def __init__(self, source: Path, configs: dict, prepare):
        self.source, self.configs, self.prepare = source, configs, prepare

    def __repr__(self) -> str:
        return f"<prepare of {self.source}>"


@pytest.fixture(scope="module")
def checked_prepare(setup):
    """prepare, with every row's outcome at reading checked: it is either kept or rejected, exactly once."""
    from surgvqa.stages import prepare as prepare_module

    source, configs, processor = setup
    original_read = prepare_module._RowReader.read

    def read_once(reader, raw):
        before = (len(reader.records), len(reader.rejects))
        original_read(reader, raw)
        grown = (len(reader.records) - before[0], len(reader.rejects) - before[1])
        assert grown in ((1, 0), (0, 1)), f"{raw.origin}: kept/rejected {grown}"

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(prepare_module._RowReader, "read", read_once)
        patch.setattr("surgvqa.prompting.sample_length._load_processor", lambda config: processor)
        # Durability is not what is checked here, and a disk flush per file is most of an example's time.
        patch.setattr("surgvqa.core.io.os.fsync", lambda fd: None)
        yield _Runner(source, configs, lambda key: prepare_module.prepare(configs[key], quiet=True))


@settings(max_examples=EXAMPLES, deadline=None, database=None, derandomize=True,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                 HealthCheck.function_scoped_fixture])
@given(task=st.sampled_from(["kvasir-vqa", "kvasir-vqa", "vqa-jsonl"]), duplicates=st.sampled_from(["report", "drop"]),
       generated=st.lists(LINE, max_size=8), position=st.integers(0, 6))
def test_every_raw_row_lands_in_exactly_one_split_or_in_rejects(checked_prepare, task, duplicates, generated, position):
    run_prepare, configs, source = checked_prepare.prepare, checked_prepare.configs, checked_prepare.source
    lines = _fixed_lines(task)
    lines[position:position] = generated
    source.write_text("".join(line + "\n" for line in lines), encoding="utf-8", errors="surrogatepass")
    run_dir = configs[task, duplicates].run_dir
    (run_dir / "prepare-rejects.jsonl").unlink(missing_ok=True)
    try:
        result = run_prepare((task, duplicates))
    except (SourceError, ValueError) as exc:
        event(f"prepare refused the source: {str(exc).split(':')[1][:40]}")
        # The documented whole-source errors: one line naming the source, every rejected row listed where said.
        message = str(exc)
        assert str(source) in message and "\n" not in message
        if "no usable rows" in message:
            assert len(_lines(run_dir / "prepare-rejects.jsonl")) == len(lines)
        return
    prepared = result.prepared_dir
    kept = [row for name in SPLITS for row in _lines(prepared / f"{name}.jsonl")]
    rejects = _lines(prepared / "rejects.jsonl")
    assert len(kept) + len(rejects) == len(lines)  # none lost, none counted twice
    assert len({row["id"] for row in kept}) == len(kept)
    origins = [item["origin"] for item in rejects]
    assert len(set(origins)) == len(origins)  # one reject per raw row
    assert set(origins) <= {f"rows.jsonl line {number}" for number in range(1, len(lines) + 1)}
    assert all(item["detail"] for item in rejects)
    for reason in {item["reason"] for item in rejects}:
        event(f"reject {reason}")
    assert all(normalize_answer(row["answer"]) and row["question"].strip() for row in kept)  # no empty target
    if result.contradictions.get("questions"):
        event(f"contradictory duplicates {result.contradictions['action']}")
