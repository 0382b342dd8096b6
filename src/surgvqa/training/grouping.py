"""Image-grouped sequences: one image's questions in one row, the image prefix encoded once.

A row is the shared prefix (system turn, image, and everything before the first question-specific token) followed
by one segment per question. Each segment attends to the prefix and causally to itself (a block mask built with
transformers' own mask helpers) and keeps the 3-D M-RoPE positions it has when alone (the model's own
``get_rope_index`` on the single sample), so each answer's loss and gradients equal the separate sample's to
rounding (``NOTES.md``, "Grouped sequences in transformers"). Every token and label comes from the per-question
encoding (:func:`surgvqa.prompting.encoding.encode_example`): the masking rules are those of per-sample training.
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from surgvqa.core.config import MaskingConfig, PromptConfig
from surgvqa.data.records import Record
from surgvqa.models.families import FAMILIES
from surgvqa.prompting.masking import IGNORE_INDEX
from surgvqa.prompting.shared_prefix import (
    RopeIndex,
    check_image_inside,
    common_prefix_length,
    positions_alone,
    rope_index_of,
    sharing_refusal,
)

PREFIX_SEGMENT = 0  # segment id of the shared prefix; questions are 1, 2, ...; padding is PADDING_SEGMENT
PADDING_SEGMENT = -1



def check_grouping_supported(model_type: str, attn_implementation: str) -> None:
    """Refuse, in one line, the models on which a grouped row is not exactly the separate samples."""
    if refusal := sharing_refusal(model_type, attn_implementation):
        raise ValueError(f"train.group_by_image is not supported: {refusal}; set train.group_by_image=false"
                         + ("" if model_type in FAMILIES and FAMILIES[model_type].linear_attention else
                            " or model.attn_implementation=sdpa"))


def grouped_attention_request(requested: str) -> str:
    """``auto`` would pick flash_attention_2 on a GPU with flash-attn installed, which grouping refuses: sdpa."""
    return "sdpa" if requested == "auto" else requested


def shared_prefix_length(examples: Sequence[dict[str, torch.Tensor]]) -> int:
    """The longest common token prefix of the encodings, ended before any supervised token can be predicted
    from it: the last prefix token predicts the first token of every segment, so that token must be unsupervised
    in every encoding (and each segment keeps at least one token)."""
    limit = min(len(example["input_ids"]) - 1 for example in examples)
    for example in examples:
        supervised = (example["labels"] != IGNORE_INDEX).nonzero()
        limit = min(limit, (int(supervised[0]) if len(supervised) else len(example["labels"])) - 1)
    length = common_prefix_length([example["input_ids"] for example in examples], limit)
    check_image_inside(examples, length)
    return length


def build_rows(examples: Sequence[dict[str, torch.Tensor]], rope_index: RopeIndex,
               max_length: int) -> list[dict[str, torch.Tensor]]:
    """One image's encoded questions (``encode_example(...).features``) as grouped rows of at most ``max_length``
    tokens each: the shared prefix, then the questions' segments in order, a new row (with the prefix again)
    whenever the next segment would not fit. Every row carries the image's pixels, since it encodes the image."""
    if not examples:
        raise ValueError("an image group needs at least one question")
    for example in examples[1:]:  # a row carries one image's pixels: the questions must all be about it
        assert torch.equal(example["image_grid_thw"], examples[0]["image_grid_thw"]) and \
            torch.equal(example["pixel_values"], examples[0]["pixel_values"]), "the questions are not about one image"
    prefix = shared_prefix_length(examples)
    positions = [positions_alone(rope_index, example) for example in examples]
    for position in positions[1:]:
        assert torch.equal(position[:, :prefix], positions[0][:, :prefix]), "the shared prefix has other positions"
    rows: list[list[int]] = [[]]
    used = prefix
    for index, example in enumerate(examples):
        segment = len(example["input_ids"]) - prefix
        if prefix + segment > max_length:  # encode_example rejects such samples; a caller that did not is wrong
            raise ValueError(f"a question of {prefix + segment} tokens exceeds masking.max_length={max_length}")
        if rows[-1] and used + segment > max_length:
            rows.append([])
            used = prefix
        rows[-1].append(index)
        used += segment
    return [_row([examples[i] for i in chosen], [positions[i] for i in chosen], prefix) for chosen in rows]


def _row(examples: Sequence[dict[str, torch.Tensor]], positions: Sequence[torch.Tensor],
         prefix: int) -> dict[str, torch.Tensor]:
    first = examples[0]
    parts = {key: [first[key][:prefix]] for key in ("input_ids", "labels", "mm_token_type_ids")}
    segment_ids = [torch.full((prefix,), PREFIX_SEGMENT, dtype=torch.long)]
    position_parts = [positions[0][:, :prefix]]
    for number, (example, position) in enumerate(zip(examples, positions), start=1):
        for key, values in parts.items():
            values.append(example[key][prefix:])
        segment_ids.append(torch.full((len(example["input_ids"]) - prefix,), number, dtype=torch.long))
        position_parts.append(position[:, prefix:])
    row = {key: torch.cat(values) for key, values in parts.items()}
    row["segment_ids"] = torch.cat(segment_ids)
    row["position_ids"] = torch.cat(position_parts, dim=1)
    row["pixel_values"] = first["pixel_values"]
    row["image_grid_thw"] = first["image_grid_thw"]
    return row


def prefix_or_same_segment(segment_ids: torch.Tensor) -> Callable:
    """A transformers mask function: a key is visible when it is in the shared prefix or in the query's segment
    (combined with causality and padding by the mask helpers)."""

    def visible(batch_idx: Any, head_idx: Any, q_idx: Any, kv_idx: Any) -> Any:
        kv_segment = segment_ids[batch_idx, kv_idx]
        return (kv_segment == PREFIX_SEGMENT) | (kv_segment == segment_ids[batch_idx, q_idx])

    return visible


def grouped_attention_mask(segment_ids: torch.Tensor, attn_implementation: str,
                           dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The (B, 1, L, L) block mask of padded grouped rows: boolean for sdpa; 0 / dtype-min for eager, which adds
    the mask to the scores (a boolean mask there would mask nothing). Padding queries see the prefix, so that no
    row of the softmax is empty (an empty one is NaN in sdpa, and NaN times a zero gradient poisons the weights)."""
    from transformers.masking_utils import and_masks, causal_mask_function, eager_mask, sdpa_mask

    batch, length = segment_ids.shape
    arguments = {"batch_size": batch, "q_length": length, "kv_length": length,
                 "mask_function": and_masks(causal_mask_function, prefix_or_same_segment(segment_ids)),
                 "attention_mask": segment_ids != PADDING_SEGMENT, "device": segment_ids.device}
    if attn_implementation == "sdpa":
        return sdpa_mask(**arguments, allow_is_causal_skip=False)
    if attn_implementation == "eager":
        return eager_mask(**arguments, dtype=dtype)
    raise ValueError(f"train.group_by_image needs model.attn_implementation sdpa or eager, not {attn_implementation}")


def tokens_in_batch(attention_mask: torch.Tensor) -> int:
    """The real (non-padding) tokens of a batch, from a 2-D padding mask or a 4-D grouped mask: in a 4-D mask a
    real token is one that sees itself (padding keys are masked for every query)."""
    if attention_mask.ndim == 2:
        return int(attention_mask.sum())
    diagonal = attention_mask.diagonal(dim1=-2, dim2=-1)
    visible = diagonal if diagonal.dtype == torch.bool else diagonal == 0
    return int(visible.sum())


def collate_rows(rows: Sequence[dict[str, torch.Tensor]], pad_token_id: int, attn_implementation: str,
                 dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
    """Right-pad grouped rows into a batch the model takes as is: explicit (3, B, L) positions (the model would
    otherwise compute them from the mask, which it cannot read when 4-D) and the 4-D block mask."""
    longest = max(len(row["input_ids"]) for row in rows)
    pad_values = {"input_ids": pad_token_id, "labels": IGNORE_INDEX, "mm_token_type_ids": 0,
                  "segment_ids": PADDING_SEGMENT}
    batch: dict[str, torch.Tensor] = {}
    for key, pad_value in pad_values.items():
        batch[key] = torch.stack([torch.cat([row[key], torch.full((longest - len(row[key]),), pad_value,
                                                                   dtype=row[key].dtype)]) for row in rows])
    # Padding positions repeat the last real one: they are never attended to, any value would do.
    batch["position_ids"] = torch.stack([
        torch.cat([row["position_ids"], row["position_ids"][:, -1:].expand(-1, longest - len(row["input_ids"]))],
                  dim=1) for row in rows], dim=1)
    segment_ids = batch.pop("segment_ids")
    batch["attention_mask"] = grouped_attention_mask(segment_ids, attn_implementation, dtype)
    batch["pixel_values"] = torch.cat([row["pixel_values"] for row in rows])
    batch["image_grid_thw"] = torch.cat([row["image_grid_thw"] for row in rows])
    return batch


@dataclass
class GroupedTrainingCollator:
    """Each dataset item is a list of grouped rows (one micro-batch, see :func:`pack_images`): they are padded
    into one batch."""

    pad_token_id: int
    attn_implementation: str
    dtype: torch.dtype = torch.float32

    def __call__(self, items: list[list[dict[str, torch.Tensor]]]) -> dict[str, torch.Tensor]:
        return collate_rows([row for rows in items for row in rows], self.pad_token_id, self.attn_implementation,
                            self.dtype)


def pack_images(question_counts: Sequence[int], questions_per_batch: int, seed: int) -> list[list[int]]:
    """Micro-batches of whole images (indices into ``question_counts``), each holding about
    ``questions_per_batch`` questions: images are added in a seeded random order until the next one would exceed
    it; an image with more questions than that is a micro-batch of its own."""
    order = list(range(len(question_counts)))
    random.Random(seed).shuffle(order)
    batches: list[list[int]] = []
    held = 0
    for index in order:
        if batches and batches[-1] and held + question_counts[index] <= questions_per_batch:
            batches[-1].append(index)
            held += question_counts[index]
        else:
            batches.append([index])
            held = question_counts[index]
    return batches


def grouped_accumulation_steps(questions_per_micro_batch: float, per_device_batch_size: int, grad_accum: int) -> int:
    """Gradient-accumulation steps that keep an optimizer step at about ``per_device_batch_size x grad_accum``
    questions (and with it the number of steps and the learning-rate schedule of per-sample training)."""
    return max(1, round(per_device_batch_size * grad_accum / max(questions_per_micro_batch, 1e-9)))


def mean_questions(batches: Sequence[Sequence[int]], question_counts: Sequence[int]) -> float:
    return sum(question_counts[i] for batch in batches for i in batch) / max(len(batches), 1)


class ImageGroupDataset(torch.utils.data.Dataset):
    """Prepared records grouped by image; each item is one micro-batch of whole images (:func:`pack_images`) as
    grouped rows, encoded lazily (each image read once per item, each question by ``encode_example``)."""

    def __init__(self, records: Sequence[Record], base_dir: str | Path, processor: Any, prompt: PromptConfig,
                 masking: MaskingConfig, rope_index: RopeIndex, questions_per_batch: int, seed: int,
                 image_roots: Sequence[str | Path] | None = None):
        images: dict[tuple[str, str], list[Record]] = {}
        for record in records:
            images.setdefault((record.img_id, record.image), []).append(record)
        self.images = list(images.values())
        self.base_dir = Path(base_dir)
        self.image_roots = image_roots
        self.processor, self.prompt, self.masking, self.rope_index = processor, prompt, masking, rope_index
        self.question_counts = [len(questions) for questions in self.images]
        self.batches = pack_images(self.question_counts, questions_per_batch, seed)

    @property
    def questions_per_item(self) -> float:
        return mean_questions(self.batches, self.question_counts)

    def __len__(self) -> int:
        return len(self.batches)

    def encoded_image(self, index: int) -> list[dict[str, torch.Tensor]]:
        from surgvqa.prompting.encoding import encode_example, load_image

        questions = self.images[index]
        image = load_image(questions[0], self.base_dir, roots=self.image_roots)
        return [encode_example(self.processor, record, image, self.prompt, self.masking).features
                for record in questions]

    def __getitem__(self, index: int) -> list[dict[str, torch.Tensor]]:
        return [row for image in self.batches[index]
                for row in build_rows(self.encoded_image(image), self.rope_index, self.masking.max_length)]


def per_answer_losses(model: Any, batch: dict[str, torch.Tensor]) -> list[torch.Tensor]:
    """Each answer's summed cross-entropy in ``batch`` (one entry per maximal run of supervised labels, in row
    order): the figure that must not change between a grouped row and the separate samples. The LM head runs on
    the supervised positions only, as in training (``logits_to_keep`` as a boolean mask)."""
    shifted = batch["labels"][:, 1:]
    supervised = shifted != IGNORE_INDEX
    keep = torch.zeros_like(batch["labels"], dtype=torch.bool)
    keep[:, :-1] = supervised
    inputs = {key: value for key, value in batch.items() if key != "labels"}
    logits = model(**inputs, logits_to_keep=keep, use_cache=False).logits.float()
    token_losses = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), shifted[supervised],
                                                     reduction="none")
    answer_lengths = []
    for row in supervised.tolist():
        run = 0
        for flag in [*row, False]:
            if flag:
                run += 1
            elif run:
                answer_lengths.append(run)
                run = 0
    return [losses.sum() for losses in torch.split(token_losses, answer_lengths)]


def grouped_max_abs_loss_diff(model: Any, image_examples: Sequence[Sequence[dict[str, torch.Tensor]]],
                              pad_token_id: int, attn_implementation: str, max_length: int) -> float:
    """The largest difference between an answer's loss in its image's grouped rows and its loss alone, over the
    given images (each a list of per-question encodings)."""
    from surgvqa.prompting.encoding import collate

    rope_index = rope_index_of(model)
    dtype = next(model.parameters()).dtype
    largest = 0.0
    with torch.no_grad():
        for examples in image_examples:
            alone = [loss for example in examples
                     for loss in per_answer_losses(model, collate([example], pad_token_id))]
            grouped = [loss for row in build_rows(examples, rope_index, max_length)
                       for loss in per_answer_losses(model, collate_rows([row], pad_token_id, attn_implementation,
                                                                         dtype))]
            if len(alone) != len(grouped):
                return math.inf  # an answer was split or merged: as wrong as a grouping can be
            largest = max([largest, *(abs(float(a - b)) for a, b in zip(alone, grouped))])
    return largest
