"""Encoding: image + whole conversation in ONE processor call, answer-only labels, and the batch collator."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from PIL import Image

from surgvqa.core.config import MaskingConfig, PromptConfig
from surgvqa.data.images import is_link_loop, open_rgb, resolve_within
from surgvqa.data.records import Record, image_path
from surgvqa.prompting.chat import render_prompt, render_training, training_target
from surgvqa.prompting.masking import (
    IGNORE_INDEX,
    expected_supervised_text,
    labels_from_offsets,
    shift_for_expansion,
    supervised_char_spans,
)


class SampleTooLong(ValueError):
    """A sample longer than masking.max_length: rejected, never truncated through its image tokens."""


def load_image(record: Record, base_dir: str | Path, *, roots: Sequence[str | Path] | None = None) -> Image.Image:
    """The record's image as RGB, decoded by the same function prepare validated it with.

    The path must resolve (links and ``..`` followed) inside one of ``roots`` — by default ``base_dir``, the
    folder of the JSONL file; stages pass :func:`surgvqa.data.images.allowed_image_roots` — so that a record
    cannot make a stage read, train on or display an arbitrary file. Any problem is a ValueError naming the row.
    """
    allowed = [Path(base_dir)] if roots is None else [Path(root) for root in roots]
    path = image_path(record, base_dir)
    resolved = resolve_within(path, allowed)
    if resolved is None and is_link_loop(path):
        raise ValueError(f"{record.id}: image path {record.image!r} is a symbolic link loop (it leads back to "
                         "itself); point the link at the image file")
    if resolved is None:
        raise ValueError(f"{record.id}: image path {record.image!r} resolves outside the allowed image folders "
                         f"({', '.join(str(root) for root in allowed)})")
    try:
        return open_rgb(resolved)
    except (OSError, ValueError) as exc:
        raise ValueError(f"{record.id}: cannot read image {path} ({exc})") from None


@dataclass
class EncodedExample:
    features: dict[str, torch.Tensor]  # input_ids, attention_mask, labels, pixel_values, image_grid_thw, ...
    target: str  # the answer text the labels teach
    expected_text: str  # what the supervised tokens must decode to
    straddling: list[int] = field(default_factory=list)


def _offsets_and_replacements(encoding: Any) -> tuple[list, list]:
    offsets = encoding.pop("offset_mapping")[0]
    replacements = encoding.pop("text_replacement_offsets", None)
    replacements = replacements[0] if replacements else []
    return offsets.tolist() if hasattr(offsets, "tolist") else offsets, replacements


def encode_example(processor: Any, record: Record, image: Image.Image, prompt: PromptConfig,
                   masking: MaskingConfig) -> EncodedExample:
    """Encode image + whole conversation in one processor call and label the answer tokens only."""
    rendered = render_training(processor, record, prompt, masking.strategy)
    target = training_target(record, prompt)
    encoding = processor(text=[rendered.text], images=[image], return_offsets_mapping=True,
                         return_text_replacement_offsets=True, return_tensors="pt")
    offsets, replacements = _offsets_and_replacements(encoding)
    input_ids = encoding["input_ids"][0]
    if len(input_ids) > masking.max_length:
        image_tokens = int((input_ids == processor.tokenizer.convert_tokens_to_ids(processor.image_token)).sum())
        text_tokens = len(input_ids) - image_tokens
        cause = (f"the text is too long ({text_tokens} text tokens): shorten the question or answer"
                 if text_tokens >= image_tokens else
                 f"the image takes {image_tokens} tokens: lower model.max_pixels")
        raise SampleTooLong(f"{record.id}: {len(input_ids)} tokens exceed masking.max_length={masking.max_length}; "
                            f"{cause}, or raise masking.max_length (samples are never truncated through image "
                            f"tokens)")
    spans = shift_for_expansion(supervised_char_spans(rendered, masking.strategy), replacements)
    token_labels = labels_from_offsets(input_ids.tolist(), offsets, spans)
    features = {key: value[0] if key in ("input_ids", "attention_mask", "mm_token_type_ids") else value
                for key, value in encoding.items()}
    features["labels"] = torch.tensor(token_labels.labels, dtype=torch.long)
    return EncodedExample(features, target, expected_supervised_text(target, masking.strategy),
                          token_labels.straddling)


def encode_prompt(processor: Any, record: Record, image: Image.Image, prompt: PromptConfig,
                  strategy: str) -> dict[str, torch.Tensor]:
    """The inference encoding: the training sequence up to (and excluding) the answer."""
    text = render_prompt(processor, record, prompt, strategy)
    encoding = processor(text=[text], images=[image], return_tensors="pt")
    return {key: value[0] if key in ("input_ids", "attention_mask", "mm_token_type_ids") else value
            for key, value in encoding.items()}


def estimate_length(record: Record, image_tokens: int) -> int:
    """A cheap token-count estimate for length-grouped batching (no image decode, no tokenizer call)."""
    return image_tokens + (len(record.question) + len(record.answer)) // 3 + 40


def collate(features: list[dict[str, torch.Tensor]], pad_token_id: int, padding_side: str = "right") -> dict:
    """Pad token tensors to the longest sample; concatenate pixel patches and grids as Qwen2-VL expects."""
    longest = max(len(item["input_ids"]) for item in features)
    batch: dict[str, Any] = {}
    pad_values = {"input_ids": pad_token_id, "attention_mask": 0, "labels": IGNORE_INDEX, "mm_token_type_ids": 0}
    for key, pad_value in pad_values.items():
        if key not in features[0]:
            continue
        rows = []
        for item in features:
            value = item[key]
            padding = torch.full((longest - len(value),), pad_value, dtype=value.dtype)
            rows.append(torch.cat([value, padding] if padding_side == "right" else [padding, value]))
        batch[key] = torch.stack(rows)
    for key in ("pixel_values", "image_grid_thw"):
        if key in features[0]:
            batch[key] = torch.cat([item[key] for item in features])
    return batch


