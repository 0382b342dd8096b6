import itertools
import json

import pytest
import torch
from PIL import Image

from surgvqa.core.config import load_config
from surgvqa.data.records import Record, read_records
from surgvqa.models.loading import load_processor, register_sentinel_tokens
from surgvqa.models.special_tokens import ANSWER_CLOSE
from surgvqa.prompting.chat import render_prompt, render_training
from surgvqa.prompting.encoding import SampleTooLong, encode_example, encode_prompt, load_image
from surgvqa.prompting.masking import IGNORE_INDEX, labels_from_offsets
from surgvqa.tasks.kvasir_vqa import TEMPLATES
from surgvqa.training.dataset import TrainingCollator

STRATEGIES = ("span", "sentinel")


def _all_kvasir_answers() -> list[str]:
    """Every documented answer, the known typos, multi-label combinations, in several letter cases."""
    labels = sorted({label for template in TEMPLATES for label in template.vocabulary})
    labels += ["lower-rigth", ">20", "Z-line", "not relevant"]
    combos = ["; ".join(pair) for pair in itertools.combinations(["pink", "red", "white", "flesh"], 2)]
    combos += ["upper-left; center; lower-rigth", "paris ip;paris is", "5-10mm;<5mm", "tube; metal clip"]
    answers = labels + combos
    return sorted({variant for answer in answers for variant in (answer, answer.upper(), answer.capitalize())})


@pytest.fixture(scope="module")
def image():
    return Image.new("RGB", (112, 112), (190, 110, 120))


def _settings(strategy: str, *extra: str):
    return load_config(None, [f"masking.strategy={strategy}", "prompt.normalize_targets=false", *extra])


@pytest.fixture(scope="module")
def processors(tiny_model_dir):
    config = load_config()
    return {strategy: load_processor(str(tiny_model_dir), config.model, strategy) for strategy in STRATEGIES}


def _record(answer: str, question: str = "What color is the abnormality? If more than one separate with ;"):
    return Record(id="r1", img_id="i1", image="", question=question, answer=answer, question_type="color")


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_every_kvasir_answer_supervises_exactly_the_answer(strategy, processors, image):
    config = _settings(strategy)
    processor = processors[strategy]
    merge = processor.image_processor.merge_size
    answers = _all_kvasir_answers()
    assert len(answers) > 150
    for answer in answers:
        example = encode_example(processor, _record(answer), image, config.prompt, config.masking)
        labels = example.features["labels"].tolist()
        supervised = processor.tokenizer.decode([label for label in labels if label != IGNORE_INDEX])
        expected = answer + (ANSWER_CLOSE if strategy == "sentinel" else "") + "<|im_end|>"
        assert supervised == expected, answer
        assert example.straddling == []
        grid = example.features["image_grid_thw"]
        image_tokens = (example.features["input_ids"] == processor.image_token_id).sum().item()
        assert image_tokens == int(grid.prod()) // merge**2


def test_sentinels_without_atomic_tokens_are_flagged(tiny_model_dir, image):
    """The seed's format with plain-text sentinels: BPE merges `>No`, and the straddling token is detected."""
    config = _settings("sentinel")
    processor = load_processor(str(tiny_model_dir), config.model, "span")  # no added <ANS> tokens
    example = encode_example(processor, _record("No"), image, config.prompt, config.masking)
    assert example.straddling, "a token crossing the <ANS>/answer boundary must be reported"
    register_sentinel_tokens(processor.tokenizer)
    example = encode_example(processor, _record("No"), image, config.prompt, config.masking)
    assert example.straddling == []


def test_span_labels_equal_separate_prompt_and_answer_tokenisation(processors, prepared_demo):
    """The method of other fine-tuning tools: tokenize the prompt, then the answer, and concatenate."""
    config = _settings("span")
    processor = processors["span"]
    tokenizer = processor.tokenizer
    records = read_records(prepared_demo / "train.jsonl")[:200]
    assert len(records) == 200
    for record in records:
        image = load_image(record, prepared_demo)
        example = encode_example(processor, record, image, config.prompt, config.masking)
        prompt_ids = encode_prompt(processor, record, image, config.prompt, "span")["input_ids"].tolist()
        answer_ids = tokenizer(record.answer.strip() + "<|im_end|>", add_special_tokens=False)["input_ids"]
        trailing = tokenizer("\n", add_special_tokens=False)["input_ids"]
        assert example.features["input_ids"].tolist() == prompt_ids + answer_ids + trailing
        reference = [IGNORE_INDEX] * len(prompt_ids) + answer_ids + [IGNORE_INDEX] * len(trailing)
        assert example.features["labels"].tolist() == reference, record.id


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_inference_prompt_is_a_strict_prefix_of_the_training_sequence(strategy, processors, prepared_demo):
    config = _settings(strategy)
    processor = processors[strategy]
    for record in read_records(prepared_demo / "val.jsonl")[:40]:
        image = load_image(record, prepared_demo)
        full = encode_example(processor, record, image, config.prompt, config.masking).features["input_ids"]
        prompt = encode_prompt(processor, record, image, config.prompt, strategy)["input_ids"]
        assert len(prompt) < len(full)
        assert torch.equal(full[: len(prompt)], prompt)
        # The first supervised token is the first token after the prompt.
        labels = encode_example(processor, record, image, config.prompt, config.masking).features["labels"]
        assert (labels[: len(prompt)] == IGNORE_INDEX).all() and labels[len(prompt)] != IGNORE_INDEX
        assert render_training(processor, record, config.prompt, strategy).text.startswith(
            render_prompt(processor, record, config.prompt, strategy))


def test_over_long_sample_is_rejected_not_truncated(processors, image):
    config = _settings("span", "masking.max_length=40")
    with pytest.raises(SampleTooLong, match=r"r1: \d+ tokens exceed masking.max_length=40"):
        encode_example(processors["span"], _record("pink"), image, config.prompt, config.masking)
    # The advice follows the cause: a long question is not fixed by fewer image tokens.
    wordy = _record("pink")
    wordy.question = "Is there text? " * 200
    with pytest.raises(SampleTooLong, match=r"the text is too long \(\d+ text tokens\): shorten the question"):
        encode_example(processors["span"], wordy, image, config.prompt, config.masking)


def test_labels_from_offsets_reports_straddling_tokens():
    # text "xx<A>No": a token covering chars 3..6 crosses a span that starts at 5
    result = labels_from_offsets([1, 2, 3], [(0, 2), (2, 3), (3, 7)], [(5, 7)])
    assert result.labels == [IGNORE_INDEX] * 3 and result.straddling == [2]


def test_collator_pads_right_and_concatenates_pixels(processors, image):
    config = _settings("span")
    processor = processors["span"]
    features = [encode_example(processor, _record(answer), image, config.prompt, config.masking).features
                for answer in ("red", "short-segment barretts; hemorrhoids")]
    batch = TrainingCollator(processor.tokenizer.pad_token_id)(features)
    lengths = [len(item["input_ids"]) for item in features]
    assert batch["input_ids"].shape == (2, max(lengths))
    short = lengths.index(min(lengths))
    assert (batch["labels"][short, min(lengths):] == IGNORE_INDEX).all()
    assert (batch["attention_mask"][short, min(lengths):] == 0).all()
    assert batch["pixel_values"].shape[0] == sum(item["pixel_values"].shape[0] for item in features)
    assert batch["image_grid_thw"].shape == (2, 3)


def test_diagnose_cli_reports_and_emits_json(demo_config_overrides, prepared_demo):
    from typer.testing import CliRunner

    from surgvqa.cli import app

    args = [item for override in demo_config_overrides for item in ("--set", override)]
    runner = CliRunner()
    result = runner.invoke(app, ["diagnose", "--n", "5", "--no-whole-file", *args])
    assert result.exit_code == 0, result.output
    assert "supervised text: 'yes<|im_end|>'" in result.output or "supervised text: 'no<|im_end|>'" in result.output
    assert "would fail" in result.output
    result = runner.invoke(app, ["diagnose", "--n", "2", "--json", *args])
    assert result.exit_code == 0, result.output
    payload = json.loads(result.output)
    assert payload["failing"] == 0 and payload["total"] > 1000
    assert {sample["question_type"] for sample in payload["samples"]} >= {"yes_no", "color", "mcq"}
    assert all(sample["ok"] and sample["image_tokens"] == sample["image_tokens_expected"]
               for sample in payload["samples"])
