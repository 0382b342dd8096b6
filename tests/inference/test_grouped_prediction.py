"""Image-grouped prediction (predict.group_by_image, surgvqa.inference.prefix_cache): the questions about one image continue
one run of the image prefix, and every mode predicts what it predicts with each question's whole prompt."""

from __future__ import annotations

import logging
from collections import Counter
from pathlib import Path

import pytest
import torch
from PIL import Image
from support.model_checks import random_head

from surgvqa.core.config import load_config
from surgvqa.data.records import Record, write_records
from surgvqa.inference.prediction_files import read_done
from surgvqa.inference.predictor import Predictor, load_for_prediction
from surgvqa.inference.prefix_cache import image_groups, shared_prefix_length
from surgvqa.models.loading import vision_tower
from surgvqa.models.tiny import IMAGE_PAD_ID, ensure_tiny_model
from surgvqa.stages.predict import run as run_predict

pytestmark = pytest.mark.usefixtures("one_torch_thread")  # conftest.py: one torch thread for the module

MIN_PIXELS, MAX_PIXELS = 56 * 56, 112 * 112  # test_families' budget: the session's tiny models are shared
IMAGES = 3
# Questions of different lengths (padding between the prefix and the shorter ones), closed single- and
# multi-label, and an open one (generated freely in every mode).
QUESTIONS = [
    ("Is there a polyp?", ["yes", "no"], False, "yes_no"),
    ("How many instruments are in the image?", [str(n) for n in range(6)], False, "count_numeric"),
    ("What color is the abnormality? If more than one separate with ;", ["pink", "red", "white", "yellow"], True,
     "color"),
    ("Where in the image is the abnormality?", ["upper-left", "center", "lower-right", "center-left"], True, "mcq"),
    ("Describe the finding", [], False, "open_ended"),
]


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("grouped")
    (folder / "images").mkdir()
    generator = torch.Generator().manual_seed(0)
    for index in range(IMAGES + 1):
        pixels = torch.randint(0, 256, (112, 112, 3), generator=generator, dtype=torch.uint8)
        Image.fromarray(pixels.numpy(), mode="RGB").save(folder / "images" / f"img{index}.png")
    return folder


def interleaved_records() -> list[Record]:
    """Every question about each of IMAGES images, interleaved (grouping must restore the input order), and one
    image asked once (it runs in the ungrouped batch)."""
    records = [Record(id=f"q{question}-img{image}", img_id=f"img{image}", image=f"images/img{image}.png",
                      question=text, answer=candidates[0] if candidates else "a polyp", question_type=kind,
                      candidates=candidates, multi_label=multi)
               for question, (text, candidates, multi, kind) in enumerate(QUESTIONS) for image in range(IMAGES)]
    alone = Record(id="alone", img_id=f"img{IMAGES}", image=f"images/img{IMAGES}.png", question=QUESTIONS[0][0],
                   answer="yes", question_type="yes_no", candidates=["yes", "no"])
    return [*records[:4], alone, *records[4:]]


def settings(path: Path, *extra: str) -> list[str]:
    return [f"model.name_or_path={path}", f"model.min_pixels={MIN_PIXELS}", f"model.max_pixels={MAX_PIXELS}",
            "predict.max_new_tokens_open=6", *extra]


@pytest.fixture(scope="module")
def predictors(session_cache, data_dir):
    """(grouped, ungrouped) predictors sharing one model per family, its LM head random so that answers vary."""
    cache: dict[tuple[str, str], tuple[Predictor, Predictor]] = {}

    def get(arch: str, attention: str = "sdpa") -> tuple[Predictor, Predictor]:
        if (arch, attention) not in cache:
            path = ensure_tiny_model(session_cache / "models", arch=arch, seed=0, min_pixels=MIN_PIXELS,
                                     max_pixels=MAX_PIXELS)
            config = load_config(None, settings(path, f"model.attn_implementation={attention}"))
            model, processor = load_for_prediction(config, str(path), quiet=True)
            ungrouped = load_config(None, settings(path, f"model.attn_implementation={attention}",
                                                   "predict.group_by_image=false"))
            cache[arch, attention] = (Predictor(model, processor, config, data_dir),
                                      Predictor(model, processor, ungrouped, data_dir))
        return cache[arch, attention]

    return get


class ImagesEncoded:
    """Counts the images the vision tower encodes."""

    def __init__(self, model):
        self.count = 0
        self.handle = vision_tower(model).register_forward_pre_hook(self._seen, with_kwargs=True)

    def _seen(self, _module, args, kwargs):
        self.count += len(kwargs["grid_thw"] if "grid_thw" in kwargs else args[1])

    def __enter__(self):
        return self

    def __exit__(self, *_exc) -> None:
        self.handle.remove()


def images_to_encode(predictor: Predictor, records: list[Record], mode: str, grouped: bool) -> int:
    """How many images the vision tower should see: per prediction method, once per image asked more than once when
    grouped, else once per question and pass (constrained decoding makes two: decoding, candidate likelihoods)."""
    by_method: dict[str, list[Record]] = {}
    for record in records:
        by_method.setdefault(predictor.method_for(record, mode), []).append(record)
    count = 0
    for method, rows in by_method.items():
        passes = 2 if method == "constrained" else 1
        asked = Counter(record.image for record in rows).values()
        count += sum(n > 1 for n in asked) + passes * sum(n == 1 for n in asked) if grouped else passes * len(rows)
    return count


def assert_close(grouped, ungrouped, where: str) -> None:
    """Equal, floats to rounding (fp32: a few 1e-6 on log-probabilities of a few tokens)."""
    if isinstance(grouped, float):
        assert grouped == pytest.approx(ungrouped, rel=1e-4, abs=1e-4), where
    elif isinstance(grouped, dict):
        assert grouped.keys() == ungrouped.keys(), where
        for key in grouped:
            assert_close(grouped[key], ungrouped[key], f"{where}.{key}")
    elif isinstance(grouped, list):
        assert len(grouped) == len(ungrouped), where
        for index, (left, right) in enumerate(zip(grouped, ungrouped)):
            assert_close(left, right, f"{where}[{index}]")
    else:
        assert grouped == ungrouped, where


@pytest.mark.parametrize(("arch", "attention"), [("qwen2_vl", "sdpa"), ("qwen2_5_vl", "sdpa"), ("qwen3_vl", "sdpa"),
                                                 ("qwen2_vl", "eager")])
@pytest.mark.parametrize("mode", ["generate", "constrained", "rank"])
def test_grouped_predictions_equal_the_ungrouped_row_for_row(arch, attention, mode, predictors):
    """eager adds a float mask built from the 2-D one: the padding between prefix and question is masked there too."""
    grouped, ungrouped = predictors(arch, attention)
    assert grouped.model.config._attn_implementation == attention
    assert grouped.group_by_image and not ungrouped.group_by_image
    records = interleaved_records()
    with random_head(grouped.model, seed=3):
        with ImagesEncoded(grouped.model) as encoded:
            by_image = grouped.predict_batch(records, mode)
        with ImagesEncoded(ungrouped.model) as separate:
            whole = ungrouped.predict_batch(records, mode)
    assert len(by_image) == len(whole) == len(records)
    for record, left, right in zip(records, by_image, whole):
        assert left.error is None and right.error is None, (left.error, right.error)
        for field in ("raw_text", "prediction", "method"):
            assert getattr(left, field) == getattr(right, field), (record.id, field)
        assert_close(left.confidence, right.confidence, f"{record.id}.confidence")
        assert_close(left.scores, right.scores, f"{record.id}.scores")
    assert encoded.count == images_to_encode(grouped, records, mode, grouped=True)
    assert separate.count == images_to_encode(ungrouped, records, mode, grouped=False)
    assert encoded.count < separate.count / 2


def largest_rank_difference(grouped, ungrouped, records, break_grouping) -> float:
    """A negative control's measure: the largest change of a candidate's rank score when ``break_grouping`` (called
    after the ungrouped reference ran, under the same random head) sabotages the grouped path."""
    with random_head(grouped.model, seed=3):
        expected = ungrouped.predict_batch(records, "rank")
        break_grouping()
        broken = grouped.predict_batch(records, "rank")
    return max(abs(left.scores[label]["sum"] - right.scores[label]["sum"])
               for left, right in zip(broken, expected) for label in left.scores)


def test_positions_as_alone_are_what_makes_the_reuse_exact(predictors, monkeypatch):
    """Negative control: the same reuse with the suffix tokens at their column index instead of their M-RoPE
    positions (an image of 4 x 4 tokens advances positions by 4, not 16) gives other candidate likelihoods."""
    from surgvqa.inference import prefix_cache

    grouped, ungrouped = predictors("qwen2_vl")
    records = [r for r in interleaved_records() if r.img_id == "img0" and r.candidates and not r.multi_label]

    def column_positions(_decoder, feature):
        return torch.arange(len(feature["input_ids"])).expand(3, -1)

    assert largest_rank_difference(grouped, ungrouped, records,
                                   lambda: monkeypatch.setattr(prefix_cache, "positions_alone", column_positions)) > 1e-2


def test_the_padding_between_prefix_and_a_shorter_question_must_be_masked(predictors, monkeypatch):
    """Negative control: the same reuse with the padding left visible changes the shorter question's likelihoods."""
    from surgvqa.inference.prefix_cache import ImagePrefixPrompts

    grouped, ungrouped = predictors("qwen2_vl")
    records = [r for r in interleaved_records() if r.img_id == "img0" and r.candidates and not r.multi_label]
    assert len({len(r.question) for r in records}) > 1  # a shorter question, padded

    def nothing_masked(prompts):
        return torch.ones((prompts.rows, prompts.length + prompts.suffix_ids.shape[1]), dtype=torch.long)

    assert largest_rank_difference(grouped, ungrouped, records,
                                   lambda: monkeypatch.setattr(ImagePrefixPrompts, "attention_mask", nothing_masked)) > 1e-2


def test_qwen3_5_runs_every_question_whole_and_says_why(predictors, caplog):
    with caplog.at_level(logging.WARNING, logger="surgvqa.inference.predictor"):
        grouped, _ = predictors("qwen3_5")
    assert not grouped.group_by_image
    assert any("group_by_image" in message and "Qwen3.5" in message for message in caplog.messages)
    records = interleaved_records()[:6]
    with ImagesEncoded(grouped.model) as encoded:
        outcomes = grouped.predict_batch(records, "rank")
    assert all(outcome.error is None for outcome in outcomes)
    assert encoded.count == images_to_encode(grouped, records, "rank", grouped=False)


def test_the_shared_prefix_holds_the_image_and_leaves_each_question_a_token():
    def prompt(*ids):
        return {"input_ids": torch.tensor(ids), "mm_token_type_ids": torch.tensor([int(i == IMAGE_PAD_ID) for i in ids])}

    image = [1, IMAGE_PAD_ID, IMAGE_PAD_ID, 2]
    assert shared_prefix_length([prompt(*image, 5, 6, 7), prompt(*image, 5, 8), prompt(*image, 5, 6, 7)]) == 5
    # identical prompts: the last token stays each one's own
    assert shared_prefix_length([prompt(*image, 5, 6), prompt(*image, 5, 6)]) == 5
    with pytest.raises(ValueError, match="do not hold the whole image"):
        shared_prefix_length([prompt(1, 3, *image), prompt(1, 4, *image)])


def test_image_groups_keep_first_appearance_and_batch_the_images_asked_once():
    records = [Record(id=str(i), img_id=image, image=image, question="q", answer="a")
               for i, image in enumerate(["a", "b", "a", "c", "d", "b", "a"])]
    assert image_groups(records, range(len(records))) == [[0, 2, 6], [1, 5], [3, 4]]
    assert image_groups(records, [3, 4]) == [[3, 4]]


def test_a_predictions_file_begun_without_grouping_is_resumed_with_it(session_cache, data_dir, tmp_path):
    """Grouping stays out of the file's made_with key and works inside each fixed input batch: a file killed
    part-way is resumed with the other setting, its missing rows are the same, and it ends as the whole run's."""
    path = ensure_tiny_model(session_cache / "models", arch="qwen2_vl", seed=0, min_pixels=MIN_PIXELS,
                             max_pixels=MAX_PIXELS)
    data = data_dir / "stage.jsonl"
    write_records(data, interleaved_records())
    out = tmp_path / "predictions.jsonl"

    def predict(grouped: bool) -> list[dict]:
        config = load_config(None, settings(path, f"output_dir={tmp_path}", "run_name=r", "predict.batch_size=6",
                                            f"predict.group_by_image={grouped}"))
        run_predict(config, "constrained", data, out, str(path), quiet=True)
        return read_done(out)

    whole = predict(grouped=False)
    lines = out.read_text(encoding="utf-8").splitlines(keepends=True)
    out.write_text("".join(lines[:7]), encoding="utf-8")  # a kill after the first batch and a row of the second
    resumed = predict(grouped=True)
    assert [row["id"] for row in resumed] == [record.id for record in interleaved_records()]
    for left, right in zip(resumed, whole):
        assert_close(left, right, left["id"])
