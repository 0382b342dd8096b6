"""Every supported architecture through every stage, on its tiny offline model: masking, the supervised-only loss,
constrained decoding, rank, LoRA train -> save -> load -> predict, and resume.

One tiny checkpoint per family is built once per session; records come from the session's prepared demo split.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path

import pytest
import torch
from PIL import Image
from support.model_checks import assert_valid_closed, random_head
from support.training_batches import training_batch

from surgvqa.core.config import load_config
from surgvqa.data.records import read_records, write_records
from surgvqa.inference.decoding import is_closed
from surgvqa.inference.prediction_files import read_done
from surgvqa.inference.predictor import Predictor
from surgvqa.models.families import FAMILIES
from surgvqa.models.loading import load_model, load_processor, model_family, processor_token_side
from surgvqa.models.tiny import ARCHS, ensure_tiny_model
from surgvqa.prompting.chat import render_prompt, render_training
from surgvqa.stages.diagnose import diagnose_record
from surgvqa.stages.predict import run as run_predict
from surgvqa.training.trainer import TrainResult, supervised_only_loss, train

pytestmark = pytest.mark.usefixtures("one_torch_thread")  # conftest.py: one torch thread for the module

MIN_PIXELS, MAX_PIXELS = 56 * 56, 112 * 112  # the demo budget: 4 to 16 image tokens on every family


@pytest.fixture(scope="session")
def family_dirs(session_cache) -> dict[str, Path]:
    return {arch: ensure_tiny_model(session_cache / "models", arch=arch, seed=0, min_pixels=MIN_PIXELS,
                                    max_pixels=MAX_PIXELS) for arch in ARCHS}


@pytest.fixture(scope="module")
def loaded(family_dirs):
    """(config, processor, model) per architecture, with the demo's pixel budget, loaded once."""
    cache: dict[str, tuple] = {}

    def get(arch: str):
        if arch not in cache:
            path = str(family_dirs[arch])
            config = load_config(None, [f"model.name_or_path={path}"])
            processor = load_processor(path, config.model)
            cache[arch] = (config, processor, load_model(path, config, processor, for_training=False).eval())
        return cache[arch]

    return get


def closed_records(prepared_demo: Path, count: int) -> list:
    """Closed-set validation records, one of each question type first, with image paths the stages can resolve."""
    records = [r for r in read_records(prepared_demo / "val.jsonl") if is_closed(r)]
    first_of_type = list({r.question_type: r for r in reversed(records)}.values())
    chosen = (first_of_type + [r for r in records if r not in first_of_type])[:count]
    return [dataclasses.replace(r, image=str(prepared_demo / r.image)) for r in chosen]


def test_the_family_is_the_checkpoints_own(family_dirs):
    for arch, path in family_dirs.items():
        family = model_family(str(path))
        assert family.model_type == arch
        assert processor_token_side(str(path)) == family.token_side  # the saved processor agrees with the table
    assert FAMILIES["qwen3_vl"].token_side == 32 and FAMILIES["qwen2_vl"].token_side == 28


@pytest.mark.parametrize("arch", ARCHS)
def test_masking_diagnostic_loss_constrained_decoding_and_rank(arch, loaded, prepared_demo):
    config, processor, model = loaded(arch)
    records = closed_records(prepared_demo, 8)

    # The pixel budget means image tokens: 112 x 112 px of 28-px tokens = 16 tokens, also of 32-px tokens.
    square = processor(text=["<|vision_start|><|image_pad|><|vision_end|>"], images=[Image.new("RGB", (400, 400))],
                       return_tensors="pt")
    assert int((square["input_ids"] == processor.image_token_id).sum()) == MAX_PIXELS // (28 * 28)

    # The masking diagnostic; the inference prompt is a prefix of the training text.
    for record in records:
        diagnosis = diagnose_record(processor, record, prepared_demo, config)
        assert diagnosis.ok, diagnosis.problems
        rendered = render_training(processor, record, config.prompt)
        assert rendered.text.startswith(render_prompt(processor, record, config.prompt))
    if FAMILIES[arch].thinking_template:  # the template would open a think block by default: closed and empty
        assert render_prompt(processor, record, config.prompt).endswith("<think>\n\n</think>\n\n")

    # The supervised-only loss and its gradients equal the model's own.
    batch, labels = training_batch(processor, config, prepared_demo, n=3)
    model.zero_grad()
    reference = model(**batch, labels=labels).loss
    reference.backward()
    reference_grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad()
    loss, _ = supervised_only_loss(model, batch, labels)
    loss.backward()
    assert abs(loss.item() - reference.item()) < 1e-5
    assert reference_grads
    for name, parameter in model.named_parameters():
        if name in reference_grads:
            assert torch.allclose(parameter.grad, reference_grads[name], atol=1e-5), name
    model.zero_grad(set_to_none=True)

    # Constrained decoding from an untrained (random-head) model: every answer is a valid candidate (set).
    predictor = Predictor(model, processor, config, prepared_demo)
    with random_head(model, seed=3, chaotic=True):
        outcomes = predictor.predict_batch(records, "constrained")
    for record, outcome in zip(records, outcomes):
        assert outcome.error is None and outcome.method == "constrained"
        assert_valid_closed(record, outcome.raw_text, outcome.prediction)

    # Rank (shared prompt cache, explicit positions) equals the model's own forward on prompt + candidate.
    records = records[:2]
    features = [predictor.encode(r) for r in records]
    for record, feature, outcome in zip(records, features, predictor.predict_rank(records, features)):
        for label in dict.fromkeys(record.candidates):
            tokens = processor.tokenizer.encode(label, add_special_tokens=False) + [predictor.terminator]
            ids = torch.cat([feature["input_ids"], torch.tensor(tokens)])[None]
            mm = torch.cat([feature["mm_token_type_ids"], torch.zeros(len(tokens), dtype=torch.int)])[None]
            with torch.inference_mode():  # the model's own forward, positions and all, without a cache
                logits = model(input_ids=ids, attention_mask=torch.ones_like(ids), mm_token_type_ids=mm,
                               pixel_values=feature["pixel_values"], image_grid_thw=feature["image_grid_thw"],
                               logits_to_keep=len(tokens) + 1).logits[0, :-1]
            logprobs = torch.log_softmax(logits.float(), -1)
            reference_score = sum(logprobs[k, t].item() for k, t in enumerate(tokens))
            assert outcome.scores[label]["sum"] == pytest.approx(reference_score, abs=1e-4), label


def _run_config(tmp_path: Path, arch: str, model_dir: Path, prepared_demo: Path, session_cache: Path):
    return load_config(None, [
        f"output_dir={tmp_path}", f"run_name={arch}", f"cache_dir={session_cache}", f"model.name_or_path={model_dir}",
        f"data.image_root={prepared_demo}", "lora.r=4", "lora.alpha=8", "lora.dropout=0",
        "train.per_device_batch_size=2", "train.grad_accum=1", "train.lr=1e-3", "train.logging_steps=1",
        "train.save_steps=1", "train.max_steps=2", "train.warmup_ratio=0", "predict.batch_size=2"])


def _losses(run_dir: Path) -> dict[int, float]:
    rows = [json.loads(line) for line in (run_dir / "train_log.jsonl").read_text().splitlines()]
    return {row["step"]: row["loss"] for row in rows if "loss" in row}


@pytest.mark.parametrize("arch", ARCHS)
def test_lora_trains_resumes_saves_loads_and_predicts(arch, family_dirs, prepared_demo, session_cache, tmp_path):
    config = _run_config(tmp_path, arch, family_dirs[arch], prepared_demo, session_cache)
    prepared = config.run_dir / "prepared"
    prepared.mkdir(parents=True)
    write_records(prepared / "train.jsonl", closed_records(prepared_demo, 4))
    write_records(prepared / "test.jsonl", closed_records(prepared_demo, 2))

    straight: TrainResult = train(config)
    assert straight.global_step == 2 and (straight.model_dir / "adapter_config.json").is_file()
    history = _losses(config.run_dir)
    # As if killed after the step-1 checkpoint: the resumed step 2 has the same weights, optimizer state and batch.
    shutil.rmtree(config.run_dir / "checkpoints" / "checkpoint-2")
    resumed = train(config, resume=True)
    assert resumed.resumed_from is not None and resumed.resumed_from.endswith("checkpoint-1")
    assert _losses(config.run_dir)[2] == pytest.approx(history[2], rel=1e-4)

    rows = read_done(run_predict(config, "constrained", quiet=True))  # loads run_dir/model: base + adapter
    records = read_records(prepared / "test.jsonl")
    assert [row["id"] for row in rows] == [record.id for record in records]
    for record, row in zip(records, rows):
        assert row.get("error") is None
        assert_valid_closed(record, row["raw_text"], row["prediction"])
