"""Image-grouped training (train.group_by_image): one image's questions in one row must give each answer the loss
and the gradients it has alone, on every family grouping serves; the others are refused in one line."""

from __future__ import annotations

import collections
import json
import shutil
from pathlib import Path

import pytest
import torch

from surgvqa.core.config import load_config
from surgvqa.data.records import read_records
from surgvqa.models.loading import load_model, load_processor
from surgvqa.models.tiny import ensure_tiny_model
from surgvqa.prompting.encoding import collate, encode_example, load_image
from surgvqa.prompting.shared_prefix import rope_index_of
from surgvqa.stages.diagnose import GROUPED_LOSS_TOLERANCE, run_diagnostic
from surgvqa.training.grouping import (
    PREFIX_SEGMENT,
    build_rows,
    check_grouping_supported,
    collate_rows,
    grouped_accumulation_steps,
    grouped_attention_mask,
    pack_images,
    per_answer_losses,
    shared_prefix_length,
    tokens_in_batch,
)
from surgvqa.training.trainer import apply_lora, grouped_training_config, grouped_training_inputs, train

pytestmark = pytest.mark.usefixtures("one_torch_thread")  # conftest.py: one torch thread for the module

MIN_PIXELS, MAX_PIXELS = 56 * 56, 112 * 112
GROUPED_FAMILIES = ("qwen2_vl", "qwen2_5_vl", "qwen3_vl")
QUESTIONS = 4  # per image: enough segments to expose a leak between them, few enough to stay fast


def _model_dir(session_cache: Path, arch: str) -> Path:
    return ensure_tiny_model(session_cache / "models", arch=arch, seed=0, min_pixels=MIN_PIXELS,
                             max_pixels=MAX_PIXELS)


def _image_questions(prepared: Path, count: int = QUESTIONS) -> list:
    """The first image of the training split with at least ``count`` questions, ``count`` of them."""
    by_image = collections.defaultdict(list)
    for record in read_records(prepared / "train.jsonl"):
        by_image[record.img_id].append(record)
    return next(records[:count] for records in by_image.values() if len(records) >= count)


def _setup(session_cache, prepared_demo, arch, *extra):
    path = str(_model_dir(session_cache, arch))
    config = load_config(None, [f"model.name_or_path={path}", "model.dtype=float32", "lora.dropout=0", *extra])
    processor = load_processor(path, config.model)
    records = _image_questions(prepared_demo)
    image = load_image(records[0], prepared_demo)
    examples = [encode_example(processor, record, image, config.prompt, config.masking).features
                for record in records]
    return config, processor, examples


def _separate_losses(model, examples, pad_id):
    return [loss for example in examples for loss in per_answer_losses(model, collate([example], pad_id))]


def _grouped_losses(model, examples, pad_id, max_length=2048, attention="sdpa"):
    rows = build_rows(examples, rope_index_of(model), max_length)
    return [loss for row in rows
            for loss in per_answer_losses(model, collate_rows([row], pad_id, attention, torch.float32))]


def _largest_difference(first, second) -> float:
    return max(abs(float(a.detach() - b.detach())) for a, b in zip(first, second, strict=True))


def _lora_gradients(model, losses_of) -> dict[str, torch.Tensor]:
    model.zero_grad(set_to_none=True)
    torch.stack(losses_of()).sum().backward()
    return {name: parameter.grad.clone() for name, parameter in model.named_parameters()
            if parameter.requires_grad and parameter.grad is not None}


@pytest.mark.parametrize("checkpointing", [False, True], ids=["plain", "gradient_checkpointing"])
@pytest.mark.parametrize("arch", GROUPED_FAMILIES)
def test_grouped_answers_have_the_losses_and_gradients_of_separate_samples(arch, checkpointing, session_cache,
                                                                           prepared_demo):
    config, processor, examples = _setup(session_cache, prepared_demo, arch,
                                         f"model.gradient_checkpointing={str(checkpointing).lower()}")
    torch.manual_seed(0)
    model = apply_lora(load_model(config.model.name_or_path, config, processor, for_training=True), config.lora)
    with torch.no_grad():  # LoRA's B starts at zero: give the adapters a gradient path that is not trivial
        for name, parameter in model.named_parameters():
            if "lora_B" in name:
                parameter.normal_(std=0.02)
    model.train()
    pad_id = processor.tokenizer.pad_token_id

    separate = _separate_losses(model, examples, pad_id)
    grouped = _grouped_losses(model, examples, pad_id)
    assert len(grouped) == len(separate) == QUESTIONS
    assert _largest_difference(separate, grouped) < 2e-5

    separate_grads = _lora_gradients(model, lambda: _separate_losses(model, examples, pad_id))
    grouped_grads = _lora_gradients(model, lambda: _grouped_losses(model, examples, pad_id))
    assert separate_grads.keys() == grouped_grads.keys() and len(separate_grads) > 0
    for name, expected in separate_grads.items():
        scale = float(expected.abs().max()) + 1e-12
        assert float((grouped_grads[name] - expected).abs().max()) / scale < 1e-4, name


def test_eager_attention_takes_a_float_mask_and_gives_the_same_losses(session_cache, prepared_demo):
    config, processor, examples = _setup(session_cache, prepared_demo, "qwen2_vl", "model.attn_implementation=eager")
    model = load_model(config.model.name_or_path, config, processor, for_training=False).eval()
    assert model.config._attn_implementation == "eager"
    pad_id = processor.tokenizer.pad_token_id
    row = build_rows(examples, rope_index_of(model), 2048)[0]
    mask = collate_rows([row], pad_id, "eager", torch.float32)["attention_mask"]
    assert mask.dtype == torch.float32 and set(mask.unique().tolist()) == {0.0, torch.finfo(torch.float32).min}
    with torch.no_grad():
        separate = _separate_losses(model, examples, pad_id)
        grouped = _grouped_losses(model, examples, pad_id, attention="eager")
    assert _largest_difference(separate, grouped) < 2e-5


def test_a_plain_causal_mask_over_the_grouped_row_changes_the_losses(session_cache, prepared_demo):
    """The negative control: the block mask does real work (later segments must not see earlier questions)."""
    config, processor, examples = _setup(session_cache, prepared_demo, "qwen2_vl")
    model = load_model(config.model.name_or_path, config, processor, for_training=False).eval()
    pad_id = processor.tokenizer.pad_token_id
    batch = collate_rows(build_rows(examples, rope_index_of(model), 2048), pad_id, "sdpa", torch.float32)
    length = batch["input_ids"].shape[1]
    batch["attention_mask"] = torch.ones(length, length, dtype=torch.bool).tril()[None, None]
    with torch.no_grad():
        separate = _separate_losses(model, examples, pad_id)
        causal = per_answer_losses(model, batch)
    assert abs(float(causal[0] - separate[0])) < 2e-5  # the first segment sees only the prefix either way
    assert _largest_difference(separate[1:], causal[1:]) > 1e-3


def test_positions_running_on_through_the_row_change_the_losses(session_cache, prepared_demo):
    """The other negative control: each segment needs the positions it has alone, not those of its row place."""
    config, processor, examples = _setup(session_cache, prepared_demo, "qwen2_vl")
    model = load_model(config.model.name_or_path, config, processor, for_training=False).eval()
    pad_id = processor.tokenizer.pad_token_id
    batch = collate_rows(build_rows(examples, rope_index_of(model), 2048), pad_id, "sdpa", torch.float32)
    prefix = shared_prefix_length(examples)
    last_prefix_position = batch["position_ids"][:, :, prefix - 1:prefix]
    steps = torch.arange(1, batch["input_ids"].shape[1] - prefix + 1)
    batch["position_ids"][:, :, prefix:] = last_prefix_position + steps
    with torch.no_grad():
        separate = _separate_losses(model, examples, pad_id)
        running_on = per_answer_losses(model, batch)
    assert _largest_difference(separate[1:], running_on[1:]) > 1e-3


def test_a_group_longer_than_max_length_is_split_into_rows_that_each_repeat_the_prefix(session_cache,
                                                                                        prepared_demo):
    config, processor, examples = _setup(session_cache, prepared_demo, "qwen2_vl")
    model = load_model(config.model.name_or_path, config, processor, for_training=False).eval()
    prefix = shared_prefix_length(examples)
    segments = [len(example["input_ids"]) - prefix for example in examples]
    max_length = prefix + max(segments[0] + segments[1], segments[2] + segments[3])  # two questions per row
    assert prefix + sum(segments[:3]) > max_length
    rows = build_rows(examples, rope_index_of(model), max_length)
    assert len(rows) == 2
    for row in rows:
        assert len(row["input_ids"]) <= max_length
        assert torch.equal(row["input_ids"][:prefix], examples[0]["input_ids"][:prefix])
        assert int((row["segment_ids"] == PREFIX_SEGMENT).sum()) == prefix
        assert int((row["mm_token_type_ids"] != 0).sum()) == int((examples[0]["mm_token_type_ids"] != 0).sum())
    assert [int(row["segment_ids"].max()) for row in rows] == [2, 2]
    pad_id = processor.tokenizer.pad_token_id
    with torch.no_grad():  # both rows padded into one batch: padding must not change an answer either
        separate = _separate_losses(model, examples, pad_id)
        grouped = per_answer_losses(model, collate_rows(rows, pad_id, "sdpa", torch.float32))
    assert _largest_difference(separate, grouped) < 2e-5


@pytest.mark.parametrize("arch", GROUPED_FAMILIES)
def test_two_images_padded_into_one_batch_keep_every_answers_loss(arch, session_cache, prepared_demo):
    config, processor, first = _setup(session_cache, prepared_demo, arch)
    model = load_model(config.model.name_or_path, config, processor, for_training=False).eval()
    by_image = collections.defaultdict(list)
    for record in read_records(prepared_demo / "train.jsonl"):
        by_image[record.img_id].append(record)
    first_image = _image_questions(prepared_demo)[0].img_id
    other = next(records[:2] for image_id, records in by_image.items()
                 if len(records) >= 2 and image_id != first_image)
    image = load_image(other[0], prepared_demo)
    second = [encode_example(processor, record, image, config.prompt, config.masking).features for record in other]
    rope_index, pad_id = rope_index_of(model), processor.tokenizer.pad_token_id
    rows = build_rows(second, rope_index, 2048) + build_rows(first, rope_index, 2048)  # the shorter row first
    with torch.no_grad():
        separate = _separate_losses(model, second + first, pad_id)
        grouped = per_answer_losses(model, collate_rows(rows, pad_id, "sdpa", torch.float32))
    assert _largest_difference(separate, grouped) < 2e-5


def test_the_prefix_ends_before_every_question_and_holds_the_image(session_cache, prepared_demo):
    _, _, examples = _setup(session_cache, prepared_demo, "qwen2_vl")
    prefix = shared_prefix_length(examples)
    for example in examples:
        assert (example["labels"][: prefix + 1] == -100).all()  # the prefix's last token predicts no answer
        assert int((example["mm_token_type_ids"][prefix:] != 0).sum()) == 0
    assert shared_prefix_length(examples[:1]) < len(examples[0]["input_ids"])  # a lone question keeps a segment


def test_token_counts_from_2d_and_4d_masks_agree(session_cache, prepared_demo):
    config, processor, examples = _setup(session_cache, prepared_demo, "qwen2_vl")
    model = load_model(config.model.name_or_path, config, processor, for_training=False)
    rows = build_rows(examples, rope_index_of(model), 2048) + build_rows(examples[:1], rope_index_of(model), 2048)
    real_tokens = sum(len(row["input_ids"]) for row in rows)
    for attention in ("sdpa", "eager"):
        batch = collate_rows(rows, processor.tokenizer.pad_token_id, attention, torch.float32)
        assert batch["input_ids"].numel() > real_tokens  # the short row is padded
        assert tokens_in_batch(batch["attention_mask"]) == real_tokens
    padded = collate([examples[0], examples[1]], processor.tokenizer.pad_token_id)
    assert tokens_in_batch(padded["attention_mask"]) == len(examples[0]["input_ids"]) + len(examples[1]["input_ids"])


def test_qwen3_5_and_flash_attention_are_refused_in_one_line(session_cache):
    path = str(_model_dir(session_cache, "qwen3_5"))
    config = load_config(None, [f"model.name_or_path={path}", "train.group_by_image=true"])
    with pytest.raises(ValueError, match=r"not supported: Qwen3\.5's linear-attention") as refused:
        grouped_training_config(config)
    assert "\n" not in str(refused.value)
    with pytest.raises(ValueError, match=r"attention 'flash_attention_2' cannot express a shared prefix .* model\.attn_implementation=sdpa") as flash:
        check_grouping_supported("qwen2_vl", "flash_attention_2")
    assert "\n" not in str(flash.value)
    with pytest.raises(ValueError, match="flash_attention_2"):
        grouped_attention_mask(torch.zeros(1, 4, dtype=torch.long), "flash_attention_2")
    for arch in GROUPED_FAMILIES:
        check_grouping_supported(arch, "sdpa")


def test_micro_batches_hold_whole_images_and_steps_keep_their_question_count():
    counts = [9, 8, 1, 10, 3, 9, 2, 1]
    batches = pack_images(counts, 4, seed=0)
    assert sorted(i for batch in batches for i in batch) == list(range(len(counts)))
    for batch in batches:
        assert len(batch) == 1 or sum(counts[i] for i in batch) <= 4
    assert pack_images(counts, 4, seed=0) == batches and pack_images(counts, 4, seed=1) != batches
    # the recipe's 4 x 16 = 64 questions per optimizer step, with about 9 questions per micro-batch
    assert grouped_accumulation_steps(9.0, 4, 16) == 7
    assert grouped_accumulation_steps(100.0, 4, 16) == 1


def test_an_optimizer_step_holds_about_batch_size_times_accumulation_questions(session_cache, prepared_demo,
                                                                                tmp_path):
    path = str(_model_dir(session_cache, "qwen2_vl"))
    config = load_config(None, [f"model.name_or_path={path}", "train.group_by_image=true",
                                "train.per_device_batch_size=4", "train.grad_accum=16"])
    processor = load_processor(path, config.model)
    model = load_model(path, config, processor, for_training=True)
    dataset, args, _ = grouped_training_inputs(config, model, processor, prepared_demo / "train.jsonl", tmp_path)
    assert args.per_device_train_batch_size == 1  # one item is one micro-batch of whole images
    questions = sum(dataset.question_counts)
    assert questions == len(read_records(prepared_demo / "train.jsonl"))
    steps_per_epoch = len(dataset) / args.gradient_accumulation_steps
    assert abs(questions / steps_per_epoch - 4 * 16) / (4 * 16) < 0.15
    item = dataset[0]
    assert sum(int(row["segment_ids"].max()) for row in item) == sum(dataset.question_counts[i]
                                                                     for i in dataset.batches[0])


def test_diagnose_writes_the_largest_grouped_loss_difference(session_cache, prepared_demo):
    path = str(_model_dir(session_cache, "qwen2_vl"))
    config = load_config(None, [f"model.name_or_path={path}", "train.group_by_image=true"])
    processor = load_processor(path, config.model)
    report = run_diagnostic(config, processor, prepared_demo / "train.jsonl", per_type=1, full_summary=False,
                            quiet=True)
    payload = report.to_json()
    assert 0 <= payload["grouped_max_abs_loss_diff"] <= GROUPED_LOSS_TOLERANCE
    assert report.passed and payload["grouping_problem"] is None
    off = run_diagnostic(load_config(None, [f"model.name_or_path={path}"]), processor, prepared_demo / "train.jsonl",
                         per_type=1, full_summary=False, quiet=True)
    assert off.grouped_max_abs_loss_diff is None


def test_diagnose_fails_grouping_on_qwen3_5(session_cache, prepared_demo):
    path = str(_model_dir(session_cache, "qwen3_5"))
    config = load_config(None, [f"model.name_or_path={path}", "train.group_by_image=true"])
    report = run_diagnostic(config, load_processor(path, config.model), prepared_demo / "train.jsonl", per_type=1,
                            full_summary=False, quiet=True)
    assert report.failing == 0 and not report.passed
    assert "Qwen3.5" in report.grouping_problem and report.to_json()["grouping_problem"] == report.grouping_problem


def test_train_with_group_by_image_runs_end_to_end(demo_config_overrides, prepared_demo):
    overrides = [*demo_config_overrides, "run_name=grouped", "train.group_by_image=true", "train.max_steps=3",
                 "train.per_device_batch_size=4", "train.grad_accum=2", "train.logging_steps=1", "train.lr=1e-3"]
    config = load_config(None, overrides)
    shutil.copytree(prepared_demo, config.run_dir / "prepared", dirs_exist_ok=True)
    result = train(config)
    assert result.global_step == 3 and any(result.model_dir.glob("*.safetensors"))
    logged = [json.loads(line) for line in (config.run_dir / "train_log.jsonl").read_text().splitlines()]
    steps = [row for row in logged if "loss" in row]
    assert len(steps) == 3 and all(row["loss"] == row["loss"] and row["loss"] > 0 for row in steps)
    assert all(row["tokens_per_s"] > 0 and row["supervised_tokens"] > 0 for row in steps)
    made_with = json.loads((config.run_dir / "checkpoints" / "made_with.json").read_text())
    assert made_with["settings"]["train"]["group_by_image"] is True  # a resume without it is refused


