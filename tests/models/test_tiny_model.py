"""The tiny offline checkpoint must look like Qwen2-VL-Instruct everywhere except the weights."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
import transformers
from PIL import Image

from surgvqa.models.tiny import (
    build_tiny_model,
    chat_template,
    ensure_tiny_model,
    tiny_model_dirname,
)

SPECIAL_IDS = {
    "<|endoftext|>": 151643,
    "<|im_start|>": 151644,
    "<|im_end|>": 151645,
    "<|object_ref_start|>": 151646,
    "<|object_ref_end|>": 151647,
    "<|box_start|>": 151648,
    "<|box_end|>": 151649,
    "<|quad_start|>": 151650,
    "<|quad_end|>": 151651,
    "<|vision_start|>": 151652,
    "<|vision_end|>": 151653,
    "<|vision_pad|>": 151654,
    "<|image_pad|>": 151655,
    "<|video_pad|>": 151656,
}

CONVERSATION = [
    {"role": "system", "content": [{"type": "text", "text": "You are a helpful assistant."}]},
    {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is this?"}]},
    {"role": "assistant", "content": [{"type": "text", "text": "A polyp."}]},
]
EXPECTED_CHAT = (
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
    "<|im_start|>user\n<|vision_start|><|image_pad|><|vision_end|>What is this?<|im_end|>\n"
    "<|im_start|>assistant\nA polyp.<|im_end|>\n"
)


@pytest.fixture(scope="module")
def qwen2_vl_dir(tmp_path_factory) -> Path:
    os.environ["HF_HUB_OFFLINE"] = "1"
    return build_tiny_model(tmp_path_factory.mktemp("tiny") / "qwen2_vl", arch="qwen2_vl", seed=0)


@pytest.fixture(scope="module")
def qwen2_5_vl_dir(tmp_path_factory) -> Path:
    os.environ["HF_HUB_OFFLINE"] = "1"
    return build_tiny_model(tmp_path_factory.mktemp("tiny") / "qwen2_5_vl", arch="qwen2_5_vl", seed=0)


@pytest.fixture(scope="module")
def processor(qwen2_vl_dir):
    return transformers.AutoProcessor.from_pretrained(qwen2_vl_dir)


@pytest.fixture(scope="module")
def image() -> Image.Image:
    generator = torch.Generator().manual_seed(0)
    pixels = torch.randint(0, 256, (224, 224, 3), generator=generator, dtype=torch.uint8)
    return Image.fromarray(pixels.numpy(), mode="RGB")


def test_tokenizer_is_the_real_qwen2_vocabulary(qwen2_vl_dir):
    tokenizer = transformers.AutoTokenizer.from_pretrained(qwen2_vl_dir)
    assert tokenizer("Hello, world").input_ids == [9707, 11, 1879]
    assert {t: tokenizer.convert_tokens_to_ids(t) for t in SPECIAL_IDS} == SPECIAL_IDS
    assert len(tokenizer) == 151657
    # Qwen2-VL-Instruct: a turn ends with <|im_end|>, padding is <|endoftext|>, no BOS is prepended.
    assert (tokenizer.eos_token, tokenizer.eos_token_id) == ("<|im_end|>", 151645)
    assert (tokenizer.pad_token, tokenizer.pad_token_id) == ("<|endoftext|>", 151643)
    assert tokenizer.bos_token is None
    assert tokenizer("<|im_start|>user\n5mm").input_ids == [151644, 872, 198, 20, 3821]


def test_chat_template_is_official_and_saved(qwen2_vl_dir, processor):
    assert "{% set image_count = namespace(value=0) %}" in chat_template()
    assert "add_vision_id" in chat_template()
    assert (qwen2_vl_dir / "chat_template.jinja").read_text(encoding="utf-8") == chat_template()
    assert processor.chat_template == chat_template()
    assert transformers.AutoTokenizer.from_pretrained(qwen2_vl_dir).chat_template == chat_template()


def test_chat_template_renders_like_qwen2_vl_instruct(qwen2_vl_dir, processor):
    tokenizer = transformers.AutoTokenizer.from_pretrained(qwen2_vl_dir)
    for renderer in (processor, tokenizer):
        assert renderer.apply_chat_template(CONVERSATION, tokenize=False) == EXPECTED_CHAT
        prompt = renderer.apply_chat_template(CONVERSATION[:2], tokenize=False, add_generation_prompt=True)
        assert prompt == EXPECTED_CHAT.split("<|im_start|>assistant\n")[0] + "<|im_start|>assistant\n"

    # No system message: the official template inserts the default one.
    no_system = processor.apply_chat_template(CONVERSATION[1:2], tokenize=False, add_generation_prompt=True)
    assert no_system == (
        "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
        "<|im_start|>user\n<|vision_start|><|image_pad|><|vision_end|>What is this?<|im_end|>\n"
        "<|im_start|>assistant\n"
    )
    numbered = processor.apply_chat_template(CONVERSATION[1:2], tokenize=False, add_vision_id=True)
    assert "<|im_start|>user\nPicture 1: <|vision_start|>" in numbered


def test_processor_expands_image_tokens(processor, image):
    prompt = processor.apply_chat_template(CONVERSATION[:2], tokenize=False, add_generation_prompt=True)
    batch = processor(text=[prompt], images=[image], return_tensors="pt")
    assert batch["image_grid_thw"].tolist() == [[1, 16, 16]]
    merge = processor.image_processor.merge_size
    expected_pads = int(batch["image_grid_thw"].prod()) // merge**2
    assert expected_pads == 64
    assert int((batch["input_ids"] == SPECIAL_IDS["<|image_pad|>"]).sum()) == expected_pads
    assert batch["pixel_values"].shape == (256, 3 * 2 * 14 * 14)
    assert "mm_token_type_ids" in batch


def _forward_backward_generate(model, processor, image):
    prompt = processor.apply_chat_template(CONVERSATION[:2], tokenize=False, add_generation_prompt=True)
    batch = processor(text=[prompt + "A polyp.<|im_end|>\n"], images=[image], return_tensors="pt")

    model.train()
    model.zero_grad()
    out = model(**batch, labels=batch["input_ids"])
    assert torch.isfinite(out.loss)
    # Random init near uniform over the vocabulary: loss ~ ln(151657) = 11.9, neither collapsed nor exploding.
    assert 8.0 < out.loss.item() < 16.0
    out.loss.backward()
    named_grads = {n: p.grad for n, p in model.named_parameters() if p.requires_grad}
    assert all(g is not None and torch.isfinite(g).all() for g in named_grads.values())
    assert any("visual" in n and g.abs().sum() > 0 for n, g in named_grads.items())

    model.eval()
    prompt_batch = processor(text=[prompt], images=[image], return_tensors="pt")
    with torch.no_grad():
        generated = model.generate(**prompt_batch, max_new_tokens=3)
    n_prompt = prompt_batch["input_ids"].shape[1]
    assert n_prompt < generated.shape[1] <= n_prompt + 3


def test_qwen2_vl_loads_trains_and_generates(qwen2_vl_dir, processor, image):
    model = transformers.Qwen2VLForConditionalGeneration.from_pretrained(qwen2_vl_dir)
    n_params = sum(p.numel() for p in model.parameters())
    assert 8_000_000 < n_params < 12_000_000
    assert model.generation_config.do_sample is False
    assert model.generation_config.eos_token_id == [151645, 151643]
    assert model.generation_config.pad_token_id == 151643
    _forward_backward_generate(model, processor, image)

    auto = transformers.AutoModelForImageTextToText.from_pretrained(qwen2_vl_dir)
    assert type(auto) is transformers.Qwen2VLForConditionalGeneration


def test_qwen2_5_vl_loads_trains_and_generates(qwen2_5_vl_dir, image):
    processor = transformers.AutoProcessor.from_pretrained(qwen2_5_vl_dir)
    assert type(processor).__name__ == "Qwen2_5_VLProcessor"
    assert processor.tokenizer("Hello, world").input_ids == [9707, 11, 1879]
    assert processor.apply_chat_template(CONVERSATION, tokenize=False) == EXPECTED_CHAT
    model = transformers.Qwen2_5_VLForConditionalGeneration.from_pretrained(qwen2_5_vl_dir)
    _forward_backward_generate(model, processor, image)

    auto = transformers.AutoModelForImageTextToText.from_pretrained(qwen2_5_vl_dir)
    assert type(auto) is transformers.Qwen2_5_VLForConditionalGeneration


def test_same_seed_gives_identical_weights(qwen2_vl_dir, tmp_path):
    again = build_tiny_model(tmp_path / "again", arch="qwen2_vl", seed=0)
    assert (again / "model.safetensors").read_bytes() == (qwen2_vl_dir / "model.safetensors").read_bytes()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary directory left behind


def test_ensure_tiny_model_builds_once(tmp_path, monkeypatch):
    from surgvqa.models import tiny

    calls = []
    real_build = tiny.build_tiny_model

    def counting_build(*args, **kwargs):
        calls.append(kwargs)
        return real_build(*args, **kwargs)

    monkeypatch.setattr(tiny, "build_tiny_model", counting_build)
    first = ensure_tiny_model(tmp_path, arch="qwen2_vl", seed=3, min_pixels=3136, max_pixels=50176)
    second = ensure_tiny_model(tmp_path, arch="qwen2_vl", seed=3, min_pixels=3136, max_pixels=50176)
    assert first == second == tmp_path / tiny_model_dirname("qwen2_vl", 3, 3136, 50176)
    assert len(calls) == 1
    assert "seed3" in first.name and "qwen2_vl" in first.name


def test_unknown_arch_is_rejected(tmp_path):
    with pytest.raises(ValueError, match="unknown arch"):
        build_tiny_model(tmp_path / "x", arch="llava")
    assert not list(tmp_path.iterdir())


@pytest.mark.parametrize("arch", ["qwen3_vl", "qwen3_5"])
def test_qwen3_templates_are_the_published_bytes(arch):
    import hashlib
    import re

    header, published = chat_template(arch).split("\n", 1)
    digest = re.search(r"sha256 ([0-9a-f]{64})", header).group(1)
    assert hashlib.sha256(published.encode("utf-8")).hexdigest() == digest
    assert header.startswith("{#-") and header.endswith("-#}")  # a Jinja comment: renders as nothing


def test_qwen3_tokenizer_adds_qwen3_tokens_and_renders_each_template():
    from surgvqa.models.tiny import build_tokenizer

    tokenizer = build_tokenizer("qwen3_vl")
    assert len(tokenizer) == 151669
    assert tokenizer.convert_tokens_to_ids(["<tool_call>", "<think>", "</think>"]) == [151657, 151667, 151668]
    assert {t: tokenizer.convert_tokens_to_ids(t) for t in SPECIAL_IDS} == SPECIAL_IDS
    assert tokenizer("Hello, world").input_ids == [9707, 11, 1879]
    assert tokenizer("<think>\n\n</think>\n\nyes").input_ids == [151667, 271, 151668, 271, 9693]
    # Qwen3-VL-Instruct: no default system prompt, no think block.
    assert tokenizer.apply_chat_template(CONVERSATION[1:], tokenize=False) == EXPECTED_CHAT.split(
        "<|im_end|>\n", 1)[1]
    # Qwen3.5: the generation prompt thinks unless told not to; the training render closes an empty block.
    qwen3_5 = chat_template("qwen3_5")
    prompt = tokenizer.apply_chat_template(CONVERSATION[1:2], chat_template=qwen3_5, tokenize=False,
                                           add_generation_prompt=True)
    assert prompt.endswith("<|im_start|>assistant\n<think>\n")
    no_thinking = tokenizer.apply_chat_template(CONVERSATION[1:2], chat_template=qwen3_5, tokenize=False,
                                                add_generation_prompt=True, enable_thinking=False)
    full = tokenizer.apply_chat_template(CONVERSATION[1:], chat_template=qwen3_5, tokenize=False)
    assert no_thinking.endswith("<|im_start|>assistant\n<think>\n\n</think>\n\n")
    assert full == no_thinking + "A polyp.<|im_end|>\n"
